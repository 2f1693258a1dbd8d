"""W8A16: int8 weights with one scale per output channel, 16-bit activations.

Layout: ``qweight`` int8 ``(N, K)``, ``scales`` ``(N,)`` float; the weight is ``qweight * scales``.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from pymllm_fx.kernels._checks import FLOATS, check_activation, check_bias, check_tensor
from pymllm_fx.kernels._triton import (
    INTERPRET,
    as_rows,
    check_contiguous,
    grouped_tile,
    num_sms,
    runs_triton,
    store_row,
    store_tile,
    tl,
    triton,
)


def _check(x, qweight, scales, bias) -> None:
    op = "pymllm_fx.w8a16_linear"
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be 2-D (N, K), got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_activation(op, x, k)
    check_tensor(op, "qweight", qweight, (n, k), (torch.int8,), x.device)
    check_tensor(op, "scales", scales, (n,), FLOATS, x.device)
    check_bias(op, bias, n, x.device)
    check_contiguous(op, qweight=qweight, scales=scales, bias=bias)


def w8a16_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pure-torch reference: dequantize, then ``F.linear``.

    The scale goes on the weight, not the output: summing raw int8 codes in float16 overflows
    once an activation channel is large.
    """
    weight = qweight.to(x.dtype) * scales.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# --- Triton kernels ----------------------------------------------------------------------------
# int8 codes are exact in bf16/fp16 (|q| <= 128), so the kernels multiply raw codes and apply the
# per-channel scale once to the float32 sum, never to each weight.


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Decode path: one activation row per program column, CUDA-core FMAs, optional split-K."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(blocks, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, blocks)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for b in range(first, last):
        k = b * BLOCK_K + offs_k
        k_ok = k < K
        q = tl.load(qweight_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        xv = tl.load(x_ptr + row * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
        acc += q.to(tl.float32) * xv[None, :]
    out = tl.sum(acc, axis=1) * tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    store_row(out_ptr + row * stride_om, out, bias_ptr, offs_n, n_ok, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Tensor-core path: int8 tiles converted to the activation dtype and fed to ``tl.dot``."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(tl.cdiv(K, BLOCK_K)):
        k = b * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(qweight_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if DOT_F32:  # fp32 activations, and Triton's interpreter, which mishandles bf16 dots
            acc = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc)
    acc *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, HAS_BIAS)


# Paths and block shapes by M (activation rows), from benchmarks/tune.py on the H100 at the
# Llama-3-8B shapes. Past DEQUANT_MIN_M rows the conversion is a small share of the matmul.
GEMV_MAX_M = 1
DEQUANT_MIN_M = 2048


def _gemv_config(m: int, n: int, k: int, device: torch.device) -> dict:
    block_n, block_k = 8, 512
    programs = -(-n // block_n) * m
    split_k = 1
    while programs * split_k < 2 * num_sms(device) and split_k < 8 and k // (block_k * split_k * 2) >= 1:
        split_k *= 2
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4, num_stages=2)


def _gemm_config(m: int, n: int, k: int) -> dict:
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def w8a16_gemv(x2, qweight, scales, bias, config=None):
    """``(M, K) -> (M, N)`` on the decode kernel."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = config or _gemv_config(m, n, k, x2.device)
    split_k = cfg["SPLIT_K"]
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype) if split_k == 1 else torch.zeros(
        (m, n), device=x2.device, dtype=torch.float32
    )
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, m)
    wrap_triton(_w8a16_gemv_kernel)[grid](
        x2, qweight, scales, bias if bias is not None else scales, out, n, k, x2.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, **cfg,
    )
    return out if split_k == 1 else out.to(x2.dtype)


def w8a16_gemm(x2, qweight, scales, bias, config=None):
    """``(M, K) -> (M, N)`` on the tensor-core kernel."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = config or _gemm_config(m, n, k)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_w8a16_gemm_kernel)[grid](
        x2, qweight, scales, bias if bias is not None else scales, out, m, n, k, x2.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, DOT_F32=INTERPRET or x2.dtype == torch.float32, **cfg,
    )
    return out


def w8a16_triton(x, qweight, scales, bias):
    """The GPU path of the op: GEMV for decode-sized M, the fused GEMM in between, and the
    reference (one fused conversion, then cuBLAS) for large M or fp32 activations."""
    x2 = as_rows(x)
    m = x2.shape[0]
    if m <= GEMV_MAX_M:
        out = w8a16_gemv(x2, qweight, scales, bias)
    elif m < DEQUANT_MIN_M and x2.dtype != torch.float32:
        out = w8a16_gemm(x2, qweight, scales, bias)
    else:
        out = w8a16_reference(x2, qweight, scales, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@torch.library.triton_op("pymllm_fx::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``x @ (qweight * scales).T + bias``: Triton on CUDA, the torch reference elsewhere."""
    _check(x, qweight, scales, bias)
    if runs_triton(x):
        return w8a16_triton(x, qweight, scales, bias)
    return w8a16_reference(x, qweight, scales, bias)
