"""``{"quant_method": "int4", "gptq": true}``: int4 rounded by GPTQ from calibration inputs.

GPTQ (Frantar et al., 2022) rounds a weight one input column at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse Hessian
``H = 2 X^T X / n`` of the layer's calibration inputs X, so that ``‖W X − Ŵ X‖`` stays small rather
than ``‖W − Ŵ‖``. This file holds the method (config, ``create_weights``, ``apply``) and the solver
for one weight given its Hessian; ``pymllm_fx/calibration.py`` runs the model block by block to
collect the Hessians, and ``api.quantize(..., calibration=...)`` ties them together.

The solver follows the reference algorithm (GPTQ's ``fasterquant``, GPTQModel's ``quantize``):
dead inputs (``H[k, k] == 0``) get a unit diagonal and a zero weight column; the diagonal is
dampened by ``damp_percent`` of its mean; the upper Cholesky factor of ``H^-1`` drives the updates;
columns go in blocks of 128 whose updates to later columns are applied lazily, once per block.
Act-order (``desc_act``) takes the columns in order of decreasing ``H[k, k]``, and numbers the
groups in that order (GPTQ's ``g_idx``). Each group's scale and zero point come from the min/max of
its columns at the group's first column, on the weights as every earlier column's error has updated
them (the reference reads a group that starts inside a 128-column block before that block's own
updates; here a group never straddles a block, and its columns are read with them).

Runtime layout: the W4A16 layout of ``methods/int4.py``. With act-order, K is stored sorted by group
(``perm``, kept as a buffer: ``x[..., perm] @ W[:, perm].T`` is ``x @ W.T``), exactly as
``methods/gptq.py`` loads an act-order GPTQ checkpoint, so ``save_quantized(format="gptq")`` writes
its ``g_idx`` and ``from_pretrained`` reads back the same tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from pymllm_fx.kernels.w4a16 import SYMMETRIC_ZERO, num_groups, pack_int4
from pymllm_fx.layers.parameter import replace_parameters
from pymllm_fx.methods.common import check_config_keys, check_finite, config_bool, config_int
from pymllm_fx.methods.int4 import Int4LinearMethod

BLOCK = 128  # columns per lazy-update block; a multiple of every group size (32, 64, 128)
MAX_CODE = 15


class GPTQWeight(NamedTuple):
    """One layer's GPTQ result in the W4A16 runtime layout (K sorted by group when ``perm`` is set)."""

    qweight: torch.Tensor  # int32 (N, K // 8)
    scales: torch.Tensor  # (N, G) in the layer's dtype
    zeros: Optional[torch.Tensor]  # (N, G) integer zero points in the layer's dtype; None: symmetric (8)
    perm: Optional[torch.Tensor]  # int32 (K,): runtime column j is input feature perm[j]; None: in order


@dataclass
class GPTQInt4LinearMethod(Int4LinearMethod):
    """int4 weights rounded by GPTQ. ``quantize(model, method, calibration=...)`` fills ``results``
    (module path -> ``GPTQWeight``) before the layers are built; a layer no calibration input reached
    is rounded as plain ``"int4"`` does, and ``explain()`` says so."""

    sym: bool = True  # GPTQ's default, as GPTQModel and AutoGPTQ have it
    desc_act: bool = False
    damp_percent: float = 0.01
    results: Dict[str, GPTQWeight] = field(default_factory=dict, repr=False, compare=False)

    name = "int4"
    needs_calibration = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)) \
                or not 0 < self.damp_percent < 1:
            raise ValueError(f"int4 gptq: damp_percent must be a number in (0, 1), got {self.damp_percent!r} "
                             f"(GPTQ's default is 0.01: 1% of the Hessian's mean diagonal)")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        result = self.results.pop(getattr(layer, "prefix", ""), None)  # popped: the model holds it from now on
        if result is None:
            super().process_weights_after_loading(layer)
            layer.register_buffer("perm", None)
            layer.gptq_calibrated = False
            return
        check_finite(getattr(layer, "prefix", "") or "layer", "weight", layer.weight.data)
        replace_parameters(layer, ("weight",), {"qweight": result.qweight, "scales": result.scales,
                                                "zeros": result.zeros})
        layer.register_buffer("perm", result.perm)
        layer.gptq_calibrated = True

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)
        return torch.ops.pymllm_fx.w4a16_linear(x, layer.qweight, layer.scales, layer.zeros, self.group_size, bias)

    def describe(self, layer: torch.nn.Module) -> str:
        text = super().describe(layer)
        if not getattr(layer, "gptq_calibrated", True):
            return text + ", rounded as plain int4 (no calibration input reached it)"
        return text + (", GPTQ act-order" if getattr(layer, "perm", None) is not None else ", GPTQ")

    @classmethod
    def from_config(cls, config: dict) -> Int4LinearMethod:
        """``{"quant_method": "int4", "gptq": true, "group_size": 128, "sym": true, "desc_act": false,
        "damp_percent": 0.01}``; ``"gptq": false`` is plain ``"int4"``."""
        if not config_bool("int4", config, "gptq", False):
            return Int4LinearMethod.from_config({k: v for k, v in config.items() if k != "gptq"})
        check_config_keys("int4 gptq", config, ("gptq", "group_size", "sym", "bits", "desc_act", "damp_percent"))
        if config_int("int4", config, "bits", 4) != 4:
            raise ValueError(f"int4 gptq: bits must be 4, got {config['bits']}")
        damp = config.get("damp_percent", 0.01)
        return cls(group_size=config_int("int4", config, "group_size", 128), sym=config_bool("int4", config, "sym", True),
                   desc_act=config_bool("int4", config, "desc_act", False), damp_percent=damp)


# --- the solver -----------------------------------------------------------------------------------


def add_to_hessian(hessian: torch.Tensor, x: torch.Tensor) -> int:
    """``hessian += X^T X`` (float32) for inputs ``x`` ``(..., K)``; returns the rows added. 16-bit
    inputs on CUDA multiply on tensor cores with a float32 result, which is exact per product."""
    x = x.reshape(-1, x.shape[-1])
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        try:
            hessian.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
            return x.shape[0]
        except (RuntimeError, TypeError):  # a torch without mm's out_dtype: the same sums in float32
            pass
    x = x.float()
    hessian.addmm_(x.t(), x)
    return x.shape[0]


def group_grid(w: torch.Tensor, sym: bool, scale_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``(N,)`` (float32) of one group's columns ``w`` ``(N, g)``, from their
    min/max as GPTQ's quantizer takes them: the range always includes 0; symmetric groups span
    ``±max|w|`` in 15 steps around the zero point 8. The scale is rounded to ``scale_dtype`` first,
    so the rounding error each column passes on is the one the stored weight has."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = hi == lo  # an all-zero group: any scale reproduces it; GPTQ takes the range [-1, 1]
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / MAX_CODE).to(scale_dtype).float()
    tiny = torch.finfo(scale_dtype).tiny
    scale = scale.clamp(min=tiny)
    zero = torch.full_like(scale, SYMMETRIC_ZERO) if sym else torch.round(-lo / scale).clamp(0, MAX_CODE)
    return scale, zero


def round_to_nearest(weight: torch.Tensor, group_size: int, sym: bool,
                     scale_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dequantized weight that GPTQ's grid gives without error feedback (min/max round to
    nearest, in float32): the baseline GPTQ is measured against."""
    scale_dtype = scale_dtype or weight.dtype
    w = weight.float()
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group_size):
        part = w[:, start:start + group_size]
        scale, zero = group_grid(part, sym, scale_dtype)
        codes = torch.clamp(torch.round(part / scale[:, None]) + zero[:, None], 0, MAX_CODE)
        out[:, start:start + group_size] = (codes - zero[:, None]) * scale[:, None]
    return out


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, where: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``, ``damp = damp_percent * mean(diag H)``. A
    Hessian that float32 still cannot factor is dampened ten times more (up to the size of its
    mean diagonal, with a warning), as GPTQModel's damp increments do; past that, a clear error."""
    mean = float(hessian.diagonal().mean())
    damp = damp_percent
    while True:
        dampened = hessian.clone()
        dampened.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                if damp != damp_percent:
                    warnings.warn(f"pymllm_fx: {where}: the calibration Hessian needed damp_percent={damp:g} "
                                  f"(asked {damp_percent:g}) to be factored", stacklevel=3)
                return upper
        if damp >= 1:
            raise ValueError(
                f"{where}: the calibration inputs' Hessian cannot be factored even dampened by {damp:g} x its mean "
                f"diagonal ({mean:.3g}); the inputs hold NaN/Inf or are degenerate. Check the model's float outputs "
                f"on the calibration data, or skip this layer")
        damp = min(damp * 10, 1.0)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, sym: bool, desc_act: bool,
                  damp_percent: float = 0.01, scale_dtype: Optional[torch.dtype] = None,
                  where: str = "layer") -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """GPTQ-round ``weight`` ``(N, K)`` against ``hessian`` ``(K, K)`` (float32, ``2 X^T X / n``).

    Returns, in the W4A16 runtime order (K sorted by group): codes uint8 ``(N, K)``, scales ``(N, G)``
    and zeros ``(N, G)`` (None when ``sym``) in ``scale_dtype`` (default: the weight's), and ``perm``
    int32 ``(K,)`` (runtime column j is input feature ``perm[j]``; None when the columns stay in order).
    Rows are independent given H, so sibling layers that read one input (q/k/v) can be stacked into
    one call.
    """
    scale_dtype = scale_dtype or weight.dtype
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"{where}: Hessian of shape {tuple(hessian.shape)} for a weight with {k} input features")
    # Transposed, (K, N): a column of W is a contiguous row here, and each step is a few vector ops.
    wt = weight.detach().to(hessian.device, torch.float32).t().contiguous()
    h = hessian.clone()
    dead = h.diagonal() == 0  # inputs that were zero for every calibration token
    h[dead, dead] = 1
    wt[dead] = 0
    order = None
    if desc_act:
        order = torch.argsort(h.diagonal(), descending=True)
        wt, h = wt[order], h[order][:, order]
    hinv = inverse_cholesky(h, damp_percent, where)
    del h

    groups = num_groups(k, group_size)
    codes = torch.empty(k, n, dtype=torch.uint8, device=wt.device)
    scales = torch.empty(groups, n, device=wt.device)
    zeros = torch.empty(groups, n, device=wt.device)
    for b1 in range(0, k, BLOCK):
        b2 = min(b1 + BLOCK, k)
        block = wt[b1:b2].clone()
        q = torch.empty_like(block)
        errors = torch.empty_like(block)
        hinv_block = hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            column = b1 + i
            if column % group_size == 0:  # a group starts: its grid from its columns as updated so far
                g = column // group_size
                scale, zero = group_grid(block[i:i + group_size].t(), sym, scale_dtype)
                scales[g], zeros[g] = scale, zero
            row, qrow, err = block[i], q[i], errors[i]
            torch.div(row, scale, out=qrow).round_().add_(zero).clamp_(0, MAX_CODE)
            torch.sub(qrow, zero, out=err).mul_(scale)  # the dequantized weight
            torch.sub(row, err, out=err).div_(hinv_block[i, i])
            block[i + 1:].addr_(hinv_block[i, i + 1:], err, alpha=-1)
        codes[b1:b2] = q.to(torch.uint8)
        wt[b2:].addmm_(hinv[b1:b2, b2:].t(), errors, alpha=-1)  # the block's lazy update to every later column
    codes, scales, zeros = codes.t(), scales.t(), zeros.t()

    perm = None
    if order is not None:
        # Groups were numbered in act-order; store K sorted by group, each group's inputs in their
        # original order: the order methods/gptq.py derives from a checkpoint's g_idx (a stable
        # sort), so a saved and reloaded model holds the very same tensors.
        g_idx = torch.empty(k, dtype=torch.long, device=wt.device)
        g_idx[order] = torch.arange(k, device=wt.device) // group_size
        perm = torch.sort(g_idx, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(k, device=wt.device)
        codes = codes[:, inverse[perm]]  # runtime column j is act-order column inverse[perm[j]]
        perm = None if torch.equal(perm, torch.arange(k, device=perm.device)) else perm.to(torch.int32)
    return codes.contiguous(), scales.to(scale_dtype).contiguous(), None if sym else zeros.to(scale_dtype).contiguous(), perm


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
               perm: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``(N, K)`` weight in the input features' own order, from :func:`gptq_quantize`'s output."""
    k = codes.shape[1]
    expand = lambda t: t.float().repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
    zero = expand(zeros) if zeros is not None else float(SYMMETRIC_ZERO)
    w = (codes.float() - zero) * expand(scales)
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm.long()] = w
    return out


def pack_result(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                perm: Optional[torch.Tensor], device: Any) -> GPTQWeight:
    """One layer's rows of :func:`gptq_quantize`'s output, packed and moved to where the layer lives."""
    move = lambda t: None if t is None else t.to(device).contiguous()  # noqa: E731
    return GPTQWeight(move(pack_int4(codes)), move(scales), move(zeros), None if perm is None else move(perm.clone()))
