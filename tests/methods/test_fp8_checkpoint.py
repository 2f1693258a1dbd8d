"""Serialized FP8 checkpoints (``quant_method: "fp8"``): e4m3 weights with per-tensor scales,
dynamic or static activation scales, ignored layers, and the refusals (block-wise, bad scales)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import pymllm_fx
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE
from pymllm_fx.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod, matches_module
from checks import rel_err, seed

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference(x, w_fp8, w_scale_rows, input_scale=None, bias=None):
    """e4m3 activations (per token when ``input_scale`` is None, else that fixed scale) times e4m3
    weights, from the definitions, in float64."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=1e-12) if input_scale is None else input_scale.float().reshape(())
    xq = (xf / s).clamp(-448, 448).to(FP8_DTYPE).double()
    out = xq @ w_fp8.double().t() * s.double() * w_scale_rows.double()
    return out if bias is None else out + bias.double()


def fp8_weight(n, k):
    return (torch.randn(n, k) * 64).clamp(-448, 448).to(FP8_DTYPE)


def load(layer, tensors, shard_ids=None):
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        if shard_ids is None:
            param.weight_loader(param, tensor)
        else:
            for shard_id, piece in zip(shard_ids, tensor):
                param.weight_loader(param, piece, shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale_shape", [(), (1,)], ids=["scalar", "shape1"])
@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_per_tensor_checkpoint(scheme, scale_shape, dtype):
    n, k = 48, 80
    seed(scheme, scale_shape, dtype)
    w = fp8_weight(n, k)
    tensors = {"weight": w, "weight_scale": torch.full(scale_shape, 0.0071)}
    if scheme == "static":
        tensors["input_scale"] = torch.full(scale_shape, 0.0123)
    method = Fp8CheckpointLinearMethod.from_config({"quant_method": "fp8", "activation_scheme": scheme})
    layer = ReplicatedLinear(k, n, bias=True, params_dtype=dtype, quant_method=method, prefix="model.layers.0.mlp.up_proj")
    bias = torch.randn(n).to(dtype)
    layer.bias.weight_loader(layer.bias, bias)
    load(layer, tensors)

    rows = torch.full((n,), 0.0071)
    assert torch.equal(layer.weight.view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(layer.weight_scale, rows)  # one scale per tensor became one per row, exactly
    x = torch.randn(6, k).to(dtype) * 2
    expected = reference(x, w, rows, tensors.get("input_scale"), bias)
    assert rel_err(layer(x), expected) <= TOL[dtype]
    if scheme == "dynamic":
        assert torch.equal(layer(x), torch.ops.pymllm_fx.fp8_linear(x, w, rows, bias))
    else:
        assert torch.equal(layer.input_scale, torch.tensor([0.0123]))
        assert rel_err(reference(x, w, rows, None, bias), expected) > 1e-4  # static is not per-token
    assert scheme in method.describe(layer)


def test_static_scale_saturates():
    w = fp8_weight(8, 16)
    method = Fp8CheckpointLinearMethod(activation_scheme="static")
    layer = load(ReplicatedLinear(16, 8, bias=False, quant_method=method),
                 {"weight": w, "weight_scale": torch.tensor(0.5), "input_scale": torch.tensor(0.001)})
    x = torch.randn(3, 16) * 10  # far beyond +-0.448, the static range
    expected = reference(x.clamp(-0.448, 0.448), w, torch.full((8,), 0.5), torch.tensor(0.001))
    assert rel_err(layer(x), expected) <= 1e-6


def test_merged_layers_keep_one_scale_per_shard():
    """gate/up and q/k/v shards each bring their own per-tensor scale: each row keeps its shard's scale."""
    seed("merged")
    k = 32
    w0, w1 = fp8_weight(16, k), fp8_weight(24, k)
    method = Fp8CheckpointLinearMethod(activation_scheme="static")
    layer = MergedColumnParallelLinear(k, [16, 24], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    load(layer, {"weight": [w0, w1], "weight_scale": [torch.tensor(0.5), torch.tensor(0.25)],
                 "input_scale": [torch.tensor(0.01), torch.tensor(0.02)]}, shard_ids=[0, 1])
    rows = torch.cat([torch.full((16,), 0.5), torch.full((24,), 0.25)])
    assert torch.equal(layer.weight_scale, rows)
    assert torch.equal(layer.input_scale, torch.tensor([0.02]))  # the shards share an input: the largest scale
    x = torch.randn(2, k)
    assert rel_err(layer(x), reference(x, torch.cat([w0, w1]), rows, torch.tensor(0.02))) <= 1e-6

    qkv = QKVParallelLinear(k, 8, 2, 1, bias=False, quant_method=Fp8CheckpointLinearMethod(), prefix="attn.qkv_proj")
    wq, wk, wv = fp8_weight(16, k), fp8_weight(8, k), fp8_weight(8, k)
    load(qkv, {"weight": [wq, wk, wv], "weight_scale": [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]},
         shard_ids=["q", "k", "v"])
    assert qkv.weight_scale.tolist() == [1.0] * 16 + [2.0] * 8 + [4.0] * 8


def test_missing_shard_scale_is_caught():
    method = Fp8CheckpointLinearMethod()
    layer = MergedColumnParallelLinear(32, [16, 16], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    layer.weight.weight_loader(layer.weight, fp8_weight(32, 32))
    layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor(0.5), 0)  # shard 1's scale never comes
    with pytest.raises(ValueError, match=r"mlp.gate_up_proj: tensor 'weight_scale' holds NaN or Inf \(first at index \[1\]\)"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    "tensor, value, pattern",
    [
        ("weight_scale", float("nan"), r"'weight_scale' holds NaN or Inf"),
        ("weight_scale", float("inf"), r"'weight_scale' holds NaN or Inf"),
        ("input_scale", 0.0, r"'input_scale' holds NaN, Inf or non-positive values"),
        ("input_scale", float("nan"), r"'input_scale' holds NaN, Inf or non-positive values"),
    ],
)
def test_bad_scales(tensor, value, pattern):
    tensors = {"weight": fp8_weight(8, 16), "weight_scale": torch.tensor(0.5), "input_scale": torch.tensor(0.01)}
    tensors[tensor] = torch.tensor(value)
    layer = ReplicatedLinear(16, 8, quant_method=Fp8CheckpointLinearMethod(activation_scheme="static"), prefix="blk.proj")
    with pytest.raises(ValueError, match="blk.proj: tensor " + pattern):
        load(layer, tensors)


def test_scale_with_many_values_is_refused():
    layer = ReplicatedLinear(16, 8, quant_method=Fp8CheckpointLinearMethod(), prefix="blk.proj")
    with pytest.raises(ValueError, match=r"expected one per-tensor scale \(shape \(\) or \(1,\)\), found shape \(8, 1\)"):
        layer.weight_scale.weight_loader(layer.weight_scale, torch.ones(8, 1))


@pytest.mark.parametrize(
    "path, patterns, hit",
    [
        ("lm_head", ["lm_head"], "lm_head"),
        ("model.layers.1.mlp.down_proj", ["model.layers.1"], "model.layers.1"),
        ("model.layers.11.mlp.down_proj", ["model.layers.1"], None),  # a module boundary, not a prefix
        ("model.layers.11.mlp.down_proj", ["model.layers.*"], "model.layers.*"),
        ("model.visual.blocks.0.attn.qkv", ["down_proj", "attn.qkv"], "attn.qkv"),  # a suffix
        ("model.layers.0.mlp.gate_proj", ["mlp.gate"], None),
    ],
)
def test_ignored_layer_patterns(path, patterns, hit):
    assert matches_module(path, patterns) == hit


def test_quantize_tiny_model_with_ignored_layer(tmp_path):
    """quantize(model, method, weights=dir): one fp8 layer and one left in float by modules_to_not_convert."""
    seed("tiny-fp8")
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    w0, b0, w2, b2 = fp8_weight(48, 32), torch.randn(48), torch.randn(16, 48), torch.randn(16)
    save_file({"0.weight": w0, "0.weight_scale": torch.tensor(0.01), "0.input_scale": torch.tensor(0.02), "0.bias": b0,
               "2.weight": w2, "2.bias": b2}, str(tmp_path / "model.safetensors"))
    config = {"quant_method": "fp8", "activation_scheme": "static", "modules_to_not_convert": ["2"]}
    pymllm_fx.quantize(model, Fp8CheckpointLinearMethod.from_config(config), weights=tmp_path, progress=False,
                       example_inputs=(torch.randn(1, 32),))
    assert model[2].weight.dtype == torch.float32
    assert model[2].quant_method.describe(model[2]) == "unquantized (ignored by the checkpoint)"
    x = torch.randn(4, 32)
    h = F.gelu(reference(x, w0, torch.full((48,), 0.01), torch.tensor(0.02), b0)).float()
    assert rel_err(model(x), F.linear(h, w2, b2)) <= 1e-5


def test_from_config():
    m = Fp8CheckpointLinearMethod.from_config(
        {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "ignored_layers": ["lm_head"],
         "modules_to_not_convert": ["visual"]}
    )
    assert (m.activation_scheme, m.activation_strategy, m.weight_strategy, m.ignored_layers) == (
        "dynamic", "token", "tensor", ("lm_head", "visual"))
    assert Fp8CheckpointLinearMethod.from_config({"activation_scheme": "static"}).activation_strategy == "tensor"


@pytest.mark.parametrize(
    "config, error, pattern",
    [
        ({"activation_scheme": "dynamic", "weight_block_size": [128, 128]}, NotImplementedError,
         r"block-wise weight scales \(weight_block_size=\[128, 128\], tensors 'weight_scale_inv'\)"),
        ({"activation_scheme": "sometimes"}, ValueError, r"activation_scheme 'sometimes' is not 'dynamic' or 'static'"),
        ({"fmt": "e5m2"}, NotImplementedError, r"fmt 'e5m2' is not supported"),
        ({"activation_sheme": "static"}, ValueError, r"unknown keys \['activation_sheme'\]"),
    ],
    ids=["block", "scheme", "e5m2", "typo"],
)
def test_from_config_errors(config, error, pattern):
    with pytest.raises(error, match=pattern):
        Fp8CheckpointLinearMethod.from_config({"quant_method": "fp8", **config})


def test_compiles_without_graph_breaks():
    """The static path is plain torch: torch.compile(fullgraph=True) keeps it in one graph."""
    w = fp8_weight(16, 32)
    layer = load(ReplicatedLinear(32, 16, bias=False, quant_method=Fp8CheckpointLinearMethod(activation_scheme="static")),
                 {"weight": w, "weight_scale": torch.tensor(0.5), "input_scale": torch.tensor(0.01)})
    x = torch.randn(2, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert rel_err(compiled(x), layer(x)) <= 1e-6
