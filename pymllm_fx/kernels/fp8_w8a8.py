"""FP8 W8A8: e4m3 weights with per-output-channel scales, activations quantized per token.

Layout: ``weight`` float8_e4m3fn ``(N, K)``, ``weight_scale`` float32 ``(N,)``. Each row (token)
of the activations gets its own scale ``amax(|x_row|) / 448`` at run time (dynamic quantization).
"""

from typing import Optional, Tuple

import torch

from pymllm_fx.kernels._checks import check_activation, check_bias, check_tensor
from pymllm_fx.kernels._triton import (
    INTERPRET,
    as_rows,
    check_contiguous,
    gemv_8bit_config,
    runs_triton,
    store_tile,
    tile_offsets,
    tl,
    triton,
)

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
    check_contiguous(op, weight=weight, weight_scale=weight_scale, bias=bias)


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-torch reference: quantize x per token, multiply the fp8 values exactly in float32."""
    xq, x_scale = quantize_fp8_per_token(x)
    out = torch.matmul(xq.float(), weight.float().t()) * x_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# --- Triton kernels ----------------------------------------------------------------------------
# Every kernel quantizes activations exactly as quantize_fp8_per_token does (amax / 448, a true
# division, round-to-nearest e4m3), so Triton and the reference agree on the fp8 values.


@triton.jit
def _row_amax(x_row_ptr, K, BLOCK_K: tl.constexpr):
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row_ptr + k, mask=k < K, other=0.0).to(tl.float32)))
    return tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)


@triton.jit
def _quantize(x, scale):
    return tl.clamp(x / scale, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def _fp8_quantize_rows_kernel(x_ptr, xq_ptr, scale_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """One program per row: its scale, then its e4m3 values (one launch, two passes over a row)."""
    row = tl.program_id(0)
    scale = _row_amax(x_ptr + row * stride_xm, K, BLOCK_K)
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(xq_ptr + row * K + k, _quantize(x, scale), mask=k < K)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Decode path with the activation quantization fused: each program finds its row's scale
    (the row is a few KB, read from L2), then quantizes its chunks of x as it streams weights.
    Rows past N are clamped (valid memory, dropped at the store); with EVEN_K no load in the
    loop is masked (16-byte loads), otherwise one masked step takes the tail."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    x_row = x_ptr + row * stride_xm
    scale = _row_amax(x_row, K, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    full = K // BLOCK_K
    for b in range(0, full):
        xq = _quantize(tl.load(x_row + b * BLOCK_K + offs_k).to(tl.float32), scale).to(tl.float32)
        acc += tl.load(w_ptrs + b * BLOCK_K).to(tl.float32) * xq[None, :]
    if not EVEN_K:
        k_ok = full * BLOCK_K + offs_k < K
        xq = _quantize(tl.load(x_row + full * BLOCK_K + offs_k, mask=k_ok, other=0.0).to(tl.float32), scale)
        w = tl.load(w_ptrs + full * BLOCK_K, mask=k_ok[None, :] & (rows[:, None] >= 0), other=0.0)
        acc += w.to(tl.float32) * xq.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1) * scale * tl.load(w_scale_ptr + rows)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _fp8_gemm_kernel(
    xq_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Tensor-core path on quantized activations: e4m3 x e4m3 dot, both scales in the epilogue."""
    offs_m, offs_n, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(tl.cdiv(K, BLOCK_K)):
        k = b * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(xq_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:  # Triton's interpreter has no fp8 dot
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    acc *= tl.load(x_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    acc *= tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    store_tile(out_ptr, acc, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, HAS_BIAS)


# Paths by M, measured on the H100 (benchmarks/tune.py): the fused GEMV for decode, then the
# Triton GEMM, except between SCALED_MM_MIN_M and SCALED_MM_MAX_M rows, where torch._scaled_mm
# (cuBLASLt with row-wise scales) was faster.
GEMV_MAX_M = 1
SCALED_MM_MIN_M = 64
SCALED_MM_MAX_M = 512


def _gemm_config(m: int) -> dict:
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_quantize_rows(x2, block_k: int = 1024):
    """``(M, K)`` -> (e4m3 ``(M, K)``, float32 ``(M, 1)``) in one Triton launch."""
    from torch.library import wrap_triton

    m, k = x2.shape
    xq = torch.empty((m, k), device=x2.device, dtype=FP8_DTYPE)
    scale = torch.empty((m, 1), device=x2.device, dtype=torch.float32)
    wrap_triton(_fp8_quantize_rows_kernel)[(m,)](x2, xq, scale, k, x2.stride(0), BLOCK_K=min(block_k, triton.next_power_of_2(k)))
    return xq, scale


def fp8_gemv(x2, weight, weight_scale, bias, config=None):
    """``(M, K) -> (M, N)`` on the fused decode kernel."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = weight.shape[0]
    cfg = config or gemv_8bit_config(n, k)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    wrap_triton(_fp8_gemv_kernel)[(triton.cdiv(n, cfg["BLOCK_N"]), m)](
        x2, weight, weight_scale, bias if bias is not None else weight_scale, out, n, k, x2.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg,
    )
    return out


def fp8_gemm(x2, weight, weight_scale, bias, config=None):
    """``(M, K) -> (M, N)``: quantize the rows, then the Triton fp8 GEMM."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = weight.shape[0]
    xq, x_scale = fp8_quantize_rows(x2)
    cfg = config or _gemm_config(m)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_fp8_gemm_kernel)[grid](
        xq, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k, out.stride(0),
        HAS_BIAS=bias is not None, DOT_F32=INTERPRET, **cfg,
    )
    return out


def fp8_scaled_mm(x2, weight, weight_scale, bias):
    """``(M, K) -> (M, N)``: quantize the rows, then cuBLASLt's fp8 GEMM with row-wise scales."""
    xq, x_scale = fp8_quantize_rows(x2)
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale[None, :], bias=None, out_dtype=torch.bfloat16
    )
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x2.dtype)


def fp8_triton(x, weight, weight_scale, bias):
    """The GPU path of the op, chosen by M (activation rows)."""
    x2 = as_rows(x)
    m, k = x2.shape
    n = weight.shape[0]
    if m <= GEMV_MAX_M:
        out = fp8_gemv(x2, weight, weight_scale, bias)
    elif SCALED_MM_MIN_M <= m < SCALED_MM_MAX_M and k % 16 == 0 and n % 16 == 0:
        out = fp8_scaled_mm(x2, weight, weight_scale, bias)
    else:
        out = fp8_gemm(x2, weight, weight_scale, bias)
    return out.reshape(*x.shape[:-1], n)


@torch.library.triton_op("pymllm_fx::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Per-token fp8 quantization of ``x``, then ``x_fp8 @ weight.T`` with both scales, + bias.

    Triton (and cuBLASLt for large M) on CUDA, the torch reference elsewhere. The Triton paths
    need a GPU with fp8 (compute capability 8.9+)."""
    _check(x, weight, weight_scale, bias)
    if runs_triton(x):
        return fp8_triton(x, weight, weight_scale, bias)
    return fp8_linear_reference(x, weight, weight_scale, bias)
