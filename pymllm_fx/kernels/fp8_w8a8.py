"""FP8 W8A8: e4m3 weights with per-output-channel scales, activations quantized per token.

Layout: ``weight`` float8_e4m3fn ``(N, K)``, ``weight_scale`` float32 ``(N,)``. Each row (token)
of the activations gets its own scale ``amax(|x_row|) / 448`` at run time (dynamic quantization).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from pymllm_fx.kernels._checks import check_activation, check_bias, check_tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
_MIN_SCALE = 1e-12


def quantize_fp8_per_channel(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float -> (e4m3 ``(N, K)``, float32 scales ``(N,)``), one scale per row."""
    w = weight.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(..., K)`` -> (e4m3 ``(..., K)``, float32 scales ``(..., 1)``), one scale per row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _check(x, weight, weight_scale, bias) -> None:
    op = "pymllm_fx.fp8_linear"
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_activation(op, x, k)
    check_tensor(op, "weight", weight, (n, k), (FP8_DTYPE,), x.device)
    check_tensor(op, "weight_scale", weight_scale, (n,), (torch.float32,), x.device)
    check_bias(op, bias, n, x.device)


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-torch reference: quantize x per token, multiply the fp8 values exactly in float32."""
    xq, x_scale = quantize_fp8_per_token(x)
    out = torch.matmul(xq.float(), weight.float().t()) * x_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@torch.library.custom_op("pymllm_fx::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    _check(x, weight, weight_scale, bias)
    return fp8_linear_reference(x, weight, weight_scale, bias)


@fp8_linear.register_fake
def _(x, weight, weight_scale, bias):
    _check(x, weight, weight_scale, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])
