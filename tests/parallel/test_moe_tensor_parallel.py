"""Mixture-of-experts under tensor parallelism at 2 ranks (gloo on CPU; NCCL on 2 GPUs, skipped
without them): each expert's intermediate dimension splits over the ranks, and the sharded model
gives the unsharded quantized model's logits."""

from __future__ import annotations

import copy

import pytest
import torch

import pymllm_fx
from pymllm_fx.layers.fused_moe import FusedMoE
from checks import backend_params, rel_err, spawn_ranks

transformers = pytest.importorskip("transformers")

# 4 heads of 16, 2 key/value heads: attention splits into whole heads at tp 2; each expert's
# intermediate 64 gives a rank 32 features, one int4 group of 32.
MIXTRAL = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
QWEN3_MOE = dict(vocab_size=128, hidden_size=64, moe_intermediate_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2)
# gpt-oss (biased, transposed, interleaved gate/up experts) is checked shard by shard in one process
# below: its attention sinks (one per head) are not split by tensor parallelism yet.
GPT_OSS = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, layer_types=None)
MODELS = {"mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE}
METHODS = {"int8": "int8", "int4": {"quant_method": "int4", "group_size": 32}}
# Sharded sums round differently; int8 calibrates a down projection's row scale over this rank's
# slice of the intermediate features (as row-parallel linears do), int4's groups lie in one rank.
TOL = {"int8": 2e-2, "int4": 1e-4}


def build(arch: str):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(arch, **{**MODELS, "gpt_oss": GPT_OSS}[arch])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # fresh expert biases are zeros: a down bias added on every rank would pass
        for name, param in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                param.normal_(0, 0.5)
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _body(rank: int, world: int, device: torch.device, expected: dict) -> None:
    for arch in MODELS:
        for name, method in METHODS.items():
            model = pymllm_fx.quantize(build(arch).to(device), method, progress=False)
            experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
            assert len(experts) == 2 and all(m.tp_size == world for m in experts)
            layer = experts[0]
            if name == "int4":
                assert tuple(layer.w13_qweight.shape) == (4, 2 * 64 // world, 64 // 8)
                assert tuple(layer.w2_qweight.shape) == (4, 64, 64 // world // 8)
            with torch.no_grad():
                logits = model(ids().to(device)).logits.cpu()
            err = rel_err(logits, expected[arch, name])
            assert err <= TOL[name], f"{arch} {name}: tp={world} logits differ from tp=1 by {err:.2e}"


@pytest.mark.parametrize("backend, world", backend_params())
def test_experts_split_over_two_ranks_match_one_rank(backend, world):
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    expected = {}
    with torch.no_grad():
        for arch in MODELS:
            for name, method in METHODS.items():
                model = pymllm_fx.quantize(build(arch).to(device), method, progress=False)
                expected[arch, name] = model(ids().to(device)).logits.cpu()
    spawn_ranks(_body, world, backend, expected)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_shards_sum_to_the_whole_layer(arch):
    """Each rank's FusedMoE (no process group: the partial sums are added here) over the shards that
    ``own_expert_tensors`` cuts: gate and up halves, or interleaved pairs, and down's columns."""
    from pymllm_fx.api import TensorParallel
    from pymllm_fx.api.quantize_model import _quantize_own_experts
    from pymllm_fx.methods.registry import resolve

    method = resolve({"quant_method": "int4", "group_size": 32})
    module = next(m for m in build(arch).modules() if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter))
    whole = _quantize_own_experts(None, {"e": copy.deepcopy(module)}, method, "cpu", False)["e"]
    shards = [_quantize_own_experts(None, {"e": copy.deepcopy(module)}, method, "cpu", False,
                                    TensorParallel(None, rank, 2))["e"] for rank in range(2)]
    torch.manual_seed(2)
    x, topk = torch.randn(5, 64), torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    w = torch.rand(5, 2)
    with torch.no_grad():
        want = whole(x, topk, w)
        got = sum(shard(x, topk, w) for shard in shards)
    assert rel_err(got, want) <= 1e-5
