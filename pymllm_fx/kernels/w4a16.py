"""W4A16: 4-bit weights, 16-bit activations. The runtime layout, its packing, the Triton kernels
and the op.

Runtime layout (every 4-bit method repacks into it in ``process_weights_after_loading``):

- ``qweight`` int32 ``(N, K // 8)``: the 4-bit codes of output feature n in row n, in tiles of 64
  input features. Read as int16 ``(N, K // 4)``: element ``16*t + p`` of tile t holds in its nibble
  j (bits ``4j .. 4j+3``) the code of input feature ``64*t + 16*j + p``. A last tile narrower than
  64 features (K not a multiple of 64) of width W uses ``W // 4`` for the 16.
- ``scales`` ``(N, G)`` float, ``G = ceil(K / group_size)``; the last group may be shorter (a tail).
- ``zeros`` ``(N, G)`` float holding integer zero points 0..15, or ``None`` for symmetric weights,
  whose zero point is 8. The weight is ``(code - zero) * scale``.

Why the tiles: the kernels read 4 codes (one int16) per register half, and a shift plus one
logic op turns nibble j of two int16 into two 16-bit floats of the same row, 16 features
apart. So a tile splits into four 16-feature quarters, each a ready tensor-core operand that is
multiplied with 16 contiguous activations: no shuffles, no trip through shared memory.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from pymllm_fx.kernels._checks import FLOATS, check_activation, check_bias, check_tensor
from pymllm_fx.kernels._triton import INTERPRET, as_rows, check_contiguous, runs_triton, tl, triton

PACK_FACTOR = 8
SYMMETRIC_ZERO = 8
TILE = 64  # input features per interleaving tile of the runtime layout
QUARTER = TILE // 4
_TILE = tl.constexpr(TILE)  # the same, for the kernels
_QUARTER = tl.constexpr(QUARTER)


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``(R, C)`` -> int32 ``(R, ceil(C / f))``, ``f = 32 // bits``:
    value j of a word sits at bits ``bits*j`` (low first); a short last word is padded with zeros.
    The layout of GPTQ and compressed-tensors checkpoints, and the bit order of the runtime layout."""
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


def unpack_words(words: torch.Tensor, bits: int, size: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_words`: int32 ``(R, W)`` -> int32 values ``(R, size or W * 32 // bits)``."""
    rows, count = words.shape
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # masking undoes the sign extension
    values = values.reshape(rows, count * (32 // bits))
    return values if size is None else values[:, :size]


def tile_order(k: int, device=None) -> torch.Tensor:
    """``order[i]`` = the input feature whose code is the i-th nibble of a packed row (nibble j of
    word w is nibble ``8*w + j``), for a row of ``k`` features (a multiple of 8)."""
    pos = torch.arange(k, device=device)
    start = pos // TILE * TILE
    quarter = torch.clamp(k - start, max=TILE) // 4
    local = pos - start  # = 4 * p + j: int16 element p of the tile, its nibble j
    return start + (local % 4) * quarter + local // 4


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``(N, K)`` integer codes in 0..15 into the runtime layout, int32 ``(N, K // 8)``."""
    k = codes.shape[1]
    if k % PACK_FACTOR:
        raise ValueError(f"pack_int4: K={k} must be a multiple of {PACK_FACTOR}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_int4: codes must lie in 0..15")
    return pack_words(codes[:, tile_order(k, codes.device)], 4)


def unpack_int4(qweight: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``(N, K // 8)`` -> uint8 codes ``(N, K)`` (or the first k)."""
    packed = unpack_words(qweight, 4)
    codes = torch.empty_like(packed)
    codes[:, tile_order(packed.shape[1], packed.device)] = packed
    codes = codes.to(torch.uint8)
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


# --- Triton: turning codes into tensor-core operands -------------------------------------------
# The kernels compute out^T = W @ x^T: the weight tile is the left operand, which the tensor-core
# instructions (mma, and wgmma on Hopper) take from registers, and the few activation rows are
# the narrow right operand. Triton loads the int16 codes through shared memory straight into the
# left operand's register layout, and everything below is elementwise on that layout.
#
# Two forms, both inline PTX on CUDA, for one 32-bit register holding two int16 e0, e1:
#   shr   t, r, 4*j                      nibble j of e0 at bits 0..3, of e1 at bits 16..19
#   lop3  t, t, 0x000F000F, MAGIC        (t & mask) | MAGIC: two 16-bit floats MAGIC + code
# MAGIC is 128.0 in bf16 (0x4300: the unit of the last mantissa bit is 1) and 1024.0 in fp16
# (0x6400). The default path (``_raw_nibbles``) stops here, one instruction per weight: the dot
# takes MAGIC + code and the zero point and scale are applied to its float32 result per group.
# Groups under 64 features (SCALE_IN, ``_nibbles``) go on to the weight itself:
#   fma   w, t, 1.0, -(MAGIC + zero)     code - zero, exact
#   fma   w, w, scale, -0.0              (code - zero) * scale, rounded once as the reference does
# The portable paths compute the same values bit for bit (every step but the scale is exact, and
# that rounds once in both); Triton's interpreter, which has no inline assembly, and fp32
# activations take them. The assembly strings are single lines: Inductor copies a kernel's
# globals into the Python source it generates, where a multi-line string literal broke the
# compiled model.

_NIBBLE_BF16_SCALED = tl.constexpr("{ .reg .b32 t, one, nz; shr.u32 t, $1, $4; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xea; mov.b32 one, 0x3F803F80; mov.b32 nz, 0x80008000; fma.rn.bf16x2 t, t, one, $2; fma.rn.bf16x2 $0, t, $3, nz; }")
_NIBBLE_FP16_SCALED = tl.constexpr("{ .reg .b32 t, one, nz; shr.u32 t, $1, $4; lop3.b32 t, t, 0x000F000F, 0x64006400, 0xea; mov.b32 one, 0x3C003C00; mov.b32 nz, 0x80008000; fma.rn.f16x2 t, t, one, $2; fma.rn.f16x2 $0, t, $3, nz; }")


@triton.jit
def _nibbles(q, zero, scale, J: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Nibble J of every int16 in ``q`` as ``(code - zero) * scale`` in DTYPE.

    ``zero`` and ``scale`` are float32 tensors that broadcast against ``q`` (one value per row)."""
    if ASM:  # operands: $1 the codes, $2 -(MAGIC + zero), $3 the scale, then the shift (twice: 32-bit)
        shift = tl.full(q.shape, 4 * J, tl.int32)
        magic = 128.0 if DTYPE == tl.bfloat16 else 1024.0
        neg_zero = (-(zero + magic)).to(DTYPE)
        s = scale.to(DTYPE)
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_NIBBLE_BF16_SCALED, "=r,r,r,r,r,r", [q, neg_zero, s, shift],
                                             dtype=neg_zero.dtype, is_pure=True, pack=2)
        return tl.inline_asm_elementwise(_NIBBLE_FP16_SCALED, "=r,r,r,r,r,r", [q, neg_zero, s, shift],
                                         dtype=neg_zero.dtype, is_pure=True, pack=2)
    w = (((q.to(tl.int32) >> (4 * J)) & 0xF).to(tl.float32) - zero).to(DTYPE)
    return (w.to(tl.float32) * scale.to(DTYPE).to(tl.float32)).to(DTYPE)


_RAW_NIBBLE_BF16 = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, $2; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea; }")
_RAW_NIBBLE_FP16 = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, $2; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xea; }")


@triton.jit
def _raw_nibbles(q, J: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Nibble J of every int16 in ``q`` as ``MAGIC + code`` in DTYPE (exact): two weights per shift
    and LOP3, no zero point or scale (they are applied to the dot's result; see ``_tile_step``)."""
    if ASM:  # operands: $1 the codes, then the shift (twice: 32-bit)
        shift = tl.full(q.shape, 4 * J, tl.int32)
        dtype = tl.zeros((1,), DTYPE).dtype  # a plain dtype: the asm call cannot take a constexpr
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_RAW_NIBBLE_BF16, "=r,r,r,r", [q, shift], dtype=dtype, is_pure=True,
                                             pack=2)
        return tl.inline_asm_elementwise(_RAW_NIBBLE_FP16, "=r,r,r,r", [q, shift], dtype=dtype, is_pure=True, pack=2)
    magic = 1024 if DTYPE == tl.float16 else 128
    return (((q.to(tl.int32) >> (4 * J)) & 0xF) + magic).to(DTYPE)


@triton.jit
def _dot(w, x, acc, DOT_F32: tl.constexpr):
    """``acc + w @ x``; with DOT_F32 in exact float32 (fp32 activations, and Triton's interpreter,
    whose bf16 dots are wrong; the operands hold values exact in their dtype either way)."""
    if DOT_F32:
        return tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, x, acc)


@triton.jit
def _group_params(s_ptr, z_ptr, offs, g, HAS_ZEROS: tl.constexpr):
    """Scale and zero point (float32) of group ``g`` at the row offsets ``offs``."""
    s = tl.load(s_ptr + offs + g).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs + g).to(tl.float32)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    return s, z


@triton.jit
def _tile_step(acc, q, x_ptrs, x_mask, s, z, s_ptr, z_ptr, s_offs, k0, GROUP: tl.constexpr,
               HAS_ZEROS: tl.constexpr, SCALE_IN: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr,
               DOT_F32: tl.constexpr):
    """One K step: the four quarters of the codes ``q`` times the activations at ``x_ptrs`` (the
    first quarter's; quarter j is 16 features on). ``s``, ``z``: the step's group parameters, with
    an added trailing axis; with groups under 64 features (SCALE_IN) they are loaded per quarter
    from ``k0``, the step's first feature."""
    if SCALE_IN:
        if GROUP < _TILE:  # each quarter (16 features) lies in one group; reload when it changes
            s, z = _group_params(s_ptr, z_ptr, s_offs, k0 // GROUP, HAS_ZEROS)
            s, z = tl.expand_dims(s, -1), tl.expand_dims(z, -1)
        xj = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc = _dot(_nibbles(q, z, s, 0, DTYPE, ASM), xj, acc, DOT_F32)
        if GROUP < _TILE and GROUP <= _QUARTER:
            s, z = _group_params(s_ptr, z_ptr, s_offs, (k0 + _QUARTER) // GROUP, HAS_ZEROS)
            s, z = tl.expand_dims(s, -1), tl.expand_dims(z, -1)
        xj = tl.load(x_ptrs + _QUARTER, mask=x_mask, other=0.0)
        acc = _dot(_nibbles(q, z, s, 1, DTYPE, ASM), xj, acc, DOT_F32)
        if GROUP < _TILE:
            s, z = _group_params(s_ptr, z_ptr, s_offs, (k0 + 2 * _QUARTER) // GROUP, HAS_ZEROS)
            s, z = tl.expand_dims(s, -1), tl.expand_dims(z, -1)
        xj = tl.load(x_ptrs + 2 * _QUARTER, mask=x_mask, other=0.0)
        acc = _dot(_nibbles(q, z, s, 2, DTYPE, ASM), xj, acc, DOT_F32)
        if GROUP < _TILE and GROUP <= _QUARTER:
            s, z = _group_params(s_ptr, z_ptr, s_offs, (k0 + 3 * _QUARTER) // GROUP, HAS_ZEROS)
            s, z = tl.expand_dims(s, -1), tl.expand_dims(z, -1)
        xj = tl.load(x_ptrs + 3 * _QUARTER, mask=x_mask, other=0.0)
        acc = _dot(_nibbles(q, z, s, 3, DTYPE, ASM), xj, acc, DOT_F32)
    else:  # MAGIC + code into the dot; the zero point and scale onto its float32 result
        # sum((MAGIC + c) x) - (MAGIC + z) sum(x) = sum((c - z) x). The activation sums come from
        # the same tensor cores (a dot with ones, in the accumulator's layout), so nothing waits
        # for the group parameters before the step's dots. (Sums from a pre-pass instead, with
        # 18 % fewer instructions a step, ran slower at every M on the H200: NOTES_w4a16.md.)
        zero = tl.zeros(acc.shape, tl.float32)
        ones = tl.full(q.shape, 1.0, DTYPE)
        x0 = tl.load(x_ptrs, mask=x_mask, other=0.0)
        x1 = tl.load(x_ptrs + _QUARTER, mask=x_mask, other=0.0)
        x2 = tl.load(x_ptrs + 2 * _QUARTER, mask=x_mask, other=0.0)
        x3 = tl.load(x_ptrs + 3 * _QUARTER, mask=x_mask, other=0.0)
        part = _dot(_raw_nibbles(q, 0, DTYPE, ASM), x0, zero, DOT_F32)
        part = _dot(_raw_nibbles(q, 1, DTYPE, ASM), x1, part, DOT_F32)
        part = _dot(_raw_nibbles(q, 2, DTYPE, ASM), x2, part, DOT_F32)
        part = _dot(_raw_nibbles(q, 3, DTYPE, ASM), x3, part, DOT_F32)
        sums = _dot(ones, x0, zero, DOT_F32)
        sums = _dot(ones, x1, sums, DOT_F32)
        sums = _dot(ones, x2, sums, DOT_F32)
        sums = _dot(ones, x3, sums, DOT_F32)
        magic = 1024.0 if DTYPE == tl.float16 else 128.0
        acc += (part - (z + magic) * sums) * s
    return acc


@triton.jit
def _store_transposed(out_ptr, acc, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS: tl.constexpr):
    """Store the float32 ``(BLOCK_N, BLOCK_M)`` tile of out^T into ``out (M, N)``, plus bias."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


@triton.jit
def _w4a16_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om, k_slice, k_slice_q,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_K: tl.constexpr, SCALE_IN: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr,
):
    """``out = x @ W.T``; K is cut into ``SPLIT_K * SPLIT`` slices of ``k_slice`` features
    (``k_slice_q = k_slice // 4`` int16 per row), each a multiple of BLOCK_K (a multiple of 64).

    Each program computes a ``(BLOCK_N, BLOCK_M)`` tile of out^T over SPLIT slices of K: with
    SPLIT > 1, slice s runs on its own warps (a batched dot, summed at the end), which keeps a
    small-M problem on many warps in one launch without atomics. The slices are contiguous
    stretches of K: then the group parameters of one step are far apart in memory, and at
    BLOCK_N = 16 Triton loads them with the warps on the slice axis, as the dot has them (at 32
    it still converts them through shared memory each step; see benchmarks/NOTES_w4a16.md).
    With SPLIT_K > 1, programs along grid axis 2 take SPLIT slices each and write float32 partial
    sums to their own ``(M, N)`` slab of ``out``; the launcher adds the slabs.
    Rows past N are clamped for loading (valid memory, results dropped at the store); activation
    rows past M are masked to zero (reloading row M - 1 in their place, as before, made M = 2..5 run
    up to 2x slower than M = 8 on the H200; benchmarks/NOTES_w4a16.md). BLOCK_K divides GROUP
    unless GROUP < 64 (then BLOCK_K is 64 and SCALE_IN), so one step of one slice lies in one group.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_n, N - 1)
    Q: tl.constexpr = BLOCK_K // 4  # int16 per row and step
    offs_c = tl.arange(0, Q)
    xcol = offs_c // _QUARTER * _TILE + offs_c % _QUARTER  # quarter 0's feature of column c
    offs_s = tl.arange(0, SPLIT)
    q16 = q_ptr.to(tl.pointer_type(tl.int16))
    DTYPE: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    k_begin = pid_k * SPLIT * k_slice
    if SPLIT == 1:
        q_ptrs = q16 + rows[:, None] * stride_qn + offs_c[None, :]
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + xcol[:, None]
        x_mask = (offs_m < M)[None, :]
        s_offs = rows * stride_sn
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        q_ptrs = q16 + rows[None, :, None] * stride_qn + (offs_s * k_slice_q)[:, None, None] + offs_c[None, None, :]
        x_ptrs = x_ptr + offs_m[None, None, :] * stride_xm + (offs_s * k_slice)[:, None, None] + xcol[None, :, None]
        x_mask = (offs_m < M)[None, None, :]
        s_offs = rows[None, :] * stride_sn
        acc = tl.zeros((SPLIT, BLOCK_N, BLOCK_M), tl.float32)
    for b in range(0, k_slice // BLOCK_K):
        k0 = k_begin + b * BLOCK_K  # slice 0's first feature of this step
        q = tl.load(q_ptrs + k0 // 4)
        if SPLIT == 1:
            kq = k0
        else:
            kq = (k0 + offs_s * k_slice)[:, None]
        s, z = _group_params(s_ptr, z_ptr, s_offs, kq // GROUP, HAS_ZEROS)
        acc = _tile_step(acc, q, x_ptrs + k0, x_mask, tl.expand_dims(s, -1), tl.expand_dims(z, -1), s_ptr,
                         z_ptr, s_offs, kq, GROUP, HAS_ZEROS, SCALE_IN, DTYPE, ASM, DOT_F32)
    if SPLIT == 1:
        out = acc
    else:
        out = tl.sum(acc, axis=0)
    out_ptr += pid_k * M * N
    _store_transposed(out_ptr, out, bias_ptr, offs_n, offs_m, N, M, stride_om, HAS_BIAS)


# --- Triton: the decode GEMV (one activation row) ------------------------------------------------
# At M = 1 the tensor cores would multiply mostly padding, and the problem is how many weights per
# second the SM can turn into products. This kernel stays on CUDA cores and keeps every value in the
# thread that loaded it: 16-byte loads of codes, the matching activations loaded in the same layout
# (so no data moves between threads inside the loop), one float32 FMA per weight.
#
# Codes become floats with one logic op each: a nibble moved to bits 16..19 under exponent 0x43 is
# the float 128 + code, one at bits 12..15 under 0x45 is 2048 + code. Four shifts of the 32-bit
# register (two int16, eight codes) put every nibble at one of the two places, so eight weights
# cost four shifts and eight LOP3s. The magic offsets are removed once per tile through the sum of
# its activations: sum((M + c) x) - (M + z) sum(x) = sum((c - z) x), exact up to float32 rounding of
# terms a few times larger than the result.

_MAGIC_CODES = tl.constexpr("{ .reg .b32 a, b, c, d; shl.b32 a, $8, 16; shl.b32 b, $8, 8; shr.b32 c, $8, 8; shr.b32 d, $8, 16; lop3.b32 $0, a, 0x000F0000, 0x43000000, 0xea; lop3.b32 $1, $8, 0x000F0000, 0x43000000, 0xea; lop3.b32 $2, b, 0x0000F000, 0x45000000, 0xea; lop3.b32 $3, c, 0x0000F000, 0x45000000, 0xea; lop3.b32 $4, b, 0x000F0000, 0x43000000, 0xea; lop3.b32 $5, c, 0x000F0000, 0x43000000, 0xea; lop3.b32 $6, $8, 0x0000F000, 0x45000000, 0xea; lop3.b32 $7, d, 0x0000F000, 0x45000000, 0xea; }")


@triton.jit
def _magic_codes(q, ASM: tl.constexpr):
    """The four nibbles of every int16 in ``q`` as float32: 128 + code for quarters 0 and 2,
    2048 + code for quarters 1 and 3 (outputs $2j, $2j+1: quarter j of the two int16)."""
    if ASM:
        return tl.inline_asm_elementwise(_MAGIC_CODES, "=r,=r,=r,=r,=r,=r,=r,=r,r", [q],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=2)
    q32 = q.to(tl.int32)
    c0 = ((q32 & 0xF) + 128).to(tl.float32)
    c1 = (((q32 >> 4) & 0xF) + 2048).to(tl.float32)
    c2 = (((q32 >> 8) & 0xF) + 128).to(tl.float32)
    c3 = (((q32 >> 12) & 0xF) + 2048).to(tl.float32)
    return c0, c1, c2, c3


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om, stride_qn, stride_sn,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
):
    """``out (M, N) = x (M, K) @ W.T`` for K a multiple of 64 * TILES and GROUP a multiple of 64,
    one activation row per program along the grid's second axis (M is a handful: the programs of
    one weight block run together, so the rows after the first read it from L2).

    A step covers TILES tiles (64 * TILES features) of BLOCK_N rows; the threads lie along K and
    each holds several rows, so the activations it loads serve all of them. With PREFETCH the
    next step's codes and group parameters are loaded into registers before this step's
    arithmetic, so the two overlap within a program: without it a program waits for its loads,
    then computes with none in flight (Triton software-pipelines only loops that feed a
    ``tl.dot``; asked to with ``tl.range(num_stages=...)`` it staged these loads through shared
    memory and ran 4-5x slower)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    x_ptr += tl.program_id(1) * stride_xm
    out_ptr += tl.program_id(1) * stride_om
    Q: tl.constexpr = TILES * 16
    offs_c = tl.arange(0, Q)
    q_ptrs = q_ptr.to(tl.pointer_type(tl.int16)) + rows[:, None] * stride_qn + offs_c[None, :]
    # the activation of quarter 0 of column c, laid out like the codes (rows * 0: the same layout)
    x_ptrs = x_ptr + rows[:, None] * 0 + (offs_c // _QUARTER * _TILE + offs_c % _QUARTER)[None, :]
    offs_t = tl.arange(0, TILES)
    offs_f = tl.arange(0, _TILE)
    odd = (offs_f // _QUARTER % 2 == 1)[None, :]  # quarters 1 and 3 (the 2048 magic)
    acc = tl.zeros((BLOCK_N, TILES), tl.float32)
    s_offs = rows[:, None] * stride_sn
    step: tl.constexpr = _TILE * TILES
    steps = K // step
    if PREFETCH:  # only then: made unconditionally, these loads stayed in the compiled kernel unused (1.6x slower)
        q = tl.load(q_ptrs)
        s, z = _group_params(s_ptr, z_ptr, s_offs, (offs_t * _TILE // GROUP)[None, :], HAS_ZEROS)
    for b in range(0, steps):
        k0 = b * step
        if PREFETCH:  # the last step reloads itself (an L2 hit) rather than masking every load
            k_next = tl.minimum(b + 1, steps - 1) * step
            q_next = tl.load(q_ptrs + k_next // 4)
            s_next, z_next = _group_params(s_ptr, z_ptr, s_offs, ((k_next + offs_t * _TILE) // GROUP)[None, :],
                                           HAS_ZEROS)
        else:
            q = tl.load(q_ptrs + k0 // 4)
            s, z = _group_params(s_ptr, z_ptr, s_offs, ((k0 + offs_t * _TILE) // GROUP)[None, :], HAS_ZEROS)
        c0, c1, c2, c3 = _magic_codes(q, ASM)
        part = c0 * tl.load(x_ptrs + k0).to(tl.float32) + c1 * tl.load(x_ptrs + k0 + _QUARTER).to(tl.float32)
        part += c2 * tl.load(x_ptrs + k0 + 2 * _QUARTER).to(tl.float32)
        part += c3 * tl.load(x_ptrs + k0 + 3 * _QUARTER).to(tl.float32)
        part = tl.sum(tl.reshape(part, (BLOCK_N, TILES, _QUARTER)), axis=2)  # per row and tile
        xt = tl.load(x_ptr + k0 + offs_t[:, None] * _TILE + offs_f[None, :]).to(tl.float32)
        x_all = tl.sum(xt, axis=1)
        x_odd = tl.sum(tl.where(odd, xt, 0.0), axis=1)
        acc += s * (part - (z + 128.0) * x_all[None, :] - 1920.0 * x_odd[None, :])
        if PREFETCH:
            q, s, z = q_next, s_next, z_next
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _w4a16_dequant_kernel(
    q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_qn, stride_sn,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
):
    """The float weight ``(N, K)`` in the output's dtype: TILES tiles of BLOCK_N rows per program.

    Indexed by output feature ``(row, tile, quarter j, p)``, so that a thread writes 16 bytes of
    consecutive features and a warp's stores are one contiguous span; the four quarters of a
    tile read the same codes (Triton loads them once and shares them through shared memory).
    On an H200 this writes 2.8-3.3 TB/s of codes read plus weights written, against 1.9-2.3 for
    threads holding the codes' int16 order, whose 16-feature pieces lay 32 bytes apart, and 2.5-3.0
    for the same indexing with the inline-PTX conversion (benchmarks/NOTES_w4a16.md): a copy-bound
    kernel, where the plain float32 arithmetic costs nothing and rounds exactly as the reference."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    row = rows[:, None, None, None]
    t = (tl.program_id(1) * TILES + tl.arange(0, TILES))[None, :, None, None]
    j = tl.arange(0, 4)[None, None, :, None]
    p = tl.arange(0, _QUARTER)[None, None, None, :]
    q = tl.load(q_ptr.to(tl.pointer_type(tl.int16)) + row * stride_qn + t * _QUARTER + p + j * 0)
    group = (t * _TILE + j * _QUARTER) // GROUP + p * 0
    s = tl.load(s_ptr + row * stride_sn + group).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + row * stride_sn + group).to(tl.float32)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    # (code - zero) * scale is exact in float32 (a 5-bit integer times a 16-bit float): one rounding
    w = (((q.to(tl.int32) >> (4 * j)) & 0xF).to(tl.float32) - z) * s
    dst = out_ptr + row.to(tl.int64) * K + t * _TILE + j * _QUARTER + p
    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None, None, None])  # broadcast over t, j, p


# --- path choice and launch ---------------------------------------------------------------------
# Block shapes by M from benchmarks/tune.py on the H200 at the Llama-3-8B shapes (see README).


MMA_MAX_M = 64  # past this, dequantize-then-cuBLAS is faster than the fused tensor-core kernel


def fast_path_ok(k: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take this shape: whole 64-feature tiles, and a group size that is
    a multiple of 64 or one of 16 and 32 (so a quarter never straddles two groups)."""
    return k % TILE == 0 and (group_size % TILE == 0 or group_size in (16, 32)) and dtype in FLOATS


def _fit_block_k(block_k: int, k: int, group_size: int, split: int) -> int:
    """The largest BLOCK_K <= block_k (a power-of-two multiple of 64) with SPLIT * BLOCK_K dividing
    K and BLOCK_K dividing the group size (BLOCK_K = 64 for groups under 64)."""
    if group_size < TILE:
        return TILE
    while block_k > TILE and (k % (split * block_k) or group_size % block_k):
        block_k //= 2
    return block_k


def _config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Tensor-core block shapes by M bucket (8, 16, 32, 64), from sweeps on the H200 at the
    Llama-3-8B shapes (benchmarks/NOTES_w4a16.md): wide N takes 128 rows a program on 8 warps; up to
    8 rows and short K, warps split K within a program; otherwise programs split K (more for long K)."""
    block_m = 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64
    if n >= 16384:
        if m <= 8:
            return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=256, SPLIT=1, SPLIT_K=2, num_warps=4, num_stages=4)
        return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, SPLIT=1, SPLIT_K=1, num_warps=8, num_stages=3)
    if k < 8192:
        if m <= 8:
            return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=256, SPLIT=4, num_stages=3)
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, SPLIT=1, SPLIT_K=4, num_warps=4, num_stages=3)
    if m <= 16:
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, SPLIT=1, SPLIT_K=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, SPLIT=1, SPLIT_K=4, num_warps=8, num_stages=3)


def w4a16_mma(x2, qweight, scales, zeros, group_size, bias, config=None):
    """``(M, K) -> (M, N)`` on the tensor-core kernel (``fast_path_ok`` must hold)."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = {"SCALE_IN": False, "SPLIT": 1, "SPLIT_K": 1, **(config or _config(m, n, k, group_size, x2.device))}
    if cfg["SPLIT"] > 1:  # Triton puts the warps on the batch axis first: one warp per K slice, none idle or doubled
        cfg["num_warps"] = cfg["SPLIT"]
    while cfg["SPLIT_K"] > 1 and k % (cfg["SPLIT_K"] * cfg["SPLIT"] * TILE):
        cfg["SPLIT_K"] //= 2
    while cfg["SPLIT"] > 1 and k % (cfg["SPLIT_K"] * cfg["SPLIT"] * TILE):
        cfg["SPLIT"] //= 2
        cfg["num_warps"] = max(cfg["SPLIT"], 1)
    cfg["BLOCK_K"] = _fit_block_k(cfg["BLOCK_K"], k // cfg["SPLIT_K"], group_size, cfg["SPLIT"])
    if group_size < TILE or group_size % cfg["BLOCK_K"]:
        cfg["SCALE_IN"] = True
    dot_f32 = INTERPRET or x2.dtype == torch.float32
    asm = cfg.pop("ASM", True) and not dot_f32  # ASM=False: the portable path, for the GPU test against it
    split_k = cfg["SPLIT_K"]
    k_slice = k // (split_k * cfg["SPLIT"])
    # SPLIT_K > 1: float32 partial sums, one (M, N) slab per K slice, added here (deterministic;
    # under torch.compile the sum, bias and cast fuse into whatever consumes the output)
    out = torch.empty((split_k, m, n) if split_k > 1 else (m, n), device=x2.device,
                      dtype=torch.float32 if split_k > 1 else x2.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split_k)
    wrap_triton(_w4a16_kernel)[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        m, n, k, x2.stride(0), qweight.stride(0) * 2, scales.stride(0), n, k_slice, k_slice // 4,
        GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None and split_k == 1, ASM=asm,
        DOT_F32=dot_f32, **cfg,
    )
    if split_k == 1:
        return out
    out = out.sum(0)
    if bias is not None:
        out += bias
    return out.to(x2.dtype)


# One activation row goes to the GEMV. From two rows the tensor-core kernel, with the rows past M
# masked to zero, is faster at every Llama-3-8B shape (H200, M = 2, us: 8.9 against 11.1 at
# 4096x4096, 21.9 against 28.6 at 14336x4096; benchmarks/NOTES_w4a16.md).
GEMV_MAX_M = 1


def gemv_ok(k: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the GEMV takes this shape: whole tiles, no group smaller than a tile, 16-bit
    activations (its magic-offset sums keep about 16 bits: plenty for a 16-bit output, not for
    float32, which the exact tensor-core path serves)."""
    return k % TILE == 0 and group_size % TILE == 0 and dtype in (torch.bfloat16, torch.float16)


def gemv_config(n: int, k: int) -> dict:
    """GEMV blocks from a sweep on the H200 at the Llama-3-8B shapes (benchmarks/NOTES_w4a16.md)."""
    if n <= 4096:
        return dict(BLOCK_N=8, TILES=32, num_warps=4, PREFETCH=True)
    return dict(BLOCK_N=16, TILES=16, num_warps=4, PREFETCH=True)


def w4a16_gemv(x2, qweight, scales, zeros, group_size, bias, config=None):
    """``(M, K) -> (M, N)`` on the decode GEMV (``gemv_ok`` must hold; a program row per activation row,
    M = 1 is its use)."""
    from torch.library import wrap_triton

    m, k = x2.shape
    n = qweight.shape[0]
    cfg = {"PREFETCH": False, **(config or gemv_config(n, k))}
    asm = cfg.pop("ASM", True) and not INTERPRET
    while k % (TILE * cfg["TILES"]):
        cfg["TILES"] //= 2
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    wrap_triton(_w4a16_gemv_kernel)[(triton.cdiv(n, cfg["BLOCK_N"]), m)](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        n, k, x2.stride(0), out.stride(0), qweight.stride(0) * 2, scales.stride(0),
        GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, ASM=asm, **cfg,
    )
    return out


def w4a16_dequantize(qweight, scales, zeros, group_size, dtype, block_n: int = 4, tiles: int = 16,
                      num_warps: int = 4):
    """The float ``(N, K)`` weight, on the dequantize kernel (``fast_path_ok`` must hold). The
    default blocks are the H200's best at the Llama-3-8B shapes (benchmarks/NOTES_w4a16.md)."""
    from torch.library import wrap_triton

    n, k = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    while (k // TILE) % tiles:
        tiles //= 2
    out = torch.empty((n, k), device=qweight.device, dtype=dtype)
    wrap_triton(_w4a16_dequant_kernel)[(triton.cdiv(n, block_n), k // (TILE * tiles))](
        qweight, scales, zeros if zeros is not None else scales, out, n, k, qweight.stride(0) * 2, scales.stride(0),
        GROUP=group_size, HAS_ZEROS=zeros is not None, BLOCK_N=block_n, TILES=tiles, num_warps=num_warps,
    )
    return out


# Past MMA_MAX_M rows the weight is dequantized to float and multiplied by cuBLAS. (Doing it in
# chunks of output rows, each multiplied while still in L2, was slower at every chunk size on the
# H200: the smaller cuBLAS calls lose more than the L2 hits gain; NOTES_w4a16.md.)
def w4a16_dequant_linear(x2, qweight, scales, zeros, group_size, bias):
    """``(M, K) -> (M, N)``: dequantize then cuBLAS."""
    bias = None if bias is None else bias.to(x2.dtype)
    return F.linear(x2, w4a16_dequantize(qweight, scales, zeros, group_size, x2.dtype), bias)


def w4a16_triton(x, qweight, scales, zeros, group_size, bias):
    """The GPU path of the op: the GEMV for one row, the tensor-core kernel up to MMA_MAX_M
    rows, dequantize-then-cuBLAS past it, and the exact reference for shapes the kernels do not
    take (K not in whole 64-feature tiles, group sizes that split a 16-feature quarter)."""
    x2 = as_rows(x)
    m, k = x2.shape
    if m <= GEMV_MAX_M and gemv_ok(k, group_size, x2.dtype):
        out = w4a16_gemv(x2, qweight, scales, zeros, group_size, bias)
    elif fast_path_ok(k, group_size, x2.dtype) and m <= MMA_MAX_M:
        out = w4a16_mma(x2, qweight, scales, zeros, group_size, bias)
    elif fast_path_ok(k, group_size, x2.dtype):  # compute-bound: the weight once in float, then cuBLAS
        out = w4a16_dequant_linear(x2, qweight, scales, zeros, group_size, bias)
    else:
        out = w4a16_reference(x2, qweight, scales, zeros, group_size, bias)
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
