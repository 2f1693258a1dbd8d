"""MoE grouped GEMMs (torch.ops.pymllm_fx.moe_w4a16 / moe_w8): moe_align's bookkeeping, the torch
references against a float64 recomputation from the format's definition, the Triton launchers
against the references (on CPU through Triton's interpreter at tiny shapes, on CUDA at the same
and at Qwen3-30B-A3B's expert shapes), input checks, fake shapes and torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import pymllm_fx  # noqa: F401  (registers torch.ops.pymllm_fx.*)
from checks import seed
from pymllm_fx.kernels import _triton, moe
from pymllm_fx.kernels.w4a16 import pack_words

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # cpu: conftest.py sets TRITON_INTERPRET=1
needs_triton = pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# ||out - ref|| / ||ref||. Against the float64 definition the reference rounds each weight and the
# output once to the activation dtype; the Triton kernels against the reference also sum in
# another order, and the interpreter rounds float -> bf16 by truncation (up to one bf16 ulp).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def routing(t, k, e, experts=None, device="cpu"):
    """Distinct experts per token, as a router's top-k gives, drawn from ``experts`` (default all),
    and positive routing weights."""
    pool = torch.tensor(experts if experts is not None else range(e))
    ids = torch.stack([pool[torch.randperm(len(pool))[:k]] for _ in range(t)]).reshape(t, k)
    return ids.to(device), torch.rand(t, k, device=device) + 0.1


def int4_experts(e, n, k, group, dtype, asym, device="cpu"):
    """Codes ``(E, N, K)`` and their checkpoint tensors: GPTQ words per expert, scales, zeros."""
    g = -(-k // group)
    codes = torch.randint(0, 16, (e, n, k), dtype=torch.int32)
    qweight = torch.stack([pack_words(c, 4) for c in codes])
    scales = (torch.rand(e, n, g) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (e, n, g)).to(dtype) if asym else None
    return codes.to(device), qweight.to(device), scales.to(device), None if zeros is None else zeros.to(device)


def w8_experts(e, n, k, kind, block, device="cpu"):
    """int8 or e4m3 codes ``(E, N, K)`` and float32 scales, per channel (block 0x0) or per block."""
    if kind == "int8":
        weight = torch.randint(-128, 128, (e, n, k), dtype=torch.int8)
    else:
        weight = (torch.randn(e, n, k) * 64).clamp(-448, 448).to(FP8)
    bn, bk = block
    shape = (e, n) if bn == 0 else (e, -(-n // bn), -(-k // bk))
    return weight.to(device), (torch.rand(shape) * 0.01 + 0.001).to(device)


def activations(t, k_top, kdim, rows, dtype, device="cpu"):
    return torch.randn(t if rows == "T" else t * k_top, kdim).to(device, dtype)


# --- float64 definitions ---------------------------------------------------------------------------


def int4_weights64(codes, scales, zeros, group):
    k = codes.shape[-1]
    expand = lambda p: p.double().repeat_interleave(group, dim=-1)[..., :k]  # noqa: E731
    return (codes.double() - (expand(zeros) if zeros is not None else 8.0)) * expand(scales)


def w8_weights64(weight, scales, block):
    bn, bk = block
    n, k = weight.shape[1:]
    if bn == 0:
        return weight.double() * scales.double()[..., None]
    s = scales.double().repeat_interleave(bn, dim=1)[:, :n].repeat_interleave(bk, dim=2)[..., :k]
    return weight.double() * s


def routed64(x, weights64, ids, tw):
    """Row ``t * k + j`` = x_row @ W[ids[t, j]].T * tw[t, j], one assignment at a time."""
    t, k = ids.shape
    out = torch.empty(t * k, weights64.shape[1], dtype=torch.float64)
    for a in range(t * k):
        row = x[a // k] if x.shape[0] == t else x[a]
        out[a] = weights64[ids.reshape(-1)[a]].cpu() @ row.double().cpu()
        if tw is not None:
            out[a] *= float(tw.reshape(-1)[a])
    return out


# --- moe_align -------------------------------------------------------------------------------------


def check_alignment(ids, e, block_m, sorted_ids, block_experts, num_padded):
    t, k = ids.shape
    a = t * k
    p = sorted_ids.shape[0]
    assert sorted_ids.dtype == block_experts.dtype == num_padded.dtype == torch.int32
    assert p % block_m == 0 and block_experts.shape == (p // block_m,) and num_padded.shape == (1,)
    assert p == -(-(a + min(e, a) * (block_m - 1)) // block_m) * block_m  # the static bound, from shapes only
    flat, sorted_ids, block_experts = ids.reshape(-1).tolist(), sorted_ids.tolist(), block_experts.tolist()
    counts = [flat.count(x) for x in range(e)]
    used = sum(-(-c // block_m) * block_m for c in counts)
    assert int(num_padded) == used
    real = [s for s in sorted_ids if s != a]
    assert sorted(real) == list(range(a))  # every assignment exactly once, the rest sentinels
    assert all(s == a for s in sorted_ids[used:])
    row = 0
    for x in range(e):  # experts in order, each run padded to whole blocks, sentinels at its end
        run = sorted_ids[row: row + -(-counts[x] // block_m) * block_m]
        assert [s for s in run if s != a] == [i for i in range(a) if flat[i] == x]
        assert all(s == a for s in run[counts[x]:])
        for b in range(row // block_m, (row + len(run)) // block_m):
            assert block_experts[b] == x
        row += len(run)
    assert all(b == -1 for b in block_experts[used // block_m:])


@pytest.mark.parametrize(
    "t, k, e, block_m, experts",
    [
        (1, 8, 128, 16, None),  # decode: eight experts of 128, one row each
        (3, 2, 4, 16, None),  # T*k < block_m
        (33, 4, 8, 16, None),  # several blocks per expert
        (7, 1, 3, 4, None),
        (20, 2, 9, 8, [1, 4, 5, 8]),  # experts 0, 2, 3, 6, 7 get nothing
        (16, 3, 6, 16, [0, 2, 5]),  # exactly one full block each
    ],
)
def test_moe_align(t, k, e, block_m, experts):
    seed("align", t, k, e, block_m)
    ids, _ = routing(t, k, e, experts)
    for dtype in (torch.int64, torch.int32):
        check_alignment(ids, e, block_m, *moe.moe_align(ids.to(dtype), e, block_m))


def test_moe_align_compiles_in_one_graph():
    seed("align-compile")
    ids, _ = routing(9, 4, 16)
    compiled = torch.compile(moe.moe_align, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(ids, 16, 16), moe.moe_align(ids, 16, 16)):
        assert torch.equal(got, want)


# --- references against the float64 definition -------------------------------------------------------

INT4_CASES = [  # (T, k, E, N, K, group)
    (1, 1, 3, 24, 64, 16),
    (4, 2, 5, 40, 72, 32),  # a short last group (72 = 2 * 32 + 8)
    (6, 3, 4, 33, 96, 96),  # per-channel: group = K
    (3, 2, 6, 16, 48, 16),
]
W8_CASES = [  # (T, k, E, N, K, kind, block)
    (4, 2, 5, 40, 72, "int8", (0, 0)),
    (1, 1, 3, 24, 64, "int8", (16, 16)),
    (5, 2, 4, 40, 72, "fp8", (0, 0)),
    (5, 3, 6, 40, 72, "fp8", (16, 16)),  # N, K not multiples of the block
    (3, 2, 4, 48, 100, "fp8", (32, 64)),
]


def test_dequantize_matches_definition():
    seed("dequant")
    for dtype in DTYPES:
        codes, qweight, scales, zeros = int4_experts(3, 24, 72, 32, dtype, True)
        want = int4_weights64(codes, scales, zeros, 32).to(dtype)  # one rounding in both
        assert torch.equal(moe.dequantize_moe_int4(qweight, scales, zeros, 32, dtype), want)
        want = int4_weights64(codes, scales, None, 32).to(dtype)
        assert torch.equal(moe.dequantize_moe_int4(qweight, scales, None, 32, dtype), want)
    for kind in ("int8", "fp8"):
        for block in ((0, 0), (16, 32)):
            weight, scales = w8_experts(3, 40, 72, kind, block)
            got = moe.dequantize_moe_w8(weight, scales, *block, torch.float32)
            assert torch.equal(got, w8_weights64(weight, scales, block).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ["T", "Tk"])
@pytest.mark.parametrize("asym, weighted", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("t, k, e, n, kdim, group", INT4_CASES)
def test_moe_w4a16_reference_matches_definition(t, k, e, n, kdim, group, asym, weighted, rows, dtype):
    seed("w4-ref", t, k, e, n, kdim, group, asym, weighted, rows, dtype)
    codes, qweight, scales, zeros = int4_experts(e, n, kdim, group, dtype, asym)
    ids, tw = routing(t, k, e)
    tw = tw if weighted else None
    x = activations(t, k, kdim, rows, dtype)
    out = torch.ops.pymllm_fx.moe_w4a16(x, qweight, scales, zeros, group, ids, tw)  # CPU: the reference
    want = routed64(x, int4_weights64(codes, scales, zeros, group), ids, tw)
    assert out.shape == (t * k, n) and out.dtype == dtype
    assert rel_err(out.double(), want) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, weighted", [("T", True), ("Tk", False)])
@pytest.mark.parametrize("t, k, e, n, kdim, kind, block", W8_CASES)
def test_moe_w8_reference_matches_definition(t, k, e, n, kdim, kind, block, rows, weighted, dtype):
    seed("w8-ref", t, k, e, n, kdim, kind, block, rows, weighted, dtype)
    weight, scales = w8_experts(e, n, kdim, kind, block)
    ids, tw = routing(t, k, e)
    tw = tw if weighted else None
    x = activations(t, k, kdim, rows, dtype)
    out = torch.ops.pymllm_fx.moe_w8(x, weight, scales, *block, ids, tw)
    want = routed64(x, w8_weights64(weight, scales, block), ids, tw)
    assert out.shape == (t * k, n) and out.dtype == dtype
    assert rel_err(out.double(), want) <= REL_TOL[dtype]


# --- Triton launchers against the references (the interpreter on CPU) ------------------------------

CONFIGS = [  # BLOCK_M at the dot's minimum; BLOCK_M above any expert's rows, with a grouped grid;
    # BLOCK_K 128, where int4 takes its eight nibble dots (for groups of 128 and per channel)
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2),
]
# Tails in N and K everywhere. Scale placement (moe.py's SCALE) per config: group 16 on the weights
# (2) in both; group 32 per K tile (1) at BLOCK_K 32, on the weights at 64; group = K on the result (0).
W4_TRITON_CASES = [  # (T, k, E, N, K, group, rows, asym, weighted)
    (5, 2, 4, 40, 72, 16, "T", True, True),
    (3, 2, 6, 24, 136, 32, "Tk", False, False),
    (4, 1, 3, 20, 64, 64, "T", True, True),
    (7, 3, 8, 33, 200, 128, "T", True, False),
    (2, 3, 5, 24, 256, 128, "Tk", False, True),
    (3, 2, 4, 16, 136, 136, "T", True, True),
]
W8_TRITON_CASES = [  # (T, k, E, N, K, kind, block, rows, weighted)
    (5, 2, 4, 40, 72, "int8", (0, 0), "T", True),
    (3, 2, 5, 24, 72, "int8", (16, 16), "Tk", False),
    (5, 2, 4, 40, 72, "fp8", (0, 0), "Tk", True),
    (4, 3, 6, 40, 72, "fp8", (16, 16), "T", True),
    (3, 2, 4, 48, 100, "fp8", (32, 64), "T", False),
]


@needs_triton
@pytest.mark.parametrize("blocks", ["sorted", "one-per-assignment"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t, k, e, n, kdim, group, rows, asym, weighted", W4_TRITON_CASES)
def test_moe_w4a16_triton_matches_reference(t, k, e, n, kdim, group, rows, asym, weighted, dtype, blocks,
                                            monkeypatch):
    monkeypatch.setattr(moe, "DIRECT_MAX_ASSIGNMENTS", 0 if blocks == "sorted" else 1 << 20)
    seed("w4-triton", t, k, e, n, kdim, group, rows, asym, weighted, dtype)
    _, qweight, scales, zeros = int4_experts(e, n, kdim, group, dtype, asym, DEVICE)
    ids, tw = routing(t, k, e, device=DEVICE)
    tw = tw if weighted else None
    x = activations(t, k, kdim, rows, dtype, DEVICE)
    ref = moe.moe_w4a16_reference(x, qweight, scales, zeros, group, ids, tw)
    for cfg in CONFIGS:
        # the nibble dots take K steps of 128 and one scale per step (a group of whole steps, or all of K)
        nibble_ok = cfg["BLOCK_K"] >= 128 and (group % cfg["BLOCK_K"] == 0 or group >= kdim)
        for nibble_dots in (False, True) if nibble_ok else (False,):
            out = moe.moe_w4a16_triton(x, qweight, scales, zeros, group, ids, tw, dict(cfg, NIBBLE_DOTS=nibble_dots))
            assert rel_err(out, ref) <= REL_TOL[dtype], (cfg, nibble_dots)


GEMV_CASES = [  # (T, k, E, N, K, group, rows, asym, weighted, BLOCK_K): a tail of N, groups under,
    # equal to and over a K step, per-channel (group = K), activation rows per token or per pair
    (1, 2, 4, 40, 256, 128, "T", True, True, 0),
    (2, 2, 4, 33, 512, 64, "Tk", False, False, 0),
    (1, 3, 3, 20, 384, 384, "T", True, False, 0),
    (2, 2, 5, 24, 1024, 256, "T", True, True, 128),
    (1, 2, 4, 24, 256, 32, "Tk", True, True, 128),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t, k, e, n, kdim, group, rows, asym, weighted, block_k", GEMV_CASES)
def test_moe_int4_decode_gemv_matches_reference(t, k, e, n, kdim, group, rows, asym, weighted, block_k, dtype,
                                                monkeypatch):
    seed("w4-gemv", t, k, e, n, kdim, group, rows, asym, weighted, dtype)
    _, qweight, scales, zeros = int4_experts(e, n, kdim, group, dtype, asym, DEVICE)
    ids, tw = routing(t, k, e, device=DEVICE)
    tw = tw.to(dtype) if weighted else None
    x = activations(t, k, kdim, rows, dtype, DEVICE)
    ref = moe.moe_w4a16_reference(x, qweight, scales, zeros, group, ids, tw)
    out = moe.moe_int4_gemv(x, qweight, scales, zeros, group, ids, tw, block_k=block_k)
    assert rel_err(out, ref) <= REL_TOL[dtype]
    if block_k == 0:  # the launcher's switch routes decode there
        monkeypatch.setattr(moe, "DECODE_GEMV", True)
        assert torch.equal(moe.moe_w4a16_triton(x, qweight, scales, zeros, group, ids, tw), out)


def test_moe_int4_decode_gemv_takes_only_whole_groups_per_step():
    assert moe.int4_gemv_block_k(2048, 128) == 512 and moe.int4_gemv_block_k(768, 128) == 256
    assert moe.int4_gemv_block_k(768, 768) == 256  # per-channel: one group spans every step
    assert moe.int4_gemv_block_k(200, 8) == 0  # no K step divides K
    assert moe.int4_gemv_block_k(1536, 192) == 0  # 192 neither divides nor is a multiple of a step


@needs_triton
@pytest.mark.parametrize("blocks", ["sorted", "one-per-assignment"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t, k, e, n, kdim, kind, block, rows, weighted", W8_TRITON_CASES)
def test_moe_w8_triton_matches_reference(t, k, e, n, kdim, kind, block, rows, weighted, dtype, blocks, monkeypatch):
    monkeypatch.setattr(moe, "DIRECT_MAX_ASSIGNMENTS", 0 if blocks == "sorted" else 1 << 20)
    seed("w8-triton", t, k, e, n, kdim, kind, block, rows, weighted, dtype)
    weight, scales = w8_experts(e, n, kdim, kind, block, DEVICE)
    ids, tw = routing(t, k, e, device=DEVICE)
    tw = tw if weighted else None
    x = activations(t, k, kdim, rows, dtype, DEVICE)
    ref = moe.moe_w8_reference(x, weight, scales, *block, ids, tw)
    for cfg in CONFIGS:
        out = moe.moe_w8_triton(x, weight, scales, *block, ids, tw, dict(cfg))
        assert rel_err(out, ref) <= REL_TOL[dtype], cfg


@needs_triton
def test_launchers_take_the_default_config_strided_rows_and_int32_ids():
    """moe_config's tiles (decode-sized here), activations whose rows are a slice of a wider
    tensor, int32 expert ids, an expert with no tokens."""
    seed("defaults")
    t, k, e, n, kdim = 3, 2, 5, 40, 72
    ids, tw = routing(t, k, e, experts=[0, 1, 3, 4], device=DEVICE)
    ids = ids.to(torch.int32)
    x = torch.randn(t, kdim + 8).to(DEVICE, torch.bfloat16)[:, :kdim]
    _, qweight, scales, zeros = int4_experts(e, n, kdim, 32, torch.bfloat16, True, DEVICE)
    out = moe.moe_w4a16_triton(x, qweight, scales, zeros, 32, ids, tw)
    assert rel_err(out, moe.moe_w4a16_reference(x, qweight, scales, zeros, 32, ids, tw)) <= 1e-2
    weight, wscales = w8_experts(e, n, kdim, "fp8", (0, 0), DEVICE)
    out = moe.moe_w8_triton(x, weight, wscales, 0, 0, ids, tw)
    assert rel_err(out, moe.moe_w8_reference(x, weight, wscales, 0, 0, ids, tw)) <= 1e-2


# --- input checks, fake shapes, torch.compile ----------------------------------------------------------


def w4_args(case):
    """Valid moe_w4a16 arguments (E=4, N=24, K=64, group 32, T=3, k=2), then one broken."""
    _, qweight, scales, zeros = int4_experts(4, 24, 64, 32, torch.float16, True)
    ids, tw = routing(3, 2, 4)
    args = dict(x=torch.randn(3, 64, dtype=torch.float16), qweight=qweight, scales=scales, zeros=zeros,
                group_size=32, topk_ids=ids, topk_weights=tw)
    if case == "wrong_E":
        args["scales"] = scales[:3].contiguous()
    elif case == "qweight_int64":
        args["qweight"] = qweight.long()
    elif case == "group_12":
        args["group_size"] = 12
    elif case == "group_minus_1":
        args["group_size"] = -1
    elif case == "int_activations":
        args["x"] = torch.ones(3, 64, dtype=torch.int32)
    elif case == "x_rows":
        args["x"] = torch.randn(4, 64, dtype=torch.float16)
    elif case == "x_features":
        args["x"] = torch.randn(3, 72, dtype=torch.float16)
    elif case == "ids_float":
        args["topk_ids"] = ids.float()
    elif case == "id_too_large":
        args["topk_ids"] = torch.where(ids == ids[0, 0], 4, ids)
    elif case == "strided_qweight":
        args["qweight"] = qweight.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "zeros_dtype":
        args["zeros"] = zeros.float()
    elif case == "weights_shape":
        args["topk_weights"] = tw.reshape(-1)
    return args


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("wrong_E", ValueError, r"scales must have shape \(4, 24, 2\), got \(3, 24, 2\)"),
        ("qweight_int64", ValueError, r"qweight must be int32 \(E, N, K // 8\), got torch.int64"),
        ("group_12", ValueError, "group_size must be a positive multiple of 8 .* got 12"),
        ("group_minus_1", ValueError, "group_size must be a positive multiple of 8 .* got -1"),
        ("int_activations", TypeError, "activations must be float16, bfloat16 or float32"),
        ("x_rows", ValueError, r"activations must be \(T, K\) = \(3, 64\) or \(T\*top_k, K\) = \(6, 64\)"),
        ("x_features", ValueError, "do not match the weight's 64 input features"),
        ("ids_float", ValueError, "topk_ids must be a 2-D .* int32/int64 tensor, got torch.float32"),
        ("id_too_large", ValueError, r"topk_ids must lie in \[0, 4\) .* found ids from \d to 4"),
        ("strided_qweight", ValueError, "qweight must be contiguous"),
        ("zeros_dtype", TypeError, "zeros must have dtype torch.float16"),
        ("weights_shape", ValueError, r"topk_weights must have shape \(3, 2\)"),
    ],
)
def test_moe_w4a16_bad_inputs(case, exc, pattern):
    seed("bad-w4", case)
    with pytest.raises(exc, match=f"pymllm_fx.moe_w4a16: .*{pattern}"):
        torch.ops.pymllm_fx.moe_w4a16(**w4_args(case))


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("weight_fp16", ValueError, r"weight must be int8 or float8_e4m3fn \(E, N, K\), got torch.float16"),
        ("channel_scales_shape", ValueError, r"scales must have shape \(4, 24\), got \(3, 24\)"),
        ("block_scales_shape", ValueError, r"scales must have shape \(4, 2, 4\), got \(4, 2, 3\)"),
        ("half_block", ValueError, "block_n and block_k must both be 0 .* got 16 and 0"),
        ("scales_fp16", TypeError, "scales must have dtype torch.float32"),
        ("strided_weight", ValueError, "weight must be contiguous"),
        ("negative_id", ValueError, r"topk_ids must lie in \[0, 4\) .* found ids from -1"),
        ("ids_device", ValueError, "topk_ids is on meta but the activations are on cpu"),
    ],
)
def test_moe_w8_bad_inputs(case, exc, pattern):
    seed("bad-w8", case)
    weight, scales = w8_experts(4, 24, 64, "fp8", (0, 0))
    ids, tw = routing(3, 2, 4)
    x, block = torch.randn(3, 64, dtype=torch.bfloat16), (0, 0)
    if case == "weight_fp16":
        weight = weight.half()
    elif case == "channel_scales_shape":
        scales = scales[:3]
    elif case == "block_scales_shape":
        scales, block = torch.rand(4, 2, 3), (16, 16)
    elif case == "half_block":
        block = (16, 0)
    elif case == "scales_fp16":
        scales = scales.half()
    elif case == "strided_weight":
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "negative_id":
        ids = torch.where(ids == ids[0, 0], -1, ids)
    elif case == "ids_device":
        ids = ids.to("meta")
    with pytest.raises(exc, match=f"pymllm_fx.moe_w8: .*{pattern}"):
        torch.ops.pymllm_fx.moe_w8(x, weight, scales, *block, ids, tw)


def test_fake_shapes_on_meta():
    x = torch.empty(5, 64, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(5, 4, dtype=torch.int32, device="meta")
    out = torch.ops.pymllm_fx.moe_w4a16(
        x, torch.empty(8, 24, 8, dtype=torch.int32, device="meta"), torch.empty(8, 24, 2, dtype=torch.bfloat16,
                                                                                     device="meta"),
        None, 32, ids, None)
    assert out.shape == (20, 24) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    weight = torch.empty(8, 24, 64, dtype=FP8, device="meta")
    out = torch.ops.pymllm_fx.moe_w8(x.repeat(4, 1), weight, torch.empty(8, 2, 1, device="meta"), 16, 128, ids, None)
    assert out.shape == (20, 24) and out.dtype == torch.bfloat16


def test_ops_compile_in_one_graph():
    """torch.compile(fullgraph=True) through fake tensors (aot_eager) with no graph break."""
    seed("compile")
    _, qweight, scales, zeros = int4_experts(4, 24, 64, 32, torch.float32, True)
    weight, wscales = w8_experts(4, 24, 64, "fp8", (16, 32))

    def fn(x, ids, tw):
        up = torch.ops.pymllm_fx.moe_w4a16(x * 2, qweight, scales, zeros, 32, ids, None)
        down = torch.ops.pymllm_fx.moe_w8(torch.nn.functional.pad(up, (0, 40)), weight, wscales, 16, 32, ids, tw)
        return down.view(ids.shape[0], ids.shape[1], -1).sum(1)

    ids, tw = routing(3, 2, 4)
    x = torch.randn(3, 64)
    assert torch._dynamo.explain(fn)(x, ids, tw).graph_break_count == 0
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, ids, tw), fn(x, ids, tw))


def test_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch checks of torch.library."""
    seed("opcheck")
    _, qweight, scales, zeros = int4_experts(4, 24, 64, 32, torch.bfloat16, True)
    ids, tw = routing(3, 2, 4)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    opcheck(torch.ops.pymllm_fx.moe_w4a16.default, (x, qweight, scales, zeros, 32, ids, tw))
    opcheck(torch.ops.pymllm_fx.moe_w4a16.default, (x.repeat(2, 1), qweight, scales, None, 32, ids, None))
    weight, wscales = w8_experts(4, 24, 64, "int8", (0, 0))
    opcheck(torch.ops.pymllm_fx.moe_w8.default, (x, weight, wscales, 0, 0, ids, tw))
    weight, wscales = w8_experts(4, 24, 64, "fp8", (16, 32))
    # test_schema compares inputs before and after with allclose, which has no CPU fp8 kernel
    opcheck(torch.ops.pymllm_fx.moe_w8.default, (x, weight, wscales, 16, 32, ids, tw),
            test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


# --- CUDA only: Qwen3-30B-A3B's experts (E=128, top-8), through the ops ----------------------------

QWEN = dict(gate_up=(2048, 1536), down=(768, 2048))  # (K, N); down reads the (T * k, K) rows


def chunked_reference(reference, x, ids, tw, *weights, tokens=16):
    """The reference a few tokens at a time: it gathers one (N, K) weight per assignment."""
    t, k = ids.shape
    outs = []
    for i in range(0, t, tokens):
        rows = x[i:i + tokens] if x.shape[0] == t else x[i * k:(i + tokens) * k]
        outs.append(reference(rows, *weights, ids[i:i + tokens], None if tw is None else tw[i:i + tokens]))
    return torch.cat(outs)


@pytest.mark.skipif(not CUDA, reason="real shapes need a CUDA device")
@pytest.mark.parametrize("family", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("proj", ["gate_up", "down"])
@pytest.mark.parametrize("t", [1, 2, 8, 256])
def test_ops_on_cuda_at_qwen3_moe_shapes(t, proj, family):
    seed("qwen", t, proj, family)
    e, k, (kdim, n) = 128, 8, QWEN[proj]
    logits = torch.randn(t, e, device="cuda")
    tw, ids = torch.softmax(logits, -1).topk(k)
    x = torch.randn(t if proj == "gate_up" else t * k, kdim, device="cuda", dtype=torch.bfloat16)
    if family == "int4":
        qweight = torch.randint(-(2**31), 2**31 - 1, (e, n, kdim // 8), device="cuda", dtype=torch.int32)
        scales = (torch.rand(e, n, kdim // 128, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (e, n, kdim // 128), device="cuda").to(torch.bfloat16)
        out = torch.ops.pymllm_fx.moe_w4a16(x, qweight, scales, zeros, 128, ids, tw)
        ref = chunked_reference(moe.moe_w4a16_reference, x, ids, tw, qweight, scales, zeros, 128)
        assert rel_err(out, ref) <= 1e-2
        if t <= 2:  # the decode GEMV (kernels/moe.py's DECODE_GEMV) at the real shapes
            gemv = moe.moe_int4_gemv(x, qweight, scales, zeros, 128, ids, tw)
            assert rel_err(gemv, ref) <= 1e-2
        out = torch.ops.pymllm_fx.moe_w4a16(x, qweight, scales, None, 128, ids, None)
        ref = chunked_reference(moe.moe_w4a16_reference, x, ids, None, qweight, scales, None, 128)
    elif family == "int8":
        weight, scales = w8_experts(e, n, kdim, "int8", (0, 0), "cuda")
        out = torch.ops.pymllm_fx.moe_w8(x, weight, scales, 0, 0, ids, tw)
        ref = chunked_reference(moe.moe_w8_reference, x, ids, tw, weight, scales, 0, 0)
    else:
        weight, scales = w8_experts(e, n, kdim, "fp8", (128, 128), "cuda")
        out = torch.ops.pymllm_fx.moe_w8(x, weight, scales, 128, 128, ids, tw)
        ref = chunked_reference(moe.moe_w8_reference, x, ids, tw, weight, scales, 128, 128)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.skipif(not CUDA, reason="Inductor's Triton path needs a CUDA device")
def test_ops_compile_with_inductor_on_cuda():
    seed("inductor")
    _, qweight, scales, zeros = int4_experts(8, 96, 256, 128, torch.bfloat16, True, "cuda")
    weight, wscales = w8_experts(8, 256, 96, "fp8", (128, 128), "cuda")
    ids, tw = routing(5, 2, 8, device="cuda")

    def fn(x):
        up = torch.ops.pymllm_fx.moe_w4a16(x, qweight, scales, zeros, 128, ids, None)
        return torch.ops.pymllm_fx.moe_w8(torch.relu(up), weight, wscales, 128, 128, ids, tw)

    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(torch.compile(fn, fullgraph=True)(x), fn(x))


def test_references_work_in_chunks_of_assignments(monkeypatch):
    """A CPU prefill of a real MoE model must not gather one dequantized weight per assignment at
    once: the references go a chunk at a time, with the same result."""
    seed("chunks")
    _, qweight, scales, zeros = int4_experts(4, 24, 64, 32, torch.float32, True, "cpu")
    weight, w8_scales = w8_experts(4, 24, 64, "int8", (0, 0), "cpu")
    ids, tw = routing(9, 2, 4, device="cpu")
    x = activations(9, 2, 64, "T", torch.float32, "cpu")
    whole = (moe.moe_w4a16_reference(x, qweight, scales, zeros, 32, ids, tw),
             moe.moe_w8_reference(x, weight, w8_scales, 0, 0, ids, tw))
    monkeypatch.setattr(moe, "_CHUNK_ELEMENTS", 24 * 64 * 5)  # five assignments a chunk: 18 = 5+5+5+3
    chunked = (moe.moe_w4a16_reference(x, qweight, scales, zeros, 32, ids, tw),
               moe.moe_w8_reference(x, weight, w8_scales, 0, 0, ids, tw))
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
