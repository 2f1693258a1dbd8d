"""W8A16: 8-bit weights with one scale per output channel, 16-bit activations.

Layout: ``qweight`` int8 or float8_e4m3fn ``(N, K)``, ``scales`` ``(N,)`` float; the weight is
``qweight * scales``. e4m3 codes (fp8 weight-only checkpoints) reach the kernels as their bytes and
are decoded there (every e4m3 value is exact in bf16, fp16 and float32).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from pymllm_fx.kernels._checks import FLOATS, check_activation, check_bias, check_tensor
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE
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


def _check(x, qweight, scales, bias) -> None:
    op = "pymllm_fx.w8a16_linear"
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be 2-D (N, K), got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_activation(op, x, k)
    check_tensor(op, "qweight", qweight, (n, k), (torch.int8, FP8_DTYPE), x.device)
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


# int8 -> float32 in two instructions per weight: XOR flips each byte to u = q + 128, PRMT puts
# u in the low byte of the float 2^23 (0x4B000000), which is then 2^23 + u exactly, and one FADD
# of -(2^23 + 128) leaves q. Triton's own conversion is an I2F per weight, which Hopper issues at
# a quarter of the FMA rate.
_INT8_TO_F32 = tl.constexpr("{ .reg .b32 u, m; xor.b32 u, $4, 0x80808080; mov.b32 m, 0x4B000000; prmt.b32 $0, u, m, 0x7540; prmt.b32 $1, u, m, 0x7541; prmt.b32 $2, u, m, 0x7542; prmt.b32 $3, u, m, 0x7543; sub.f32 $0, $0, 0f4B000080; sub.f32 $1, $1, 0f4B000080; sub.f32 $2, $2, 0f4B000080; sub.f32 $3, $3, 0f4B000080; }")


@triton.jit
def _int8_to_f32(q, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(_INT8_TO_F32, "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=True, pack=4)
    return q.to(tl.float32)


@triton.jit
def _codes_to_f32(q, ASM: tl.constexpr, FP8: tl.constexpr):
    """int8 codes, or the bytes of e4m3 codes (FP8), as float32."""
    if FP8:
        return q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return _int8_to_f32(q, ASM)


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, bias_ptr, out_ptr, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
    FP8: tl.constexpr,
):
    """Decode path, one activation row: ``out (1, N) = x (1, K) @ (q * s).T``.

    BLOCK_N rows per program, the threads along K with 16 consecutive codes each (one 16-byte
    load), the activations loaded in the codes' layout (``rows * 0``: the same addresses for
    every row fold into one load per thread), so nothing moves between threads until the final
    sum. Rows past N are clamped (valid memory, dropped at the store); with EVEN_K no load is
    masked, otherwise one masked step takes the tail."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    q_ptrs = qweight_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    x_ptrs = x_ptr + rows[:, None] * 0 + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    full = K // BLOCK_K
    for b in range(0, full):
        q = tl.load(q_ptrs + b * BLOCK_K)
        acc += _codes_to_f32(q, ASM, FP8) * tl.load(x_ptrs + b * BLOCK_K).to(tl.float32)
    if not EVEN_K:
        k_ok = (full * BLOCK_K + offs_k < K)[None, :] & (rows[:, None] >= 0)
        q = tl.load(q_ptrs + full * BLOCK_K, mask=k_ok, other=0)
        acc += _codes_to_f32(q, ASM, FP8) * tl.load(x_ptrs + full * BLOCK_K, mask=k_ok, other=0.0).to(tl.float32)
    out = tl.sum(acc, axis=1) * tl.load(scales_ptr + rows).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _w8a16_dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    """The float weight ``q * s`` ``(N, K)`` in the output's dtype (exact in float32, rounded once,
    as the reference): one pass, 16-byte loads, for cuBLAS at large M."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1)
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    offs = rows[:, None].to(tl.int64) * K + offs_k[None, :]
    q = tl.load(q_ptr + offs, mask=ok, other=0)
    w = _codes_to_f32(q, False, FP8) * tl.load(s_ptr + rows).to(tl.float32)[:, None]
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, FP8: tl.constexpr,
):
    """Tensor-core path: 8-bit tiles converted to the activation dtype and fed to ``tl.dot``."""
    offs_m, offs_n, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(tl.cdiv(K, BLOCK_K)):
        k = b * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(qweight_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if FP8:
            q = q.to(tl.float8e4nv, bitcast=True)
        if DOT_F32:  # fp32 activations, and Triton's interpreter, which mishandles bf16 dots
            acc = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc)
    acc *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, HAS_BIAS)


# Paths by M (activation rows). The GEMM's block shapes are from benchmarks/tune.py on the H100 at
# the Llama-3-8B shapes; DEQUANT_MIN_M from benchmarks/ab.py on the H200 (a tie with the GEMM at
# M = 128, dequantize + cuBLAS well ahead at 1024; nothing between was timed).
GEMV_MAX_M = 1
DEQUANT_MIN_M = 256


def _gemm_config(m: int, n: int, k: int) -> dict:
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def w8a16_gemv(x2, qweight, scales, bias, config=None):
    """``(M, K) -> (M, N)`` on the decode kernel, one launch per activation row (M is 1 in decode)."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = dict(config or gemv_8bit_config(n, k))
    asm = cfg.pop("ASM", True) and not INTERPRET
    fp8 = qweight.dtype == FP8_DTYPE
    codes = qweight.view(torch.uint8) if fp8 else qweight
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    for row in range(m):
        wrap_triton(_w8a16_gemv_kernel)[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            x2[row], codes, scales, bias if bias is not None else scales, out[row], n, k,
            HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, ASM=asm, FP8=fp8, **cfg,
        )
    return out


def w8a16_gemm(x2, qweight, scales, bias, config=None):
    """``(M, K) -> (M, N)`` on the tensor-core kernel."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = config or _gemm_config(m, n, k)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    fp8 = qweight.dtype == FP8_DTYPE
    wrap_triton(_w8a16_gemm_kernel)[grid](
        x2, qweight.view(torch.uint8) if fp8 else qweight, scales, bias if bias is not None else scales, out, m, n, k,
        x2.stride(0), out.stride(0), HAS_BIAS=bias is not None, DOT_F32=INTERPRET or x2.dtype == torch.float32, FP8=fp8,
        **cfg,
    )
    return out


def w8a16_dequantize(qweight, scales, dtype, block_n: int = 8, block_k: int = 512):
    """The float ``(N, K)`` weight on the dequantize kernel."""
    from torch.library import wrap_triton

    n, k = qweight.shape
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    fp8 = qweight.dtype == FP8_DTYPE
    wrap_triton(_w8a16_dequant_kernel)[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight.view(torch.uint8) if fp8 else qweight, scales, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, FP8=fp8,
        num_warps=4,
    )
    return out


def w8a16_triton(x, qweight, scales, bias):
    """The GPU path of the op: GEMV for decode-sized M, the fused GEMM in between, the dequantize
    kernel then cuBLAS for large M, and the reference for fp32 activations."""
    x2 = as_rows(x)
    m = x2.shape[0]
    if m <= GEMV_MAX_M:
        out = w8a16_gemv(x2, qweight, scales, bias)
    elif m < DEQUANT_MIN_M and x2.dtype != torch.float32:
        out = w8a16_gemm(x2, qweight, scales, bias)
    elif x2.dtype != torch.float32:  # compute-bound: the weight once in float, then cuBLAS
        out = F.linear(x2, w8a16_dequantize(qweight, scales, x2.dtype), None if bias is None else bias.to(x2.dtype))
    else:
        out = w8a16_reference(x2, qweight, scales, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@torch.library.triton_op("pymllm_fx::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``x @ (qweight * scales).T + bias`` (int8 or e4m3 codes): Triton on CUDA, the torch reference elsewhere."""
    _check(x, qweight, scales, bias)
    if runs_triton(x):
        return w8a16_triton(x, qweight, scales, bias)
    return w8a16_reference(x, qweight, scales, bias)
