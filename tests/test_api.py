"""quantize()'s orchestration: work order and memory, beyond what the method tests cover."""

import pytest
import torch

import pymllm_fx
from pymllm_fx.methods.int8 import Int8LinearMethod

from hf_models import build_model


class _CountingInt8(Int8LinearMethod):
    """int8 that records how many real (non-meta) float weights are alive at once."""

    def __init__(self):
        super().__init__()
        self.alive = self.peak = self.dry_runs = 0

    def create_weights(self, layer, *args, **kwargs):
        super().create_weights(layer, *args, **kwargs)
        if layer.weight.device.type == "meta":
            self.dry_runs += 1
        else:
            self.alive += 1
            self.peak = max(self.peak, self.alive)

    def process_weights_after_loading(self, layer):
        super().process_weights_after_loading(layer)
        self.alive -= 1


def test_own_weights_are_calibrated_one_layer_at_a_time():
    torch.manual_seed(0)
    method = _CountingInt8()
    pymllm_fx.quantize(build_model("llama"), method, progress=False)
    assert method.dry_runs == 14  # 7 linears x 2 layers, checked on meta before any real work
    assert method.peak == 1
    assert method.alive == 0


def test_default_skip_leaves_the_whole_output_head_float():
    """skip=("lm_head",) also covers modules inside it (RoBERTa's lm_head.dense), as a user means it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=64)
    model = transformers.RobertaForMaskedLM(config).eval()
    pymllm_fx.quantize(model, "int8", progress=False)
    assert type(model.lm_head.dense) is torch.nn.Linear
    assert type(model.roberta.encoder.layer[0].attention.self.query) is not torch.nn.Linear
    rows = {row.path: row for row in pymllm_fx.explain(model, file=None).rows}
    assert "inside lm_head" in rows["lm_head.dense"].detail


def test_a_checkpoint_is_read_once_and_each_experts_layer_built_once_on_meta(tmp_path, monkeypatch):
    """quantize(weights=) reads the headers once (checked, then loaded) and builds each experts layer
    once on meta (the dry run whose layers the headers are checked against)."""
    import pymllm_fx.api.plan as plan
    import pymllm_fx.api.quantize_model as quantize_model

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_local_experts=4, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path)
    calls = {"headers": 0, "meta experts": 0}
    read, build = quantize_model.checkpoint_tensors, plan._build_experts

    def counted_read(path):
        calls["headers"] += 1
        return read(path)

    def counted_build(path, module, method, device, *args):
        calls["meta experts"] += str(device) == "meta"
        return build(path, module, method, device, *args)

    monkeypatch.setattr(quantize_model, "checkpoint_tensors", counted_read)  # quantize reads the headers
    monkeypatch.setattr(plan, "_build_experts", counted_build)  # _plan_experts builds on meta
    model = transformers.MixtralForCausalLM(config).eval()
    with pytest.warns(UserWarning):  # the routers' weights stay float
        pymllm_fx.quantize(model, "int8", weights=tmp_path, progress=False)
    assert calls == {"headers": 1, "meta experts": 2}
