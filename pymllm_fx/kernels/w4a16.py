"""W4A16: 4-bit weights, 16-bit activations. The runtime layout, its packing, the Triton kernels
and the op.

Runtime layout (every 4-bit method repacks into it in ``process_weights_after_loading``):

- ``qweight`` int32 ``(N, K // 8)``: row n holds the 4-bit codes of output feature n; nibble j
  (bits ``4j .. 4j+3``) of word i is input feature ``8*i + j``.
- ``scales`` ``(N, G)`` float, ``G = ceil(K / group_size)``; the last group may be shorter (a tail).
- ``zeros`` ``(N, G)`` float holding integer zero points 0..15, or ``None`` for symmetric weights,
  whose zero point is 8. The weight is ``(code - zero) * scale``.
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

PACK_FACTOR = 8
SYMMETRIC_ZERO = 8


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``(R, C)`` -> int32 ``(R, ceil(C / f))``, ``f = 32 // bits``:
    value j of a word sits at bits ``bits*j`` (low first); a short last word is padded with zeros.
    The layout of this runtime format and of GPTQ and compressed-tensors checkpoints alike."""
    f = 32 // bits
    values = values.to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"pack_words: values must lie in 0..{(1 << bits) - 1}")
    rows, cols = values.shape
    padded = F.pad(values, (0, -cols % f))
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64)
    # Built in int64 so the top value cannot overflow, then the low 32 bits reinterpreted.
    words = (padded.view(rows, -1, f) << shifts).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``(N, K)`` integer codes in 0..15 into int32 ``(N, K // 8)``, low nibble first."""
    if codes.shape[1] % PACK_FACTOR:
        raise ValueError(f"pack_int4: K={codes.shape[1]} must be a multiple of {PACK_FACTOR}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_int4: codes must lie in 0..15")
    return pack_words(codes, 4)


def unpack_words(words: torch.Tensor, bits: int, size: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_words`: int32 ``(R, W)`` -> int32 values ``(R, size or W * 32 // bits)``."""
    rows, count = words.shape
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # masking undoes the sign extension
    values = values.reshape(rows, count * (32 // bits))
    return values if size is None else values[:, :size]


def unpack_int4(qweight: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``(N, K // 8)`` -> uint8 codes ``(N, K)``."""
    return unpack_words(qweight, 4, k).to(torch.uint8)


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
    check_contiguous(op, qweight=qweight, scales=scales, zeros=zeros, bias=bias)


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


# --- Triton kernels ----------------------------------------------------------------------------
# Codes become floats without an int->float conversion (a quarter-rate instruction): OR-ing a
# code c into the mantissa of 2**23 gives the float 2**23 + c exactly, and subtracting
# 2**23 + zero leaves c - zero, exact in float32 (and in bf16/fp16: |c - zero| <= 15).


@triton.jit
def _plane(q, j: tl.constexpr, offset):
    """Nibble j of every word in ``q`` as ``code - zero`` in float32 (``offset`` = 2**23 + zero)."""
    return (((q >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - offset


@triton.jit
def _unpack_tile(q, offset, scale, dtype: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 words ``[ROWS, BLOCK_K // 8]`` -> dequantized ``[ROWS, BLOCK_K]`` in K order.

    The eight nibble planes are joined so that the new axes stay inside each thread (no shuffles):
    joining evens with odds, recursively, puts plane j of word i at column 8 * i + j.
    """
    p0 = (_plane(q, 0, offset) * scale).to(dtype)  # scale 1.0 folds away
    p1 = (_plane(q, 1, offset) * scale).to(dtype)
    p2 = (_plane(q, 2, offset) * scale).to(dtype)
    p3 = (_plane(q, 3, offset) * scale).to(dtype)
    p4 = (_plane(q, 4, offset) * scale).to(dtype)
    p5 = (_plane(q, 5, offset) * scale).to(dtype)
    p6 = (_plane(q, 6, offset) * scale).to(dtype)
    p7 = (_plane(q, 7, offset) * scale).to(dtype)
    evens = tl.join(tl.join(p0, p4), tl.join(p2, p6))
    odds = tl.join(tl.join(p1, p5), tl.join(p3, p7))
    return tl.reshape(tl.join(evens, odds), (ROWS, BLOCK_K))


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b``; float32 operands stay float32 (Triton would round them to tf32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    N, K, num_groups, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Decode path, one activation row per program column: CUDA-core FMAs, no tensor cores.

    Each program streams BLOCK_N weight rows one group at a time (one scale and zero per row per
    step), one nibble plane at a time, so every value stays in the thread that loaded its word;
    the matching activations (every 8th feature) come from L1. With SPLIT_K > 1 the groups are
    shared out and the partial sums meet in a zeroed float32 output.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    WORDS: tl.constexpr = GROUP_SIZE // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_w = tl.arange(0, WORDS)
    k_words = K // 8
    per_split = tl.cdiv(num_groups, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, num_groups)
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    for g in range(first, last):
        word = g * WORDS + offs_w
        in_k = word < k_words
        q = tl.load(qweight_ptr + offs_n[:, None] * k_words + word[None, :], mask=n_ok[:, None] & in_k[None, :], other=0)
        scale = tl.load(scales_ptr + offs_n * num_groups + g, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            offset = tl.load(zeros_ptr + offs_n * num_groups + g, mask=n_ok, other=0.0).to(tl.float32) + 8388608.0
        else:
            offset = tl.full((BLOCK_N,), 8388616.0, tl.float32)  # 2**23 + 8
        offset = offset[:, None]
        xk = x_row + word * 8
        part = _plane(q, 0, offset) * tl.load(xk, mask=in_k, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(1, 8):
            part += _plane(q, j, offset) * tl.load(xk + j, mask=in_k, other=0.0).to(tl.float32)[None, :]
        acc += part * scale[:, None]
    out = tl.sum(acc, axis=1)
    store_row(out_ptr + row * stride_om, out, bias_ptr, offs_n, n_ok, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K, num_groups, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
):
    """Tensor-core path: each (BLOCK_N, BLOCK_K) weight tile is dequantized in registers and fed
    to ``tl.dot``. BLOCK_K divides GROUP_SIZE, so a tile sees one scale per output row.

    SCALE_AFTER_DOT (small M): the tile holds the exact integers ``code - zero`` and the scale
    multiplies the (BLOCK_M, BLOCK_N) partial product instead of every weight."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    k_words = K // 8
    dtype = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(tl.cdiv(K, BLOCK_K)):
        k = b * BLOCK_K + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        word = b * WORDS + offs_w
        q = tl.load(
            qweight_ptr + offs_n[:, None] * k_words + word[None, :],
            mask=n_ok[:, None] & (word < k_words)[None, :],
            other=0,
        )
        group = b * BLOCK_K // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n * num_groups + group, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n * num_groups + group, mask=n_ok, other=0.0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 8.0, tl.float32)
        # fp32 runs (and Triton's interpreter, which mishandles bf16 dots) round the weight to the
        # activation dtype first, as the reference does.
        if SCALE_AFTER_DOT:
            w = _unpack_tile(q, (zero + 8388608.0)[:, None], 1.0, x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
            acc += _dot(x.to(dtype), tl.trans(w.to(dtype)), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_F32) * scale[None, :]
        else:
            w = _unpack_tile(q, (zero + 8388608.0)[:, None], scale[:, None], x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
            acc = _dot(x.to(dtype), tl.trans(w.to(dtype)), acc, DOT_F32)
    store_tile(out_ptr, acc, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, HAS_BIAS)


@triton.jit
def _w4a16_dequant_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, num_groups,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The float weight ``(N, K)`` in the output's dtype, for the dequantize-then-cuBLAS path.
    BLOCK_K divides GROUP_SIZE, so a tile has one scale per row."""
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    n_ok = offs_n < N
    k_words = K // 8
    q = tl.load(qweight_ptr + offs_n[:, None] * k_words + word[None, :], mask=n_ok[:, None] & (word < k_words)[None, :], other=0)
    group = tl.program_id(1) * BLOCK_K // GROUP_SIZE
    scale = tl.load(scales_ptr + offs_n * num_groups + group, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + offs_n * num_groups + group, mask=n_ok, other=0.0).to(tl.float32)
    else:
        zero = tl.full((BLOCK_N,), 8.0, tl.float32)
    w = _unpack_tile(q, (zero + 8388608.0)[:, None], scale[:, None], out_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + k[None, :], w, mask=n_ok[:, None] & (k < K)[None, :])


# --- path choice and launch ---------------------------------------------------------------------
# Paths and block shapes by M (activation rows), from benchmarks/tune.py on the H100 at the
# Llama-3-8B shapes: the GEMV for one row, the fused tensor-core GEMM up to DEQUANT_MIN_M rows,
# then dequantize-then-cuBLAS, where the dequantization is a small share of the matmul.
GEMV_MAX_M = 1
DEQUANT_MIN_M = 64


def _gemv_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    block_n = 32 if n * k <= (1 << 24) else 64 if n < 16384 else 128
    programs = -(-n // block_n) * m
    groups = num_groups(k, group_size)
    split_k = 1
    while programs * split_k < 4 * num_sms(device) and split_k < 4 and groups >= 4 * split_k:
        split_k *= 2
    return dict(BLOCK_N=block_n, SPLIT_K=split_k, num_warps=8 if block_n == 64 else 4, num_stages=2)


def _gemm_config(m: int, n: int, k: int, group_size: int) -> dict:
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)
    elif m <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    return dict(cfg, GROUP_M=8, SCALE_AFTER_DOT=m <= 32)


def w4a16_gemv(x2, qweight, scales, zeros, group_size, bias, config=None):
    """``(M, K) -> (M, N)`` on the decode kernel."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = config or _gemv_config(m, n, k, group_size, x2.device)
    split_k = cfg["SPLIT_K"]
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype) if split_k == 1 else torch.zeros(
        (m, n), device=x2.device, dtype=torch.float32
    )
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, m)
    wrap_triton(_w4a16_gemv_kernel)[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        n, k, scales.shape[1], x2.stride(0), out.stride(0),
        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, **cfg,
    )
    return out if split_k == 1 else out.to(x2.dtype)


def w4a16_gemm(x2, qweight, scales, zeros, group_size, bias, config=None):
    """``(M, K) -> (M, N)`` on the tensor-core kernel."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = {"SCALE_AFTER_DOT": False, **(config or _gemm_config(m, n, k, group_size))}
    if group_size % cfg["BLOCK_K"]:
        raise ValueError(f"w4a16_gemm: BLOCK_K={cfg['BLOCK_K']} must divide group_size={group_size}")
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_w4a16_gemm_kernel)[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        m, n, k, scales.shape[1], x2.stride(0), out.stride(0),
        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        DOT_F32=INTERPRET or x2.dtype == torch.float32, **cfg,
    )
    return out


def w4a16_dequantize(qweight, scales, zeros, group_size, dtype, config=None):
    """The float ``(N, K)`` weight, on the dequantize kernel."""
    from torch.library import wrap_triton

    n, k = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    cfg = config or dict(BLOCK_N=32, BLOCK_K=min(128, group_size), num_warps=4)
    if group_size % cfg["BLOCK_K"]:
        raise ValueError(f"w4a16_dequantize: BLOCK_K={cfg['BLOCK_K']} must divide group_size={group_size}")
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))
    wrap_triton(_w4a16_dequant_kernel)[grid](
        qweight, scales, zeros if zeros is not None else scales, out, n, k, scales.shape[1],
        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, **cfg,
    )
    return out


def w4a16_triton(x, qweight, scales, zeros, group_size, bias):
    """The GPU path of the op: GEMV for decode-sized M, the fused GEMM in between, and
    dequantize-then-cuBLAS for large M (or fp32 activations past decode sizes)."""
    x2 = as_rows(x)
    m = x2.shape[0]
    if group_size < 16 or group_size > 256 or group_size & (group_size - 1):
        # Triton block shapes are powers of two; other group sizes take the (exact) reference.
        out = w4a16_reference(x2, qweight, scales, zeros, group_size, bias)
    elif m <= GEMV_MAX_M:
        out = w4a16_gemv(x2, qweight, scales, zeros, group_size, bias)
    elif m < DEQUANT_MIN_M and x2.dtype != torch.float32:
        out = w4a16_gemm(x2, qweight, scales, zeros, group_size, bias)
    else:
        weight = w4a16_dequantize(qweight, scales, zeros, group_size, x2.dtype)
        out = F.linear(x2, weight, None if bias is None else bias.to(x2.dtype))
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@torch.library.triton_op("pymllm_fx::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``x @ dequantize(qweight).T + bias``. Triton on CUDA, the torch reference elsewhere; under
    torch.compile Inductor traces into this function and compiles the kernels into the graph."""
    _check(x, qweight, scales, zeros, group_size, bias)
    if runs_triton(x):
        return w4a16_triton(x, qweight, scales, zeros, group_size, bias)
    return w4a16_reference(x, qweight, scales, zeros, group_size, bias)
