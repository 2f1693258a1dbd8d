"""Sibling fusion: q/k/v and gate/up share one buffer after quantize and one op call under
torch.compile (Inductor); eager runs, state_dict, explain() and checkpoints stay per module."""

from __future__ import annotations

import pytest
import torch

import pymllm_fx
from pymllm_fx.layers.siblings import TAG
from pymllm_fx.passes import siblings

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHS = {  # config, linear op calls per layer before and after fusion
    "llama": (lambda: transformers.LlamaConfig(num_key_value_heads=2, **SMALL), 7, 4),
    "qwen2": (lambda: transformers.Qwen2Config(num_key_value_heads=2, **SMALL), 7, 4),
    "phi3": (lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, **SMALL), 4, 4),  # fused in HF already
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=99, n_embd=64, n_layer=2, n_head=4), 4, 4),  # c_attn: one linear
}
METHODS = ["int8", "int4", "fp8", "none"]


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(ARCHS[arch][0]()).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 99, (1, 9), generator=torch.Generator().manual_seed(3))


def logits(model, compiled=False):
    run = torch.compile(model, fullgraph=True) if compiled else model
    with torch.no_grad():
        return run(ids(), use_cache=False).logits


def compiled_logits_and_log(model):
    torch._dynamo.reset()
    siblings.FUSION_LOG.clear()
    out = logits(model, compiled=True)
    return out, list(siblings.FUSION_LOG)


def shares_buffer(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_compiled_llama_runs_q_k_v_and_gate_up_as_one_call_each(method):
    fused = pymllm_fx.quantize(build("llama"), method, progress=False)
    plain = pymllm_fx.quantize(build("llama"), method, progress=False, fuse_siblings=False)
    assert torch.equal(logits(fused), logits(plain))  # eager: unfused math, same bits
    out_fused, log = compiled_logits_and_log(fused)
    out_plain, plain_log = compiled_logits_and_log(plain)
    layers = 2
    assert log == [{"calls_before": 7 * layers + 1, "calls_after": 4 * layers + 1, "groups": 2 * layers}]  # + lm_head
    assert plain_log == []
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_compiled_models_fuse_what_reads_one_input(arch, method):
    _, per_layer_before, per_layer_after = ARCHS[arch]
    model = pymllm_fx.quantize(build(arch), method, progress=False)
    eager = logits(model)
    out, log = compiled_logits_and_log(model)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    if per_layer_before == per_layer_after:
        assert log == [] and not model._pymllm_fx_sibling_groups["fused"]
    else:
        assert log[0]["calls_before"] - log[0]["calls_after"] == 2 * (per_layer_before - per_layer_after)


def test_storage_is_one_buffer_of_views_and_state_dict_is_unchanged():
    fused = pymllm_fx.quantize(build("llama"), "int4", progress=False)
    plain = pymllm_fx.quantize(build("llama"), "int4", progress=False, fuse_siblings=False)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    for name in ("qweight", "scales", "zeros"):
        assert shares_buffer(getattr(attn.q_proj, name), getattr(attn.v_proj, name))
        assert shares_buffer(getattr(mlp.gate_proj, name), getattr(mlp.up_proj, name))
        assert not shares_buffer(getattr(attn.q_proj, name), getattr(attn.o_proj, name))
    assert getattr(attn.k_proj.qweight, TAG).offset == attn.q_proj.out_features
    a, b = fused.state_dict(), plain.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(fused) == size(plain)  # views: no memory added
    report = pymllm_fx.explain(fused, file=None)
    assert len(report.fused_groups) == 4 and "q_proj + k_proj + v_proj x2" in str(report)


def test_a_skipped_sibling_leaves_its_group_unfused_and_says_why():
    model = pymllm_fx.quantize(build("llama"), "int8", skip=("lm_head", "v_proj"), progress=False)
    report = pymllm_fx.explain(model, file=None)
    assert len(report.fused_groups) == 2  # gate/up of each layer
    why = report.unfused_groups["model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
                                "model.layers.0.self_attn.v_proj"]
    assert "not every sibling is quantized" in why
    out, log = compiled_logits_and_log(model)
    torch.testing.assert_close(out, logits(model), rtol=1e-4, atol=1e-4)
    assert log[0]["groups"] == 2


def test_a_tensor_replaced_after_quantize_runs_unfused_and_right():
    model = pymllm_fx.quantize(build("llama"), "int8", progress=False)
    k = model.model.layers[0].self_attn.k_proj
    k.scales = torch.nn.Parameter(k.scales.detach().clone() * 2, requires_grad=False)  # its own storage now
    out, log = compiled_logits_and_log(model)
    torch.testing.assert_close(out, logits(model), rtol=1e-4, atol=1e-4)
    assert log[0]["groups"] == 3  # that layer's q/k/v not


def test_a_cast_model_is_fused_again():
    model = pymllm_fx.quantize(build("llama"), "int4", progress=False)
    model.to(torch.float64)  # the scales get new storage, layer by layer
    q, v = model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.v_proj
    assert q.scales.dtype == torch.float64 and shares_buffer(q.scales, v.scales) and shares_buffer(q.qweight, v.qweight)
    model.to(torch.float32)
    out, log = compiled_logits_and_log(model)
    assert log[0]["groups"] == 4
    torch.testing.assert_close(out, logits(model), rtol=1e-4, atol=1e-4)


def test_save_and_load_keep_working_with_fused_storage(tmp_path):
    model = pymllm_fx.quantize(build("llama"), {"quant_method": "int4", "group_size": 32}, progress=False)
    pymllm_fx.save_quantized(model, tmp_path, format="gptq", progress=False)
    loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    assert torch.equal(logits(loaded), logits(model))
    assert len(pymllm_fx.explain(loaded, file=None).fused_groups) == 4
    out, log = compiled_logits_and_log(loaded)
    torch.testing.assert_close(out, logits(model), rtol=1e-4, atol=1e-4)
    assert log[0]["groups"] == 4


def test_graphs_without_tagged_parameters_are_untouched():
    siblings.install()

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x).sum(-1) + self.b(x).sum(-1)

    model = TwoHeads()
    x = torch.randn(3, 8)
    torch._dynamo.reset()
    siblings.FUSION_LOG.clear()
    out = torch.compile(model, fullgraph=True)(x)
    assert siblings.FUSION_LOG == []
    torch.testing.assert_close(out, model(x))
