"""AWQ (AutoAWQ GEMM) checkpoints: golden tensors packed here by the format's own definition.

The packer below follows AutoAWQ's ``WQLinear_GEMM.from_linear`` (awq/modules/linear/gemm.py):
for word ``col`` and nibble ``i``, ``qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << 4i``
with ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``; qzeros are packed the same way. It shares no code
with the method's unpacking.
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import pymllm_fx
from pymllm_fx.kernels.w4a16 import dequantize_int4
from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.methods.awq import AWQLinearMethod
from checks import build_layer, rel_err, seed

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Layer vs float64 x @ W_ref.T: only the output dtype's rounding and accumulation order remain.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """``(R, C)`` values 0..15 -> int32 ``(R, C // 8)``, AutoAWQ GEMM order."""
    rows, cols = intweight.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + ORDER_MAP[i]].long() << (4 * i)
    return to_int32(packed)


def make_awq(k, n, group_size, zero_point=True):
    """Known codes, zeros and scales, their checkpoint tensors, and the float64 weight they encode."""
    g = k if group_size == -1 else group_size
    groups = k // g
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (groups, n)) if zero_point else torch.full((groups, n), 8)
    s = (torch.rand(groups, n) * 0.02 + 0.001).half()
    tensors = {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s}
    group_of = torch.arange(k) // g
    return tensors, q, z, s, group_of


def reference_weight(q, z, s, group_of, dtype):
    """W_ref (N, K) in float64 with the scales as the layer stores them (in ``dtype``)."""
    s = s.to(dtype).double()
    return ((q.double() - z.double()[group_of]) * s[group_of]).t()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
@pytest.mark.parametrize("k, n, group_size", [(256, 64, 32), (256, 48, 64), (384, 32, 128), (200, 16, -1), (512, 24, 256)])
def test_awq_golden(k, n, group_size, zero_point, dtype):
    seed(k, n, group_size, zero_point, dtype)
    tensors, q, z, s, group_of = make_awq(k, n, group_size, zero_point)
    bias = torch.randn(n).to(dtype) if zero_point else None
    method = AWQLinearMethod(group_size=group_size, zero_point=zero_point)
    layer = build_layer(method, k, n, tensors, bias, dtype)
    layer.quant_method.process_weights_after_loading(layer)

    expected = {"qweight": torch.int32, "scales": dtype} | ({"zeros": dtype} if zero_point else {})
    expected |= {"bias": dtype} if bias is not None else {}
    assert {name: p.dtype for name, p in layer.named_parameters()} == expected
    assert (layer.zeros is None) == (not zero_point) and not hasattr(layer, "qzeros")

    w_ref = reference_weight(q, z, s, group_of, dtype)
    runtime_group = group_size if group_size in (32, 64) else 128
    w = dequantize_int4(layer.qweight, layer.scales.double(), None if layer.zeros is None else layer.zeros.double(), runtime_group)
    assert torch.equal(w, w_ref)

    x = torch.randn(3, 2, k).to(dtype)
    out = layer(x)
    ref = x.double() @ w_ref.t() + (0 if bias is None else bias.double())
    assert out.shape == (3, 2, n) and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]


def test_awq_interleaved_order_single_word():
    """One word, spelled out: output feature p of the eight sits in nibble [0, 4, 1, 5, 2, 6, 3, 7][p]."""
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 9]])  # (K=1 row, N=8 outputs)
    word = awq_pack(codes)
    nibbles = [(int(word) >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [1, 3, 5, 7, 2, 4, 6, 9]
    # Through the method: a (K=8, N=8) layer whose every input row holds those codes.
    k = 8
    tensors = {"qweight": awq_pack(codes.repeat(k, 1)), "qzeros": awq_pack(torch.zeros(1, 8, dtype=torch.long)),
               "scales": torch.ones(1, 8, dtype=torch.float16)}
    layer = build_layer(AWQLinearMethod(group_size=-1), k, 8, tensors, None, torch.float32)
    layer.quant_method.process_weights_after_loading(layer)
    w = dequantize_int4(layer.qweight, layer.scales, layer.zeros, 128)
    assert torch.equal(w, codes.t().float().repeat(1, k))


def test_awq_quantize_tiny_model_from_safetensors(tmp_path):
    """quantize(model, AWQLinearMethod, weights=dir) on a tiny nn.Sequential, checkpoint in AutoAWQ names."""
    seed("sequential")
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32, bias=False))
    state, refs = {}, {}
    for path, (k, n, bias) in {"0": (128, 64, True), "2": (64, 32, False)}.items():
        tensors, q, z, s, group_of = make_awq(k, n, 32)
        state |= {f"{path}.{name}": t for name, t in tensors.items()}
        refs[path] = reference_weight(q, z, s, group_of, torch.float32).float()
        if bias:
            state[f"{path}.bias"] = refs[path + ".bias"] = torch.randn(n).half()
    save_file(state, str(tmp_path / "model.safetensors"))

    reference = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        reference[0].weight.copy_(refs["0"])
        reference[0].bias.copy_(refs["0.bias"])
        reference[2].weight.copy_(refs["2"])

    pymllm_fx.quantize(model, AWQLinearMethod(group_size=32), weights=tmp_path, progress=False,
                       example_inputs=(torch.randn(1, 128),))
    assert isinstance(model[0], ReplicatedLinear) and isinstance(model[2], ReplicatedLinear)
    x = torch.randn(4, 128)
    assert rel_err(model(x), reference(x)) <= 1e-5
    assert model[0].quant_method.describe(model[0]) == "AWQ W4A16 g32 asym"


# --- config --------------------------------------------------------------------------------------


def test_awq_from_hf_and_autoawq_configs():
    hf = AWQLinearMethod.from_config(
        {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False, "version": "GEMM",
         "modules_to_not_convert": ["visual"], "backend": "autoawq", "do_fuse": False}
    )
    assert (hf.bits, hf.group_size, hf.zero_point, hf.version, hf.modules_to_not_convert) == (4, 64, False, "gemm", ("visual",))
    autoawq = AWQLinearMethod.from_config({"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "gemm"})
    assert (autoawq.group_size, autoawq.zero_point) == (128, True)
    assert AWQLinearMethod.from_config({}) == AWQLinearMethod()


def test_awq_from_transformers_awq_config_dict():
    """transformers' AwqConfig.to_dict() (which inherits GPTQConfig's calibration fields) is accepted."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AwqConfig(bits=4, group_size=64, zero_point=False).to_dict()
    config = {key: getattr(value, "value", value) for key, value in config.items()}  # enums -> plain strings
    method = AWQLinearMethod.from_config(config)
    assert (method.bits, method.group_size, method.zero_point, method.version) == (4, 64, False, "gemm")


@pytest.mark.parametrize(
    "config, pattern",
    [
        ({"bits": 3}, "bits=3 is not supported"),
        ({"w_bit": 8}, "bits=8 is not supported"),
        ({"version": "gemm", "format": "gemv_fast"}, "conflicting"),
        ({"format": "gemv"}, "version 'gemv' is not supported"),
        ({"desc_act": True}, "desc_act=true does not apply"),
        ({"group_size": 16}, "group_size 16 is not supported"),
        ({"q_group_size": 100}, "group_size 100 is not supported"),
        ({"version": "gemv"}, "version 'gemv' is not supported"),
        ({"bits": 4, "w_bit": 8}, "conflicting"),
        ({"method": "gptq"}, "method 'gptq'"),
    ],
)
def test_awq_bad_config(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        AWQLinearMethod.from_config(config)


# --- bad shapes and bad tensors: clear errors naming the layer, nothing changed ---------------------


@pytest.mark.parametrize(
    "k, n, group_size, pattern",
    [
        (96, 16, 64, r"blk\.proj.*in_features=96.*group_size=64"),
        (128, 12, 32, r"blk\.proj.*out_features=12.*multiple of 8"),
        (100, 16, -1, r"blk\.proj.*in_features=100.*multiple of 8"),
    ],
)
def test_awq_shape_errors_name_the_layer(k, n, group_size, pattern):
    with pytest.raises(ValueError, match=pattern):
        ReplicatedLinear(k, n, quant_method=AWQLinearMethod(group_size=group_size), prefix="blk.proj")


def _snapshot(layer):
    return {name: t.clone() for name, t in layer.state_dict().items()}


def _assert_unchanged(layer, snap):
    now = layer.state_dict()
    assert list(now) == list(snap)
    for name in snap:
        torch.testing.assert_close(now[name], snap[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_awq_non_finite_scales(bad):
    seed("nan", bad)
    tensors, *_ = make_awq(128, 16, 64)
    tensors["scales"][1, 3] = bad
    layer = build_layer(AWQLinearMethod(group_size=64), 128, 16, tensors, None, torch.float16)
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match=r"blk\.proj.*'scales' holds NaN or Inf.*\[1, 3\]"):
        layer.quant_method.process_weights_after_loading(layer)
    _assert_unchanged(layer, snap)


def test_awq_symmetric_config_with_asymmetric_zeros():
    seed("sym-mismatch")
    tensors, *_ = make_awq(128, 16, 64, zero_point=True)
    layer = build_layer(AWQLinearMethod(group_size=64, zero_point=False), 128, 16, tensors, None, torch.float16)
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match=r"blk\.proj.*zero_point=false.*set zero_point=true"):
        layer.quant_method.process_weights_after_loading(layer)
    _assert_unchanged(layer, snap)


def test_awq_wrong_shape_tensor_is_refused_by_the_loader():
    seed("shape")
    tensors, *_ = make_awq(128, 32, 64)
    layer = ReplicatedLinear(128, 32, bias=False, params_dtype=torch.float16, quant_method=AWQLinearMethod(group_size=32))
    with pytest.raises(ValueError, match=r"expected shape \(4, 4\), found \(2, 4\)"):
        layer.qzeros.weight_loader(layer.qzeros, tensors["qzeros"])


# --- loader attributes: the checkpoint tensors shard like vLLM's (output_dim / input_dim / packed_dim) -----


def test_awq_merged_column_layer_loads_each_shard():
    """gate/up stored as two checkpoint weights load into one MergedColumnParallelLinear (packed along N)."""
    from pymllm_fx.layers.linear import MergedColumnParallelLinear

    seed("merged")
    parts = [make_awq(128, n, 32) for n in (32, 48)]
    layer = MergedColumnParallelLinear(128, [32, 48], bias=False, params_dtype=torch.float32,
                                       quant_method=AWQLinearMethod(group_size=32))
    for shard, (tensors, *_) in enumerate(parts):
        for name, tensor in tensors.items():
            getattr(layer, name).weight_loader(getattr(layer, name), tensor, shard)
    layer.quant_method.process_weights_after_loading(layer)
    w_ref = torch.cat([reference_weight(q, z, s, g, torch.float32) for _, q, z, s, g in parts])
    x = torch.randn(3, 128)
    assert rel_err(layer(x), x.double() @ w_ref.t()) <= 1e-5


def test_awq_row_parallel_ranks_sum_to_the_whole():
    """Each rank of a RowParallelLinear (tp=2) takes its slice of K; the partial outputs sum to x @ W.T."""
    from pymllm_fx.layers.linear import RowParallelLinear

    seed("row")
    tensors, q, z, s, group_of = make_awq(256, 16, 64)
    x = torch.randn(3, 256)
    total = 0
    for rank in range(2):
        layer = RowParallelLinear(256, 16, bias=False, params_dtype=torch.float32,
                                  quant_method=AWQLinearMethod(group_size=64), tp_rank=rank, tp_size=2)
        for name, tensor in tensors.items():
            getattr(layer, name).weight_loader(getattr(layer, name), tensor)
        layer.quant_method.process_weights_after_loading(layer)
        total = total + layer(x[:, rank * 128:(rank + 1) * 128]).double()
    assert rel_err(total, x.double() @ reference_weight(q, z, s, group_of, torch.float32).t()) <= 1e-5
