"""Checkpoint formats come from a registry: a format defined in one file (``toy_format.py``) is
written by ``save_quantized`` with no change to ``pymllm_fx/loading``."""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pymllm_fx
from pymllm_fx.loading import formats
from pymllm_fx.loading.export import save_quantized


@pytest.fixture
def toy(monkeypatch):
    """The toy writer, registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))
    module = importlib.import_module("loading.toy_format")
    formats.register_format("toy", module.ToyWriter)  # a no-op on first import, which registered it
    return module.ToyWriter


def two_layers(first_method):
    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(l0=nn.Linear(32, 32), l1=nn.Linear(32, 16)))
    pymllm_fx.quantize(model, first_method, skip=["l1"], example_inputs=(torch.randn(1, 32),), progress=False)
    return model


def test_builtin_formats_are_registered_in_order():
    assert formats.format_names()[:4] == ("awq", "gptq", "compressed-tensors", "fp8")


def test_a_toy_format_registered_in_one_file_is_written(toy, tmp_path):
    model = two_layers("int8")
    save_quantized(model, tmp_path, "toy", progress=False)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "toy", "layers": ["l0"], "ignore": ["l1"]}
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(tensors) == ["l0.bias", "l0.weight", "l0.weight_scale", "l1.bias", "l1.weight"]
    layer = model.l0
    expected = layer.qweight.float() * layer.scales.float().reshape(-1, 1)
    assert torch.equal(tensors["l0.weight"], expected)
    assert torch.equal(tensors["l1.weight"], model.l1.weight.detach())


def test_the_cli_offers_a_registered_format(toy):
    from pymllm_fx.cli import _parser

    args = _parser().parse_args(["quantize", "src", "--method", "int8", "--out", "out", "--format", "toy"])
    assert args.format == "toy"


def test_the_toy_format_refuses_before_writing(toy, tmp_path):
    with pytest.raises(ValueError, match=r"l0: cannot write an int4 layer .* as 'toy': the toy format holds int8"):
        save_quantized(two_layers({"quant_method": "int4", "group_size": 32}), tmp_path / "out", "toy", progress=False)
    assert not (tmp_path / "out").exists()


def test_registry_refuses_a_second_writer_or_a_non_writer(toy):
    with pytest.raises(ValueError, match="already written by"):
        formats.register_format("toy", type("OtherToy", (toy,), {}))
    with pytest.raises(TypeError, match="has no checkpoint_config"):
        formats.register_format("other", object())


def test_a_method_without_a_checkpoint_view_is_refused(tmp_path):
    class Opaque(pymllm_fx.UnquantizedLinearMethod.__base__):  # a LinearMethodBase with no save hook
        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra_weight_attrs):
            pymllm_fx.UnquantizedLinearMethod().create_weights(layer, input_size_per_partition, output_partition_sizes,
                                                               input_size, output_size, params_dtype, **extra_weight_attrs)

        def apply(self, layer, x, bias=None):
            return nn.functional.linear(x, layer.weight, bias)

    model = nn.Sequential(OrderedDict(l0=nn.Linear(32, 32)))
    pymllm_fx.quantize(model, Opaque(), example_inputs=(torch.randn(1, 32),), progress=False)
    with pytest.raises(ValueError, match=r"l0: save_quantized does not know how to export layers quantized with Opaque"):
        save_quantized(model, tmp_path / "out", "awq", progress=False)
    assert not (tmp_path / "out").exists()
