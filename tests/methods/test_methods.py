"""Quantization methods (int8, int4, fp8, none) end to end on a ReplicatedLinear, and the registry."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import pymllm_fx
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE, quantize_fp8_per_token
from pymllm_fx.kernels.w4a16 import dequantize_int4, pack_int4, unpack_int4
from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.layers.quantize_base import LinearMethodBase, UnquantizedLinearMethod
from pymllm_fx.methods.fp8 import Fp8LinearMethod
from pymllm_fx.methods.int4 import Int4LinearMethod, quantize_int4
from pymllm_fx.methods.int8 import Int8LinearMethod, quantize_int8
from pymllm_fx.methods.registry import method_names, resolve
from checks import rel_err, seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (in, out, bias); 576 and 200 leave tail groups for g=128 and g=64/128.
SIZES = [(64, 32, True), (256, 96, False), (576, 64, True), (200, 48, False), (200, 40, True)]

# Error of the quantized layer against F.linear with the float weight, for weights ~N(0, 1) and
# inputs ~N(0, 1); the output error is the rms of the weight's rounding error relative to its rms.
# - int8, per-channel sym: step = max|w_row|/127 ~ 3.5/127, uniform rounding rms = step/sqrt(12)
#   ~ 0.008 (measured 0.0079-0.0085 over these shapes/dtypes) -> bound 1.5e-2.
# - fp8 e4m3 (weights and per-token activations): two roundings of <= 2**-4 relative, ~0.04
#   measured (0.039-0.041) -> bound 6e-2.
# - int4: sym step = max|w_group|/7 ~ 2.9/7 gives ~0.12 (g128, measured up to 0.126); asym
#   step = range/15 gives ~0.11 -> bound 0.15. A wrong group or scale layout gives ~1.0.
# - none: exactly F.linear.
ERROR_BOUND = {"none": 0.0, "int8": 1.5e-2, "fp8": 6e-2, "int4": 0.15}
# The layer against a float64 product with the method's own dequantized weight: only the output
# dtype's rounding (and accumulation order) remains.
DEQUANT_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}

METHODS = [
    pytest.param("none", id="none"),
    pytest.param("int8", id="int8"),
    pytest.param("fp8", id="fp8"),
    *[
        pytest.param({"quant_method": "int4", "group_size": g, "sym": sym}, id=f"int4-g{g}-{'sym' if sym else 'asym'}")
        for g in (32, 64, 128)
        for sym in (True, False)
    ],
]


def build_loaded_layer(method, in_f, out_f, bias, dtype):
    """A ReplicatedLinear loaded through its params' weight_loader, then post-processed."""
    layer = ReplicatedLinear(in_f, out_f, bias=bias, params_dtype=dtype, quant_method=resolve(method), prefix="blk.proj")
    weight = torch.randn(out_f, in_f).to(dtype)
    layer.weight.weight_loader(layer.weight, weight)
    b = None
    if bias:
        b = torch.randn(out_f).to(dtype)
        layer.bias.weight_loader(layer.bias, b)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, weight, b


def own_float64_output(layer, x):
    """x @ W_deq.T (+ b) in float64, where W_deq is what the method's own parameters encode."""
    qm = layer.quant_method
    if isinstance(qm, Int4LinearMethod):
        w = dequantize_int4(layer.qweight, layer.scales.double(), None if layer.zeros is None else layer.zeros.double(), qm.group_size)
        xd = x.double()
    elif isinstance(qm, Int8LinearMethod):
        w = layer.qweight.double() * layer.scales.double()[:, None]
        xd = x.double()
    elif isinstance(qm, Fp8LinearMethod):
        w = layer.weight.double() * layer.weight_scale.double()[:, None]
        xq, xs = quantize_fp8_per_token(x)  # fp8 quantizes the activations too
        xd = xq.double() * xs.double()
    else:
        w = layer.weight.double()
        xd = x.double()
    out = xd @ w.t()
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_f, out_f, bias", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_method_accuracy(method, in_f, out_f, dtype, bias):
    seed(method, in_f, out_f, dtype, bias)
    layer, weight, b = build_loaded_layer(method, in_f, out_f, bias, dtype)
    x = torch.randn(2, 4, in_f).to(dtype)
    out = layer(x)
    assert out.shape == (2, 4, out_f) and out.dtype == dtype

    name = method if isinstance(method, str) else method["quant_method"]
    ref = F.linear(x.double(), weight.double(), None if b is None else b.double())
    matmul = ref - (0 if b is None else b.double())  # bound the error relative to x @ W.T alone
    err = ((out.double() - ref).norm() / matmul.norm()).item()
    if name == "none":
        assert torch.equal(out, F.linear(x, weight, b))
    else:
        assert 0 < err <= ERROR_BOUND[name], f"{name}: relative error {err:.4f}"

    own = own_float64_output(layer, x)
    assert rel_err(out, own) <= DEQUANT_TOL[dtype]
    if isinstance(layer.quant_method, Int4LinearMethod):
        # The W4A16 op is exactly F.linear with the dequantized weight.
        w = dequantize_int4(layer.qweight, layer.scales, layer.zeros, layer.quant_method.group_size).to(dtype)
        assert torch.equal(out, F.linear(x, w, b))


@pytest.mark.parametrize(
    "method, params",
    [
        ("none", {"weight": torch.bfloat16, "bias": torch.bfloat16}),
        ("int8", {"qweight": torch.int8, "scales": torch.bfloat16, "bias": torch.bfloat16}),
        ("fp8", {"weight": FP8_DTYPE, "weight_scale": torch.float32, "bias": torch.bfloat16}),
        (
            {"quant_method": "int4", "sym": False},
            {"qweight": torch.int32, "scales": torch.bfloat16, "zeros": torch.bfloat16, "bias": torch.bfloat16},
        ),
        ({"quant_method": "int4", "sym": True}, {"qweight": torch.int32, "scales": torch.bfloat16, "bias": torch.bfloat16}),
    ],
    ids=["none", "int8", "fp8", "int4-asym", "int4-sym"],
)
def test_runtime_parameters_replace_float_weight(method, params):
    """After post-processing only the runtime layout is left: the float weight is gone."""
    torch.manual_seed(11)
    layer, _, _ = build_loaded_layer(method, 128, 16, True, torch.bfloat16)
    assert {n: p.dtype for n, p in layer.named_parameters()} == params
    assert all(not p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("k, group_size", [(64, 32), (200, 64), (576, 128), (128, 128)])
def test_quantize_int4_codes_and_zero_points(k, group_size, sym, dtype):
    """Min/max round-to-nearest (``rtn=True``); the default's search: tests/methods/test_int4_search.py."""
    seed(k, group_size, sym, dtype)
    w = (torch.randn(24, k) * 0.05 + (0.02 if not sym else 0)).to(dtype)
    codes, scales, zeros = quantize_int4(w, group_size, sym, rtn=True)
    groups = -(-k // group_size)
    assert codes.shape == (24, k) and codes.dtype == torch.uint8
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert scales.shape == (24, groups) and scales.dtype == dtype and (scales > 0).all()
    if sym:
        assert zeros is None
        zero = torch.full((24, groups), 8.0)
    else:
        assert zeros.shape == (24, groups) and zeros.dtype == dtype
        assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
        zero = zeros.float()
    # Round-to-nearest: every weight is within half a step (plus the zero point's own rounding
    # for asym, up to another half step) of its dequantized value. Codes are rounded with the
    # float32 scale but the scale is stored in ``dtype``: |code - zero| <= 15 times its rounding
    # error (<= eps/2 relative) is added.
    group_of = torch.arange(k) // group_size
    step = scales.float()[:, group_of]
    deq = (codes.float() - zero[:, group_of]) * step
    slack = 0.5 if sym else 1.0
    storage = 15 * torch.finfo(dtype).eps / 2
    assert ((deq - w.float()).abs() <= (slack + storage) * step * (1 + 1e-6)).all()
    # Packing then dequantizing reproduces the same weight.
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    torch.testing.assert_close(dequantize_int4(pack_int4(codes), scales.float(), None if sym else zeros.float(), group_size), deq)


@pytest.mark.parametrize("rtn", [True, False], ids=["rtn", "search"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("offset", [0.3, -0.3])
def test_quantize_int4_groups_that_do_not_span_zero(offset, sym, rtn):
    """Groups whose weights are all positive (or all negative) must still round to the nearest
    level: the dequantized error stays within one step of the group's scale."""
    seed(offset, sym)
    w = torch.randn(8, 64) * 0.05 + offset
    codes, scales, zeros = quantize_int4(w, 32, sym, rtn)
    deq = dequantize_int4(pack_int4(codes), scales, zeros, 32)
    step = scales.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step * (1 + 1e-5)).all(), f"max error {(deq - w).abs().max():.4f} vs step {scales.max():.4f}"
    # One step is at most max|w|/7 (sym) or max|w|/15 (asym, range widened to include 0) here,
    # giving ~0.06 / ~0.03 relative rms error; 0.1 flags a group clamped to the wrong range (~0.5).
    assert rel_err(deq, w) < 0.1


def test_quantize_int8_codes():
    torch.manual_seed(12)
    w = torch.randn(16, 100) * torch.rand(16, 1)
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    torch.testing.assert_close(scales, w.abs().amax(dim=1) / 127)
    assert ((codes.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


# --- registry --------------------------------------------------------------------------------


def test_method_names():
    assert method_names() == ["awq", "compressed-tensors", "fp8", "gptq", "int4", "int8", "none", "w8a8"]
    assert pymllm_fx.method_names() == method_names()


@pytest.mark.parametrize(
    "name, cls",
    [("int8", Int8LinearMethod), ("INT4", Int4LinearMethod), ("fp8", Fp8LinearMethod), ("none", UnquantizedLinearMethod)],
)
def test_resolve_by_name(name, cls):
    method = resolve(name)
    assert isinstance(method, cls) and isinstance(method, LinearMethodBase)


def test_resolve_int4_defaults_and_dict():
    default = resolve("int4")
    assert (default.group_size, default.sym) == (128, False)
    method = resolve({"quant_method": "int4", "group_size": 64, "sym": True})
    assert isinstance(method, Int4LinearMethod) and (method.group_size, method.sym) == (64, True)
    assert isinstance(resolve({"quant_method": "int8"}), Int8LinearMethod)
    assert isinstance(resolve({"quant_method": "fp8", "activation_scheme": "dynamic"}), Fp8LinearMethod)


def test_resolve_instance_is_returned_as_is():
    method = Int4LinearMethod(group_size=32, sym=True)
    assert resolve(method) is method


@pytest.mark.parametrize("spec", ["awq4", {"quant_method": "gptq_v9"}])
def test_resolve_unknown_name_lists_valid_names(spec):
    with pytest.raises(ValueError, match="unknown quantization method") as info:
        resolve(spec)
    for name in ("awq", "fp8", "gptq", "int4", "int8", "none"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "config, pattern",
    [
        ({"quant_method": "int4", "group_sz": 64}, "unknown keys.*group_sz"),
        ({"quant_method": "int8", "group_size": 64}, "unknown keys.*group_size"),
        ({"quant_method": "none", "bits": 4}, "unknown keys.*bits"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "unknown keys.*weight_block_size"),
        ({"quant_method": "int4", "group_size": 256}, "group_size 256 is not supported"),
        ({"quant_method": "int4", "group_size": 16}, "group_size 16 is not supported"),
        ({"quant_method": "int4", "bits": 8}, "bits must be 4"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme"),
        ({"group_size": 64}, "no 'quant_method' key"),
    ],
)
def test_resolve_bad_config(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve(config)


def test_int4_unsupported_group_size_direct():
    with pytest.raises(ValueError, match=r"group_size 100 .*\(32, 64, 128\)"):
        Int4LinearMethod(group_size=100)


def test_resolve_bad_type():
    with pytest.raises(TypeError, match="LinearMethodBase"):
        resolve(4)


def test_int4_in_features_not_multiple_of_8_names_layer():
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj.*in_features=100"):
        ReplicatedLinear(100, 16, quant_method=Int4LinearMethod(), prefix="model.layers.3.mlp.down_proj")
