"""Checkpoint-format tensors in merged and tensor-parallel layers, for every checkpoint method.

Ground truth is one ReplicatedLinear per logical weight (gate, up, q, k, v, ...) loaded with its own
checkpoint tensors: the method tests prove those right. A merged / QKV layer loaded shard by shard
must give their outputs side by side; with ``tp_size`` 2 or 4 (one layer per ``tp_rank``, no process
group) the column-parallel ranks' outputs concatenate, and the row-parallel ranks' partial outputs
sum, to the whole layer's output. The packers here are written from each format's definition and
share no code with the methods' unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import pytest
import torch

from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE
from pymllm_fx.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pymllm_fx.methods.awq import AWQLinearMethod
from pymllm_fx.methods.compressed_tensors import CompressedTensorsLinearMethod
from pymllm_fx.methods.gptq import GPTQLinearMethod
from checks import rel_err, seed

K = 256  # in features: 64 per rank at tp 4, two groups of 32
AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column AWQ_ORDER_MAP[i] of its 8


# --- packers, from the formats' definitions ------------------------------------------------------


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Unsigned values -> int32 words: ``32 // bits`` consecutive values along ``dim`` share a word,
    value j at bits ``bits*j`` (or value ``order[j]`` of the run, for AWQ)."""
    per_word = 32 // bits
    v = values.long().movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per_word, per_word)
    if order is not None:
        v = v[..., order]
    words = (v << (torch.arange(per_word) * bits)).sum(-1)
    return to_int32(words).movedim(-1, dim).contiguous()


def make_awq(n, k, group_size, zero_point, shared):
    g = k if group_size == -1 else group_size
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // g, n)) if zero_point else torch.full((k // g, n), 8)
    s = (torch.rand(k // g, n) * 0.02 + 0.001).half()
    return {"qweight": pack(q, 4, 1, AWQ_ORDER_MAP), "qzeros": pack(z, 4, 1, AWQ_ORDER_MAP), "scales": s}


def make_gptq(n, k, bits, group_size, sym, act_order, shared):
    """v1 ("gptq") checkpoint tensors; ``shared`` keeps one g_idx per input, as q/k/v share it."""
    g = k if group_size == -1 else group_size
    groups = k // g
    if "g_idx" not in shared:
        order = torch.randperm(k) if act_order else torch.arange(k)
        shared["g_idx"] = torch.empty(k, dtype=torch.int32)
        shared["g_idx"][order] = (torch.arange(k) // g).to(torch.int32)
    top = 1 << bits
    q = torch.randint(0, top, (k, n))
    z = torch.full((groups, n), top // 2) if sym else torch.randint(0, top, (groups, n))
    s = (torch.rand(groups, n) * 0.02 + 0.001).half()
    v1_offset = sum(1 << (bits * j) for j in range(32 // bits))
    qzeros = to_int32(pack(z, bits, 1).long() - v1_offset)
    return {"qweight": pack(q, bits, 0), "qzeros": qzeros, "scales": s, "g_idx": shared["g_idx"].clone()}


def make_ct_int(n, k, bits, group_size, symmetric, shared):
    """compressed-tensors pack-quantized: signed values stored as value + 2**(bits-1)."""
    half = 1 << (bits - 1)
    groups = 1 if group_size is None else -(-k // group_size)
    q = torch.randint(-half, half, (n, k))
    tensors = {
        "weight_packed": pack(q + half, bits, 1),
        "weight_scale": torch.rand(n, groups) * 0.05 + 0.01,
        "weight_shape": torch.tensor([n, k]),
    }
    if not symmetric:
        tensors["weight_zero_point"] = pack(torch.randint(-half, half, (n, groups)) + half, bits, 0)
    return tensors


def make_fp8(n, k, strategy, static, shared):
    w = (torch.randn(n, k) * 64).clamp(-448, 448).to(FP8_DTYPE)
    scale = torch.rand(()) * 0.01 + 0.001 if strategy == "tensor" else torch.rand(n, 1) * 0.02 + 0.001
    tensors = {"weight": w, "weight_scale": scale}
    if static:
        # One activation scale for every shard: the merged layer keeps the largest, so equal
        # scales make it exactly the separate layers.
        tensors["input_scale"] = torch.tensor([0.05])
    return tensors


def ct_int_config(bits, group_size, symmetric):
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "channel" if group_size is None else "group", "group_size": group_size}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def ct_fp8_config(strategy, static):
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if static else "token",
            "dynamic": not static}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


@dataclass
class Fmt:
    """One checkpoint scheme: how to build its method, and one layer's checkpoint tensors."""

    method: Callable[[], object]
    make: Callable[[int, int, dict], Dict[str, torch.Tensor]]
    # Activations quantized per token / per tensor at run time: a row-parallel rank quantizes only
    # its slice of x, so the partial sums match the whole layer only to fp8 precision.
    dynamic_act: bool = False
    row_parallel: bool = True


FORMATS = {
    "awq-g32": Fmt(lambda: AWQLinearMethod(group_size=32), lambda n, k, s: make_awq(n, k, 32, True, s)),
    "awq-channel-sym": Fmt(lambda: AWQLinearMethod(group_size=-1, zero_point=False),
                           lambda n, k, s: make_awq(n, k, -1, False, s)),
    "gptq4-g32-asym": Fmt(lambda: GPTQLinearMethod(4, 32, False, False, "gptq"),
                          lambda n, k, s: make_gptq(n, k, 4, 32, False, False, s)),
    "gptq4-g64-sym-actorder": Fmt(lambda: GPTQLinearMethod(4, 64, True, True, "gptq"),
                                  lambda n, k, s: make_gptq(n, k, 4, 64, True, True, s), row_parallel=False),
    "gptq8-channel-actorder": Fmt(lambda: GPTQLinearMethod(8, -1, True, True, "gptq"),
                                  lambda n, k, s: make_gptq(n, k, 8, -1, True, True, s)),
    "ct-int4-g32-sym": Fmt(lambda: CompressedTensorsLinearMethod.from_config(ct_int_config(4, 32, True)),
                           lambda n, k, s: make_ct_int(n, k, 4, 32, True, s)),
    "ct-int4-g32-asym": Fmt(lambda: CompressedTensorsLinearMethod.from_config(ct_int_config(4, 32, False)),
                            lambda n, k, s: make_ct_int(n, k, 4, 32, False, s)),
    "ct-int4-channel-asym": Fmt(lambda: CompressedTensorsLinearMethod.from_config(ct_int_config(4, None, False)),
                                lambda n, k, s: make_ct_int(n, k, 4, None, False, s)),
    "ct-int8-channel": Fmt(lambda: CompressedTensorsLinearMethod.from_config(ct_int_config(8, None, True)),
                           lambda n, k, s: make_ct_int(n, k, 8, None, True, s)),
    "ct-fp8-tensor-static": Fmt(lambda: CompressedTensorsLinearMethod.from_config(ct_fp8_config("tensor", True)),
                                lambda n, k, s: make_fp8(n, k, "tensor", True, s)),
    "ct-fp8-tensor-dynamic": Fmt(lambda: CompressedTensorsLinearMethod.from_config(ct_fp8_config("tensor", False)),
                                 lambda n, k, s: make_fp8(n, k, "tensor", False, s), dynamic_act=True),
    "ct-fp8-channel-dynamic": Fmt(lambda: CompressedTensorsLinearMethod.from_config(ct_fp8_config("channel", False)),
                                  lambda n, k, s: make_fp8(n, k, "channel", False, s), dynamic_act=True),
}
ALL = list(FORMATS)
ROW = [name for name in ALL if FORMATS[name].row_parallel]


# --- loading ---------------------------------------------------------------------------------------


def load_shards(layer, shards: Dict[object, Dict[str, torch.Tensor]]):
    """Every tensor through its parameter's weight_loader, with the shard id when there is one (as
    ``loading.load_weights`` does for a merged target), then post-processing."""
    for shard_id, tensors in shards.items():
        for name, tensor in tensors.items():
            param = getattr(layer, name)
            if shard_id is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def checkpoint(fmt: Fmt, sizes: Dict[object, int], k: int = K):
    """Checkpoint tensors (bias included) for each logical weight; the shards share one input."""
    shared: dict = {}
    out = {}
    for shard_id, n in sizes.items():
        tensors = fmt.make(n, k, shared)
        tensors["bias"] = torch.randn(n)
        out[shard_id] = tensors
    return out


def separate(fmt: Fmt, tensors: Dict[str, torch.Tensor], k: int = K):
    """The ground truth: one ReplicatedLinear holding one logical weight."""
    n = tensors["bias"].shape[0]
    layer = ReplicatedLinear(k, n, bias=True, params_dtype=torch.float32, quant_method=fmt.method(), prefix="ref")
    return load_shards(layer, {None: tensors})


# --- (1) + (2): merged and QKV layers, tp 1 / 2 / 4 --------------------------------------------------

MERGED_SIZES = {0: 32, 1: 64}  # gate, up
HEAD_SIZE, HEADS, KV_HEADS = 16, 4, 2  # q 64 rows, k and v 32 each; tp 4 replicates each kv head twice


def build_merged(kind: str, fmt: Fmt, rank: int, tp: int):
    common = dict(bias=True, params_dtype=torch.float32, quant_method=fmt.method(), tp_rank=rank, tp_size=tp)
    if kind == "merged":
        return MergedColumnParallelLinear(K, list(MERGED_SIZES.values()), prefix="mlp.gate_up_proj", **common)
    return QKVParallelLinear(K, HEAD_SIZE, HEADS, KV_HEADS, prefix="self_attn.qkv_proj", **common)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", ["merged", "qkv"])
@pytest.mark.parametrize("name", ALL)
def test_merged_layers_equal_separate_layers(name, kind, tp):
    seed(name, kind, tp)
    fmt = FORMATS[name]
    sizes = MERGED_SIZES if kind == "merged" else {"q": HEADS * HEAD_SIZE, "k": KV_HEADS * HEAD_SIZE, "v": KV_HEADS * HEAD_SIZE}
    shards = checkpoint(fmt, sizes)
    x = torch.randn(3, K)
    expected = {sid: separate(fmt, tensors)(x) for sid, tensors in shards.items()}

    pieces: Dict[object, List[torch.Tensor]] = {sid: [] for sid in sizes}
    for rank in range(tp):
        layer = build_merged(kind, fmt, rank, tp)
        # Shards arrive in checkpoint order, not layer order.
        load_shards(layer, dict(reversed(list(shards.items()))))
        outs = layer(x).split(layer.output_partition_sizes, dim=-1)
        replicas = getattr(layer, "num_kv_head_replicas", 1)
        for sid, out in zip(sizes, outs):
            if sid in ("k", "v") and rank % replicas:
                continue  # a replicated kv head: one copy of it is enough
            pieces[sid].append(out)
    for sid in sizes:
        got = torch.cat(pieces[sid], dim=-1)
        assert got.shape == expected[sid].shape
        assert rel_err(got, expected[sid]) <= 1e-5, sid


# --- (2) column-parallel, (3) row-parallel ----------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ALL)
def test_column_parallel_ranks_concatenate_to_the_whole(name, tp):
    seed(name, "column", tp)
    fmt = FORMATS[name]
    tensors = checkpoint(fmt, {None: 64})[None]
    x = torch.randn(3, K)
    outs = []
    for rank in range(tp):
        layer = ColumnParallelLinear(K, 64, bias=True, params_dtype=torch.float32, quant_method=fmt.method(),
                                     prefix="mlp.up_proj", tp_rank=rank, tp_size=tp)
        outs.append(load_shards(layer, {None: tensors})(x))
        assert outs[-1].shape == (3, 64 // tp)
    expected = separate(fmt, tensors)(x)
    assert rel_err(torch.cat(outs, dim=-1), expected) <= 1e-5


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ROW)
def test_row_parallel_partial_outputs_sum_to_the_whole(name, tp):
    seed(name, "row", tp)
    fmt = FORMATS[name]
    tensors = checkpoint(fmt, {None: 48})[None]
    x = torch.randn(3, K)
    total = 0
    for rank in range(tp):
        layer = RowParallelLinear(K, 48, bias=True, params_dtype=torch.float32, quant_method=fmt.method(),
                                  prefix="mlp.down_proj", tp_rank=rank, tp_size=tp)
        load_shards(layer, {None: tensors})
        total = total + layer(x.chunk(tp, dim=-1)[rank]).double()  # the bias comes from rank 0 only
    expected = separate(fmt, tensors)(x)
    # A dynamic fp8 activation scale is computed from each rank's slice of x: close, not equal.
    assert rel_err(total, expected) <= (3e-2 if fmt.dynamic_act else 1e-5)


# --- (4) shards that cut a group or a packed word: refused when the layer is built ------------------


def awq_g(group_size):
    return lambda: AWQLinearMethod(group_size=group_size)


def gptq_g(group_size, bits=4, sym=False, desc_act=False):
    return lambda: GPTQLinearMethod(bits, group_size, sym, desc_act, "gptq")


def ct_int(bits, group_size, symmetric):
    return lambda: CompressedTensorsLinearMethod.from_config(ct_int_config(bits, group_size, symmetric))


def column(n, tp):
    return lambda method: ColumnParallelLinear(K, n, quant_method=method, prefix="L.up", tp_size=tp)


def row(k, tp):
    return lambda method: RowParallelLinear(k, 48, quant_method=method, prefix="L.down", tp_size=tp)


def merged(sizes, tp=1):
    return lambda method: MergedColumnParallelLinear(K, sizes, quant_method=method, prefix="L.gate_up", tp_size=tp)


@pytest.mark.parametrize(
    "method, make, pattern",
    [
        (awq_g(32), column(48, 4), r"L\.up: awq packs 8 output features.*out_features=12 on this rank \(48 split over "
                                   r"tp_size=4\) is not a multiple of 8; use a smaller tensor-parallel size"),
        (awq_g(32), merged([32, 64], 8), r"L\.gate_up: .*out_features of logical weight 0=4 on this rank.*multiple of 8"),
        (awq_g(128), row(256, 4), r"L\.down: .*in_features=64 on this rank \(256 split over tp_size=4\) and "
                                  r"group_size=128; use a smaller tensor-parallel size"),
        (gptq_g(32), column(48, 4), r"L\.up: gptq 4-bit packs 8 zero points.*out_features=12 on this rank.*tensor-parallel"),
        (gptq_g(128), row(256, 4), r"L\.down: row-parallel gptq .*in_features=64 on this rank \(256 split over "
                                   r"tp_size=4\) is not a multiple of group_size=128; use a tensor-parallel size"),
        (gptq_g(-1, bits=8, sym=True), row(200, 4), r"L\.down: gptq 8-bit packs 4 input features.*in_features=50 on this rank"),
        (ct_int(4, 128, True), row(256, 4), r"L\.down: row-parallel .*weight_scale.*in_features=64 on this rank.*"
                                            r"group_size=128; use a tensor-parallel size"),
        # 240 = 2 ranks x 120 inputs: 2 + 2 scale groups per rank is the checkpoint's 4, so a loader
        # that only checks shapes would take it, and rank 1 would get groups 2, 3 for inputs 120..239.
        (ct_int(4, 64, True), row(240, 2), r"L\.down: row-parallel .*in_features=120 on this rank.*group_size=64"),
        (ct_int(8, None, True), row(200, 4), r"L\.down: weight_packed holds 4 input features.*in_features=50 on this rank"),
        (ct_int(4, 32, False), column(48, 4), r"L\.up: asymmetric weight_zero_point packs 8 output features.*"
                                              r"out_features=12 on this rank"),
        # 14 rows over 2 ranks: 1 + 1 zero-point words is the checkpoint's 2, but word 1 holds rows 8..13.
        (ct_int(4, 32, False), column(14, 2), r"L\.up: asymmetric weight_zero_point.*out_features=7 on this rank"),
        (ct_int(4, 32, False), merged([20, 12]), r"L\.gate_up: asymmetric weight_zero_point.*out_features of "
                                                 r"logical weight 0=20 is not a multiple of 8"),
    ],
    ids=["awq-column", "awq-merged", "awq-row-group", "gptq-column", "gptq-row-group", "gptq8-row-word",
         "ct-row-group", "ct-row-group-same-count", "ct-int8-row-word", "ct-asym-column", "ct-asym-column-same-count",
         "ct-asym-merged"],
)
def test_shard_that_cuts_a_group_or_word_is_refused_at_create_weights(method, make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(method())


def test_the_same_sizes_load_unsplit():
    """The refusals are about the split: each layer above builds with tp_size 1 (tails and padding allowed)."""
    ReplicatedLinear(K, 48, quant_method=AWQLinearMethod(group_size=32))
    ReplicatedLinear(200, 48, quant_method=GPTQLinearMethod(8, -1, True, False, "gptq"))
    ReplicatedLinear(200, 48, quant_method=ct_int(8, None, True)())
    ReplicatedLinear(K, 20, quant_method=ct_int(4, 32, False)())
    MergedColumnParallelLinear(K, [20, 12], quant_method=ct_int(4, 32, True)())  # no packed zero points


# --- GPTQ act-order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
def test_gptq_act_order_row_parallel_is_refused(tp):
    """Act-order permutes the whole K: a rank's slice of inputs holds part of every group, in unequal
    numbers, which W4A16's equal contiguous groups cannot express. Refused before loading, naming the
    layer and the way out."""
    with pytest.raises(NotImplementedError, match=r"L\.down: act-order GPTQ \(desc_act=true, group_size=32\) cannot "
                                                  rf"be split.*tp_size={tp}.*desc_act=false or static_groups=true"):
        RowParallelLinear(K, 48, quant_method=GPTQLinearMethod(4, 32, False, True, "gptq"), prefix="L.down", tp_size=tp)


def test_gptq_act_order_with_static_groups_splits_by_rank():
    """static_groups=true keeps g_idx sorted even with desc_act, so the row-parallel split is exact."""
    seed("static-groups")
    method = GPTQLinearMethod.from_config({"bits": 4, "group_size": 32, "sym": False, "desc_act": True,
                                           "static_groups": True})
    fmt = Fmt(lambda: method, lambda n, k, s: make_gptq(n, k, 4, 32, False, False, s))
    tensors = checkpoint(fmt, {None: 48})[None]
    x = torch.randn(3, K)
    total = 0
    for rank in range(4):
        layer = RowParallelLinear(K, 48, params_dtype=torch.float32, quant_method=method, tp_rank=rank, tp_size=4)
        total = total + load_shards(layer, {None: tensors})(x.chunk(4, dim=-1)[rank])
    assert rel_err(total, separate(fmt, tensors)(x)) <= 1e-5


def test_gptq_act_order_g_idx_reaching_other_ranks_is_refused_at_load():
    """A checkpoint with a shuffled g_idx but a config without desc_act: the rank's g_idx points at
    groups it does not hold; the error says so instead of computing garbage."""
    seed("shuffled")
    tensors = make_gptq(48, K, 4, 32, False, True, {})
    layer = RowParallelLinear(K, 48, bias=False, quant_method=GPTQLinearMethod(4, 32, False, False, "gptq"),
                              prefix="L.down", tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match=r"L\.down: tensor 'g_idx'.*rank 1 of 2 holds the layer's groups \[4, 8\).*"
                                         r"keep this layer unsplit"):
        load_shards(layer, {None: tensors})


def test_gptq_merged_shards_with_different_act_orders_are_refused():
    seed("two-orders")
    first, second = make_gptq(32, K, 4, 32, False, True, {}), make_gptq(64, K, 4, 32, False, True, {})
    layer = MergedColumnParallelLinear(K, [32, 64], quant_method=GPTQLinearMethod(4, 32, False, True, "gptq"),
                                       prefix="mlp.gate_up_proj")
    layer.g_idx.weight_loader(layer.g_idx, first["g_idx"], 0)
    with pytest.raises(ValueError, match=r"mlp\.gate_up_proj: tensor 'g_idx' of shard 1 differs.*separate"):
        layer.g_idx.weight_loader(layer.g_idx, second["g_idx"], 1)
    assert torch.equal(layer.g_idx.data, first["g_idx"])  # left as it was


# --- fp8 per-tensor scales: one per shard -------------------------------------------------------------


def test_fp8_per_tensor_scales_one_per_shard():
    """q, k, v each bring one scalar weight_scale; after loading every output row carries its shard's."""
    seed("fp8-scalars")
    fmt = FORMATS["ct-fp8-tensor-dynamic"]
    sizes = {"q": HEADS * HEAD_SIZE, "k": KV_HEADS * HEAD_SIZE, "v": KV_HEADS * HEAD_SIZE}
    shards = checkpoint(fmt, sizes)
    layer = load_shards(build_merged("qkv", fmt, 0, 1), shards)
    expected = torch.cat([shards[s]["weight_scale"].float().expand(n) for s, n in sizes.items()])
    assert torch.equal(layer.weight_scale, expected)
