"""The "w8a8" method: int8 weights per output channel, int8 activations per token, on one layer and
on a tiny HF Llama (explain, torch.compile without graph breaks, save_quantized round trips, and
compressed-tensors' own reader through transformers)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import pymllm_fx
from pymllm_fx.kernels.w8a8 import quantize_int8_per_token, w8a8_reference
from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.methods.registry import resolve
from pymllm_fx.methods.w8a8 import W8A8LinearMethod, quantize_int8_per_channel
from checks import rel_err, seed
from hf_models import build_model

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(64, 32, True), (576, 64, True), (200, 40, False)]  # (in, out, bias)
# The layer against the float64 product of its own int8 values: only the output dtype's rounding.
OWN_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Against F.linear with the float weight (weights and inputs ~N(0, 1)): the weight's rounding
# (~0.008, as int8) and the activations' per-token rounding (~0.006 at K = 64) add up to ~0.01
# (measured 0.009-0.011); 2e-2 catches a wrong scale (an error of ~1).
FLOAT_BOUND = 2e-2


def loaded_layer(in_f, out_f, bias, dtype):
    layer = ReplicatedLinear(in_f, out_f, bias=bias, params_dtype=dtype, quant_method=resolve("w8a8"), prefix="blk.proj")
    weight = torch.randn(out_f, in_f).to(dtype)
    layer.weight.weight_loader(layer.weight, weight)
    b = None
    if bias:
        b = torch.randn(out_f).to(dtype)
        layer.bias.weight_loader(layer.bias, b)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, weight, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_f, out_f, bias", SIZES)
def test_layer_accuracy(in_f, out_f, bias, dtype):
    seed("w8a8", in_f, out_f, bias, dtype)
    layer, weight, b = loaded_layer(in_f, out_f, bias, dtype)
    params = {n: p.dtype for n, p in layer.named_parameters()}
    assert params == {"qweight": torch.int8, "weight_scale": torch.float32, **({"bias": dtype} if bias else {})}
    codes, scale = quantize_int8_per_channel(weight)
    assert torch.equal(layer.qweight, codes) and torch.equal(layer.weight_scale, scale)
    x = torch.randn(2, 4, in_f).to(dtype)
    out = layer(x)
    assert out.shape == (2, 4, out_f) and out.dtype == dtype

    xq, xs = quantize_int8_per_token(x)
    own = (xq.double() @ codes.double().t()) * xs.double() * scale.double()
    own = own if b is None else own + b.double()
    assert rel_err(out, own) <= OWN_TOL[dtype]
    ref = F.linear(x.double(), weight.double())
    err = ((out.double() - (ref if b is None else ref + b.double())).norm() / ref.norm()).item()
    assert 0 < err <= FLOAT_BOUND, err


def test_half_keeps_float32_scales():
    """The op reads float32 scales: a cast of the model casts the bias, never the scales or codes."""
    torch.manual_seed(1)
    layer, _, _ = loaded_layer(64, 32, True, torch.float32)
    scale = layer.weight_scale.clone()
    x = torch.randn(3, 64)
    before = layer(x)
    layer.half()
    assert torch.equal(layer.weight_scale, scale) and layer.qweight.dtype == torch.int8
    assert layer.bias.dtype == torch.float16 and layer.weight.dtype == torch.float16  # the weight view follows
    out = layer(x.half())
    assert torch.equal(out, w8a8_reference(x.half(), layer.qweight, scale, bias=layer.bias))
    assert rel_err(out, before) <= 1e-2  # fp16 inputs and outputs


def test_registry_and_config():
    assert isinstance(resolve("w8a8"), W8A8LinearMethod)
    assert isinstance(resolve({"quant_method": "w8a8"}), W8A8LinearMethod)
    with pytest.raises(ValueError, match=r"unknown keys \['group_size'\]"):
        resolve({"quant_method": "w8a8", "group_size": 128})


# --- a tiny HF model ------------------------------------------------------------------------------

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return build_model("llama")


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_tiny_llama_quantize_explain_and_compile(llama):
    model = pymllm_fx.quantize(copy.deepcopy(llama), "w8a8", progress=False)
    assert rel_err(logits(model), logits(llama)) <= 2e-2  # measured 0.007
    table = str(pymllm_fx.explain(model))
    assert table.count("W8A8 int8, per-channel sym weight, per-token dynamic act") == 14  # every linear but lm_head
    explained = torch._dynamo.explain(model)(IDS)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    assert rel_err(logits(compiled), logits(model)) <= 1e-5  # q/k/v and gate/up fused: one quantization each


def read_tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_save_compressed_tensors_round_trip(llama, tmp_path):
    """W8A8 -> compressed-tensors int-quantized (golden tensors by the format's definition) ->
    from_pretrained: the same logits; saved again: the same bytes."""
    model = pymllm_fx.quantize(copy.deepcopy(llama), "w8a8", progress=False)
    first = pymllm_fx.save_quantized(model, tmp_path / "a", format="compressed-tensors", progress=False)
    config = json.loads((first / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized" and config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "int-quantized"
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    acts = group["input_activations"]
    assert {k: acts[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

    tensors = read_tensors(first)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        w = llama.get_submodule(name).weight.detach().double()
        scale = w.abs().amax(1, keepdim=True) / 127  # the definition, in float64
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(tensors[f"{name}.weight"], torch.round(w / scale.float().double()).to(torch.int8))
        assert tensors[f"{name}.weight_scale"].shape == (w.shape[0], 1)
        torch.testing.assert_close(tensors[f"{name}.weight_scale"].double(), scale, rtol=1e-6, atol=0)
        assert f"{name}.input_scale" not in tensors and f"{name}.input_zero_point" not in tensors

    loaded = pymllm_fx.from_pretrained(first, progress=False)
    assert "W8A8 int8 checkpoint, per-channel weight scale, per-token dynamic act" in str(pymllm_fx.explain(loaded))
    assert torch.equal(logits(loaded), logits(model))
    second = pymllm_fx.save_quantized(loaded, tmp_path / "b", format="compressed-tensors", progress=False)
    again = read_tensors(second)
    assert sorted(again) == sorted(tensors)
    assert all(again[n].dtype == t.dtype and torch.equal(again[n], t) for n, t in tensors.items())
    assert json.loads((second / "config.json").read_text())["quantization_config"] == config


@pytest.mark.parametrize("fmt, fix", [("awq", "compressed-tensors"), ("gptq", "compressed-tensors"), ("fp8", "compressed-tensors")])
def test_other_formats_refuse_w8a8(llama, tmp_path, fmt, fix):
    model = pymllm_fx.quantize(copy.deepcopy(llama), "w8a8", progress=False)
    with pytest.raises(ValueError, match=rf"q_proj: cannot write a W8A8 int8 layer \(per-token dynamic int8 activations\) "
                                         rf"as '{fmt}': .*use format='{fix}'"):
        pymllm_fx.save_quantized(model, tmp_path / "out", format=fmt, progress=False)
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_reads_our_checkpoint(llama, tmp_path):
    """compressed-tensors' own decompressor (through transformers' loader) gives back exactly our
    dequantized weights."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = pymllm_fx.quantize(copy.deepcopy(llama), "w8a8", progress=False)
    path = pymllm_fx.save_quantized(model, tmp_path, format="compressed-tensors", progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(run_compressed=False))
    for name, layer in model.named_modules():
        if hasattr(layer, "qweight"):
            ours = layer.qweight.float() * layer.weight_scale[:, None]  # float32, as compressed-tensors computes it
            assert torch.equal(theirs.get_submodule(name).weight, ours), name
    # compressed-tensors' own activation rounding (scale max|x| / 127.5) is not ours, so only close.
    assert rel_err(logits(theirs), logits(model)) <= 2e-2
