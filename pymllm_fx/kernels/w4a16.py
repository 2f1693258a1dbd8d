"""W4A16: 4-bit weights, 16-bit activations. The runtime layout, its packing, and the op.

Runtime layout (every 4-bit method repacks into it in ``process_weights_after_loading``):

- ``qweight`` int32 ``(N, K // 8)``: row n holds the 4-bit codes of output feature n; nibble j
  (bits ``4j .. 4j+3``) of word i is input feature ``8*i + j``.
- ``scales`` ``(N, G)`` float, ``G = ceil(K / group_size)``; the last group may be shorter (a tail).
- ``zeros`` ``(N, G)`` float holding integer zero points 0..15, or ``None`` for symmetric weights,
  whose zero point is 8. The weight is ``(code - zero) * scale``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pymllm_fx.kernels._checks import FLOATS, check_activation, check_bias, check_tensor

PACK_FACTOR = 8
SYMMETRIC_ZERO = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``(N, K)`` integer codes in 0..15 into int32 ``(N, K // 8)``, low nibble first."""
    n, k = codes.shape
    if k % PACK_FACTOR:
        raise ValueError(f"pack_int4: K={k} must be a multiple of {PACK_FACTOR}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_int4: codes must lie in 0..15")
    # Build in int64 so the top nibble cannot overflow, then reinterpret the low 32 bits.
    shifts = _SHIFTS.to(device=codes.device, dtype=torch.int64)
    words = (codes.to(torch.int64).view(n, k // PACK_FACTOR, PACK_FACTOR) << shifts).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def unpack_int4(qweight: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``(N, K // 8)`` -> uint8 codes ``(N, K)``."""
    n, words = qweight.shape
    shifts = _SHIFTS.to(qweight.device)
    codes = (qweight.unsqueeze(-1) >> shifts) & 0xF
    codes = codes.reshape(n, words * PACK_FACTOR).to(torch.uint8)
    return codes if k is None else codes[:, :k]


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int
) -> torch.Tensor:
    """The float weight ``(N, K)`` in the dtype of ``scales``."""
    k = qweight.shape[1] * PACK_FACTOR
    codes = unpack_int4(qweight).to(scales.dtype)
    expand = lambda t: t.repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
    zero = expand(zeros) if zeros is not None else SYMMETRIC_ZERO
    return (codes - zero) * expand(scales)


def _check(x, qweight, scales, zeros, group_size, bias) -> None:
    op = "pymllm_fx.w4a16_linear"
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be 2-D (N, K/8), got shape {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if group_size <= 0 or group_size % PACK_FACTOR:
        raise ValueError(f"{op}: group_size must be a positive multiple of 8, got {group_size}")
    check_activation(op, x, k)
    check_tensor(op, "qweight", qweight, (n, k // PACK_FACTOR), (torch.int32,), x.device)
    check_tensor(op, "scales", scales, (n, num_groups(k, group_size)), FLOATS, x.device)
    if zeros is not None:
        check_tensor(op, "zeros", zeros, (n, num_groups(k, group_size)), (scales.dtype,), x.device)
    check_bias(op, bias, n, x.device)


def w4a16_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch reference: dequantize the whole weight, then ``F.linear``."""
    weight = dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("pymllm_fx::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    _check(x, qweight, scales, zeros, group_size, bias)
    return w4a16_reference(x, qweight, scales, zeros, group_size, bias)


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    _check(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
