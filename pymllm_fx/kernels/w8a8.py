"""W8A8 int8: int8 weights with one scale per output channel, activations quantized to int8 per
token at run time (or with a checkpoint's static per-tensor scale), int8 x int8 -> int32 products.

Layout: ``qweight`` int8 ``(N, K)``, ``weight_scale`` float32 ``(N,)``; the weight is
``qweight * weight_scale``. Activations:

- dynamic (``input_scale`` None): each row (token) gets ``s = max(|x_row|) / 127`` and
  ``q = clamp(round(x * (127 / max(|x_row|))), -128, 127)`` (symmetric; vLLM's per-token int8
  quantization, which multiplies by the reciprocal as well);
- static (``input_scale`` float32 ``(1,)``, a checkpoint's): ``q = clamp(round(x / s) + z, -128, 127)``
  with ``z`` = ``input_zero_point`` int32 ``(1,)`` when the checkpoint is asymmetric, else 0.

``round`` is round-half-to-even (``torch.round``); every division is float32. The product is
``(sum_k q[m, k] * qweight[n, k] - z * weight_sums[n]) * s[m] * weight_scale[n] + bias[n]``, the sum in
exact integers; ``weight_sums`` int32 ``(N,)`` is ``qweight.sum(1)``, needed only with a zero point.
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
from pymllm_fx.kernels.w8a16 import _int8_to_f32

INT8_MIN, INT8_MAX = -128, 127
_MIN_AMAX = 1.27e-10  # an all-zero row keeps a finite scale, about 1e-12 (its codes are 0)
OP = "pymllm_fx.w8a8_linear"


def quantize_int8_per_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(..., K)`` float -> (int8 ``(..., K)``, float32 scales ``(..., 1)``), one symmetric scale per row."""
    xf = x.float()
    # Multiplied by 127 / amax, as vLLM's CUDA quantizer does (one multiply a value, not a division).
    # Tensor operands: CUDA divides by a Python number as a multiply by its reciprocal (1 ulp off
    # the IEEE division the kernels do).
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX)
    int8_max = xf.new_tensor(float(INT8_MAX))
    scale, inv_scale = amax / int8_max, int8_max / amax
    return torch.round(xf * inv_scale).clamp(INT8_MIN, INT8_MAX).to(torch.int8), scale


def quantize_int8_static(
    x: torch.Tensor, input_scale: torch.Tensor, input_zero_point: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(..., K)`` float -> int8 with one given scale (and zero point) for the whole tensor."""
    q = torch.round(x.float() / input_scale.float())
    if input_zero_point is not None:
        q = q + input_zero_point.float()
    return q.clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(M, K) int8 @ (N, K).T int8 -> (M, N) int32``, exactly: ``torch._int_mm`` on the CPU; in float64
    elsewhere (CUDA's ``_int_mm`` refuses small M), which is exact since every sum stays below 2**53."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b.t())
    return torch.matmul(a.double(), b.double().t()).to(torch.int32)


def _check(x, qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias) -> None:
    if qweight.dim() != 2:
        raise ValueError(f"{OP}: qweight must be 2-D (N, K), got shape {tuple(qweight.shape)}")
    n, k = qweight.shape
    check_activation(OP, x, k)
    check_tensor(OP, "qweight", qweight, (n, k), (torch.int8,), x.device)
    check_tensor(OP, "weight_scale", weight_scale, (n,), (torch.float32,), x.device)
    if input_scale is not None:
        check_tensor(OP, "input_scale", input_scale, (1,), (torch.float32,), x.device)
    if input_zero_point is not None:
        if input_scale is None:
            raise ValueError(f"{OP}: input_zero_point needs a static input_scale (dynamic activations are symmetric)")
        check_tensor(OP, "input_zero_point", input_zero_point, (1,), (torch.int32,), x.device)
        if weight_sums is None:
            raise ValueError(f"{OP}: input_zero_point needs weight_sums (int32 qweight.sum(1)) for its correction")
    if weight_sums is not None:
        check_tensor(OP, "weight_sums", weight_sums, (n,), (torch.int32,), x.device)
    check_bias(OP, bias, n, x.device)
    check_contiguous(OP, qweight=qweight, weight_scale=weight_scale, weight_sums=weight_sums, bias=bias)


def w8a8_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: Optional[torch.Tensor] = None,
    input_zero_point: Optional[torch.Tensor] = None,
    weight_sums: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch reference: quantize ``x``, exact int32 products, then the scales and the bias in float32."""
    x2 = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        xq, x_scale = quantize_int8_per_token(x2)
    else:
        xq, x_scale = quantize_int8_static(x2, input_scale, input_zero_point), input_scale.float()
    acc = int8_matmul(xq, qweight)
    if input_zero_point is not None:
        acc = acc - input_zero_point * weight_sums
    out = acc.float() * x_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


# --- Triton kernels ----------------------------------------------------------------------------
# Every kernel quantizes activations exactly as the reference does: the scale amax / 127, a dynamic
# row's values x * (127 / amax), a static one's x / s, every division IEEE float32 (tl.math.div_rn),
# round half to even, clamp, so Triton and the reference agree on the int8 values; the dots sum
# exact integers.

# Round half to even on the GPU: one cvt.rni (what libdevice's rint is). The interpreter has no
# libdevice, so its twin adds and subtracts 1.5 * 2**23, which leaves the float32 sum rounded to
# an integer, half to even, for |v| < 2**22 (v is clamped to +-256 first: the result is clamped
# to int8 anyway). A GPU test checks the two bit for bit.
_RINT = tl.constexpr("cvt.rni.f32.f32 $0, $1;")


@triton.jit
def _row_amax(x_row_ptr, K, ROW_BLOCK: tl.constexpr):
    """A row's largest magnitude (floored). ROW_BLOCK spans the whole row up to 8192 features: each
    step is a round trip to memory, and a decode launch waits on all of them before its first weight."""
    amax = tl.zeros((ROW_BLOCK,), dtype=tl.float32)
    for start in range(0, K, ROW_BLOCK):
        k = start + tl.arange(0, ROW_BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row_ptr + k, mask=k < K, other=0.0).to(tl.float32)))
    return tl.maximum(tl.max(amax, axis=0), 1.27e-10)


@triton.jit
def _quantize(x, scale, inv_scale, zero, STATIC: tl.constexpr, ASM: tl.constexpr):
    """The int8 value of ``x`` as an integral float32 (exact, ready for a float product or a cast):
    ``x * (127 / amax)`` for a dynamic row, ``x / scale`` (IEEE, as torch's) for a static scale."""
    if STATIC:
        v = tl.math.div_rn(x, scale)  # Triton's `/` is div.full (2 ulp)
    else:
        v = x * inv_scale
    v = tl.clamp(v, -256.0, 256.0)
    if ASM:
        v = tl.inline_asm_elementwise(_RINT, "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    else:
        v = (v + 12582912.0) - 12582912.0
    return tl.clamp(v + zero, -128.0, 127.0)


@triton.jit
def _w8a8_quantize_rows_kernel(
    x_ptr, xq_ptr, scale_ptr, in_scale_ptr, in_zero_ptr, K, stride_xm,
    STATIC: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    """One program per row: its scale (dynamic) or the given one, then its int8 values. ONE_PASS
    (the row fits one BLOCK_K): one load, kept in registers for both the scale and the values."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    zero = tl.load(in_zero_ptr).to(tl.float32) if HAS_ZERO else 0.0
    if ONE_PASS:
        k = tl.arange(0, BLOCK_K)
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1.27e-10)
    else:
        amax = _row_amax(x_row, K, BLOCK_K)
    if STATIC:
        scale = tl.load(in_scale_ptr)
    else:
        scale = tl.math.div_rn(amax, 127.0)
        tl.store(scale_ptr + row, scale)
    inv_scale = tl.math.div_rn(127.0, amax)
    if ONE_PASS:
        tl.store(xq_ptr + row * K + k, _quantize(x, scale, inv_scale, zero, STATIC, ASM).to(tl.int8), mask=k < K)
    else:
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            tl.store(xq_ptr + row * K + k, _quantize(x, scale, inv_scale, zero, STATIC, ASM).to(tl.int8), mask=k < K)


@triton.jit
def _activations(x_row, k, scale, inv_scale, zero, STATIC: tl.constexpr, PREQUANT: tl.constexpr, ASM: tl.constexpr):
    """The int8 values of the activations at ``x_row + k`` as integral float32: loaded from the
    row quantizer's output (PREQUANT), or quantized here."""
    if PREQUANT:
        return _int8_to_f32(tl.load(x_row + k), ASM)
    return _quantize(tl.load(x_row + k).to(tl.float32), scale, inv_scale, zero, STATIC, ASM)


@triton.jit
def _w8a8_gemv_kernel(
    x_ptr, in_scale_ptr, in_zero_ptr, w_ptr, w_scale_ptr, w_sums_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
    stride_xs, STATIC: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr, PREQUANT: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
):
    """Decode path on CUDA cores. Fused (one launch): each program finds its row's scale (the row
    is a few KB, read from L2), then quantizes its chunks of x as it streams weights. PREQUANT:
    ``x_ptr`` holds the row quantizer's int8 values and ``in_scale_ptr`` its scales (row stride
    ``stride_xs``), so no program repeats the division per activation (a second launch instead).
    Products of int8 values are exact in float32, and so is each lane's sum of K / BLOCK_K of them.
    Rows past N are clamped (valid memory, dropped at the store); with EVEN_K no load in the loop
    is masked, otherwise one masked step takes the tail."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    x_row = x_ptr + row * stride_xm
    if STATIC or PREQUANT:
        scale = tl.load(in_scale_ptr + row * stride_xs)
        inv_scale = scale  # unread
    else:
        amax = _row_amax(x_row, K, ROW_BLOCK)
        scale = tl.math.div_rn(amax, 127.0)
        inv_scale = tl.math.div_rn(127.0, amax)
    zero = tl.load(in_zero_ptr).to(tl.float32) if HAS_ZERO else 0.0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    full = K // BLOCK_K
    for b in range(0, full):
        xq = _activations(x_row, b * BLOCK_K + offs_k, scale, inv_scale, zero, STATIC, PREQUANT, ASM)
        acc += _int8_to_f32(tl.load(w_ptrs + b * BLOCK_K), ASM) * xq[None, :]
    if not EVEN_K:
        k_ok = full * BLOCK_K + offs_k < K
        x = tl.load(x_row + full * BLOCK_K + offs_k, mask=k_ok, other=0)
        if PREQUANT:
            xq = _int8_to_f32(x, ASM)
        else:  # a zero point would make the padding non-zero
            xq = tl.where(k_ok, _quantize(x.to(tl.float32), scale, inv_scale, zero, STATIC, ASM), 0.0)
        w = tl.load(w_ptrs + full * BLOCK_K, mask=k_ok[None, :] & (rows[:, None] >= 0), other=0)
        acc += _int8_to_f32(w, ASM) * xq[None, :]
    dot = tl.sum(acc, axis=1)
    if HAS_ZERO:
        dot -= zero * tl.load(w_sums_ptr + rows).to(tl.float32)
    out = dot * scale * tl.load(w_scale_ptr + rows)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _w8a8_gemm_kernel(
    xq_ptr, x_scale_ptr, stride_xs, in_zero_ptr, w_ptr, w_scale_ptr, w_sums_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tensor-core path on quantized activations: int8 x int8 -> int32 ``tl.dot``; the zero-point
    correction, both scales and the bias in the epilogue. ``stride_xs`` is 1 for per-row scales,
    0 for one static scale."""
    offs_m, offs_n, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for b in range(tl.cdiv(K, BLOCK_K)):
        k = b * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(xq_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    if HAS_ZERO:
        acc -= tl.load(in_zero_ptr) * tl.load(w_sums_ptr + offs_n, mask=n_ok, other=0)[None, :]
    out = acc.to(tl.float32) * tl.load(x_scale_ptr + offs_m * stride_xs, mask=m_ok, other=0.0)[:, None]
    out *= tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    store_tile(out_ptr, out, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, HAS_BIAS)


# Paths by M: the fused GEMV for decode, else the row quantizer and the int8 GEMM; one row over
# DECODE_GEMM_MIN_N outputs also takes the GEMM (H200, 4096x28672: 34.6 us against the GEMV's 48.5).
# Block shapes from benchmarks/tune.py and benchmarks/ab.py on the H200 (benchmarks/NOTES_w4a16.md).
GEMV_MAX_M = 1
DECODE_GEMM_MIN_N = 16384


def _gemm_config(m: int) -> dict:
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=5)
    if m <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


# Rows up to this many features are quantized from one load (registers), longer ones in steps.
ROW_BLOCK_MAX = 8192


def _row_block(k: int) -> int:
    return min(triton.next_power_of_2(k), ROW_BLOCK_MAX)


def w8a8_quantize_rows(x2, input_scale=None, input_zero_point=None, block_k: Optional[int] = None, asm: bool = True):
    """``(M, K)`` -> (int8 ``(M, K)``, float32 scales: ``(M, 1)`` dynamic, or ``input_scale``) in one launch."""
    from torch.library import wrap_triton

    m, k = x2.shape
    block_k = min(block_k, triton.next_power_of_2(k)) if block_k else _row_block(k)
    xq = torch.empty((m, k), device=x2.device, dtype=torch.int8)
    static = input_scale is not None
    scale = input_scale if static else torch.empty((m, 1), device=x2.device, dtype=torch.float32)
    wrap_triton(_w8a8_quantize_rows_kernel)[(m,)](
        x2, xq, scale, scale, input_zero_point if input_zero_point is not None else scale, k, x2.stride(0),
        STATIC=static, HAS_ZERO=input_zero_point is not None, BLOCK_K=block_k, ASM=asm and not INTERPRET,
        ONE_PASS=k <= block_k, num_warps=8 if block_k >= 4096 else 4,
    )
    return xq, scale


# The decode GEMV quantizes the activations in every program (PREQUANT False: one launch, one
# multiply a value in every program), or takes them from the row quantizer (True: two launches).
# On the H200 the fused one won at 3 of the 4 Llama-3-8B shapes once the row's scale came from one
# load and the division became a multiply (4096x4096: 8.6 against 9.4 us).
GEMV_PREQUANT = False


def w8a8_gemv(x2, qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias, config=None):
    """``(M, K) -> (M, N)`` on the decode kernel (one program column per row)."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = dict(config or gemv_8bit_config(n, k))
    asm = cfg.pop("ASM", True) and not INTERPRET
    prequant = cfg.pop("PREQUANT", GEMV_PREQUANT)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    anything = weight_scale  # a valid pointer for the arguments a constexpr switch leaves unread
    scale, stride_xs = input_scale, 0
    if prequant:
        x2, scale = w8a8_quantize_rows(x2, input_scale, input_zero_point, asm=asm)
        stride_xs = 0 if input_scale is not None else 1
    wrap_triton(_w8a8_gemv_kernel)[(triton.cdiv(n, cfg["BLOCK_N"]), m)](
        x2, scale if scale is not None else anything,
        input_zero_point if input_zero_point is not None else anything, qweight, weight_scale,
        weight_sums if weight_sums is not None else anything, bias if bias is not None else anything, out,
        n, k, x2.stride(0), out.stride(0), stride_xs,
        STATIC=input_scale is not None, HAS_ZERO=input_zero_point is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg["BLOCK_K"] == 0, ASM=asm, PREQUANT=prequant, ROW_BLOCK=_row_block(k), **cfg,
    )
    return out


def w8a8_gemm(x2, qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias, config=None):
    """``(M, K) -> (M, N)``: quantize the rows (one launch), then the int8 tensor-core GEMM."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = dict(config or _gemm_config(m))
    xq, x_scale = w8a8_quantize_rows(x2, input_scale, input_zero_point, asm=cfg.pop("ASM", True))
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    anything = weight_scale
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_w8a8_gemm_kernel)[grid](
        xq, x_scale, 0 if input_scale is not None else 1,
        input_zero_point if input_zero_point is not None else anything, qweight, weight_scale,
        weight_sums if weight_sums is not None else anything, bias if bias is not None else anything, out,
        m, n, k, out.stride(0),
        HAS_ZERO=input_zero_point is not None, HAS_BIAS=bias is not None, **cfg,
    )
    return out


def w8a8_triton(x, qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias):
    """The GPU path of the op, chosen by M (activation rows)."""
    x2 = as_rows(x)
    args = (qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias)
    gemv = x2.shape[0] <= GEMV_MAX_M and qweight.shape[0] < DECODE_GEMM_MIN_N
    out = w8a8_gemv(x2, *args) if gemv else w8a8_gemm(x2, *args)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@torch.library.triton_op("pymllm_fx::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: Optional[torch.Tensor],
    input_zero_point: Optional[torch.Tensor],
    weight_sums: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """int8 quantization of ``x`` (per token, or static per tensor), then ``x_int8 @ qweight.T`` in
    int32 with both scales, + bias: Triton on CUDA, the torch reference elsewhere."""
    _check(x, qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias)
    if runs_triton(x):
        return w8a8_triton(x, qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias)
    return w8a8_reference(x, qweight, weight_scale, input_scale, input_zero_point, weight_sums, bias)
