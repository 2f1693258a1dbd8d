"""Mixture-of-experts layers that hold a quant_method: the experts' counterpart of ``linear.py``.

transformers 5 keeps a MoE block's experts in one module with stacked 3-D weights,
``gate_up_proj`` ``(E, 2I, H)`` (or ``up_proj`` ``(E, I, H)`` without a gate) and ``down_proj``
``(E, H, I)`` (both transposed when ``is_transposed``), and calls it as
``experts(hidden_states, top_k_index, top_k_weights)``. ``FusedMoE`` takes that module's place
with the same call. Its method's grouped kernels run every token through its k experts; the
model's own gate function (SiLU-and-multiply, gpt-oss's clamped and interleaved variant) runs
between the two GEMMs, so no architecture needs code here.

Parameter names follow vLLM: ``w13_*`` is the gate and up projections stacked ``(E, 2I, H)`` in the
module's own row order, ``w2_*`` the down projection ``(E, H, I)``.

Tensor parallelism splits every expert's intermediate dimension: a rank holds its slice of the gate
rows and the same slice of the up rows (or a contiguous run of an interleaved gate/up), and the
matching columns of the down projection; the partial outputs are all-reduced, the down bias
added on rank 0 only.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from pymllm_fx.kernels.w4a16 import unpack_words
from pymllm_fx.layers.all_reduce import AllReduce, all_reduce
from pymllm_fx.layers.checkpoint_view import Quantized, zero_points
from pymllm_fx.layers.parameter import holds_values, load_expert, register_param, replace_parameters, set_weight_attrs
from pymllm_fx.layers.quantize_base import QuantizeMethodBase

# What a transformers experts module says about itself (set by ``@use_experts_implementation``).
_FLAGS = ("has_gate", "has_bias", "is_transposed")


class FusedMoEMethodBase(QuantizeMethodBase):
    """How a quantization method stores and runs a layer's experts (vLLM's FusedMoEMethodBase).

    ``create_weights`` registers the ``w13_*`` and ``w2_*`` tensors with ``weight_loader``
    attributes; ``process_weights_after_loading`` calibrates or repacks them; ``apply`` runs the
    experts of every token (usually through :func:`run_experts` with the method's grouped GEMM).
    """

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:
        """``x`` ``(T, H)``, each token's experts and routing weights ``(T, k)`` -> ``(T, H)``."""
        raise NotImplementedError

    def describe(self, layer: nn.Module) -> str:
        return ""

    def checkpoint_expert_view(self, layer: nn.Module, which: str, expert: int, where: str = "") -> Quantized:
        """One expert's ``which`` ("w13": gate and up rows, "w2": down) in checkpoint terms (the
        optional save hook of ``quantize_base.py``). The experts layouts keep the checkpoint's groups
        (int4) and scales (8-bit), so the stacks are read as they are; a method whose checkpoint
        says more (fp8 block or per-tensor scales) overrides this."""
        where = where or layer.prefix or "experts"
        qweight = getattr(layer, which + "_qweight").data[expert]
        scales = getattr(layer, which + "_scales").data[expert]
        if qweight.dtype == torch.int32:  # the int4 experts layout: codes packed along K, plain order
            zeros = getattr(layer, which + "_zeros")
            zeros = None if zeros is None else zero_points(zeros.data[expert], where, which + "_zeros")
            return Quantized("int4", unpack_words(qweight, 4), scales, zeros, self.group_size)  # -1: one group per row
        if qweight.dtype == torch.int8:
            return Quantized("int8", qweight, scales)
        return Quantized("fp8", qweight, scales)


def experts_contract(module: nn.Module) -> Optional[str]:
    """Why ``module`` is not an experts module this layer can replace, or None when it is: the
    stacked weights and the flags of transformers' experts interface, read from the module."""
    missing = [flag for flag in _FLAGS if not isinstance(getattr(module, flag, None), bool)]
    if missing:
        return (f"{type(module).__name__} does not declare transformers' experts interface ({', '.join(missing)} "
                f"unset), so its forward is unknown")
    if getattr(module, "_is_expert_parallel", False):
        return "it is expert-parallel"
    if getattr(module, "has_post_expert_norm", False) and not isinstance(getattr(module, "post_expert_norm", None), nn.Module):
        return "it declares a post-expert norm but holds none"
    first = "gate_up_proj" if module.has_gate else "up_proj"
    names = [first, "down_proj"] + ([first + "_bias", "down_proj_bias"] if module.has_bias else [])
    tensors = [getattr(module, name, None) for name in names]
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return f"it lacks one of {', '.join(names)}"
    up, down = tensors[0], tensors[1]
    if up.dim() != 3 or down.dim() != 3 or up.shape[0] != down.shape[0]:
        return f"{first} {tuple(up.shape)} and down_proj {tuple(down.shape)} are not stacks of one matrix per expert"
    num, hidden, inter = expert_shape(module)
    rows = 2 * inter if module.has_gate else inter
    want_up = (num, hidden, rows) if module.is_transposed else (num, rows, hidden)
    want_down = (num, inter, hidden) if module.is_transposed else (num, hidden, inter)
    if tuple(up.shape) != want_up or tuple(down.shape) != want_down:
        return f"{first} {tuple(up.shape)} and down_proj {tuple(down.shape)} do not chain (hidden {hidden}, intermediate {inter})"
    if not up.dtype.is_floating_point or up.dtype != down.dtype:
        return f"its weights are {up.dtype} and {down.dtype}, not one float dtype"
    return None


def expert_shape(module: nn.Module):
    """``(experts, hidden, intermediate)`` of a transformers experts module."""
    down = module.down_proj
    num = int(down.shape[0])
    hidden, inter = (int(down.shape[2]), int(down.shape[1])) if module.is_transposed else (int(down.shape[1]), int(down.shape[2]))
    return num, hidden, inter


class FusedMoE(nn.Module):
    """The experts of one MoE block, run by ``quant_method`` (a ``FusedMoEMethodBase``)."""

    all_reduce_with: Optional[AllReduce] = None  # None: the functional collective (see layers/all_reduce.py)

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        quant_method: FusedMoEMethodBase,
        params_dtype: torch.dtype,
        has_gate: bool = True,
        has_bias: bool = False,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
        process_group: Optional[object] = None,
    ) -> None:
        """``intermediate_size``: this rank's share of each expert's intermediate dimension."""
        super().__init__()
        self.tp_rank, self.tp_size, self.process_group = tp_rank, tp_size, process_group
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = intermediate_size
        self.params_dtype = params_dtype
        self.has_gate = has_gate
        self.has_bias = has_bias
        self.prefix = prefix
        self.quant_method = quant_method
        self._gate: Optional[Callable] = None  # the replaced class's _apply_gate, called with this layer
        quant_method.create_weights(self, num_experts, hidden_size, intermediate_size, params_dtype,
                                    weight_loader=load_expert)
        rows = (2 if has_gate else 1) * intermediate_size
        for name, size in (("w13_bias", rows), ("w2_bias", hidden_size)):
            if has_bias:
                register_param(self, name, torch.empty(num_experts, size, dtype=params_dtype), {"output_dim": 1},
                               {"weight_loader": load_expert})
            else:
                self.register_parameter(name, None)

    def adopt(self, experts: nn.Module) -> None:
        """Take the replaced module's gate function and what it reads: its child modules (``act_fn``,
        ``post_expert_norm``) and plain attributes (gpt-oss's ``alpha`` and ``limit``)."""
        for name, child in experts.named_children():
            self.add_module(name, child)
        for key, value in vars(experts).items():
            if not key.startswith("_") and key not in self.__dict__ and not isinstance(value, (torch.Tensor, nn.Module)):
                self.__dict__[key] = value
        self._gate = getattr(type(experts), "_apply_gate", None) if self.has_gate else None
        if not getattr(experts, "has_post_expert_norm", False):
            self._modules.pop("post_expert_norm", None)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """``(S, 2I)`` gate-and-up outputs -> ``(S, I)``, as the replaced module computes it."""
        if self._gate is not None:
            return self._gate(self, h)
        if self.has_gate:
            gate, up = h.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, hidden_states, top_k_index, top_k_weights)
        if self.process_group is not None and self.tp_size > 1:
            out = all_reduce(out, self.process_group, self.all_reduce_with)
        return out

    def _apply(self, fn, recurse=True):
        """A cast (``.half()``) changes the float tensors that hold values in the layer's dtype
        (scales and zero points of int4, biases, float weights) and ``params_dtype``; never stored
        codes (integers, e4m3) nor the float32 scales the 8-bit kernels read."""
        params = {name: p for name, p in self._parameters.items() if p is not None}
        eight_bit = any(p.element_size() == 1 for p in params.values())
        fixed = {id(p) for name, p in params.items()
                 if not holds_values(p) or (eight_bit and name.endswith("_scales"))}

        def cast(t):
            out = fn(t)
            return t.to(device=out.device) if out.dtype != t.dtype and id(t) in fixed else out

        probe = fn(torch.empty(0, dtype=self.params_dtype))
        result = super()._apply(cast, recurse)
        if probe.is_floating_point():
            self.params_dtype = probe.dtype
        return result

    def float_bytes(self) -> int:
        """What the replaced module's float weights (and biases) took."""
        rows = (2 if self.has_gate else 1) * self.intermediate_size_per_partition
        per_expert = 2 * rows * self.hidden_size + (rows + self.hidden_size if self.has_bias else 0)
        return self.num_experts * per_expert * torch.empty((), dtype=self.params_dtype).element_size()

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size_per_partition}, method={getattr(self.quant_method, 'name', '')}")


GroupedGemm = Callable[[torch.Tensor, str, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def run_experts(layer: FusedMoE, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                gemm: GroupedGemm) -> torch.Tensor:
    """The expert computation every method shares. ``gemm(inputs, "w13" | "w2", topk_ids, weights)``
    is the method's grouped GEMM: rows of ``inputs`` (``(T, K)``, one per token, or ``(T*k, K)``, one
    per token-expert pair) times each pair's expert, ``(T*k, N)``, scaled by ``weights`` if given.
    The routing weight rides in the second GEMM unless a bias or a post-expert norm comes first."""
    tokens, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    h = gemm(x, "w13", topk_ids, None)
    if layer.w13_bias is not None:
        h = h + layer.w13_bias[flat_ids]
    h = layer.activate(h)
    norm = layer._modules.get("post_expert_norm")
    weights_inside = layer.w2_bias is None and norm is None
    out = gemm(h, "w2", topk_ids, topk_weights if weights_inside else None)
    if layer.w2_bias is not None and getattr(layer, "tp_rank", 0) == 0:  # once over the ranks' partial sums
        out = out + layer.w2_bias[flat_ids]
    if norm is not None:
        out = norm(out)
    if not weights_inside:
        out = out * topk_weights.reshape(-1, 1).to(out.dtype)
    return out.view(tokens, k, out.shape[-1]).float().sum(dim=1).to(x.dtype)


# A transformers experts module's stacked tensors and the FusedMoE parameters they fill.
STACKED_NAMES = {"gate_up_proj": "w13_weight", "up_proj": "w13_weight", "down_proj": "w2_weight",
                 "gate_up_proj_bias": "w13_bias", "up_proj_bias": "w13_bias", "down_proj_bias": "w2_bias"}


def own_expert_tensors(experts: nn.Module, tp_rank: int = 0, tp_size: int = 1) -> Dict[str, torch.Tensor]:
    """The float tensors of a transformers experts module under ``FusedMoE``'s names and layout,
    this rank's share of them under tensor parallelism."""
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    leaves = [first, "down_proj"] + ([first + "_bias", "down_proj_bias"] if experts.has_bias else [])
    return {STACKED_NAMES[leaf]: stacked_in_layout(experts, leaf, getattr(experts, leaf).detach(), tp_rank, tp_size)
            for leaf in leaves}


def stacked_in_layout(experts: nn.Module, leaf: str, t: torch.Tensor, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """The experts module's stacked tensor ``leaf`` (``gate_up_proj``, ``up_proj``, ``down_proj`` or
    their ``_bias``), as the module or a checkpoint stores it, in ``FusedMoE``'s layout: rows are
    output features (transposed when ``is_transposed``), cut to this rank's share."""
    if leaf.endswith("_bias"):
        return t if leaf.startswith("down") else _rank_rows(experts, t, tp_rank, tp_size)
    t = t.transpose(1, 2) if experts.is_transposed else t
    if leaf == "down_proj":
        return t.chunk(tp_size, dim=2)[tp_rank] if tp_size > 1 else t
    return _rank_rows(experts, t, tp_rank, tp_size)


def _rank_rows(experts: nn.Module, t: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """A rank's rows (dim 1) of the gate-and-up tensor: the same slice of the gate half and of the up
    half when they are concatenated, a contiguous run (whole gate/up pairs) when interleaved."""
    if tp_size == 1:
        return t
    if experts.has_gate and getattr(experts, "is_concatenated", True):
        gate, up = t.chunk(2, dim=1)
        return torch.cat([gate.chunk(tp_size, dim=1)[tp_rank], up.chunk(tp_size, dim=1)[tp_rank]], dim=1)
    return t.chunk(tp_size, dim=1)[tp_rank]


def tensor_parallel_problem(experts: nn.Module, tp_size: int) -> Optional[str]:
    """Why these experts cannot be split over ``tp_size`` ranks by their intermediate dimension."""
    _, _, inter = expert_shape(experts)
    if inter % tp_size or (not getattr(experts, "is_concatenated", True) and (2 * inter) % (2 * tp_size)):
        return f"their intermediate size {inter} does not split evenly over tensor-parallel size {tp_size}"
    if getattr(experts, "has_post_expert_norm", False):
        return "a norm after each expert cannot be applied to a rank's partial sums"
    return None


def create_float_experts(layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                         params_dtype: torch.dtype, extra_weight_attrs: Dict[str, Any]) -> None:
    """Register float ``w13_weight`` ``(E, 2I, H)`` (``(E, I, H)`` without a gate) and ``w2_weight``
    ``(E, H, I)``: what methods that calibrate from float weights load first."""
    rows = (2 if getattr(layer, "has_gate", True) else 1) * intermediate_size
    for name, shape in (("w13_weight", (num_experts, rows, hidden_size)),
                        ("w2_weight", (num_experts, hidden_size, intermediate_size))):
        param = nn.Parameter(torch.empty(shape, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(param, {"output_dim": 1, "input_dim": 2})
        set_weight_attrs(param, extra_weight_attrs)
        layer.register_parameter(name, param)


def expert_chunks(num_experts: int, rows: int, cols: int, budget: int = 1 << 26):
    """Slices of experts whose ``rows x cols`` matrices hold at most ``budget`` elements together, so
    that calibrating a large MoE layer needs a bounded float32 scratch."""
    step = max(1, budget // max(rows * cols, 1))
    return [slice(i, min(i + step, num_experts)) for i in range(0, num_experts, step)]


class EightBitMoEMethod(FusedMoEMethodBase):
    """Experts calibrated from float weights into 8-bit codes ``(E, N, K)`` with one float32 scale
    per row ``(E, N)``, run by ``moe_w8`` with 16-bit activations: int8 and fp8 differ only in
    :meth:`quantize_rows`."""

    @abstractmethod
    def quantize_rows(self, rows: torch.Tensor):
        """``(R, K)`` float -> (8-bit codes ``(R, K)``, per-row scales ``(R,)``)."""
        raise NotImplementedError

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs: Any) -> None:
        create_float_experts(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                             extra_weight_attrs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from pymllm_fx.methods.common import check_finite  # layers/ is imported by methods/, not the reverse

        for which in ("w13", "w2"):
            weight = getattr(layer, which + "_weight").data
            check_finite(getattr(layer, "prefix", "") or "experts", which + "_weight", weight)
            experts, n, k = weight.shape
            codes, scales = [], []
            for part in expert_chunks(experts, n, k):
                q, s = self.quantize_rows(weight[part].reshape(-1, k))
                codes.append(q.view(-1, n, k))
                scales.append(s.float().view(-1, n))
            replace_parameters(layer, (which + "_weight",), {which + "_qweight": torch.cat(codes),
                                                             which + "_scales": torch.cat(scales)})

    def apply(self, layer, x, topk_ids, topk_weights) -> torch.Tensor:
        return run_8bit_experts(layer, x, topk_ids, topk_weights)


def run_int4_experts(layer: nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """Experts in the int4 layout (``{w13,w2}_qweight`` ``(E, N, K // 8)``, ``_scales``, ``_zeros`` or
    None), through ``moe_w4a16``."""
    def gemm(inputs, which, ids, weights):
        return torch.ops.pymllm_fx.moe_w4a16(inputs, getattr(layer, which + "_qweight"), getattr(layer, which + "_scales"),
                                             getattr(layer, which + "_zeros"), group_size, ids, weights)

    return run_experts(layer, x, topk_ids, topk_weights, gemm)


def run_8bit_experts(layer: nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     block: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Experts in the 8-bit layout (int8 or e4m3 ``{w13,w2}_qweight`` ``(E, N, K)``, float32 ``_scales``
    per row, or per ``block`` of weights), through ``moe_w8``."""
    def gemm(inputs, which, ids, weights):
        return torch.ops.pymllm_fx.moe_w8(inputs, getattr(layer, which + "_qweight"), getattr(layer, which + "_scales"),
                                          block[0], block[1], ids, weights)

    return run_experts(layer, x, topk_ids, topk_weights, gemm)


# One expert projection's checkpoint tensors: name -> (shape, dtype, loading attributes of that
# 2-D tensor: output_dim, packed_dim, packed_factor, or a weight_loader of its own).
ProjectionTensors = Dict[str, Tuple[Tuple[int, ...], torch.dtype, Dict[str, Any]]]


class CheckpointMoEMethod(FusedMoEMethodBase):
    """Experts a quantized checkpoint stores as one linear per expert and projection
    (``experts.3.w1.qweight``, ``mlp.experts.3.gate_proj.weight_packed``, ...). Each of that
    linear's tensors is stacked as stored, ``(E, *shape)`` (the gate and up projections side by side
    along the outputs, gate first), and :func:`load_expert` puts one expert's projection in its rows,
    so the strict loader accounts for every expert tensor. After loading, :meth:`runtime` turns each
    stack into the grouped kernels' layout: int32 codes run ``moe_w4a16``, int8 / e4m3 ``moe_w8``.
    A format says what it stores (:meth:`projection`) and how that becomes the runtime layout."""

    prequantized = True

    @abstractmethod
    def projection(self, where: str, which: str, k: int, n: int, part: int,
                   params_dtype: torch.dtype) -> ProjectionTensors:
        """The checkpoint tensors of ``which`` ("w13" or "w2"): ``k`` inputs, ``n`` outputs made of
        projections of ``part`` outputs each (gate and up, or down). Refuses sizes it cannot hold."""
        raise NotImplementedError

    @abstractmethod
    def runtime(self, where: str, which: str, stacks: Dict[str, torch.Tensor],
                params_dtype: torch.dtype) -> Dict[str, Optional[torch.Tensor]]:
        """The loaded stacks of ``which`` (by checkpoint tensor name) -> its runtime tensors
        ``{which}_qweight``, ``{which}_scales`` and, for int4, ``{which}_zeros`` (None: symmetric)."""
        raise NotImplementedError

    group_size: int = -1  # int4 runtimes: inputs per group, -1 for one group per row
    block: Tuple[int, int] = (0, 0)  # 8-bit runtimes: (rows, columns) per scale, (0, 0) per row
    ignore: Tuple[str, ...] = ()  # compressed-tensors ``ignore`` entries (names, ``re:`` patterns), set by it

    def left_float(self, where: str) -> Optional[str]:
        """The checkpoint's rule that stores the experts at ``where`` in float, or None."""
        for entry in self.ignore:
            if where == entry or (entry.startswith("re:") and re.match(entry[3:], where)):
                return f"compressed-tensors ignore {entry!r}"
        return None

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs: Any) -> None:
        where = getattr(layer, "prefix", "") or "experts"
        if getattr(layer, "tp_size", 1) > 1:
            raise NotImplementedError(
                f"{where}: experts stored quantized ({self.name}) load unsplit only, not over tensor-parallel size "
                f"{layer.tp_size}; load this checkpoint without tensor parallelism")
        rule = self.left_float(where)
        if rule is not None:
            raise NotImplementedError(
                f"{where}: the checkpoint stores these experts in float ({rule}), which pymllm_fx does not load beside "
                f"quantized layers yet; load the float model and call quantize(model, method)")
        inter = intermediate_size_per_partition
        rows = (2 if getattr(layer, "has_gate", True) else 1) * inter
        for which, k, n, part in (("w13", hidden_size, rows, inter), ("w2", inter, hidden_size, hidden_size)):
            for name, (shape, dtype, attrs) in self.projection(where, which, k, n, part, params_dtype).items():
                attrs = {key: value + 1 if key.endswith("_dim") else value for key, value in attrs.items()}
                register_param(layer, f"{which}_{name}", torch.empty((num_experts, *shape), dtype=dtype), attrs,
                               {"weight_loader": load_expert})

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        where = getattr(layer, "prefix", "") or "experts"
        stored, runtime = [], {}
        for which in ("w13", "w2"):  # everything computed first; the layer changes at the end
            names = [name for name, p in layer._parameters.items()
                     if p is not None and name.startswith(which + "_") and name != which + "_bias"]
            stacks = {name[len(which) + 1:]: layer._parameters[name].data for name in names}
            runtime.update(self.runtime(where, which, stacks, layer.params_dtype))
            stored += names
        replace_parameters(layer, tuple(stored), runtime)

    def apply(self, layer, x, topk_ids, topk_weights) -> torch.Tensor:
        if layer.w13_qweight.dtype == torch.int32:
            group = self.group_size
            if group == -1:  # one group a row: a group as long as the longer of the two inputs
                group = max(layer.hidden_size, layer.intermediate_size_per_partition)
            return run_int4_experts(layer, x, topk_ids, topk_weights, group)
        return run_8bit_experts(layer, x, topk_ids, topk_weights, self.block)
