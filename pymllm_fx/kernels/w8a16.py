"""W8A16: int8 weights with one scale per output channel, 16-bit activations.

Layout: ``qweight`` int8 ``(N, K)``, ``scales`` ``(N,)`` float; the weight is ``qweight * scales``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pymllm_fx.kernels._checks import FLOATS, check_activation, check_bias, check_tensor


def _check(x, qweight, scales, bias) -> None:
    op = "pymllm_fx.w8a16_linear"
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be 2-D (N, K), got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_activation(op, x, k)
    check_tensor(op, "qweight", qweight, (n, k), (torch.int8,), x.device)
    check_tensor(op, "scales", scales, (n,), FLOATS, x.device)
    check_bias(op, bias, n, x.device)


def w8a16_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-torch reference: dequantize, then ``F.linear``.

    The scale goes on the weight, not the output: summing raw int8 codes in float16 overflows
    once an activation channel is large.
    """
    weight = qweight.to(x.dtype) * scales.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("pymllm_fx::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    _check(x, qweight, scales, bias)
    return w8a16_reference(x, qweight, scales, bias)


@w8a16_linear.register_fake
def _(x, qweight, scales, bias):
    _check(x, qweight, scales, bias)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
