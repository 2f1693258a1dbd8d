"""FP8 W8A8: e4m3 quantizers and torch.ops.pymllm_fx.fp8_linear against its references."""

from __future__ import annotations

import pytest
import torch

import pymllm_fx  # noqa: F401  (registers torch.ops.pymllm_fx.*)
from checks import rel_err, seed
from pymllm_fx.kernels.fp8_w8a8 import (
    FP8_DTYPE,
    fp8_linear_reference,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
)

OP = "pymllm_fx.fp8_linear"
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# e4m3 keeps 3 mantissa bits: round-to-nearest of a normal value errs by at most 2**-4 relative;
# below the smallest normal (2**-6) the spacing is 2**-9, so the absolute error is <= 2**-10.
E4M3_REL = 2.0**-4
E4M3_ABS = 2.0**-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (7, 64), (2, 3, 200)])
def test_per_token_quantization_round_trip(shape, dtype):
    seed(shape, dtype)
    x = (torch.randn(*shape) * torch.logspace(-3, 2, shape[-1])).to(dtype)  # wide dynamic range
    xq, scale = quantize_fp8_per_token(x)
    assert xq.dtype == FP8_DTYPE and xq.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    # Each row's largest magnitude maps to the top of the e4m3 range.
    assert torch.equal(xq.float().abs().amax(dim=-1, keepdim=True), torch.full_like(scale, 448.0))
    back = xq.double() * scale.double()
    bound = E4M3_REL * x.double().abs() + E4M3_ABS * scale.double() + 1e-12
    assert ((back - x.double()).abs() <= bound).all()
    # Not a trivial bound: the error is mostly well below the worst case but not zero.
    assert (back - x.double()).abs().max() > 0


def test_per_token_zero_row_is_finite():
    x = torch.zeros(3, 32)
    x[1] = torch.randn(32)
    xq, scale = quantize_fp8_per_token(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(xq[0].float(), torch.zeros(32)) and torch.equal(xq[2].float(), torch.zeros(32))


def test_per_channel_quantization_round_trip():
    torch.manual_seed(7)
    w = torch.randn(24, 80) * torch.rand(24, 1) * 3
    wq, scale = quantize_fp8_per_channel(w)
    assert wq.shape == w.shape and scale.shape == (24,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 448.0)
    back = wq.double() * scale.double()[:, None]
    assert ((back - w.double()).abs() <= E4M3_REL * w.double().abs() + E4M3_ABS * scale.double()[:, None]).all()


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k", [(16, 64), (48, 256), (32, 576), (24, 200)])
def test_fp8_op_matches_references(n, k, dtype, bias, lead):
    seed(n, k, dtype, bias, lead)
    w = torch.randn(n, k)
    wq, ws = quantize_fp8_per_channel(w)
    x = torch.randn(*lead, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None

    out = torch.ops.pymllm_fx.fp8_linear(x, wq, ws, b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert torch.equal(out, fp8_linear_reference(x, wq, ws, b))

    # float64 recomputation of the same quantized product (the op's arithmetic must be exact-ish).
    xq, xs = quantize_fp8_per_token(x)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).t()
    if bias:
        ref = ref + b.double()
    assert rel_err(out, ref) <= REL_TOL[dtype]

    # Against the unquantized float product: two e4m3 roundings (<= 2**-4 each, ~2**-4/sqrt(3)
    # rms for uniform rounding error) give ~0.04 on Gaussian data (measured 0.038-0.041); 0.06
    # leaves margin and still catches a wrong scale or a missing dequantization.
    full = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert rel_err(out, full) <= 0.06


def test_fp8_zero_activation_row_gives_bias():
    torch.manual_seed(8)
    wq, ws = quantize_fp8_per_channel(torch.randn(8, 32))
    b = torch.randn(8)
    x = torch.zeros(2, 32)
    x[1] = torch.randn(32)
    out = torch.ops.pymllm_fx.fp8_linear(x, wq, ws, b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], b)


def test_fp8_fake_shapes_on_meta():
    x = torch.empty(3, 4, 64, dtype=torch.bfloat16, device="meta")
    w = torch.empty(10, 64, dtype=FP8_DTYPE, device="meta")
    s = torch.empty(10, dtype=torch.float32, device="meta")
    assert torch.ops.pymllm_fx.fp8_linear(x, w, s, None).shape == (3, 4, 10)


def test_fp8_under_torch_compile_fullgraph():
    torch.manual_seed(9)
    wq, ws = quantize_fp8_per_channel(torch.randn(16, 64))

    def fn(x):
        return torch.ops.pymllm_fx.fp8_linear(x + 1, wq, ws, None) * 3

    x = torch.randn(4, 64)
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x))


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("int_activations", TypeError, "activations"),
        ("fp8_activations", TypeError, "activations"),
        ("mismatched_k", ValueError, "input features"),
        ("weight_not_fp8", TypeError, "weight must have dtype"),
        ("int64_weight", TypeError, "weight must have dtype"),
        ("weight_1d", ValueError, "weight must be 2-D"),
        ("scale_shape", ValueError, "weight_scale must have shape"),
        ("scale_fp16", TypeError, "weight_scale must have dtype"),
        ("bias_shape", ValueError, "bias must have shape"),
    ],
)
def test_fp8_bad_inputs(case, exc, pattern):
    torch.manual_seed(10)
    wq, ws = quantize_fp8_per_channel(torch.randn(8, 64))
    x, bias = torch.randn(3, 64, dtype=torch.bfloat16), None
    if case == "int_activations":
        x = x.to(torch.int32)
    elif case == "fp8_activations":
        x = x.to(FP8_DTYPE)
    elif case == "mismatched_k":
        x = torch.randn(3, 32, dtype=torch.bfloat16)
    elif case == "weight_not_fp8":
        wq = wq.float()
    elif case == "int64_weight":
        wq = wq.float().to(torch.int64)
    elif case == "weight_1d":
        wq = wq.flatten()
    elif case == "scale_shape":
        ws = ws[:4]
    elif case == "scale_fp16":
        ws = ws.half()
    elif case == "bias_shape":
        bias = torch.zeros(16, dtype=torch.bfloat16)
    with pytest.raises(exc, match=OP) as info:
        torch.ops.pymllm_fx.fp8_linear(x, wq, ws, bias)
    assert pattern in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_fp8_device_mismatch():
    wq, ws = quantize_fp8_per_channel(torch.randn(8, 64))
    x = torch.randn(3, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=OP + ".*weight is on cpu"):
        torch.ops.pymllm_fx.fp8_linear(x, wq, ws.cuda(), None)
