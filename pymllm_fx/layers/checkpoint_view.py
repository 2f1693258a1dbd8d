"""A quantized layer in checkpoint terms: what a runtime method hands to a checkpoint writer.

The runtime layouts of ``kernels/`` lose what a checkpoint records (AWQ / GPTQ groups of 256 run
as groups of 128; activation quantization is a method field, not a tensor), so each method says
what one of its layers is through the optional ``checkpoint_view`` hook (see ``quantize_base.py``)
and writers read only this view. It lives in ``layers/`` because experts layers (``fused_moe.py``)
produce it too, and ``loading/`` consumes it without importing any method.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

from pymllm_fx.kernels.w4a16 import SYMMETRIC_ZERO


@dataclass
class Quantized:
    """One layer's (or shard's) quantized weight in checkpoint terms, before a format packs it."""

    kind: str  # "int4", "int8" (weight-only), "w8a8" (int8 weights and activations) or "fp8"
    # int4: codes 0..15 int32 (N, K) in checkpoint column order; int8, w8a8: int8 (N, K); fp8: e4m3 (N, K)
    weight: torch.Tensor
    # int4: (N, G), one per checkpoint group; int8, w8a8 and fp8: (N,), one per output row;
    # fp8 block: float32 (ceil(N / bn), ceil(K / bk)), one per weight block
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None  # int4 asymmetric: int32 (N, G) zero points 0..15; None: 8
    group_size: int = -1  # int4: inputs per group (the last may be shorter); -1: one group per row
    g_idx: Optional[torch.Tensor] = None  # int4 act-order: int32 (K,) group of each input, unsorted
    activation: str = "token"  # fp8, w8a8: "token" / "tensor" (dynamic), "static", "group" (fp8 block), "none" (fp8 weight-only)
    input_scale: Optional[torch.Tensor] = None  # fp8, w8a8 static: float (1,)
    input_zero_point: Optional[torch.Tensor] = None  # w8a8 static asymmetric: int32 (1,)
    weight_strategy: str = "channel"  # fp8, w8a8: "channel", "tensor" or "block", as calibration or the checkpoint declared
    block_size: Optional[Tuple[int, int]] = None  # fp8 block: (bn, bk) weight rows and columns per scale

    def rows(self, start: int, stop: int) -> "Quantized":
        """Output rows ``start:stop`` (one logical weight of a merged layer)."""

        def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[start:stop]

        scales = cut(self.scales)
        if self.block_size is not None:  # block rows; the layer made shards start on block boundaries
            bn = self.block_size[0]
            scales = self.scales[start // bn: -(-stop // bn)]
        return replace(self, weight=cut(self.weight), scales=scales, zeros=cut(self.zeros))


def zero_points(z: torch.Tensor, where: str, name: str) -> Optional[torch.Tensor]:
    """Float runtime zero points -> int32 0..15, or None when all are the symmetric 8 (an AWQ
    zero_point checkpoint of a symmetric model)."""
    zeros = z.round().to(torch.int32)
    if not torch.equal(zeros.to(z.dtype), z) or int(zeros.min()) < 0 or int(zeros.max()) > 15:
        raise ValueError(f"{where}: tensor {name!r} holds values that are not integer zero points 0..15")
    return None if bool((zeros == SYMMETRIC_ZERO).all()) else zeros
