"""Weight loaders of the linear layers: full loads, shard ids, tensor-parallel slices, packed params.

Tensor parallelism is simulated by building one layer per ``tp_rank`` (no process group): each
rank's params must hold the right slice of the full checkpoint tensor, and the ranks' outputs
must recombine (concatenate for column-parallel, sum for row-parallel) into the full output.
"""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.nn import Parameter

from pymllm_fx.kernels.w4a16 import pack_words, unpack_words
from pymllm_fx.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pymllm_fx.layers.parameter import set_weight_attrs
from pymllm_fx.layers.quantize_base import LinearMethodBase


def load(param, tensor, shard_id=None):
    """Load through the param's own ``weight_loader`` attribute, as the checkpoint loader does."""
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


def chunk(t: torch.Tensor, rank: int, tp: int, dim: int = 0) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank]


# --- tp_size = 1: every layer reproduces F.linear with the full weight -------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls", [ReplicatedLinear, ColumnParallelLinear, RowParallelLinear], ids=lambda c: c.__name__)
def test_simple_layers_tp1(cls, bias):
    torch.manual_seed(0)
    layer = cls(24, 40, bias=bias, prefix="p")
    w, b = torch.randn(40, 24), torch.randn(40)
    load(layer.weight, w)
    if bias:
        load(layer.bias, b)
    x = torch.randn(2, 3, 24)
    assert torch.equal(layer.weight.data, w)
    torch.testing.assert_close(layer(x), F.linear(x, w, b if bias else None), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["shards", "shards_reversed", "fused"])
def test_merged_tp1(mode):
    torch.manual_seed(1)
    sizes = [24, 40]
    layer = MergedColumnParallelLinear(32, sizes, bias=True, prefix="mlp.gate_up_proj")
    ws = [torch.randn(s, 32) for s in sizes]
    bs = [torch.randn(s) for s in sizes]
    if mode == "fused":
        load(layer.weight, torch.cat(ws))
        load(layer.bias, torch.cat(bs))
    else:
        order = [0, 1] if mode == "shards" else [1, 0]
        for i in order:
            load(layer.weight, ws[i], i)
            load(layer.bias, bs[i], i)
    assert torch.equal(layer.weight.data, torch.cat(ws))
    assert torch.equal(layer.bias.data, torch.cat(bs))
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat(ws), torch.cat(bs)), rtol=0, atol=1e-6)


def load_qkv(layer, mode, ws, bs, order):
    """Load q/k/v weights and biases fused (one tensor, no shard id) or shard by shard in ``order``."""
    if mode == "fused":
        load(layer.weight, torch.cat([ws["q"], ws["k"], ws["v"]]))
        load(layer.bias, torch.cat([bs["q"], bs["k"], bs["v"]]))
    else:
        for sid in order:
            load(layer.weight, ws[sid], sid)
            load(layer.bias, bs[sid], sid)


@pytest.mark.parametrize("kv_heads", [None, 4, 2, 1], ids=lambda k: f"kv{k}")
@pytest.mark.parametrize("mode", ["shards", "fused"])
def test_qkv_tp1(kv_heads, mode):
    torch.manual_seed(2)
    hidden, hs, heads = 64, 8, 8
    kv = kv_heads or heads
    layer = QKVParallelLinear(hidden, hs, heads, kv_heads, bias=True, prefix="attn.qkv_proj")
    wq, wk, wv = torch.randn(heads * hs, hidden), torch.randn(kv * hs, hidden), torch.randn(kv * hs, hidden)
    bq, bk, bv = torch.randn(heads * hs), torch.randn(kv * hs), torch.randn(kv * hs)
    assert layer.weight.shape == ((heads + 2 * kv) * hs, hidden)
    load_qkv(layer, mode, {"q": wq, "k": wk, "v": wv}, {"q": bq, "k": bk, "v": bv}, order="vqk")
    full_w, full_b = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
    assert torch.equal(layer.weight.data, full_w)
    x = torch.randn(3, hidden)
    torch.testing.assert_close(layer(x), F.linear(x, full_w, full_b), rtol=0, atol=1e-5)


# --- tp_size 2 and 4 -------------------------------------------------------------------------

TPS = [2, 4]


@pytest.mark.parametrize("tp", TPS)
def test_column_parallel_slices(tp):
    torch.manual_seed(3)
    w, b = torch.randn(32, 24), torch.randn(32)
    x = torch.randn(4, 24)
    outs = []
    for rank in range(tp):
        layer = ColumnParallelLinear(24, 32, prefix="c", tp_rank=rank, tp_size=tp)
        load(layer.weight, w)
        load(layer.bias, b)
        assert layer.out_features == 32 // tp
        assert torch.equal(layer.weight.data, chunk(w, rank, tp))
        assert torch.equal(layer.bias.data, chunk(b, rank, tp))
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tp", TPS)
def test_row_parallel_slices_and_partial_sums(tp):
    torch.manual_seed(4)
    w, b = torch.randn(20, 32), torch.randn(20)
    x = torch.randn(2, 3, 32)
    total = 0
    for rank in range(tp):
        layer = RowParallelLinear(32, 20, prefix="r", tp_rank=rank, tp_size=tp)
        load(layer.weight, w)
        load(layer.bias, b)
        assert torch.equal(layer.weight.data, chunk(w, rank, tp, dim=1))
        assert torch.equal(layer.bias.data, b)  # every rank holds the bias, only rank 0 adds it
        x_r = chunk(x, rank, tp, dim=-1)
        out = layer(x_r)
        expected_partial = F.linear(x_r, chunk(w, rank, tp, dim=1), b if rank == 0 else None)
        torch.testing.assert_close(out, expected_partial, rtol=0, atol=1e-6)
        total = total + out
    torch.testing.assert_close(total, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["shards", "fused"])
@pytest.mark.parametrize("tp", TPS)
def test_merged_column_parallel_slices(tp, mode):
    torch.manual_seed(5)
    sizes = [16, 32]
    ws = [torch.randn(s, 24) for s in sizes]
    bs = [torch.randn(s) for s in sizes]
    x = torch.randn(3, 24)
    per_shard_outs: List[List[torch.Tensor]] = [[], []]
    for rank in range(tp):
        layer = MergedColumnParallelLinear(24, sizes, prefix="gate_up", tp_rank=rank, tp_size=tp)
        if mode == "fused":
            load(layer.weight, torch.cat(ws))
            load(layer.bias, torch.cat(bs))
        else:
            for i in (1, 0):
                load(layer.weight, ws[i], i)
                load(layer.bias, bs[i], i)
        expected = torch.cat([chunk(ws[0], rank, tp), chunk(ws[1], rank, tp)])
        assert torch.equal(layer.weight.data, expected)
        assert torch.equal(layer.bias.data, torch.cat([chunk(bs[0], rank, tp), chunk(bs[1], rank, tp)]))
        out = layer(x)
        gate, up = out.split([16 // tp, 32 // tp], dim=-1)
        per_shard_outs[0].append(gate)
        per_shard_outs[1].append(up)
    for i in range(2):
        torch.testing.assert_close(torch.cat(per_shard_outs[i], -1), F.linear(x, ws[i], bs[i]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["shards", "fused"])
@pytest.mark.parametrize(
    "tp, kv_heads", [(2, 8), (2, 2), (4, 8), (4, 4), (4, 2), (4, 1), (2, 1)], ids=lambda v: str(v)
)
def test_qkv_parallel_slices(tp, kv_heads, mode):
    torch.manual_seed(6)
    hidden, hs, heads = 32, 4, 8
    wq, wk, wv = torch.randn(heads * hs, hidden), torch.randn(kv_heads * hs, hidden), torch.randn(kv_heads * hs, hidden)
    bq, bk, bv = torch.randn(heads * hs), torch.randn(kv_heads * hs), torch.randn(kv_heads * hs)
    x = torch.randn(5, hidden)
    replicas = max(1, tp // kv_heads)
    kv_per_rank = max(1, kv_heads // tp)
    q_outs, k_outs, v_outs = [], [], []
    for rank in range(tp):
        layer = QKVParallelLinear(hidden, hs, heads, kv_heads, prefix="qkv", tp_rank=rank, tp_size=tp)
        load_qkv(layer, mode, {"q": wq, "k": wk, "v": wv}, {"q": bq, "k": bk, "v": bv}, order="kvq")
        q_rows = slice(rank * (heads // tp) * hs, (rank + 1) * (heads // tp) * hs)
        kv_block = rank // replicas  # with fewer kv heads than ranks, ranks share a kv head
        kv_rows = slice(kv_block * kv_per_rank * hs, (kv_block + 1) * kv_per_rank * hs)
        expected = torch.cat([wq[q_rows], wk[kv_rows], wv[kv_rows]])
        assert layer.weight.shape == expected.shape
        assert torch.equal(layer.weight.data, expected)
        assert torch.equal(layer.bias.data, torch.cat([bq[q_rows], bk[kv_rows], bv[kv_rows]]))
        q, k, v = layer(x).split([(heads // tp) * hs, kv_per_rank * hs, kv_per_rank * hs], dim=-1)
        q_outs.append(q)
        if rank % replicas == 0:  # one copy of each kv head
            k_outs.append(k)
            v_outs.append(v)
    for outs, w, b in ((q_outs, wq, bq), (k_outs, wk, bk), (v_outs, wv, bv)):
        torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b), rtol=0, atol=1e-5)


def test_qkv_replicated_kv_heads_are_identical_across_ranks():
    torch.manual_seed(7)
    wq, wk, wv = torch.randn(32, 16), torch.randn(8, 16), torch.randn(8, 16)  # 8 heads, 2 kv, hs 4
    layers = [QKVParallelLinear(16, 4, 8, 2, bias=False, tp_rank=r, tp_size=4) for r in range(4)]
    for layer in layers:
        load(layer.weight, torch.cat([wq, wk, wv]))
    k_of = [layer.weight.data[8:12] for layer in layers]  # per rank: 2 q heads (8 rows), then 1 k head
    assert torch.equal(k_of[0], k_of[1]) and torch.equal(k_of[2], k_of[3])
    assert torch.equal(k_of[0], wk[:4]) and torch.equal(k_of[2], wk[4:])
    assert not torch.equal(k_of[0], k_of[2])


# --- packed params (int4 codes, 8 per int32) -------------------------------------------------


class PackedInt4Method(LinearMethodBase):
    """Registers an int32 ``qweight`` holding 8 codes per element along the output or input dim.

    ``along="out"``: shape (out/8, in), packed_dim=0 (codes of rows 8i..8i+7 share word i).
    ``along="in"``: shape (out, in/8), packed_dim=1 (the W4A16 runtime layout).
    The weight is ``code - 8`` (symmetric, scale 1), so outputs check the placement too.
    """

    def __init__(self, along: str) -> None:
        self.along = along

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs: Any) -> None:
        out = sum(output_partition_sizes)
        if self.along == "out":
            shape, attrs = (out // 8, input_size_per_partition), {"packed_dim": 0}
        else:
            shape, attrs = (out, input_size_per_partition // 8), {"packed_dim": 1}
        qweight = Parameter(torch.empty(shape, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(qweight, {"output_dim": 0, "input_dim": 1, "packed_factor": 8, **attrs, **extra_weight_attrs})
        layer.register_parameter("qweight", qweight)

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        codes = unpack_packed(layer.qweight, self.along)
        return F.linear(x, codes.to(x.dtype) - 8, bias)


def pack(codes: torch.Tensor, along: str) -> torch.Tensor:
    """Eight codes per int32 in order (GPTQ's packing), along the input or the output dimension."""
    return pack_words(codes, 4) if along == "in" else pack_words(codes.t().contiguous(), 4).t().contiguous()


def unpack_packed(qweight: torch.Tensor, along: str) -> torch.Tensor:
    return unpack_words(qweight, 4) if along == "in" else unpack_words(qweight.t().contiguous(), 4).t()


def codes_like(rows: int, cols: int) -> torch.Tensor:
    return torch.randint(0, 16, (rows, cols), dtype=torch.uint8)


@pytest.mark.parametrize("mode", ["shards", "fused"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("along", ["out", "in"])
def test_merged_packed_shards_land_at_packed_offsets(along, tp, mode):
    torch.manual_seed(8)
    sizes, k = [32, 64], 48
    codes = [codes_like(s, k) for s in sizes]
    x = torch.randn(3, k)
    for rank in range(tp):
        layer = MergedColumnParallelLinear(k, sizes, bias=False, quant_method=PackedInt4Method(along),
                                           prefix="gate_up", tp_rank=rank, tp_size=tp)
        if mode == "fused":
            load(layer.qweight, pack(torch.cat(codes), along))
        else:
            for i in (1, 0):
                load(layer.qweight, pack(codes[i], along), i)
        local = torch.cat([chunk(c, rank, tp) for c in codes])  # this rank's logical codes
        assert torch.equal(layer.qweight.data, pack(local, along))
        if along == "out":
            # Shard 1 starts at packed row 32/tp/8, not at logical row 32/tp.
            assert torch.equal(layer.qweight.data[(32 // tp) // 8:], pack(chunk(codes[1], rank, tp), along))
        torch.testing.assert_close(layer(x), F.linear(x, local.float() - 8), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["shards", "fused"])
@pytest.mark.parametrize("tp, kv_heads", [(1, 2), (2, 2), (2, 4), (4, 2)])
@pytest.mark.parametrize("along", ["out", "in"])
def test_qkv_packed_shards_land_at_packed_offsets(along, tp, kv_heads, mode):
    torch.manual_seed(9)
    hidden, hs, heads = 32, 16, 4
    cq, ck, cv = codes_like(heads * hs, hidden), codes_like(kv_heads * hs, hidden), codes_like(kv_heads * hs, hidden)
    replicas = max(1, tp // kv_heads)
    kv_per_rank = max(1, kv_heads // tp)
    for rank in range(tp):
        layer = QKVParallelLinear(hidden, hs, heads, kv_heads, bias=False, quant_method=PackedInt4Method(along),
                                  prefix="qkv", tp_rank=rank, tp_size=tp)
        if mode == "fused":
            load(layer.qweight, pack(torch.cat([cq, ck, cv]), along))
        else:
            for sid, c in (("v", cv), ("k", ck), ("q", cq)):
                load(layer.qweight, pack(c, along), sid)
        q_rows = slice(rank * (heads // tp) * hs, (rank + 1) * (heads // tp) * hs)
        block = rank // replicas
        kv_rows = slice(block * kv_per_rank * hs, (block + 1) * kv_per_rank * hs)
        local = torch.cat([cq[q_rows], ck[kv_rows], cv[kv_rows]])
        assert torch.equal(layer.qweight.data, pack(local, along))
        x = torch.randn(2, hidden)
        torch.testing.assert_close(layer(x), F.linear(x, local.float() - 8), rtol=0, atol=1e-4)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("along", ["out", "in"])
def test_column_and_row_packed_slices(along, tp):
    torch.manual_seed(10)
    codes = codes_like(64, 128)
    x = torch.randn(2, 128)
    cols, partial = [], 0
    for rank in range(tp):
        col = ColumnParallelLinear(128, 64, bias=False, quant_method=PackedInt4Method(along), tp_rank=rank, tp_size=tp)
        load(col.qweight, pack(codes, along))
        assert torch.equal(col.qweight.data, pack(chunk(codes, rank, tp), along))
        cols.append(col(x))
        row = RowParallelLinear(128, 64, bias=False, quant_method=PackedInt4Method(along), tp_rank=rank, tp_size=tp)
        load(row.qweight, pack(codes, along))
        assert torch.equal(row.qweight.data, pack(chunk(codes, rank, tp, dim=1), along))
        partial = partial + row(chunk(x, rank, tp, dim=-1))
    full = F.linear(x, codes.float() - 8)
    torch.testing.assert_close(torch.cat(cols, -1), full, rtol=0, atol=1e-3)
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-3)


def test_merged_packed_shard_not_multiple_of_pack_factor():
    """12 + 4 rows fill two int32 rows in total, but neither shard starts/ends on a word."""
    layer = MergedColumnParallelLinear(16, [12, 4], bias=False, quant_method=PackedInt4Method("out"))
    with pytest.raises(ValueError, match="12 features cannot be packed 8 per element"):
        load(layer.qweight, torch.zeros(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        load(layer.qweight, torch.zeros(1, 16, dtype=torch.int32), 0)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, param, tensor_shape, shard_id",
    [
        (lambda: ReplicatedLinear(24, 40, prefix="p"), "weight", (40, 25), None),
        (lambda: ReplicatedLinear(24, 40, prefix="p"), "bias", (41,), None),
        (lambda: ColumnParallelLinear(24, 40, prefix="p"), "weight", (40, 23), None),
        (lambda: ColumnParallelLinear(24, 40, prefix="p", tp_rank=1, tp_size=2), "weight", (20, 24), None),
        (lambda: RowParallelLinear(24, 40, prefix="p", tp_rank=1, tp_size=2), "weight", (40, 12), None),
        (lambda: RowParallelLinear(24, 40, prefix="p"), "weight", (39, 24), None),
        (lambda: MergedColumnParallelLinear(24, [16, 8], prefix="p"), "weight", (8, 24), 0),
        (lambda: MergedColumnParallelLinear(24, [16, 8], prefix="p"), "weight", (8, 20), 1),
        (lambda: MergedColumnParallelLinear(24, [16, 8], prefix="p"), "weight", (25, 24), None),
        (lambda: QKVParallelLinear(32, 4, 8, 2, prefix="p"), "weight", (32, 32), "k"),
        (lambda: QKVParallelLinear(32, 4, 8, 2, prefix="p"), "weight", (64, 32), None),
        (lambda: QKVParallelLinear(32, 4, 8, 2, prefix="p", tp_rank=1, tp_size=4), "weight", (4, 32), "v"),
    ],
    ids=["rep-w", "rep-b", "col-w", "col-tp2", "row-tp2", "row-w", "merged-0", "merged-1", "merged-fused",
         "qkv-k", "qkv-fused", "qkv-tp4-v"],
)
def test_wrong_shape_is_refused(make, param, tensor_shape, shard_id):
    layer = make()
    p = getattr(layer, param)
    p.data.fill_(7.0)
    with pytest.raises(ValueError, match=r"expected.*found") as info:
        load(p, torch.randn(tensor_shape), shard_id)
    assert str(tuple(tensor_shape)) in str(info.value)
    assert bool((p.data == 7.0).all())  # nothing half-written


def test_wrong_dtype_is_refused():
    layer = ReplicatedLinear(8, 4, prefix="p")
    with pytest.raises(TypeError, match="expected dtype torch.float32, found torch.int64"):
        load(layer.weight, torch.ones(4, 8, dtype=torch.int64))
    packed = ReplicatedLinear(16, 8, bias=False, quant_method=PackedInt4Method("in"))
    with pytest.raises(TypeError, match="expected dtype torch.int32"):
        load(packed.qweight, torch.zeros(8, 2))  # float into the packed int32 param


@pytest.mark.parametrize(
    "make, shard_id",
    [
        (lambda: MergedColumnParallelLinear(24, [16, 8], prefix="mlp.gate_up_proj"), 2),
        (lambda: MergedColumnParallelLinear(24, [16, 8], prefix="mlp.gate_up_proj"), -1),
        (lambda: MergedColumnParallelLinear(24, [16, 8], prefix="mlp.gate_up_proj"), "q"),
        (lambda: QKVParallelLinear(32, 4, 8, 2, prefix="attn.qkv_proj"), "x"),
        (lambda: QKVParallelLinear(32, 4, 8, 2, prefix="attn.qkv_proj"), 0),
    ],
    ids=["merged-2", "merged-neg", "merged-q", "qkv-x", "qkv-0"],
)
def test_bad_shard_id_names_layer(make, shard_id):
    layer = make()
    with pytest.raises(ValueError, match=rf"{layer.prefix}.*shard id"):
        load(layer.weight, torch.randn(8, 24 if isinstance(layer, MergedColumnParallelLinear) else 32), shard_id)


def test_shard_id_on_param_without_output_dim():
    class WithScalar(PackedInt4Method):
        def create_weights(self, layer, *args, **kwargs):
            super().create_weights(layer, *args, **kwargs)
            scale = Parameter(torch.empty(()), requires_grad=False)
            set_weight_attrs(scale, {"weight_loader": kwargs["weight_loader"]})
            layer.register_parameter("global_scale", scale)

    layer = MergedColumnParallelLinear(16, [8, 8], bias=False, quant_method=WithScalar("in"), prefix="gu")
    load(layer.global_scale, torch.tensor(3.0))
    assert layer.global_scale.item() == 3.0
    with pytest.raises(ValueError, match="gu.*no output_dim"):
        load(layer.global_scale, torch.tensor(2.0), 0)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: ColumnParallelLinear(24, 30, prefix="L", tp_size=4), "output size 30"),
        (lambda: RowParallelLinear(30, 8, prefix="L", tp_size=4), "input size 30"),
        (lambda: MergedColumnParallelLinear(24, [16, 18], prefix="L", tp_size=4), "output size 18"),
        (lambda: QKVParallelLinear(32, 4, 6, 2, prefix="L", tp_size=4), "attention heads"),
        (lambda: QKVParallelLinear(32, 4, 6, 3, prefix="L", tp_size=2), "key/value heads"),
        (lambda: QKVParallelLinear(32, 4, 6, 2, prefix="L", tp_size=3), "kv heads"),
    ],
    ids=["column", "row", "merged", "qkv-heads", "qkv-kv", "qkv-kv-replicas"],
)
def test_non_divisible_tp_size(make, pattern):
    with pytest.raises(ValueError, match=rf"L: .*{pattern}.*not divisible"):
        make()


def test_kv_replication_error_states_the_real_sizes():
    """tp_size 3 cannot replicate 2 kv heads evenly: the message must say tp size 3 and 2 kv heads,
    not that something is 'not divisible by the tensor-parallel size 2'."""
    with pytest.raises(ValueError) as info:
        QKVParallelLinear(32, 4, 6, 2, prefix="L", tp_size=3)
    message = str(info.value)
    assert "tensor-parallel size 2" not in message, message
    assert "3" in message and "2" in message


@pytest.mark.parametrize("rank", [-1, 2])
def test_tp_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=r"L: tp_rank"):
        ColumnParallelLinear(8, 8, prefix="L", tp_rank=rank, tp_size=2)
