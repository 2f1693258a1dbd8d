"""W8A16: torch.ops.pymllm_fx.w8a16_linear against its reference and a float64 recomputation."""

from __future__ import annotations


import pytest
import torch

import pymllm_fx  # noqa: F401  (registers torch.ops.pymllm_fx.*)
from pymllm_fx.kernels.w8a16 import w8a16_reference
from checks import rel_err, seed

OP = "pymllm_fx.w8a16_linear"
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_weights(n: int, k: int, dtype: torch.dtype):
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = (torch.rand(n) * 0.01 + 1e-3).to(dtype)
    return qweight, scales


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k", [(16, 64), (48, 256), (32, 576), (24, 200), (7, 33)])
def test_w8a16_op_matches_references(n, k, dtype, bias, lead):
    seed(n, k, dtype, bias, lead)
    qweight, scales = make_weights(n, k, dtype)
    x = torch.randn(*lead, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None

    out = torch.ops.pymllm_fx.w8a16_linear(x, qweight, scales, b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert torch.equal(out, w8a16_reference(x, qweight, scales, b))

    ref = x.double() @ (qweight.double() * scales.double()[:, None]).t()
    if bias:
        ref = ref + b.double()
    assert rel_err(out, ref) <= REL_TOL[dtype]


def test_w8a16_fp16_activation_outlier_does_not_overflow():
    """A realistic layer: weights ~N(0, 0.02), one activation channel at 1000 (LLM "massive
    activations"). The true outputs are below 100, well inside fp16's range, so the op must not
    return inf. (Multiplying by integer codes before the scale makes the fp16 intermediate
    ~1000*127 > 65504.)"""
    torch.manual_seed(4)
    n, k = 64, 1024
    w = torch.randn(n, k) * 0.02
    scales = (w.abs().amax(dim=1) / 127).half()
    qweight = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    x = torch.randn(4, k)
    x[:, 7] = 1000.0
    ref = x.double() @ (qweight.double() * scales.double()[:, None]).t()
    assert ref.abs().max() < 1000  # fp16 can represent every true output
    out = torch.ops.pymllm_fx.w8a16_linear(x.half(), qweight, scales, None)
    non_finite = int((~torch.isfinite(out)).sum())
    assert non_finite == 0, f"{non_finite} of {out.numel()} outputs are inf/nan"
    assert rel_err(out, ref) <= 1e-2


def test_w8a16_fake_shapes_on_meta():
    x = torch.empty(2, 5, 32, dtype=torch.bfloat16, device="meta")
    qweight = torch.empty(11, 32, dtype=torch.int8, device="meta")
    scales = torch.empty(11, dtype=torch.bfloat16, device="meta")
    out = torch.ops.pymllm_fx.w8a16_linear(x, qweight, scales, None)
    assert out.shape == (2, 5, 11)


def test_w8a16_under_torch_compile_fullgraph():
    torch.manual_seed(5)
    qweight, scales = make_weights(16, 96, torch.float32)
    b = torch.randn(16)

    def fn(x):
        return torch.ops.pymllm_fx.w8a16_linear(x.sin(), qweight, scales, b).sum(-1)

    x = torch.randn(2, 4, 96)
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x))


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("int_activations", TypeError, "activations"),
        ("mismatched_k", ValueError, "input features"),
        ("scales_shape", ValueError, "scales must have shape"),
        ("scales_int", TypeError, "scales must have dtype"),
        ("int64_qweight", TypeError, "qweight must have dtype"),
        ("uint8_qweight", TypeError, "qweight must have dtype"),
        ("qweight_3d", ValueError, "qweight must be 2-D"),
        ("bias_shape", ValueError, "bias must have shape"),
    ],
)
def test_w8a16_bad_inputs(case, exc, pattern):
    torch.manual_seed(6)
    qweight, scales = make_weights(8, 64, torch.float16)
    x, bias = torch.randn(3, 64, dtype=torch.float16), None
    if case == "int_activations":
        x = x.to(torch.int64)
    elif case == "mismatched_k":
        x = torch.randn(3, 63, dtype=torch.float16)
    elif case == "scales_shape":
        scales = scales[:, None]
    elif case == "scales_int":
        scales = scales.to(torch.int32)
    elif case == "int64_qweight":
        qweight = qweight.to(torch.int64)
    elif case == "uint8_qweight":
        qweight = qweight.to(torch.uint8)
    elif case == "qweight_3d":
        qweight = qweight[None]
    elif case == "bias_shape":
        bias = torch.zeros(8, 1, dtype=torch.float16)
    with pytest.raises(exc, match=OP) as info:
        torch.ops.pymllm_fx.w8a16_linear(x, qweight, scales, bias)
    assert pattern in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_w8a16_device_mismatch():
    qweight, scales = make_weights(8, 64, torch.float16)
    x = torch.randn(3, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match=OP + ".*qweight is on cpu"):
        torch.ops.pymllm_fx.w8a16_linear(x, qweight, scales.cuda(), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_w8a16_takes_e4m3_codes(dtype):
    """fp8 weight-only checkpoints: e4m3 codes times a per-row scale, activations left in float."""
    torch.manual_seed(7)
    qweight = (torch.randn(24, 96) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = (torch.rand(24) * 0.01 + 1e-3).to(dtype)
    x, b = torch.randn(5, 96).to(dtype), torch.randn(24).to(dtype)
    out = torch.ops.pymllm_fx.w8a16_linear(x, qweight, scales, b)
    ref = x.double() @ (qweight.double() * scales.double()[:, None]).t() + b.double()
    assert out.dtype == dtype and rel_err(out, ref) <= REL_TOL[dtype]
