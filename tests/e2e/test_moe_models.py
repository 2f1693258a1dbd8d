"""Mixture-of-experts models: the experts found from the graph, replaced by FusedMoE layers, and
checked against the float experts module running fake-quantized weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pymllm_fx
from pymllm_fx.layers.fused_moe import FusedMoE
from arch_sweep import fake_quantize_experts, tiny_config
from checks import rel_err, seed

# Every transformers MoE family the issue names, plus the variants of the experts interface:
# gpt-oss (transposed, biased, interleaved gate/up, clamped gate), granitemoe, nemotron_h (no gate).
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe", "nemotron_h"]
METHODS = ["int8", "int4", "fp8"]


def tiny_moe(arch: str):
    from transformers import AutoModelForCausalLM

    config, _ = tiny_config(arch)
    seed(arch)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # fresh expert biases are zeros, which would hide a bias applied wrong
        for name, param in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                param.normal_(0, 0.5)
    return model, config


def experts_paths(model) -> list:
    return [path for path, m in model.named_modules()
            if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter) and m.down_proj.dim() == 3]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_experts_replaced_and_match_fake_quantized_module(arch, method):
    model, config = tiny_moe(arch)
    float_model = copy.deepcopy(model)
    paths = experts_paths(model)
    assert paths, f"{arch}: the tiny model has no stacked experts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, method, progress=False)
    for path in paths:
        layer = model.get_submodule(path)
        assert isinstance(layer, FusedMoE), f"{path} stayed {type(layer).__name__}"
        assert not any(p.dtype.is_floating_point and p.dim() == 3 and p.element_size() >= 2
                       for n, p in layer.named_parameters() if n.endswith("weight")), "a float expert weight remains"
        reference = float_model.get_submodule(path)
        fake_quantize_experts(reference, pymllm_fx.methods.registry.resolve(method))
        tokens, k = 9, min(2, layer.num_experts)
        seed(arch, method, path)
        x = torch.randn(tokens, layer.hidden_size)
        ids = torch.stack([torch.randperm(layer.num_experts)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k)
        with torch.no_grad():
            out, ref = layer(x, ids, weights), reference(x, ids, weights)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) <= 1e-4, f"{arch} {method} {path}: {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_moe_model_close_and_compiles_without_breaks(arch):
    model, config = tiny_moe(arch)
    ids = torch.randint(0, min(config.vocab_size, 100), (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, "int4", progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits  # fullgraph: a graph break raises
    assert rel_err(eager, ref) <= 0.3
    assert rel_err(compiled, eager) <= 1e-4


def test_explain_lists_expert_layers_with_their_bytes():
    model, _ = tiny_moe("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, "int4", progress=False)
    report = pymllm_fx.explain(model, file=None)
    rows = [r for r in report.rows if r.path.endswith("mlp.experts")]
    assert len(rows) == len(experts_paths(tiny_moe("qwen3_moe")[0])) and all(r.method == "int4" for r in rows)
    for row in rows:
        layer = model.get_submodule(row.path)
        assert row.bytes_after == sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))
        assert row.bytes_before == layer.float_bytes() > 3 * row.bytes_after
    assert "experts" in report.table()


def test_experts_that_stay_float_are_named_in_one_warning_and_in_explain():
    """A skip pattern (and a method without an experts kernel) leaves them float, never silently."""
    model, _ = tiny_moe("mixtral")
    paths = experts_paths(model)
    with pytest.warns(UserWarning, match=r"matmul weight\(s\) outside nn.Linear stay float") as caught:
        pymllm_fx.quantize(model, "int8", progress=False, skip=["lm_head", "*.experts"])
    text = " ".join(str(w.message) for w in caught)
    assert paths[0] + ".gate_up_proj" in text
    assert not any(isinstance(m, FusedMoE) for m in model.modules())
    report = pymllm_fx.explain(model, file=None)
    why = {r.path: r.detail for r in report.rows}
    assert "matches skip pattern '*.experts'" in why[paths[0] + ".down_proj"]

    model, _ = tiny_moe("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, "none", progress=False)
    assert not any(isinstance(m, FusedMoE) for m in model.modules())
    assert "no grouped kernel for experts" in model._pymllm_fx_float_params[paths[0] + ".down_proj"]


def test_experts_without_the_interface_stay_float_with_the_reason():
    """Llama 4's experts are stacked but not declared through transformers' experts interface: the
    graph finds them, and they stay float rather than being run by a guess."""
    model, _ = tiny_moe("llama4_text")
    with pytest.warns(UserWarning, match="stay float"):
        pymllm_fx.quantize(model, "int8", progress=False)
    assert not any(isinstance(m, FusedMoE) for m in model.modules())
    assert any("experts" in name for name in model._pymllm_fx_float_params)


def test_int4_refuses_experts_whose_sizes_it_cannot_pack():
    model, _ = tiny_moe("mixtral")
    for path in experts_paths(model):  # an intermediate size that is not a multiple of 8
        module = model.get_submodule(path)
        module.down_proj = torch.nn.Parameter(module.down_proj.data[:, :, :-4].contiguous())
        module.gate_up_proj = torch.nn.Parameter(torch.cat([module.gate_up_proj.data[:, :module.down_proj.shape[2]],
                                                            module.gate_up_proj.data[:, -module.down_proj.shape[2]:]], 1))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        pymllm_fx.quantize(model, "int4", progress=False, strict=True)
    assert not any(isinstance(m, FusedMoE) for m in model.modules())  # unchanged


def test_cast_keeps_codes_and_moves_scales():
    model, _ = tiny_moe("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, "int4", progress=False)
    layer = next(m for m in model.modules() if isinstance(m, FusedMoE))
    model.to(torch.bfloat16)
    assert layer.w13_qweight.dtype == torch.int32 and layer.w13_scales.dtype == torch.bfloat16
    assert layer.params_dtype == torch.bfloat16
    x = torch.randn(3, layer.hidden_size, dtype=torch.bfloat16)
    out = layer(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_quantized_refuses_experts_checkpoints_keep_stacked_and_names_the_way_out(tmp_path):
    """gpt-oss checkpoints keep experts stacked (with biases): no per-expert linears to write them as."""
    model, _ = tiny_moe("gpt_oss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, "int8", progress=False)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts: .*stacked biases.*skip=\['lm_head', '\*.experts'\]"):
        pymllm_fx.save_quantized(model, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_no_tokens_gives_an_empty_output():
    model, _ = tiny_moe("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, "int4", progress=False)
    layer = next(m for m in model.modules() if isinstance(m, FusedMoE))
    out = layer(torch.randn(0, layer.hidden_size), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, layer.hidden_size)
