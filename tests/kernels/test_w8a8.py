"""W8A8 int8 (torch.ops.pymllm_fx.w8a8_linear): the quantizers and the reference against their
definitions, the Triton kernels against the reference (on CPU through Triton's interpreter at
small shapes, on CUDA also at the Llama-3-8B shapes), input checks, meta shapes and torch.compile."""

from __future__ import annotations

import pytest
import torch

import pymllm_fx  # noqa: F401  (registers torch.ops.pymllm_fx.*)
from checks import rel_err, seed
from pymllm_fx.kernels import _triton, w8a8
from pymllm_fx.kernels.w8a8 import quantize_int8_per_token, quantize_int8_static, w8a8_reference
from pymllm_fx.methods.w8a8 import quantize_int8_per_channel

OP = "pymllm_fx.w8a8_linear"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # cpu: conftest.py sets TRITON_INTERPRET=1
needs_triton = pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The op against its reference; the interpreter rounds float -> bf16 by truncation (the GPU rounds
# to nearest), which costs up to one bf16 ulp.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def activations(lead, k, dtype, device="cpu"):
    """A wide dynamic range along K, so that rounding to int8 matters."""
    return (torch.randn(*lead, k) * torch.logspace(-2, 1, k)).to(device, dtype)


def weights(n, k, device="cpu"):
    qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    return qweight.to(device), (torch.rand(n) * 0.01 + 1e-3).to(device)


def definition(xq, x_scale, qweight, weight_scale, zero=None, bias=None):
    """The format's product in float64: sum_k (xq - z) * q, times both scales, plus bias."""
    xs = xq.double() - (0 if zero is None else zero.double())
    out = (xs @ qweight.double().t()) * x_scale.double() * weight_scale.double()
    return out if bias is None else out + bias.double()


# --- quantizers and the reference --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (7, 64), (2, 3, 200)])
def test_per_token_quantization_round_trip(shape, dtype):
    seed("tok", shape, dtype)
    x = activations(shape[:-1], shape[-1], dtype)
    xq, scale = quantize_int8_per_token(x)
    assert xq.dtype == torch.int8 and xq.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    torch.testing.assert_close(scale, x.float().abs().amax(-1, keepdim=True) / 127, rtol=0, atol=0)
    # Each row's largest magnitude maps to +-127, and every value rounds to the nearest step.
    assert torch.equal(xq.abs().amax(dim=-1, keepdim=True).int(), torch.full(scale.shape, 127, dtype=torch.int32))
    err = (xq.double() * scale.double() - x.double()).abs()
    assert (err <= scale.double() / 2 * (1 + 1e-6)).all() and err.max() > 0


def test_rounding_is_half_to_even():
    """Ties go to the even code (torch.round), as the kernels' cvt.rni and its twin do."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]])
    xq, scale = quantize_int8_per_token(x)
    assert scale.item() == 1.0
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]


def test_zero_row_is_finite():
    x = torch.zeros(3, 32)
    x[1] = torch.randn(32)
    xq, scale = quantize_int8_per_token(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert not xq[0].any() and not xq[2].any()


def test_static_quantization_with_zero_point():
    x = torch.tensor([[-10.0, -1.0, 0.0, 0.25, 0.75, 3.0, 100.0]])
    scale, zero = torch.tensor([0.5]), torch.tensor([-3], dtype=torch.int32)
    # round(x / 0.5) + (-3), clamped: -20-3, -2-3, 0-3, round(0.5)=0 -3, round(1.5)=2 -3, 6-3, 200-3 -> 127
    assert quantize_int8_static(x, scale, zero).tolist() == [[-23, -5, -3, -3, -1, 3, 127]]
    assert quantize_int8_static(-x, scale).tolist() == [[20, 2, 0, 0, -2, -6, -128]]


def test_per_channel_weights():
    torch.manual_seed(3)
    w = torch.randn(24, 80) * torch.rand(24, 1) * 3
    codes, scale = quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (24,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127, rtol=0, atol=0)
    assert int(codes.abs().max()) == 127
    assert ((codes.double() * scale.double()[:, None] - w.double()).abs() <= scale.double()[:, None] / 2 + 1e-7).all()


def test_int8_matmul_is_exact_integer_arithmetic():
    """The reference's products are integers (int32 on CPU): values where float32 would round."""
    a = torch.full((2, 4096), 127, dtype=torch.int8)
    a[1, ::2] = -128
    b = torch.full((3, 4096), -128, dtype=torch.int8)
    b[2, 1] = 1
    out = w8a8.int8_matmul(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long().t())
    assert abs(int(out[0, 0])) > 2**24  # beyond float32's exact integers


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["dynamic", "static", "static-asym"])
@pytest.mark.parametrize("n, k", [(16, 64), (32, 576), (7, 33)])
def test_op_on_cpu_matches_definition(n, k, act, dtype, bias, lead):
    seed("op", n, k, act, dtype, bias, lead)
    qweight, wscale = weights(n, k)
    x = activations(lead, k, dtype)
    b = torch.randn(n).to(dtype) if bias else None
    s = z = sums = None
    if act != "dynamic":
        s = x.float().abs().amax().reshape(1) / 100  # some values clamp
        if act == "static-asym":
            z, sums = torch.tensor([-7], dtype=torch.int32), qweight.sum(1, dtype=torch.int32)
    out = torch.ops.pymllm_fx.w8a8_linear(x, qweight, wscale, s, z, sums, b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert torch.equal(out, w8a8_reference(x, qweight, wscale, s, z, sums, b))
    if act == "dynamic":
        xq, xs = quantize_int8_per_token(x)
    else:
        xq, xs = quantize_int8_static(x, s, z), s
    assert rel_err(out, definition(xq, xs, qweight, wscale, z, b)) <= REL_TOL[dtype]


def test_quantized_product_is_close_to_float():
    """Against the unquantized product: two int8 roundings on Gaussian data cost ~1 % (measured
    0.6-0.9 %); 2 % still catches a wrong scale or a missing correction."""
    torch.manual_seed(4)
    w, x = torch.randn(64, 512), torch.randn(9, 512)
    codes, scale = quantize_int8_per_channel(w)
    out = torch.ops.pymllm_fx.w8a8_linear(x, codes, scale, None, None, None, None)
    assert rel_err(out, x.double() @ w.double().t()) <= 2e-2


def test_zero_activation_row_gives_bias():
    torch.manual_seed(8)
    qweight, wscale = weights(8, 32)
    b = torch.randn(8)
    x = torch.zeros(2, 32)
    x[1] = torch.randn(32)
    out = torch.ops.pymllm_fx.w8a8_linear(x, qweight, wscale, None, None, None, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], b)


def test_fake_shapes_on_meta():
    x = torch.empty(3, 4, 64, dtype=torch.bfloat16, device="meta")
    q = torch.empty(10, 64, dtype=torch.int8, device="meta")
    s = torch.empty(10, dtype=torch.float32, device="meta")
    assert torch.ops.pymllm_fx.w8a8_linear(x, q, s, None, None, None, None).shape == (3, 4, 10)


def test_under_torch_compile_fullgraph():
    torch.manual_seed(9)
    qweight, wscale = weights(16, 64)

    def fn(x):
        return torch.ops.pymllm_fx.w8a8_linear(x + 1, qweight, wscale, None, None, None, None) * 3

    x = torch.randn(4, 64)
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x))


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("int_activations", TypeError, "activations"),
        ("mismatched_k", ValueError, "input features"),
        ("weight_not_int8", TypeError, "qweight must have dtype"),
        ("uint8_weight", TypeError, "qweight must have dtype"),
        ("weight_1d", ValueError, "qweight must be 2-D"),
        ("scale_shape", ValueError, "weight_scale must have shape"),
        ("scale_bf16", TypeError, "weight_scale must have dtype"),
        ("input_scale_shape", ValueError, "input_scale must have shape"),
        ("zero_without_scale", ValueError, "needs a static input_scale"),
        ("zero_without_sums", ValueError, "needs weight_sums"),
        ("zero_float", TypeError, "input_zero_point must have dtype"),
        ("bias_shape", ValueError, "bias must have shape"),
        ("strided_weight", ValueError, "qweight must be contiguous"),
    ],
)
def test_bad_inputs(case, exc, pattern):
    torch.manual_seed(10)
    qweight, wscale = weights(8, 64)
    x, s, z, sums, bias = torch.randn(3, 64, dtype=torch.bfloat16), None, None, None, None
    if case == "int_activations":
        x = x.to(torch.int32)
    elif case == "mismatched_k":
        x = torch.randn(3, 32, dtype=torch.bfloat16)
    elif case == "weight_not_int8":
        qweight = qweight.float()
    elif case == "uint8_weight":
        qweight = qweight.to(torch.uint8)
    elif case == "weight_1d":
        qweight = qweight.flatten()
    elif case == "scale_shape":
        wscale = wscale[:4]
    elif case == "scale_bf16":
        wscale = wscale.bfloat16()
    elif case == "input_scale_shape":
        s = torch.ones(2)
    elif case == "zero_without_scale":
        z, sums = torch.zeros(1, dtype=torch.int32), qweight.sum(1, dtype=torch.int32)
    elif case == "zero_without_sums":
        s, z = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    elif case == "zero_float":
        s, z, sums = torch.ones(1), torch.zeros(1), qweight.sum(1, dtype=torch.int32)
    elif case == "bias_shape":
        bias = torch.zeros(16, dtype=torch.bfloat16)
    elif case == "strided_weight":
        qweight = qweight.t().contiguous().t()
    with pytest.raises(exc, match=OP) as info:
        torch.ops.pymllm_fx.w8a8_linear(x, qweight, wscale, s, z, sums, bias)
    assert pattern in str(info.value)


# --- the Triton kernels against the reference ----------------------------------------------------

GEMV_CFGS = [dict(BLOCK_N=16, BLOCK_K=64, num_warps=4), dict(BLOCK_N=8, BLOCK_K=128, num_warps=2),  # K tails, N tails
             dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, PREQUANT=True)]  # the row quantizer's output
GEMM_CFGS = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2),
             dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2)]


def static_args(x, qweight, asym):
    s = (x.float().abs().amax() / 90).reshape(1)  # the largest values clamp
    if not asym:
        return s, None, None
    return s, torch.tensor([11], dtype=torch.int32, device=x.device), qweight.sum(1, dtype=torch.int32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["dynamic", "static", "static-asym"])
@pytest.mark.parametrize("m, n, k", [(1, 40, 200), (3, 24, 256), (17, 70, 136)])
def test_kernels_match_reference(m, n, k, act, dtype):
    seed("kernels", m, n, k, act, dtype)
    qweight, wscale = weights(n, k, DEVICE)
    x = activations((m,), k, dtype, DEVICE)
    bias = torch.randn(n).to(DEVICE, dtype)
    s, z, sums = (None, None, None) if act == "dynamic" else static_args(x, qweight, act == "static-asym")
    ref = w8a8_reference(x, qweight, wscale, s, z, sums, bias)
    xq, x_scale = w8a8.w8a8_quantize_rows(x, s, z, block_k=64)  # K tails
    if act == "dynamic":
        ref_q, ref_scale = quantize_int8_per_token(x)
        assert torch.equal(x_scale, ref_scale)
    else:
        ref_q = quantize_int8_static(x, s, z)
    assert torch.equal(xq, ref_q)
    one_pass_q, one_pass_scale = w8a8.w8a8_quantize_rows(x, s, z)  # the whole row from one load
    assert torch.equal(one_pass_q, ref_q) and torch.equal(one_pass_scale, x_scale)
    for cfg in GEMV_CFGS:  # one program column per row, the quantization fused (two rows are enough)
        out = w8a8.w8a8_gemv(x[:2], qweight, wscale, s, z, sums, bias, dict(cfg))
        assert out.dtype == dtype and rel_err(out, ref[:2]) <= REL_TOL[dtype], cfg
    for cfg in GEMM_CFGS:
        out = w8a8.w8a8_gemm(x, qweight, wscale, s, z, sums, bias, dict(cfg))
        assert out.dtype == dtype and rel_err(out, ref) <= REL_TOL[dtype], cfg
        if dtype == torch.float32 and not CUDA:  # integer sums, the same float32 epilogue (no FMA here)
            assert torch.equal(out, ref), cfg


@needs_triton
def test_row_scale_over_several_steps(monkeypatch):
    """Rows longer than ROW_BLOCK_MAX: the quantizer and the fused GEMV find the scale in steps."""
    monkeypatch.setattr(w8a8, "ROW_BLOCK_MAX", 64)
    seed("row-steps")
    qweight, wscale = weights(24, 200, DEVICE)
    x = activations((2,), 200, torch.float32, DEVICE)
    x[1, 190] = 50.0  # the row's largest value sits in the last, partial step
    ref_q, ref_scale = quantize_int8_per_token(x)
    xq, x_scale = w8a8.w8a8_quantize_rows(x)
    assert torch.equal(xq, ref_q) and torch.equal(x_scale, ref_scale)
    out = w8a8.w8a8_gemv(x, qweight, wscale, None, None, None, None, dict(BLOCK_N=8, BLOCK_K=64, num_warps=4))
    assert rel_err(out, w8a8_reference(x, qweight, wscale)) <= REL_TOL[torch.float32]


@needs_triton
def test_one_row_over_wide_outputs_takes_the_gemm(monkeypatch):
    """Decode over DECODE_GEMM_MIN_N outputs or more runs the row quantizer and the GEMM."""
    monkeypatch.setattr(w8a8, "DECODE_GEMM_MIN_N", 32)
    calls = []
    monkeypatch.setattr(w8a8, "w8a8_gemv", lambda *a: calls.append("gemv"))
    seed("decode-gemm")
    qweight, wscale = weights(40, 128, DEVICE)
    x = activations((1,), 128, torch.float32, DEVICE)
    out = w8a8.w8a8_triton(x, qweight, wscale, None, None, None, None)
    assert not calls and rel_err(out, w8a8_reference(x, qweight, wscale)) <= REL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 4)], ids=["3d", "4d"])
def test_launcher_takes_batched_and_strided_activations(lead):
    seed("lead", lead)
    qweight, wscale = weights(24, 128, DEVICE)
    wide = torch.randn(*lead, 256).to(DEVICE, torch.float16)
    x = wide[..., ::2]  # a strided view: the launcher makes the rows contiguous
    out = w8a8.w8a8_triton(x, qweight, wscale, None, None, None, None)
    assert out.shape == (*lead, 24)
    assert rel_err(out, w8a8_reference(x.contiguous(), qweight, wscale)) <= REL_TOL[torch.float16]
    one = w8a8.w8a8_triton(x[..., :1, :], qweight, wscale, None, None, None, None)  # M = 1: the GEMV
    assert rel_err(one, w8a8_reference(x[..., :1, :].contiguous(), qweight, wscale)) <= REL_TOL[torch.float16]


# --- CUDA only: inline PTX against its twin, the op at the Llama-3-8B shapes ------------------------


@pytest.mark.skipif(not CUDA, reason="inline PTX runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k", [(40, 200), (4096, 4096), (4096, 14336)])
def test_inline_ptx_is_bit_exact_with_the_portable_path(n, k, dtype):
    seed("asm", n, k, dtype)
    qweight, wscale = weights(n, k, DEVICE)
    x = activations((33,), k, dtype, DEVICE)
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 127.0], dtype=dtype)  # ties
    for s, z in ((None, None), (torch.tensor([1.0], device=DEVICE), torch.tensor([3], dtype=torch.int32, device=DEVICE))):
        fast, _ = w8a8.w8a8_quantize_rows(x, s, z, asm=True)
        portable, _ = w8a8.w8a8_quantize_rows(x, s, z, asm=False)
        assert torch.equal(fast, portable)
        ref = quantize_int8_per_token(x)[0] if s is None else quantize_int8_static(x, s, z)
        assert torch.equal(fast, ref)
    for cfg in GEMV_CFGS + [dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)]:
        fast = w8a8.w8a8_gemv(x[:1], qweight, wscale, None, None, None, None, dict(cfg))
        assert torch.equal(fast, w8a8.w8a8_gemv(x[:1], qweight, wscale, None, None, None, None, dict(cfg, ASM=False))), cfg


LLAMA_SHAPES = [(4096, 4096), (4096, 6144), (14336, 4096), (4096, 28672)]  # (K, N)


@pytest.mark.skipif(not CUDA, reason="real shapes need a CUDA device")
@pytest.mark.parametrize("act", ["dynamic", "static-asym"])
@pytest.mark.parametrize("m", [1, 8, 32, 128, 1024, 4096])
@pytest.mark.parametrize("k, n", LLAMA_SHAPES)
def test_op_on_cuda_at_llama_shapes(k, n, m, act):
    seed("cuda", k, n, m, act)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    qweight, wscale = weights(n, k, "cuda")
    s, z, sums = (None, None, None) if act == "dynamic" else static_args(x, qweight, True)
    out = torch.ops.pymllm_fx.w8a8_linear(x, qweight, wscale, s, z, sums, bias)
    assert rel_err(out, w8a8_reference(x, qweight, wscale, s, z, sums, bias)) <= 1e-2
    ref32 = w8a8_reference(x.float(), qweight, wscale, s, z, sums, bias.float())  # fp32 output: only the epilogue rounds
    assert rel_err(w8a8.w8a8_triton(x.float(), qweight, wscale, s, z, sums, bias.float()), ref32) <= 1e-5
