"""``"int4"``: W4A16, per-group scales, asymmetric (zero points) or symmetric.

Each group's scale and zero point are searched to minimize a weighted reconstruction error, with
no calibration data (``rtn=True``: plain min/max round-to-nearest instead). Calibrates from the
float weight in ``process_weights_after_loading`` into the W4A16 runtime
layout (see ``kernels/w4a16.py``); runs ``torch.ops.pymllm_fx.w4a16_linear``. When the input
size is not a multiple of the group size, the last group is shorter (a tail group) rather than
the layer falling back to another group size; ``explain()`` shows the tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

from pymllm_fx.kernels.w4a16 import PACK_FACTOR, SYMMETRIC_ZERO, num_groups, pack_int4, pack_words
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import FusedMoEMethodBase, create_float_experts, expert_chunks, run_int4_experts
from pymllm_fx.layers.parameter import create_float_weight, replace_parameters
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.methods.common import check_config_keys, check_finite, config_bool, config_int, read_int4

GROUP_SIZES = (32, 64, 128)


# The default quantizer tries these shrinks of each group's range (min/max first) and keeps the one
# with the least weighted reconstruction error; see _grid_error for the weighting.
SHRINKS = tuple(1 - i / 50 for i in range(16))  # 1.0, 0.98, ..., 0.70
_SLAB = 1 << 24  # float32 elements of weight searched at a time: bounds the scratch to a few slabs


def quantize_int4(
    weight: torch.Tensor, group_size: int, sym: bool, rtn: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(N, K)`` float -> (codes 0..15 ``(N, K)`` uint8, scales ``(N, G)``, zeros ``(N, G)`` or None).

    By default each group's grid is searched (:func:`search_int4_grid`); ``rtn=True`` is plain
    min/max round-to-nearest. Either way codes are the nearest level of the chosen grid.
    Scales and zeros come back in the weight's dtype.
    """
    if rtn:
        return _round_to_nearest(weight, group_size, sym)
    n, k = weight.shape
    groups = num_groups(k, group_size)
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, groups, dtype=weight.dtype, device=weight.device)
    zeros = None if sym else torch.empty(n, groups, dtype=weight.dtype, device=weight.device)
    rows = max(1, _SLAB // (groups * group_size))
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        w = F.pad(weight[part].float(), (0, groups * group_size - k)).view(-1, groups, group_size)
        s, z = search_int4_grid(w, sym, weight.dtype)
        q = (torch.round(w / s[..., None]) + z[..., None]).clamp(0, 15)
        codes[part] = q.reshape(-1, groups * group_size)[:, :k].to(torch.uint8)
        scales[part] = s.to(weight.dtype)
        if not sym:
            zeros[part] = z.to(weight.dtype)
    return codes, scales, zeros


def search_int4_grid(w: torch.Tensor, sym: bool, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Groups ``(R, G, S)`` float32 -> (scales, zero points) ``(R, G)`` float32 that minimize each
    group's weighted reconstruction error over :data:`SHRINKS` of its min/max range.

    Asymmetric: the range ``shrink * [min(w, 0), max(w, 0)]``, whose integer zero point is min/max's
    for every shrink (so it stays in 0..15, and zero-padding a tail group costs no error).
    Symmetric: scale ``shrink * absmax / 7`` with zero point 8 (a shrink of 7/8 puts a negative
    extreme on -8). Shrink 1 is min/max itself, so no group ends up worse than round-to-nearest.
    Each scale is judged as it will be stored in ``dtype``, so the codes fit the stored scale.
    """
    tiny = torch.finfo(torch.float32).tiny
    if sym:
        full = (w.abs().amax(dim=-1) / 7).clamp(min=tiny)
        z = torch.full_like(full, SYMMETRIC_ZERO)
    else:
        w_min, w_max = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        full = ((w_max - w_min) / 15).clamp(min=tiny)
        z = torch.round(-w_min / full).clamp(0, 15)
    importance = w.abs() + 0.5 * w.square().mean(dim=-1, keepdim=True).sqrt()
    scratch = torch.empty_like(w)
    best_err, best_s = None, None
    for shrink in SHRINKS:
        s = _stored(full * shrink, dtype)
        err = _grid_error(w, importance, s, z, scratch)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return best_s, z


def _stored(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales as they will be stored in ``dtype``, back in float32 and never 0 (a 0 would divide)."""
    tiny = torch.finfo(torch.float32).tiny
    return scales.clamp(min=tiny).to(dtype).float().clamp(min=tiny)


def _grid_error(w, importance, s, z, scratch) -> torch.Tensor:
    """Per group, sum of ``importance * (dequantized - w)^2`` on the grid (s, z), in place in scratch.

    The weighting ``|w| + rms(group) / 2`` counts an error on a large weight more than the same
    error on a small one. Plain MSE clips the tails, and on SmolLM2-135M that is worse than min/max
    (KL to fp +19 %): large weights carry the outlier channels. This weighting gave the least KL
    among those tried (README, "Measured").
    """
    torch.div(w, s[..., None], out=scratch)
    scratch.round_().add_(z[..., None]).clamp_(0, 15).sub_(z[..., None]).mul_(s[..., None]).sub_(w)
    return scratch.square_().mul_(importance).sum(dim=-1)


def _round_to_nearest(
    weight: torch.Tensor, group_size: int, sym: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Plain min/max round-to-nearest (``rtn=True``).

    Each asymmetric group's range is widened to include 0 (as GPTQ does), so its integer zero point
    always lies in 0..15: a group of all-positive weights keeps full accuracy instead of clamping.
    Because the range includes 0, zero-padding a tail group to a full group leaves its statistics
    unchanged.
    """
    n, k = weight.shape
    groups = num_groups(k, group_size)
    w = F.pad(weight.float(), (0, groups * group_size - k)).view(n, groups, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if sym:
        scales = (w.abs().amax(dim=-1) / 7).clamp(min=tiny)
        q = torch.round(w / scales[..., None]).clamp(-8, 7) + SYMMETRIC_ZERO
        zeros = None
    else:
        w_min, w_max = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scales = ((w_max - w_min) / 15).clamp(min=tiny)
        zero_points = torch.round(-w_min / scales).clamp(0, 15)
        q = (torch.round(w / scales[..., None]) + zero_points[..., None]).clamp(0, 15)
        zeros = zero_points.to(weight.dtype)
    codes = q.reshape(n, groups * group_size)[:, :k].to(torch.uint8)
    return codes, scales.to(weight.dtype), zeros


@dataclass
class Int4LinearMethod(LinearMethodBase):
    """4-bit weights in groups of ``group_size`` input features; activations stay float.
    ``rtn=True`` picks each group's grid by min/max instead of searching it."""

    group_size: int = 128
    sym: bool = False
    rtn: bool = False

    name = "int4"

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4: group_size {self.group_size} is not supported; use one of {GROUP_SIZES}")

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: List[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        if input_size_per_partition % PACK_FACTOR:
            raise ValueError(
                f"{getattr(layer, 'prefix', '') or 'layer'}: int4 packs {PACK_FACTOR} input features per "
                f"int32, but in_features={input_size_per_partition} is not a multiple of {PACK_FACTOR}; "
                f"skip this layer or use int8"
            )
        if input_size != input_size_per_partition and input_size_per_partition % self.group_size:
            raise ValueError(
                f"{getattr(layer, 'prefix', '') or 'layer'}: row-parallel int4 gives each rank whole groups, but this "
                f"rank's {input_size_per_partition} of {input_size} input features are not a multiple of "
                f"group_size={self.group_size}; use a tensor-parallel size that divides {input_size} into multiples "
                f"of {self.group_size}, a smaller group_size, or skip this layer"
            )
        create_float_weight(layer, input_size_per_partition, output_partition_sizes, params_dtype, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        check_finite(getattr(layer, "prefix", "") or "layer", "weight", layer.weight.data)  # else NaN scales
        codes, scales, zeros = quantize_int4(layer.weight.data, self.group_size, self.sym, self.rtn)
        replace_parameters(
            layer, ("weight",), {"qweight": pack_int4(codes), "scales": scales, "zeros": zeros}
        )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.pymllm_fx.w4a16_linear(x, layer.qweight, layer.scales, layer.zeros, self.group_size, bias)

    def experts_method(self) -> "Int4MoEMethod":
        return Int4MoEMethod(self.group_size, self.sym, self.rtn)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        # GPTQ-calibrated int4 may hold an act-order ``perm``
        return read_int4(layer, where, self.group_size, self.group_size, per_row=False, perm=getattr(layer, "perm", None))

    def describe(self, layer: torch.nn.Module) -> str:
        k = layer.input_size_per_partition
        tail = k % self.group_size
        text = f"W4A16 g{self.group_size} {'sym' if self.sym else 'asym'}{' rtn' if self.rtn else ''}"
        return text + (f" (tail group {tail})" if tail else "")

    @classmethod
    def from_config(cls, config: dict) -> "Int4LinearMethod":
        check_config_keys(cls.name, config, ("group_size", "sym", "bits", "rtn"))
        if config_int(cls.name, config, "bits", 4) != 4:
            raise ValueError(f"int4: bits must be 4, got {config['bits']}")
        return cls(group_size=config_int(cls.name, config, "group_size", 128), sym=config_bool(cls.name, config, "sym", False),
                   rtn=config_bool(cls.name, config, "rtn", False))


@dataclass
class Int4MoEMethod(FusedMoEMethodBase):
    """Experts in 4 bits, as the linear method calibrates them, in the grouped kernel's layout:
    ``qweight`` ``(E, N, K // 8)`` packed along K in plain order (``kernels/moe.py``)."""

    group_size: int = 128
    sym: bool = False
    rtn: bool = False

    name = "int4"

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs: Any) -> None:
        for what, k in (("hidden size", hidden_size), ("expert intermediate size", intermediate_size_per_partition)):
            if k % PACK_FACTOR:
                raise ValueError(f"{getattr(layer, 'prefix', '') or 'experts'}: int4 packs {PACK_FACTOR} input features "
                                 f"per int32, but the {what} {k} is not a multiple of {PACK_FACTOR}; use int8")
        if getattr(layer, "tp_size", 1) > 1 and intermediate_size_per_partition % self.group_size:
            raise ValueError(
                f"{getattr(layer, 'prefix', '') or 'experts'}: the down projection's groups must lie within one "
                f"tensor-parallel rank, but this rank's {intermediate_size_per_partition} intermediate features are "
                f"not a multiple of group_size={self.group_size}; use a smaller group_size or tensor-parallel size")
        create_float_experts(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                             extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for which in ("w13", "w2"):
            weight = getattr(layer, which + "_weight").data
            check_finite(getattr(layer, "prefix", "") or "experts", which + "_weight", weight)
            experts, n, k = weight.shape
            packed, scales, zeros = [], [], []
            for part in expert_chunks(experts, n, k):
                codes, s, z = quantize_int4(weight[part].reshape(-1, k), self.group_size, self.sym, self.rtn)
                packed.append(pack_words(codes, 4).view(-1, n, k // PACK_FACTOR))
                scales.append(s.view(-1, n, s.shape[-1]))
                zeros.append(None if z is None else z.view(-1, n, z.shape[-1]))
            replace_parameters(layer, (which + "_weight",), {
                which + "_qweight": torch.cat(packed), which + "_scales": torch.cat(scales),
                which + "_zeros": None if self.sym else torch.cat(zeros),
            })

    def apply(self, layer, x, topk_ids, topk_weights) -> torch.Tensor:
        return run_int4_experts(layer, x, topk_ids, topk_weights, self.group_size)

    def describe(self, layer: torch.nn.Module) -> str:
        return f"W4A16 g{self.group_size} {'sym' if self.sym else 'asym'}{' rtn' if self.rtn else ''}, {layer.num_experts} experts"
