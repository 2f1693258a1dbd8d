"""Checkpoint iteration (safetensors only, pickles refused) and strict weight loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pymllm_fx.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from pymllm_fx.layers.quantize_base import LinearMethodBase, UnquantizedLinearMethod
from pymllm_fx.loading import CheckpointError, LoadTarget, iter_weights, load_weights, process_weights_after_loading


def random_tensors(names_shapes: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    return {name: torch.randn(shape) for name, shape in names_shapes.items()}


def assert_same(got: List, expected: Dict[str, torch.Tensor]) -> None:
    got_dict = dict(got)
    assert len(got_dict) == len(got), "a tensor was yielded twice"
    assert got_dict.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got_dict[name], tensor), name


def write_sharded(tmp_path: Path, shards: Dict[str, Dict[str, torch.Tensor]], weight_map=None) -> Path:
    for file_name, tensors in shards.items():
        save_file(tensors, str(tmp_path / file_name))
    if weight_map is None:
        weight_map = {name: file_name for file_name, tensors in shards.items() for name in tensors}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load / pickle.load must never be called on a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# --- iter_weights --------------------------------------------------------------------------------


def test_single_file(tmp_path):
    torch.manual_seed(0)
    tensors = random_tensors({"a.weight": (4, 3), "a.bias": (4,), "norm.weight": (7,)})
    tensors["ids"] = torch.arange(5, dtype=torch.int64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = list(iter_weights(tmp_path / "model.safetensors"))
    assert_same(got, tensors)
    assert dict(got)["ids"].dtype == torch.int64
    assert_same(list(iter_weights(str(tmp_path / "model.safetensors"))), tensors)  # str path too


def test_directory_of_unindexed_shards_is_refused(tmp_path):
    """Without an index there is no telling which files form the model (transformers reads the
    index or model.safetensors, nothing else)."""
    torch.manual_seed(1)
    save_file(random_tensors({"x.weight": (2, 2)}), str(tmp_path / "part-1.safetensors"))
    save_file(random_tensors({"z.weight": (5, 1)}), str(tmp_path / "part-2.safetensors"))
    with pytest.raises(CheckpointError, match=r"several safetensors files.*part-1.*part-2.*no index"):
        list(iter_weights(tmp_path))


def test_directory_reads_model_safetensors_and_ignores_other_files(tmp_path):
    torch.manual_seed(1)
    model = random_tensors({"x.weight": (2, 2), "y.weight": (3,)})
    save_file(model, str(tmp_path / "model.safetensors"))
    save_file(random_tensors({"layers.0.w": (4,)}), str(tmp_path / "consolidated.safetensors"))  # Mistral's copy
    save_file(random_tensors({"lora_A": (2,)}), str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "README.md").write_text("not a checkpoint")
    assert_same(list(iter_weights(tmp_path)), model)


def test_lone_file_of_another_name_is_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = random_tensors({"x.weight": (2, 2)})
    save_file(model, str(tmp_path / "weights.safetensors"))
    assert_same(list(iter_weights(tmp_path)), model)


@pytest.mark.parametrize("via", ["index_file", "directory"])
def test_sharded_index(tmp_path, via):
    torch.manual_seed(2)
    shards = {
        "model-00001-of-00002.safetensors": random_tensors({"layers.0.w": (4, 4), "embed": (10, 4)}),
        "model-00002-of-00002.safetensors": random_tensors({"layers.1.w": (4, 4), "lm_head": (10, 4)}),
    }
    index = write_sharded(tmp_path, shards)
    # A stray safetensors file next to an index is not part of the checkpoint.
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "zzz-stray.safetensors"))
    got = list(iter_weights(index if via == "index_file" else tmp_path))
    assert_same(got, {**shards["model-00001-of-00002.safetensors"], **shards["model-00002-of-00002.safetensors"]})


def test_index_shard_missing_names_the_shard(tmp_path):
    shards = {"model-00001-of-00002.safetensors": {"a": torch.zeros(2)}}
    index = write_sharded(tmp_path, shards, weight_map={"a": "model-00001-of-00002.safetensors",
                                                         "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing") as info:
        list(iter_weights(index))
    assert "'b'" in str(info.value)  # says what the missing shard should hold


def test_index_claims_tensor_the_shard_lacks(tmp_path):
    shards = {"model-00001-of-00001.safetensors": {"a": torch.zeros(2)}}
    index = write_sharded(tmp_path, shards, weight_map={"a": "model-00001-of-00001.safetensors",
                                                         "ghost.weight": "model-00001-of-00001.safetensors"})
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors.*ghost\.weight.*does not"):
        list(iter_weights(index))


def test_invalid_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        list(iter_weights(tmp_path))


@pytest.mark.parametrize("keep", ["all_but_4", "half", "header_only", "5_bytes", "empty"])
def test_truncated_file(tmp_path, keep):
    torch.manual_seed(3)
    path = tmp_path / "model.safetensors"
    save_file(random_tensors({"a": (16, 16), "b": (8,)}), str(path))
    data = path.read_bytes()
    header_len = 8 + int.from_bytes(data[:8], "little")
    cut = {"all_but_4": len(data) - 4, "half": len(data) // 2, "header_only": header_len, "5_bytes": 5, "empty": 0}[keep]
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        list(iter_weights(path))


def test_garbage_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{ not json }}}}" + bytes(64))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        list(iter_weights(path))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_file_refused_without_unpickling(tmp_path, name, no_unpickling):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump({"w": [1.0, 2.0]}, f)
    with pytest.raises(CheckpointError, match=r"pickle.*arbitrary code") as info:
        list(iter_weights(path))
    assert name in str(info.value) and "safetensors" in str(info.value)


def test_directory_with_only_pickle_refused(tmp_path, no_unpickling):
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": 1}, f)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle"):
        list(iter_weights(tmp_path))


def test_safetensors_preferred_over_pickle_in_same_directory(tmp_path, no_unpickling):
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": 1}, f)
    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert [n for n, _ in iter_weights(tmp_path)] == ["w"]


@pytest.mark.parametrize("case", ["missing_path", "empty_dir", "txt_file"])
def test_not_a_checkpoint(tmp_path, case):
    path = {"missing_path": tmp_path / "nope", "empty_dir": tmp_path, "txt_file": tmp_path / "w.txt"}[case]
    if case == "txt_file":
        path.write_text("hello")
    with pytest.raises(CheckpointError, match=str(path.name)):
        list(iter_weights(path))


# --- load_weights: strict accounting -----------------------------------------------------------


def make_targets():
    """Two linear layers (weights with weight_loader) and a bare norm parameter (default loader)."""
    a = ReplicatedLinear(6, 4, bias=True, prefix="a")
    b = ReplicatedLinear(4, 3, bias=False, prefix="b")
    norm = nn.Parameter(torch.empty(4), requires_grad=False)
    targets = {
        "a.weight": LoadTarget(a.weight, owner="a"),
        "a.bias": LoadTarget(a.bias, owner="a"),
        "b.weight": LoadTarget(b.weight, owner="b"),
        "norm.weight": LoadTarget(norm, owner="norm"),
    }
    return targets, a, b, norm


def test_load_weights_all_good():
    torch.manual_seed(4)
    targets, a, b, norm = make_targets()
    ckpt = {"a.weight": torch.randn(4, 6), "a.bias": torch.randn(4), "b.weight": torch.randn(3, 4),
            "norm.weight": torch.randn(4).half()}  # plain floats convert
    assert load_weights(targets, ckpt.items()) == 4
    assert torch.equal(a.weight.data, ckpt["a.weight"]) and torch.equal(b.weight.data, ckpt["b.weight"])
    assert torch.equal(norm.data, ckpt["norm.weight"].float())
    x = torch.randn(2, 6)
    torch.testing.assert_close(b(a(x)), F.linear(F.linear(x, ckpt["a.weight"], ckpt["a.bias"]), ckpt["b.weight"]))


def test_load_weights_lists_every_problem():
    torch.manual_seed(5)
    targets, *_ = make_targets()
    ckpt = [
        ("a.weight", torch.randn(4, 7)),  # wrong shape
        ("a.bias", torch.arange(4)),  # int64 into a float param
        ("norm.weight", torch.randn(4)),
        ("norm.weight", torch.randn(4)),  # duplicate
        ("extra.rotary_inv_freq", torch.randn(2)),  # unexpected
        ("c.weight", torch.randn(2)),  # unexpected
        # b.weight missing
    ]
    with pytest.raises(CheckpointError) as info:
        load_weights(targets, ckpt)
    msg = str(info.value)
    assert "a: tensor 'a.weight'" in msg and "(4, 7)" in msg and "(4, 6)" in msg
    assert "a: tensor 'a.bias'" in msg and "torch.int64" in msg
    assert "norm.weight: appears more than once" in msg
    assert "parameters no checkpoint tensor filled (1)" in msg and "- b.weight" in msg
    assert "checkpoint tensors no parameter takes (2)" in msg
    assert "- extra.rotary_inv_freq" in msg and "- c.weight" in msg
    assert "tensors that do not fit their parameter (3)" in msg


@pytest.mark.parametrize(
    "ckpt_names, expect_error",
    [
        (["a.weight", "b.weight", "norm.weight"], "a.bias"),
        (["a.weight", "a.bias", "b.weight", "norm.weight", "b.bias"], "b.bias"),
    ],
)
def test_load_weights_single_problem_named(ckpt_names, expect_error):
    torch.manual_seed(6)
    targets, *_ = make_targets()
    shapes = {"a.weight": (4, 6), "a.bias": (4,), "b.weight": (3, 4), "norm.weight": (4,), "b.bias": (3,)}
    with pytest.raises(CheckpointError, match=rf"- {expect_error}\b"):
        load_weights(targets, [(n, torch.randn(shapes[n])) for n in ckpt_names])


def test_many_problems_are_summarised():
    targets = {f"p{i}": LoadTarget(nn.Parameter(torch.empty(1), requires_grad=False)) for i in range(25)}
    with pytest.raises(CheckpointError, match=r"\(25\)(.|\n)*- p0(.|\n)*and 5 more"):
        load_weights(targets, [])


@pytest.mark.parametrize("present", ["embed_tokens.weight", "lm_head.weight"])
def test_tied_alias_counts_as_loaded(present):
    torch.manual_seed(7)
    shared = nn.Parameter(torch.empty(10, 4), requires_grad=False)
    targets = {"embed_tokens.weight": LoadTarget(shared), "lm_head.weight": LoadTarget(shared)}
    value = torch.randn(10, 4)
    assert load_weights(targets, [(present, value)]) == 1
    assert torch.equal(shared.data, value)


def test_alias_does_not_hide_a_missing_shard():
    """gate and up are two shards of one param: loading gate must not count up as loaded."""
    merged = MergedColumnParallelLinear(8, [4, 4], bias=False, prefix="mlp.gate_up_proj")
    targets = {
        "mlp.gate_proj.weight": LoadTarget(merged.weight, shard_id=0, owner="mlp.gate_up_proj"),
        "mlp.up_proj.weight": LoadTarget(merged.weight, shard_id=1, owner="mlp.gate_up_proj"),
    }
    with pytest.raises(CheckpointError, match=r"- mlp\.up_proj\.weight"):
        load_weights(targets, [("mlp.gate_proj.weight", torch.randn(4, 8))])
    torch.manual_seed(8)
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    assert load_weights(targets, [("mlp.up_proj.weight", u), ("mlp.gate_proj.weight", g)]) == 2
    assert torch.equal(merged.weight.data, torch.cat([g, u]))


def test_optional_target_and_transform():
    torch.manual_seed(9)
    layer = ReplicatedLinear(6, 4, bias=False, prefix="c_attn")
    buf = torch.zeros(3)
    targets = {
        "c_attn.weight": LoadTarget(layer.weight, transform=lambda t: t.t(), owner="c_attn"),  # Conv1D (in, out)
        "rope.inv_freq": LoadTarget(buf, required=False),
    }
    w_in_out = torch.randn(6, 4)
    assert load_weights(targets, [("c_attn.weight", w_in_out)]) == 1
    assert torch.equal(layer.weight.data, w_in_out.t())
    assert torch.equal(buf, torch.zeros(3))


def test_iter_weights_into_load_weights(tmp_path):
    torch.manual_seed(10)
    targets, a, b, norm = make_targets()
    ckpt = {"a.weight": torch.randn(4, 6), "a.bias": torch.randn(4), "b.weight": torch.randn(3, 4), "norm.weight": torch.randn(4)}
    write_sharded(tmp_path, {"s1.safetensors": {k: ckpt[k] for k in ("a.weight", "a.bias")},
                             "s2.safetensors": {k: ckpt[k] for k in ("b.weight", "norm.weight")}})
    assert load_weights(targets, iter_weights(tmp_path)) == 4
    assert torch.equal(a.bias.data, ckpt["a.bias"]) and torch.equal(norm.data, ckpt["norm.weight"])


# --- process_weights_after_loading(model) ------------------------------------------------------


class CountingMethod(UnquantizedLinearMethod):
    def __init__(self) -> None:
        self.calls: List[nn.Module] = []

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.calls.append(layer)


class OtherCountingMethod(LinearMethodBase):
    def __init__(self) -> None:
        self.calls: List[nn.Module] = []

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        UnquantizedLinearMethod().create_weights(layer, input_size_per_partition, output_partition_sizes,
                                                 input_size, output_size, params_dtype, **extra_weight_attrs)

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)

    def process_weights_after_loading(self, layer):
        self.calls.append(layer)


def test_process_weights_after_loading_calls_each_module_once():
    shared, other = CountingMethod(), OtherCountingMethod()
    model = nn.Module()
    model.blocks = nn.ModuleList(
        [nn.ModuleDict({"q": ReplicatedLinear(8, 8, quant_method=shared), "o": ReplicatedLinear(8, 8, quant_method=other)})
         for _ in range(3)]
    )
    model.head = ReplicatedLinear(8, 2, quant_method=shared)
    model.plain = nn.Linear(8, 8)
    model.odd = nn.Module()
    model.odd.quant_method = "not a method"  # ignored: only QuantizeMethodBase instances are called
    process_weights_after_loading(model)
    expected_shared = [blk["q"] for blk in model.blocks] + [model.head]
    assert len(shared.calls) == 4 and all(any(c is m for c in shared.calls) for m in expected_shared)
    assert len(other.calls) == 3 and all(any(c is blk["o"] for c in other.calls) for blk in model.blocks)
    assert len({id(c) for c in shared.calls + other.calls}) == 7  # no module twice
