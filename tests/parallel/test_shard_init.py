"""Models no rank holds whole: ``quantize(..., shard_init=)`` on a meta model fills and quantizes one
layer at a time, and benchmarks/shard_init.py's builder makes each rank's shards only (gloo, 2 ranks
on CPU), block-seeded so that tp 2's shards are exactly slices of tp 1's weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import pymllm_fx
from pymllm_fx.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from checks import rel_err, spawn_ranks

transformers = pytest.importorskip("transformers")

# The 70B's proportions, tiny: no split layer's whole shape (q 512x256, k/v 128x256, o 256x512,
# gate/up 768x256, down 256x768) is the shape of any shard, random block or other tensor the build
# makes, so a whole weight allocated anywhere would be seen.
TINY_70B = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, vocab_size=1536, tie_word_embeddings=False)
INT4 = {"quant_method": "int4", "group_size": 128}


def config():
    return transformers.LlamaConfig(**TINY_70B)


def load_builder():
    """benchmarks/shard_init.py, loaded by path (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "shard_init.py"
    spec = importlib.util.spec_from_file_location("bench_shard_init", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def meta_model():
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config(), dtype=torch.float32)


def test_shard_init_quantizes_each_layer_before_the_next_is_filled():
    model = meta_model()
    built = []

    def init(site, layer):
        # every layer built before this one is already int4: its float weight is gone
        assert all("weight" not in earlier._parameters for earlier in built), "a float weight outlived its layer"
        assert layer.weight.device.type == "cpu" and tuple(layer.weight.shape) == (site.out_features, site.in_features)
        layer.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(built)))
        built.append(layer)

    pymllm_fx.quantize(model, INT4, progress=False, device="cpu", shard_init=init)
    assert len(built) == 7 * 2  # q, k, v, o, gate, up, down per layer; lm_head skipped
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, ReplicatedLinear) and q.qweight.device.type == "cpu" and "weight" not in q._parameters
    assert model.model.embed_tokens.weight.device.type == "meta"  # the caller's to fill


def test_shard_init_refusals_leave_the_model_unchanged():
    model = meta_model()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match="shard_init needs device="):
        pymllm_fx.quantize(model, INT4, progress=False, shard_init=lambda site, layer: None)
    with pytest.raises(ValueError, match="either weights=<checkpoint path> or shard_init="):
        pymllm_fx.quantize(model, INT4, progress=False, device="cpu", weights="nowhere",
                           shard_init=lambda site, layer: None)
    assert dict(model.named_modules()) == before


class RecordShapes(TorchDispatchMode):
    """Shapes of every real (not meta, not fake) tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta":
                self.shapes.add(tuple(t.shape))
        return out


def _body(rank: int, world: int, device: torch.device) -> None:
    builder = load_builder()
    ids = torch.randint(0, 1536, (1, 9), generator=torch.Generator().manual_seed(1))
    with RecordShapes() as record:
        sharded = builder.build_sharded(config(), "none", device, 0, dist.group.WORLD, fuse_siblings=False,
                                        dtype=torch.float32)
    whole = builder.build_sharded(config(), "none", device, 0, None, fuse_siblings=False, dtype=torch.float32)
    split = {name: m for name, m in sharded.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    assert len(split) == 14, sorted(split)
    whole_shapes = {tuple(whole.get_submodule(name).weight.shape) for name in split}
    assert not record.shapes & whole_shapes, f"whole weights allocated: {record.shapes & whole_shapes}"
    for name, layer in split.items():
        full = whole.get_submodule(name).weight
        dim = 0 if isinstance(layer, ColumnParallelLinear) else 1
        size = layer.weight.shape[dim]
        assert size * world == full.shape[dim]
        assert torch.equal(layer.weight, full.narrow(dim, rank * size, size)), name
    for name, param in whole.named_parameters():  # embeddings, norms and lm_head: whole on every rank
        if name.rpartition(".")[0] not in split:
            assert torch.equal(param, sharded.get_parameter(name)), name
    with torch.no_grad():
        err = rel_err(sharded(ids).logits, whole(ids).logits)
    assert err <= 1e-5, f"tp={world} logits differ from tp=1 by {err:.2e}"
    int4 = builder.build_sharded(config(), INT4, device, 0, dist.group.WORLD, dtype=torch.float32)
    int4_whole = builder.build_sharded(config(), INT4, device, 0, None, dtype=torch.float32)
    assert tuple(int4.model.layers[0].mlp.down_proj.qweight.shape) == (256, 768 // world // 8)
    with torch.no_grad():
        err = rel_err(int4(ids).logits, int4_whole(ids).logits)
    assert err <= 1e-5, f"int4: tp={world} logits differ from tp=1 by {err:.2e}"


def test_sharded_builder_holds_only_shards_and_matches_tp1():
    spawn_ranks(_body, 2, "gloo")
