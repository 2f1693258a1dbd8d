"""Mixture-of-experts grouped GEMMs: all experts' quantized weights in one tensor, one launch per
projection, for int4 (GPTQ packing) and 8-bit (int8 or fp8 e4m3) weights with 16-bit activations.

Routing: ``topk_ids (T, k)`` sends token t to experts ``topk_ids[t]``; assignment ``a = t * k + j``
is one (token, slot) pair and row ``a`` of the ``(T * k, N)`` output. The activations are either
``(T, K)`` (assignment a reads row ``a // k``: the gate/up projection) or ``(T * k, K)`` (row a:
the down projection, whose input is the previous output).

The kernels (after vLLM's fused_moe idea, written from scratch): ``moe_align`` sorts the
assignments by expert and pads each expert's run to a multiple of BLOCK_M, so every BLOCK_M rows
of the sorted list belong to one expert. A program takes one such block and BLOCK_N output
features, gathers its activation rows, and streams that one expert's weight tiles through a
``tl.dot``, dequantizing in registers. All shapes are static, so the op traces under
``torch.compile(fullgraph=True)`` and CUDA graphs.

Layouts (E experts, N output features, K input features):

- int4: ``qweight`` int32 ``(E, N, K // 8)``, nibble j (bits ``4j .. 4j+3``) of word w holding the
  code of feature ``8w + j`` (``w4a16.pack_words(codes, 4)`` per expert); ``scales`` and optional
  ``zeros`` ``(E, N, ceil(K / group_size))``, zeros integers 0..15 (None: 8). Weight
  ``(code - zero) * scale``.
- 8-bit: ``weight`` int8 or float8_e4m3fn ``(E, N, K)``, float32 ``scales`` per output channel
  ``(E, N)`` (``block_n = block_k = 0``) or per ``block_n x block_k`` block
  ``(E, ceil(N / block_n), ceil(K / block_k))`` (DeepSeek-V3's weight_scale_inv). Weight
  ``code * scale``; the activations stay 16-bit (weight-only).
"""

from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from pymllm_fx.kernels._checks import FLOATS, check_activation, check_tensor
from pymllm_fx.kernels._triton import INTERPRET, check_contiguous, grouped_tile, runs_triton, tl, triton
from pymllm_fx.kernels.w4a16 import PACK_FACTOR, SYMMETRIC_ZERO, num_groups, unpack_words

FP8_DTYPE = torch.float8_e4m3fn
W8_DTYPES = (torch.int8, FP8_DTYPE)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignments grouped by expert, each expert's run padded to a multiple of ``block_m``.

    Returns ``sorted_ids`` int32 ``(P,)`` (assignment indices, the sentinel ``T * k`` in padding),
    ``block_experts`` int32 ``(P // block_m,)`` (the expert of each block, -1 past the last run)
    and ``num_padded`` int32 ``(1,)`` (rows in use). P is a static bound from the shapes alone:
    an expert with c > 0 assignments takes at most ``c + block_m - 1`` rows, and at most
    ``min(E, T * k)`` experts have any. Pure torch ops, no host sync. Run op by op (eager, or
    replayed in a CUDA graph) it is ~20 small kernels: 40-130 us on the H200, more than the decode
    GEMM itself; under torch.compile Inductor fuses most of them."""
    flat = topk_ids.reshape(-1).long()
    a = flat.numel()
    dev = flat.device
    p = _round_up(a + min(num_experts, a) * (block_m - 1), block_m)
    experts, order = torch.sort(flat, stable=True)  # order: assignment indices grouped by expert
    bounds = torch.searchsorted(experts, torch.arange(num_experts + 1, device=dev))  # each expert's first
    padded = (bounds[1:] - bounds[:-1] + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    shift = ends - padded - bounds[:-1]  # sorted position -> padded row, per expert
    pos = shift[experts] + torch.arange(a, device=dev)
    sorted_ids = torch.full((p,), a, dtype=torch.int32, device=dev).scatter_(0, pos, order.to(torch.int32))
    # The block starting at row r belongs to the first expert whose run ends after r.
    block_experts = torch.searchsorted(ends, torch.arange(0, p, block_m, device=dev), right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_ids, block_experts, ends[-1:].to(torch.int32)


# How the grouped GEMM runs (benchmarks/moe.py measures each choice against the other; H200,
# Qwen3-30B-A3B experts, compiled, results/moe_ab.json):
# NIBBLE_DOTS: at decode tiles (BLOCK_M 16) int4 codes meet the activations in eight dots, one per
# nibble position, instead of being spread into feature order by a reshape: 47.0 against 53.2 us a
# layer at one token; at 2048 tokens (BLOCK_M 64) the reshape wins, 2415 against 3188 us, so it
# stays there. DIRECT_MAX_ASSIGNMENTS: up to this many (token, expert) pairs (decode), each pair
# gets its own block, with no sort: 47.0 against 61.0 us at one token (moe_align is ~20 small ops,
# more than the GEMMs); two tokens sharing an expert then read it twice.
NIBBLE_DOTS = True
DIRECT_MAX_ASSIGNMENTS = 16
# DECODE_GEMV: int4 at decode (up to DIRECT_MAX_ASSIGNMENTS pairs, 16-bit activations) on the
# CUDA-core GEMV below instead of 16-row tensor-core tiles. H200, Qwen3-30B-A3B expert shapes,
# benchmarks/moe.py --layers 8 --tokens 1,8 in one run: one token 36.7 us a layer against 47.2 on
# the tiles (bf16 62.9: 1.71x against 1.33x); eight tokens (64 assignments, past the limit) 233 us on both.
DECODE_GEMV = True


def one_block_each(topk_ids: torch.Tensor, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``moe_align``'s ``(sorted_ids, block_experts)`` with one block per assignment: block a holds
    assignment a in its first row and the sentinel ``T * k`` in the rest."""
    flat = topk_ids.reshape(-1)
    a = flat.numel()
    rows = torch.arange(a * block_m, device=flat.device, dtype=torch.int32)
    sorted_ids = torch.where(rows % block_m == 0, rows // block_m, a).to(torch.int32)
    return sorted_ids, flat.to(torch.int32)


# --- references ----------------------------------------------------------------------------------


def dequantize_moe_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(E, N, K)`` weights in ``dtype``: ``(code - zero) * scale`` in float32 (exact for 16-bit
    scales), rounded once."""
    e, n, words = qweight.shape
    k = words * PACK_FACTOR
    codes = unpack_words(qweight.reshape(e * n, words), 4).reshape(e, n, k).float()
    group = torch.arange(k, device=qweight.device) // group_size
    zero = zeros.float()[..., group] if zeros is not None else float(SYMMETRIC_ZERO)
    return ((codes - zero) * scales.float()[..., group]).to(dtype)


def dequantize_moe_w8(
    weight: torch.Tensor, scales: torch.Tensor, block_n: int, block_k: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(E, N, K)`` weights in ``dtype``: ``code * scale`` in float32, rounded once."""
    _, n, k = weight.shape
    if block_n == 0:
        scale = scales.float()[..., None]
    else:
        rows = torch.arange(n, device=weight.device) // block_n
        cols = torch.arange(k, device=weight.device) // block_k
        scale = scales.float()[:, rows][..., cols]
    return (weight.float() * scale).to(dtype)


def _routed_matmul(x, dequantize, topk_ids, topk_weights, n, k):
    """Row a of the output: ``x_row(a) @ W[topk_ids.flat[a]].T`` times the routing weight, in float32,
    cast to x's dtype once. ``dequantize(experts)`` gives the float weights of a list of expert ids;
    assignments go in chunks, so the gathered weights stay under ``_CHUNK_ELEMENTS`` floats however
    many tokens there are (a CPU prefill of a real MoE model)."""
    t, top = topk_ids.shape
    rows = x if x.shape[0] == t * top else x.repeat_interleave(top, dim=0)
    flat = topk_ids.reshape(-1).long()
    step = max(1, _CHUNK_ELEMENTS // max(n * k, 1))
    parts = []
    for start in range(0, flat.numel(), step):
        ids = flat[start:start + step]
        weights = dequantize(ids).float()
        parts.append(torch.bmm(weights, rows[start:start + step].float().unsqueeze(-1)).squeeze(-1))
    out = torch.cat(parts) if parts else rows.new_zeros((0, n), dtype=torch.float32)
    if topk_weights is not None:
        out = out * topk_weights.reshape(-1, 1).float()
    return out.to(x.dtype)


_CHUNK_ELEMENTS = 1 << 26


def moe_w4a16_reference(x, qweight, scales, zeros, group_size, topk_ids, topk_weights=None) -> torch.Tensor:
    """Pure torch: dequantize the expert of every assignment, a chunk of assignments at a time, then
    float32 batched matmuls."""
    def dequantize(ids):
        return dequantize_moe_int4(qweight[ids], scales[ids], None if zeros is None else zeros[ids], group_size, x.dtype)

    return _routed_matmul(x, dequantize, topk_ids, topk_weights, qweight.shape[1], qweight.shape[2] * PACK_FACTOR)


def moe_w8_reference(x, weight, scales, block_n, block_k, topk_ids, topk_weights=None) -> torch.Tensor:
    """Pure torch, as :func:`moe_w4a16_reference`, for int8 / fp8 experts."""
    def dequantize(ids):
        return dequantize_moe_w8(weight[ids], scales[ids], block_n, block_k, x.dtype)

    return _routed_matmul(x, dequantize, topk_ids, topk_weights, weight.shape[1], weight.shape[2])


# --- input checks --------------------------------------------------------------------------------


def _check_routing(op, x, topk_ids, topk_weights, num_experts, k) -> None:
    check_activation(op, x, k)
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: topk_ids must be a 2-D (T, top_k) int32/int64 tensor, got {topk_ids.dtype} "
                         f"of shape {tuple(topk_ids.shape)}")
    t, top = topk_ids.shape
    if topk_ids.device != x.device:
        raise ValueError(f"{op}: topk_ids is on {topk_ids.device} but the activations are on {x.device}")
    if x.dim() != 2 or x.shape[0] not in (t, t * top):
        raise ValueError(f"{op}: activations must be (T, K) = ({t}, {k}) or (T*top_k, K) = ({t * top}, {k}) for "
                         f"topk_ids of shape {tuple(topk_ids.shape)}, got {tuple(x.shape)}")
    if topk_weights is not None:
        if not topk_weights.dtype.is_floating_point:
            raise TypeError(f"{op}: topk_weights must be a float tensor, got {topk_weights.dtype}")
        check_tensor(op, "topk_weights", topk_weights, (t, top), (topk_weights.dtype,), x.device)
    # Expert ids are data: checked where that costs no device sync (real CPU tensors), so the
    # reference cannot wrap a -1 around to the last expert. On CUDA they must lie in [0, E).
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not is_fake(topk_ids):
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{op}: topk_ids must lie in [0, {num_experts}) (the weights hold {num_experts} "
                             f"experts), found ids from {lo} to {hi}")


def _check_w4a16(x, qweight, scales, zeros, group_size, topk_ids, topk_weights) -> None:
    op = "pymllm_fx.moe_w4a16"
    if qweight.dim() != 3 or qweight.dtype != torch.int32:
        raise ValueError(f"{op}: qweight must be int32 (E, N, K // 8), got {qweight.dtype} of shape "
                         f"{tuple(qweight.shape)}")
    e, n, k = qweight.shape[0], qweight.shape[1], qweight.shape[2] * PACK_FACTOR
    if group_size <= 0 or group_size % PACK_FACTOR:
        raise ValueError(f"{op}: group_size must be a positive multiple of 8 (K = {k} for per-channel), "
                         f"got {group_size}")
    _check_routing(op, x, topk_ids, topk_weights, e, k)
    check_tensor(op, "qweight", qweight, (e, n, k // PACK_FACTOR), (torch.int32,), x.device)
    check_tensor(op, "scales", scales, (e, n, num_groups(k, group_size)), FLOATS, x.device)
    if zeros is not None:
        check_tensor(op, "zeros", zeros, (e, n, num_groups(k, group_size)), (scales.dtype,), x.device)
    check_contiguous(op, qweight=qweight, scales=scales, zeros=zeros)


def _check_w8(x, weight, scales, block_n, block_k, topk_ids, topk_weights) -> None:
    op = "pymllm_fx.moe_w8"
    if weight.dim() != 3 or weight.dtype not in W8_DTYPES:
        raise ValueError(f"{op}: weight must be int8 or float8_e4m3fn (E, N, K), got {weight.dtype} of shape "
                         f"{tuple(weight.shape)}")
    e, n, k = weight.shape
    if not (block_n == block_k == 0 or (block_n > 0 and block_k > 0)):
        raise ValueError(f"{op}: block_n and block_k must both be 0 (per-channel scales) or both positive "
                         f"(block scales), got {block_n} and {block_k}")
    _check_routing(op, x, topk_ids, topk_weights, e, k)
    shape = (e, n) if block_n == 0 else (e, -(-n // block_n), -(-k // block_k))
    check_tensor(op, "scales", scales, shape, (torch.float32,), x.device)
    check_tensor(op, "weight", weight, (e, n, k), (weight.dtype,), x.device)
    check_contiguous(op, weight=weight, scales=scales)


# --- Triton --------------------------------------------------------------------------------------
# A program computes the (BLOCK_N, BLOCK_M) tile of out^T = W_e @ x^T: the weight tile is the left
# operand, so at decode (BLOCK_M = 16, one or two real rows) it fills the tensor cores' long side.
# The scale goes where the group layout allows the fewest multiplies (SCALE, from the launcher):
# 0: one K group (per-channel), once on the float32 result; 1: every K tile inside one group, on
# each tile's partial product; 2: on each weight before the dot (groups smaller than a tile).

_MAGIC = tl.constexpr(0x4B000000)  # the float 2^23: OR-ing an integer 0..255 into it adds it exactly


@triton.jit
def _moe_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, tw_ptr, out_ptr, sorted_ptr, experts_ptr,
    P, N, K, A, X_DIV, stride_xm, stride_we, stride_wn, SCALE_ROWS, SCALE_COLS,
    INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, SCALE: tl.constexpr,
    SN: tl.constexpr, SK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, NIBBLE_DOTS: tl.constexpr = False,
):
    """Rows ``sorted[pid_m * BLOCK_M :][: BLOCK_M]`` (one expert) x BLOCK_N output features.

    Scale (and zero) row of weight row n: ``expert * SCALE_ROWS + n // SN``, column: ``k // SK``.
    Sentinel rows load zeros and are not stored; weight rows past N are clamped (valid memory,
    dropped at the store); the K tail is masked."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), P, N, BLOCK_M, BLOCK_N, GROUP_M)
    expert = tl.load(experts_ptr + pid_m).to(tl.int64)
    if expert < 0:  # past the last expert's run: nothing but padding
        return
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < A
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    x_col_ptrs = x_ptr + (rows // X_DIV).to(tl.int64)[None, :] * stride_xm  # (1, BLOCK_M) row starts
    x_ptrs = x_col_ptrs + offs_k[:, None]  # x^T (BLOCK_K, BLOCK_M)
    w_rows = w_ptr + expert * stride_we + n.to(tl.int64)[:, None] * stride_wn
    s_rows = (expert * SCALE_ROWS + n // SN) * SCALE_COLS  # (BLOCK_N,) offsets of the scale rows
    DTYPE: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        if SCALE == 2:
            s_cols = s_rows[:, None] + (k // SK)[None, :]
        else:
            s_cols = s_rows + k0 // SK
        if INT4 and NIBBLE_DOTS:  # eight dots, one per nibble j, over features 8w + j: no reshape of
            # the codes (a layout shuffle), the activations read with a stride of 8 instead
            kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            q = tl.load(w_rows + kw[None, :], mask=(kw < K // 8)[None, :], other=0)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + s_cols).to(tl.float32)[:, None]
            else:
                zero = 8.0
            part = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for j in tl.static_range(8):
                wj = (((q >> (4 * j)) & 0xF) | _MAGIC).to(tl.float32, bitcast=True) - (8388608.0 + zero)
                kj = kw * 8 + j
                xj = tl.load(x_col_ptrs + kj[:, None], mask=(kj < K)[:, None] & row_ok[None, :], other=0.0)
                if DOT_F32:
                    part += tl.dot(wj, xj.to(tl.float32), input_precision="ieee")
                else:
                    part += tl.dot(wj.to(DTYPE), xj)
        else:
            x = tl.load(x_ptrs + k0, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            if INT4:  # the step's words, loaded once, spread in registers into their 8 nibbles (feature
                # 8w + j is nibble j of word w). Loading each feature's own word (k // 8) ran 5-12x slower.
                kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                q = tl.load(w_rows + kw[None, :], mask=(kw < K // 8)[None, :], other=0)
                nib = (q[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
                bits = tl.reshape(nib, (BLOCK_N, BLOCK_K)) | _MAGIC
                if not HAS_ZEROS:
                    zero = 8.0
                elif SCALE == 2:
                    zero = tl.load(z_ptr + s_cols, mask=k_ok[None, :], other=0.0).to(tl.float32)
                else:
                    zero = tl.load(z_ptr + s_cols).to(tl.float32)[:, None]
                w = bits.to(tl.float32, bitcast=True) - (8388608.0 + zero)  # code - zero, exact
            else:
                w = tl.load(w_rows + k[None, :], mask=k_ok[None, :], other=0.0)
                if w.dtype == tl.int8:  # (q + 128) into 2^23, then both off: no int-to-float conversion
                    w = (w.to(tl.int32) + (_MAGIC + 128)).to(tl.float32, bitcast=True) - 8388736.0
            if SCALE == 2:
                w = w.to(tl.float32) * tl.load(s_ptr + s_cols, mask=k_ok[None, :], other=0.0).to(tl.float32)
            if DOT_F32:  # fp32 activations, and Triton's interpreter, which mishandles 16-bit dots
                part = tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(w.to(DTYPE), x)
        if SCALE == 1:
            acc += part * tl.load(s_ptr + s_cols).to(tl.float32)[:, None]
        else:
            acc += part
    if SCALE == 0:
        acc *= tl.load(s_ptr + s_rows).to(tl.float32)[:, None]
    if HAS_WEIGHTS:
        acc *= tl.load(tw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[None, :] * N + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & row_ok[None, :])


# --- Triton: int4 decode GEMV ---------------------------------------------------------------------
# At decode most experts get one row, and the tensor-core kernel above multiplies 15 padding rows
# per tile. This kernel is the dense decode GEMV's design (kernels/w4a16.py) on the experts' GPTQ
# word order: one program per (BLOCK_N output features, assignment), threads along K holding
# several rows, the activations loaded in the codes' layout, one FFMA a weight, and the next step's
# words and group parameters loaded before this step's arithmetic. Nibble j of a word (feature
# 8w + j) is moved to bits 16..19 under the exponent of 128.0: the float 128 + code in one shift
# and one LOP3; the offsets come off per group through the activations' sums,
# sum((128 + c) x) - (128 + z) sum(x) = sum((c - z) x).


@triton.jit
def _nibble_floats(q, J: tl.constexpr):
    """Nibble J of every int32 in ``q`` as the float32 ``128 + code``."""
    if J < 4:
        bits = (q << (16 - 4 * J)) & 0xF0000
    elif J == 4:
        bits = q & 0xF0000
    else:
        bits = (q >> (4 * J - 16)) & 0xF0000
    return (bits | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _moe_int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, tw_ptr, out_ptr, ids_ptr, N, K, X_DIV, stride_xm, stride_we, stride_wn,
    stride_se, stride_sn, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[a, n] = x[a // X_DIV] @ W[ids[a], n].T`` (times the routing weight), for K a multiple of
    BLOCK_K and groups that a step never straddles (GROUP a multiple of BLOCK_K, or dividing it)."""
    a = tl.program_id(1)
    expert = tl.load(ids_ptr + a).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    WORDS: tl.constexpr = BLOCK_K // 8
    SPAN: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # features of one group within a step
    GROUPS: tl.constexpr = BLOCK_K // SPAN
    offs_w = tl.arange(0, WORDS)
    w_ptrs = w_ptr + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn + offs_w[None, :]
    x_row = x_ptr + (a // X_DIV).to(tl.int64) * stride_xm
    x_ptrs = x_row + rows[:, None] * 0 + offs_w[None, :] * 8  # feature 8w of each word, in the codes' layout
    s_rows = s_ptr + expert * stride_se + rows[:, None] * stride_sn
    z_rows = z_ptr + expert * stride_se + rows[:, None] * stride_sn
    offs_g = tl.arange(0, GROUPS)
    offs_f = tl.arange(0, SPAN)
    steps = K // BLOCK_K
    q = tl.load(w_ptrs)
    s = tl.load(s_rows + (offs_g * SPAN // GROUP)[None, :]).to(tl.float32)
    z = tl.load(z_rows + (offs_g * SPAN // GROUP)[None, :]).to(tl.float32) if HAS_ZEROS else 8.0
    acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
    for b in range(0, steps):
        k0 = b * BLOCK_K
        k_next = tl.minimum(b + 1, steps - 1) * BLOCK_K  # the last step reloads itself (an L2 hit)
        q_next = tl.load(w_ptrs + k_next // 8)
        g_next = ((k_next + offs_g * SPAN) // GROUP)[None, :]
        s_next = tl.load(s_rows + g_next).to(tl.float32)
        z_next = tl.load(z_rows + g_next).to(tl.float32) if HAS_ZEROS else 8.0
        part = _nibble_floats(q, 0) * tl.load(x_ptrs + k0).to(tl.float32)
        for j in tl.static_range(1, 8):
            part += _nibble_floats(q, j) * tl.load(x_ptrs + k0 + j).to(tl.float32)
        part = tl.sum(tl.reshape(part, (BLOCK_N, GROUPS, WORDS // GROUPS)), axis=2)  # per row and group
        xs = tl.sum(tl.load(x_row + k0 + offs_g[:, None] * SPAN + offs_f[None, :]).to(tl.float32), axis=1)
        acc += s * (part - (z + 128.0) * xs[None, :])
        q, s, z = q_next, s_next, z_next
    out = tl.sum(acc, axis=1)
    if HAS_WEIGHTS:
        out *= tl.load(tw_ptr + a).to(tl.float32)
    tl.store(out_ptr + a.to(tl.int64) * N + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def int4_gemv_block_k(k: int, group_size: int) -> int:
    """The GEMV's K step for these shapes (0: it does not take them): the largest of 512, 256, 128
    that divides K and that a group never straddles."""
    for block_k in (512, 256, 128):
        if k % block_k == 0 and (group_size % block_k == 0 or block_k % group_size == 0) and group_size % 8 == 0:
            return block_k
    return 0


def moe_int4_gemv(x, qweight, scales, zeros, group_size, topk_ids, topk_weights, block_n: int = 16,
                  block_k: int = 0, num_warps: int = 4) -> torch.Tensor:
    """The decode GEMV path of ``moe_w4a16`` (16-bit activations; ``int4_gemv_block_k`` must accept
    the shapes): ``(T * k, N)``."""
    from torch.library import wrap_triton

    t, top = topk_ids.shape
    a = t * top
    e, n, words = qweight.shape
    k = words * PACK_FACTOR
    block_k = block_k or int4_gemv_block_k(k, group_size)
    out = torch.empty((a, n), device=x.device, dtype=x.dtype)
    if a == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    ids = topk_ids.reshape(-1)
    wrap_triton(_moe_int4_gemv_kernel)[(triton.cdiv(n, block_n), a)](
        x, qweight, scales, zeros if zeros is not None else scales,
        topk_weights.reshape(-1) if topk_weights is not None else scales, out, ids,
        n, k, 1 if x.shape[0] == a else top, x.stride(0), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1),
        GROUP=min(group_size, k), HAS_ZEROS=zeros is not None, HAS_WEIGHTS=topk_weights is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out


def moe_config(num_rows: int, num_experts: int, int4: bool) -> dict:
    """Tiles by the average rows per expert (``T * k / E``), from timings on the H200 at
    Qwen3-30B-A3B's shapes. Decode (most experts get one row) streams weights: BLOCK_M at the
    dot's minimum, narrow N tiles for many programs, long K steps. Past that, wider tiles reuse
    each weight tile across more rows; at prefill the int4 unpack favours long K steps, the 8-bit
    weights wide N tiles."""
    per_expert = num_rows / max(num_experts, 1)
    if per_expert < 1:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 48:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    if int4:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _launch(x, w, scales, zeros, topk_ids, topk_weights, n, k, sn, sk, int4, config) -> torch.Tensor:
    from torch.library import wrap_triton

    t, top = topk_ids.shape
    a, e = t * top, w.shape[0]
    out = torch.empty((a, n), device=x.device, dtype=x.dtype)
    if a == 0:
        return out
    cfg = dict(config or moe_config(a, e, int4))
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    if a <= DIRECT_MAX_ASSIGNMENTS:
        sorted_ids, block_experts = one_block_each(topk_ids, bm)
    else:
        sorted_ids, block_experts, _ = moe_align(topk_ids, e, bm)
    p = sorted_ids.shape[0]
    scale = 0 if sk >= k else 1 if sk % bk == 0 else 2
    cfg.setdefault("NIBBLE_DOTS", int4 and NIBBLE_DOTS and scale != 2 and bk >= 128 and bm <= 16)
    x = x if x.stride(-1) == 1 else x.contiguous()
    tw = topk_weights.reshape(-1) if topk_weights is not None else scales
    grid = (triton.cdiv(p, bm) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_moe_kernel)[grid](
        x, w, scales, zeros if zeros is not None else scales, tw, out, sorted_ids, block_experts,
        p, n, k, a, 1 if x.shape[0] == a else top, x.stride(0), w.stride(0), w.stride(1),
        -(-n // sn), -(-k // sk),
        INT4=int4, HAS_ZEROS=zeros is not None, HAS_WEIGHTS=topk_weights is not None, SCALE=scale, SN=sn,
        SK=sk, DOT_F32=INTERPRET or x.dtype == torch.float32, **cfg,
    )
    return out


def moe_w4a16_triton(x, qweight, scales, zeros, group_size, topk_ids, topk_weights=None, config: dict = None):
    """The Triton path of ``moe_w4a16`` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _, n, words = qweight.shape
    if (DECODE_GEMV and config is None and topk_ids.numel() <= DIRECT_MAX_ASSIGNMENTS
            and x.dtype in (torch.float16, torch.bfloat16)
            and int4_gemv_block_k(words * PACK_FACTOR, min(group_size, words * PACK_FACTOR))):
        return moe_int4_gemv(x, qweight, scales, zeros, group_size, topk_ids, topk_weights)
    return _launch(x, qweight, scales, zeros, topk_ids, topk_weights, n, words * PACK_FACTOR, 1, group_size,
                   True, config)


def moe_w8_triton(x, weight, scales, block_n, block_k, topk_ids, topk_weights=None, config: dict = None):
    """The Triton path of ``moe_w8``; per-channel scales are block scales of ``1 x K``."""
    _, n, k = weight.shape
    sn, sk = (1, k) if block_n == 0 else (block_n, block_k)
    return _launch(x, weight, scales, None, topk_ids, topk_weights, n, k, sn, sk, False, config)


# --- ops -----------------------------------------------------------------------------------------


@torch.library.triton_op("pymllm_fx::moe_w4a16", mutates_args=())
def moe_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    group_size: int,
    topk_ids: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """``(T * k, N)``: row ``t * k + j`` is token t's input times expert ``topk_ids[t, j]``'s int4
    weight, times ``topk_weights[t, j]`` if given. Triton on CUDA, the torch reference elsewhere."""
    _check_w4a16(x, qweight, scales, zeros, group_size, topk_ids, topk_weights)
    if runs_triton(x):
        return moe_w4a16_triton(x, qweight, scales, zeros, group_size, topk_ids, topk_weights)
    return moe_w4a16_reference(x, qweight, scales, zeros, group_size, topk_ids, topk_weights)


@torch.library.triton_op("pymllm_fx::moe_w8", mutates_args=())
def moe_w8(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    block_n: int,
    block_k: int,
    topk_ids: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """As ``moe_w4a16`` for int8 / fp8 e4m3 expert weights with per-channel (``block_n = block_k
    = 0``) or block scales."""
    _check_w8(x, weight, scales, block_n, block_k, topk_ids, topk_weights)
    if runs_triton(x):
        return moe_w8_triton(x, weight, scales, block_n, block_k, topk_ids, topk_weights)
    return moe_w8_reference(x, weight, scales, block_n, block_k, topk_ids, topk_weights)
