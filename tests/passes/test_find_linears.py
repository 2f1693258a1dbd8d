"""find_linears / swap_linears on tiny random-weight transformers models and on hand-made modules."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from pymllm_fx.passes import find_linears, swap_linears

transformers = pytest.importorskip("transformers")

from hf_models import ARCHS, build_model, model_and_sites  # noqa: E402


# Per-layer linears as (relative path, in_features, out_features, bias, kind); head_dim 16, so k/v of
# the GQA models (2 kv heads) are 32 wide.
_LLAMA_LAYER = [("self_attn.q_proj", 64, 64, False), ("self_attn.k_proj", 64, 32, False),
                ("self_attn.v_proj", 64, 32, False), ("self_attn.o_proj", 64, 64, False),
                ("mlp.gate_proj", 64, 128, False), ("mlp.up_proj", 64, 128, False),
                ("mlp.down_proj", 128, 64, False)]
_QWEN2_LAYER = [(p, i, o, p.split(".")[-1] in ("q_proj", "k_proj", "v_proj")) for p, i, o, _ in _LLAMA_LAYER]
_LAYERS = {
    "llama": ("model.layers.{}", _LLAMA_LAYER, "linear"),
    "mistral": ("model.layers.{}", _LLAMA_LAYER, "linear"),
    "gemma": ("model.layers.{}", _LLAMA_LAYER, "linear"),
    "qwen2": ("model.layers.{}", _QWEN2_LAYER, "linear"),
    "phi3": ("model.layers.{}", [("self_attn.qkv_proj", 64, 128, False), ("self_attn.o_proj", 64, 64, False),
                                 ("mlp.gate_up_proj", 64, 256, False), ("mlp.down_proj", 128, 64, False)], "linear"),
    "gpt2": ("transformer.h.{}", [("attn.c_attn", 64, 192, True), ("attn.c_proj", 64, 64, True),
                                  ("mlp.c_fc", 64, 128, True), ("mlp.c_proj", 128, 64, True)], "conv1d"),
    "bert": ("encoder.layer.{}", [("attention.self.query", 64, 64, True), ("attention.self.key", 64, 64, True),
                                  ("attention.self.value", 64, 64, True), ("attention.output.dense", 64, 64, True),
                                  ("intermediate.dense", 64, 128, True), ("output.dense", 128, 64, True)], "linear"),
    "opt": ("model.decoder.layers.{}", [("self_attn.q_proj", 64, 64, True), ("self_attn.k_proj", 64, 64, True),
                                        ("self_attn.v_proj", 64, 64, True), ("self_attn.out_proj", 64, 64, True),
                                        ("fc1", 64, 128, True), ("fc2", 128, 64, True)], "linear"),
}
_HEADS = {"bert": [("pooler.dense", 64, 64, True, "linear")]}


def expected_sites(arch: str) -> dict:
    """{path: (in_features, out_features, bias, kind)} of every linear the model calls."""
    prefix, layer, kind = _LAYERS[arch]
    out = {f"{prefix.format(i)}.{rel}": (fin, fout, bias, kind) for i in range(2) for rel, fin, fout, bias in layer}
    for path, fin, fout, bias, k in _HEADS.get(arch, [("lm_head", 64, 128, False, "linear")]):
        out[path] = (fin, fout, bias, k)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_site_found_with_shapes_bias_and_kind(arch):
    model, sites = model_and_sites(arch)
    expected = expected_sites(arch)
    found = {s.path: (s.in_features, s.out_features, s.bias, s.kind) for s in sites}
    assert found == expected
    assert len(sites) == len(found), "a path is listed twice"
    for site in sites:
        assert site.from_graph and site.swappable, site
        assert site.calls == 1, site
        assert site.dtype == torch.float32 and site.device.type == "cpu"
        # the features agree with the module's weight
        module = model.get_submodule(site.path)
        w_shape = tuple(module.weight.shape)
        assert w_shape == ((site.in_features, site.out_features) if site.kind == "conv1d"
                           else (site.out_features, site.in_features))


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_come_in_call_order(arch):
    _, sites = model_and_sites(arch)
    layer_of = [int(m.group(1)) for m in (re.search(r"\.(\d+)\.", s.path) for s in sites) if m]
    assert len(layer_of) == len(sites) - 1
    assert layer_of == sorted(layer_of)
    assert sites[-1].path in ("lm_head", "pooler.dense")


_SIBLING_GROUPS = {
    "llama": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
    "qwen2": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
    "mistral": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
    "gemma": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
    "opt": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")],
    "bert": [("attention.self.query", "attention.self.key", "attention.self.value")],
}


@pytest.mark.parametrize("arch", sorted(_SIBLING_GROUPS))
def test_siblings_share_input(arch):
    _, sites = model_and_sites(arch)
    by_path = {s.path: s for s in sites}
    prefix = _LAYERS[arch][0]
    grouped = set()
    for i in range(2):
        for group in _SIBLING_GROUPS[arch]:
            paths = [f"{prefix.format(i)}.{rel}" for rel in group]
            for p in paths:
                assert set(by_path[p].siblings) == set(paths) - {p}, (p, by_path[p].siblings)
            grouped.update(paths)
    # every other site consumes an input of its own (o_proj, down_proj, lm_head, ...)
    for s in sites:
        if s.path not in grouped:
            assert s.siblings == (), (s.path, s.siblings)


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_fused_projections_have_no_siblings(arch):
    _, sites = model_and_sites(arch)
    assert all(s.siblings == () for s in sites)


@pytest.mark.parametrize("arch, kwargs, embedding", [
    ("gpt2", {}, "transformer.wte.weight"),
    ("gemma", {"tie_word_embeddings": True}, "model.embed_tokens.weight"),
    ("llama", {"tie_word_embeddings": True}, "model.embed_tokens.weight"),
])
def test_tied_lm_head_reports_embedding(arch, kwargs, embedding):
    torch.manual_seed(0)
    model = build_model(arch, **kwargs)
    assert model.lm_head.weight is model.get_parameter(embedding), "test setup: weights are not tied"
    sites = {s.path: s for s in find_linears(model)}
    assert embedding in sites["lm_head"].tied_to
    assert "lm_head.weight" not in sites["lm_head"].tied_to
    assert all(s.tied_to == () for p, s in sites.items() if p != "lm_head")


def test_untied_lm_head_has_no_tie():
    _, sites = model_and_sites("llama")  # Llama's default is untied
    assert {s.path: s for s in sites}["lm_head"].tied_to == ()


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_device_model_gives_the_same_sites(arch):
    _, cpu_sites = model_and_sites(arch)
    with torch.device("meta"):
        model = build_model(arch)
    assert next(model.parameters()).is_meta
    sites = find_linears(model)
    assert all(s.device.type == "meta" and s.from_graph for s in sites)
    key = lambda s: (s.path, s.in_features, s.out_features, s.bias, s.kind, s.calls, tuple(sorted(s.siblings)), s.tied_to)
    assert [key(s) for s in sites] == [key(s) for s in cpu_sites]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_capture_leaves_model_untouched(arch):
    torch.manual_seed(1)
    model = build_model(arch).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    find_linears(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
        assert v.data_ptr() == ptrs[k], f"{k} was replaced"
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.training, "find_linears must restore the training mode"
    assert all(m.training for m in model.modules())


# --- models that cannot be captured: fall back to walking the modules -----------------------------

class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4, bias=False)


class DataDependentBranch(_TwoLinears):
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


class CallsItem(_TwoLinears):
    def forward(self, x):
        h = self.a(x)
        for _ in range(int(x[0, 0].item() > 0) + 1):
            h = h + 1
        return self.b(h)


class CallsTolist(_TwoLinears):
    def forward(self, x):
        h = self.a(x)
        scale = x.abs().max(dim=1).values.tolist()
        return self.b(h) * max(scale)


class Plain(_TwoLinears):
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("cls, with_inputs", [
    (DataDependentBranch, True), (CallsItem, True), (CallsTolist, True), (Plain, False),
])
def test_untraceable_model_falls_back_to_module_walk(cls, with_inputs):
    torch.manual_seed(0)
    model = cls()
    example = (torch.randn(2, 8),) if with_inputs else None
    with pytest.warns(UserWarning, match="falling back"):
        sites = find_linears(model, example)
    found = {s.path: (s.in_features, s.out_features, s.bias, s.kind, s.from_graph) for s in sites}
    assert found == {"a": (8, 16, True, "linear", False), "b": (16, 4, False, "linear", False)}


def test_traceable_plain_module_needs_no_fallback():
    model = Plain()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sites = find_linears(model, (torch.randn(2, 8),))
    assert [(s.path, s.from_graph) for s in sites] == [("a", True), ("b", True)]


def test_graph_counts_calls_and_reports_unused_linears():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)
            self.raw = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            h = self.shared(self.shared(x))
            return h @ self.raw.t()

    sites = {s.path: s for s in find_linears(M(), (torch.randn(3, 8),))}
    assert not sites["unused"].swappable and "not reached by the example inputs" in sites["unused"].reason
    assert sites["shared"].calls == 2 and sites["shared"].swappable
    # a bare parameter used in a matmul is found but cannot be swapped for a linear module
    assert not sites[""].swappable and sites[""].reason


# --- swap_linears ---------------------------------------------------------------------------------

def _snapshot(model):
    return {n: m for n, m in model.named_modules()}


def test_swap_linears_replaces_by_path():
    torch.manual_seed(0)
    model = build_model("llama")
    new = {"model.layers.0.mlp.up_proj": nn.Identity(), "lm_head": nn.Linear(64, 128)}
    swap_linears(model, new)
    assert model.model.layers[0].mlp.up_proj is new["model.layers.0.mlp.up_proj"]
    assert model.lm_head is new["lm_head"]


@pytest.mark.parametrize("bad_path", ["model.layers.0.mlp.nope", "model.nope.q_proj", "model.layers.7.mlp.up_proj"])
def test_swap_linears_bad_path_changes_nothing(bad_path):
    torch.manual_seed(0)
    model = build_model("llama")
    before = _snapshot(model)
    replacements = {"model.layers.0.self_attn.q_proj": nn.Identity(), "lm_head": nn.Identity(),
                    bad_path: nn.Identity()}
    with pytest.raises(ValueError, match="no module at"):
        swap_linears(model, replacements)
    after = _snapshot(model)
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)


@pytest.mark.parametrize("bad", [torch.zeros(3), "linear", None])
def test_swap_linears_non_module_replacement_changes_nothing(bad):
    torch.manual_seed(0)
    model = build_model("gpt2")
    before = _snapshot(model)
    replacements = {"transformer.h.0.attn.c_attn": nn.Identity(), "transformer.h.1.mlp.c_fc": bad}
    with pytest.raises(TypeError, match="transformer.h.1.mlp.c_fc"):
        swap_linears(model, replacements)
    after = _snapshot(model)
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)


class _RawMatmuls(nn.Module):
    """Parameters used in matmuls outside any nn.Linear: one (in, out), one (out, in) transposed."""

    def __init__(self):
        super().__init__()
        self.w_in_out = nn.Parameter(torch.randn(8, 24))
        self.w_out_in = nn.Parameter(torch.randn(16, 24))

    def forward(self, x):
        return (x @ self.w_in_out) @ self.w_out_in.t()


def test_raw_matmul_sites_are_reported_unswappable_with_their_orientation():
    sites = find_linears(_RawMatmuls(), (torch.randn(2, 8),))
    by_weight = {s.reason.split(" ")[0]: s for s in sites}
    assert len(sites) == 2
    first, second = by_weight["w_in_out"], by_weight["w_out_in"]
    assert (first.in_features, first.out_features) == (8, 24)
    assert (second.in_features, second.out_features) == (24, 16)
    assert not first.swappable and "not an nn.Linear" in first.reason


def test_quantizing_twice_says_the_model_is_already_quantized():
    import pymllm_fx

    model = pymllm_fx.quantize(build_model("llama"), "int8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        pymllm_fx.quantize(model, "int8", progress=False)


# Each layer's tensor-parallel role as the dataflow gives it (layer 0, by the last part of its path).
ROLES = {
    "llama": {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row",
              "gate_proj": "column", "up_proj": "column", "down_proj": "row"},
    # c_attn's output is split by the full q/k/v sizes: sharding it would misalign the split.
    "gpt2": {"attn.c_attn": "replicated", "attn.c_proj": "replicated", "mlp.c_fc": "column", "mlp.c_proj": "row"},
    # Fused qkv_proj and gate_up_proj are sliced and chunked along the features.
    "phi3": {"qkv_proj": "replicated", "o_proj": "replicated", "gate_up_proj": "replicated", "down_proj": "replicated"},
    "bert": {"query": "column", "key": "column", "value": "column", "attention.output.dense": "row",
             "intermediate.dense": "column", "layer.0.output.dense": "row"},
}


@pytest.mark.parametrize("arch", list(ROLES))
def test_tensor_parallel_roles_come_from_the_dataflow(arch):
    _, sites = model_and_sites(arch)
    layer0 = [s for s in sites if ".0." in s.path]
    for suffix, role in ROLES[arch].items():
        (site,) = [s for s in layer0 if s.path.endswith(suffix)]
        assert site.parallel == role, (site.path, site.parallel)
    last = {"llama": "lm_head", "gpt2": "lm_head", "phi3": "lm_head", "bert": "pooler.dense"}[arch]
    assert next(s for s in sites if s.path == last).parallel == "replicated"  # its output is the model's
    heads = {s.path.rpartition(".")[2]: s.head_dim for s in layer0}
    if arch == "llama":
        assert heads["q_proj"] == heads["k_proj"] == 16 and heads["o_proj"] is None
