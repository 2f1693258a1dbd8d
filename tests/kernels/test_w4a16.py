"""W4A16: int4 packing, dequantization, and torch.ops.pymllm_fx.w4a16_linear against references."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pymllm_fx  # noqa: F401  (registers torch.ops.pymllm_fx.*)
from pymllm_fx.kernels.w4a16 import dequantize_int4, num_groups, pack_int4, unpack_int4, w4a16_reference
from checks import rel_err, seed

OP = "pymllm_fx.w4a16_linear"
# Relative error bounds ||out - ref|| / ||ref|| against a float64 recomputation (DESIGN.md conv. 1).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def manual_unpack(qweight: torch.Tensor) -> list:
    """Bit-by-bit unpacking with Python ints, from the layout's definition in kernels/w4a16.py: read
    as int16 (little-endian halves of each word), element 16*t + p of 64-feature tile t holds in
    nibble j the code of feature 64*t + 16*j + p; a last tile of width W uses W // 4 for 16."""
    rows = []
    for row in qweight.tolist():
        halves = []
        for word in row:
            word &= 0xFFFFFFFF
            halves += [word & 0xFFFF, word >> 16]
        k = 4 * len(halves)
        codes = [None] * k
        for e, half in enumerate(halves):
            start = e * 4 // 64 * 64
            quarter = min(64, k - start) // 4
            p = e - start // 4
            for j in range(4):
                codes[start + j * quarter + p] = (half >> (4 * j)) & 0xF
        rows.append(codes)
    return rows


def make_weights(n: int, k: int, group_size: int, dtype: torch.dtype, asym: bool):
    g = num_groups(k, group_size)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, g) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (n, g)).to(dtype) if asym else None
    return codes, pack_int4(codes), scales, zeros


def dequant_float64(codes, scales, zeros, group_size):
    """Independent float64 dequantization from the unpacked codes."""
    k = codes.shape[1]
    group_of = torch.arange(k) // group_size
    s = scales.double()[:, group_of]
    z = zeros.double()[:, group_of] if zeros is not None else 8.0
    return (codes.double() - z) * s


# --- packing ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), words=st.integers(1, 6), data=st.data())
def test_pack_unpack_round_trip(n, words, data):
    flat = data.draw(st.lists(st.integers(0, 15), min_size=n * words * 8, max_size=n * words * 8))
    codes = torch.tensor(flat, dtype=torch.uint8).view(n, words * 8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (n, words)
    assert torch.equal(unpack_int4(packed), codes)
    assert manual_unpack(packed) == codes.tolist()


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=16))
def test_unpack_pack_round_trip_from_words(words):
    qweight = torch.tensor(words, dtype=torch.int32).view(1, -1)
    assert torch.equal(pack_int4(unpack_int4(qweight)), qweight)


def test_pack_golden_one_word():
    """K = 8: one tile of width 8, quarters of 2 features: int16 element p holds features p, 2+p,
    4+p, 6+p in nibbles 0..3."""
    packed = pack_int4(torch.tensor([list(range(8))], dtype=torch.uint8))
    # element 0: codes of features 0, 2, 4, 6; element 1: features 1, 3, 5, 7
    assert packed.tolist() == [[0x7531_6420]]
    assert unpack_int4(packed).tolist() == [list(range(8))]


def test_pack_golden_full_tile():
    """K = 64: element p (0..15) holds features p, 16+p, 32+p, 48+p."""
    codes = torch.tensor([[f % 16 for f in range(64)]], dtype=torch.uint8)  # feature f has code f % 16
    packed = pack_int4(codes)
    halves = [(w & 0xFFFF, (w >> 16) & 0xFFFF) for w in (v & 0xFFFFFFFF for v in packed[0].tolist())]
    flat = [h for pair in halves for h in pair]
    assert flat == [p * 0x1111 for p in range(16)]  # all four quarters of column p hold code p
    codes = torch.tensor([[f // 16 for f in range(64)]], dtype=torch.uint8)  # quarter index as the code
    flat = [h for w in pack_int4(codes)[0].tolist() for h in (w & 0xFFFF, (w >> 16) & 0xFFFF)]
    assert flat == [0x3210] * 16


def test_pack_top_nibble_gives_negative_words():
    packed = pack_int4(torch.full((1, 8), 15, dtype=torch.uint8))
    assert packed.tolist() == [[-1]]


def test_unpack_truncates_to_k():
    codes = torch.randint(0, 16, (3, 16), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes), k=13), codes[:, :13])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((1, 8), 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((1, 8), -1, dtype=torch.int32))


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("k, group_size", [(40, 32), (64, 64), (48, 16)])
def test_dequantize_matches_manual_loop(k, group_size, asym):
    torch.manual_seed(0)
    n = 3
    codes, qweight, scales, zeros = make_weights(n, k, group_size, torch.float32, asym)
    got = dequantize_int4(qweight, scales, zeros, group_size)
    assert got.shape == (n, k) and got.dtype == torch.float32
    unpacked = manual_unpack(qweight)
    for row in range(n):
        for col in range(k):
            grp = col // group_size
            zero = zeros[row, grp].item() if asym else 8
            expect = (unpacked[row][col] - zero) * scales[row, grp].item()
            assert got[row, col].item() == pytest.approx(expect, rel=1e-6, abs=1e-9)


# --- the op ----------------------------------------------------------------------------------

SHAPES = [(16, 64, 32), (48, 256, 64), (32, 256, 128), (32, 576, 128), (24, 200, 64)]


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k, group_size", SHAPES)
def test_w4a16_op_matches_references(n, k, group_size, dtype, asym, bias, lead):
    seed(n, k, group_size, dtype, asym, bias, lead)
    codes, qweight, scales, zeros = make_weights(n, k, group_size, dtype, asym)
    x = torch.randn(*lead, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None

    out = torch.ops.pymllm_fx.w4a16_linear(x, qweight, scales, zeros, group_size, b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert torch.equal(out, w4a16_reference(x, qweight, scales, zeros, group_size, b))

    ref = x.double() @ dequant_float64(codes, scales, zeros, group_size).t()
    if bias:
        ref = ref + b.double()
    assert rel_err(out, ref) <= REL_TOL[dtype]


def test_w4a16_tail_group_uses_its_own_scale():
    """K=200, g=64: the last 8 features form a 4th group; changing its scale changes only them."""
    torch.manual_seed(1)
    codes, qweight, scales, zeros = make_weights(4, 200, 64, torch.float32, True)
    x = torch.zeros(1, 200)
    x[0, 195] = 1.0  # a feature in the tail group
    base = torch.ops.pymllm_fx.w4a16_linear(x, qweight, scales, zeros, 64, None)
    bumped = scales.clone()
    bumped[:, 3] *= 2
    out = torch.ops.pymllm_fx.w4a16_linear(x, qweight, bumped, zeros, 64, None)
    expected = (codes[:, 195].float() - zeros[:, 3]) * scales[:, 3]
    torch.testing.assert_close(base[0], expected)
    torch.testing.assert_close(out[0], 2 * expected)


def test_w4a16_fake_shapes_on_meta():
    qweight = torch.empty(12, 8, dtype=torch.int32, device="meta")
    scales = torch.empty(12, 2, dtype=torch.float16, device="meta")
    x = torch.empty(2, 7, 64, dtype=torch.float16, device="meta")
    out = torch.ops.pymllm_fx.w4a16_linear(x, qweight, scales, None, 32, None)
    assert out.shape == (2, 7, 12) and out.device.type == "meta"


def test_w4a16_under_torch_compile_fullgraph():
    torch.manual_seed(2)
    codes, qweight, scales, zeros = make_weights(16, 128, 64, torch.float32, True)
    b = torch.randn(16)

    def fn(x):
        return torch.relu(torch.ops.pymllm_fx.w4a16_linear(x * 2, qweight, scales, zeros, 64, b)) + 1

    x = torch.randn(3, 128)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), fn(x))


def _valid(dtype=torch.float16):
    _, qweight, scales, zeros = make_weights(8, 64, 32, dtype, True)
    return torch.randn(3, 64).to(dtype), qweight, scales, zeros


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("int_activations", TypeError, "activations"),
        ("float64_activations", TypeError, "activations"),
        ("mismatched_k", ValueError, "input features"),
        ("scales_shape", ValueError, "scales must have shape"),
        ("zeros_shape", ValueError, "zeros must have shape"),
        ("zeros_dtype", TypeError, "zeros must have dtype"),
        ("int64_qweight", TypeError, "qweight must have dtype"),
        ("qweight_1d", ValueError, "qweight must be 2-D"),
        ("group_size", ValueError, "group_size"),
        ("bias_shape", ValueError, "bias must have shape"),
        ("int_bias", TypeError, "bias"),
    ],
)
def test_w4a16_bad_inputs(case, exc, pattern):
    torch.manual_seed(3)
    x, qweight, scales, zeros = _valid()
    group_size, bias = 32, None
    if case == "int_activations":
        x = x.to(torch.int32)
    elif case == "float64_activations":  # the check's own message: "float16, bfloat16 or float32"
        x = x.double()
    elif case == "mismatched_k":
        x = torch.randn(3, 72, dtype=torch.float16)
    elif case == "scales_shape":
        scales = scales[:, :1]
    elif case == "zeros_shape":
        zeros = zeros[:4]
    elif case == "zeros_dtype":
        zeros = zeros.to(torch.int32)
    elif case == "int64_qweight":
        qweight = qweight.to(torch.int64)
    elif case == "qweight_1d":
        qweight = qweight.flatten()
    elif case == "group_size":
        group_size = 12
    elif case == "bias_shape":
        bias = torch.zeros(9, dtype=torch.float16)
    elif case == "int_bias":
        bias = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(exc, match=OP) as info:
        torch.ops.pymllm_fx.w4a16_linear(x, qweight, scales, zeros, group_size, bias)
    assert pattern in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_w4a16_device_mismatch():
    x, qweight, scales, zeros = _valid()
    with pytest.raises(ValueError, match=OP + ".*qweight is on cpu"):
        torch.ops.pymllm_fx.w4a16_linear(x.cuda(), qweight, scales.cuda(), zeros.cuda(), 32, None)
