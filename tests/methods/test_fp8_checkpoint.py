"""Serialized FP8 checkpoints (``quant_method: "fp8"``): e4m3 weights with per-tensor scales,
dynamic or static activation scales, block-wise scales (``weight_scale_inv``), ignored layers, and
the refusals (bad scales, shards that cut weight blocks)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import pymllm_fx
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE
from pymllm_fx.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod, matches_module
from checks import build_layer, rel_err, seed

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference(x, w_fp8, w_scale_rows, input_scale=None, bias=None):
    """e4m3 activations (per token when ``input_scale`` is None, else that fixed scale) times e4m3
    weights, from the definitions, in float64."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=1e-12) if input_scale is None else input_scale.float().reshape(())
    xq = (xf / s).clamp(-448, 448).to(FP8_DTYPE).double()
    out = xq @ w_fp8.double().t() * s.double() * w_scale_rows.double()
    return out if bias is None else out + bias.double()


def fp8_weight(n, k):
    return (torch.randn(n, k) * 64).clamp(-448, 448).to(FP8_DTYPE)


def load(layer, tensors, shard_ids=None):
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        if shard_ids is None:
            param.weight_loader(param, tensor)
        else:
            for shard_id, piece in zip(shard_ids, tensor):
                param.weight_loader(param, piece, shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale_shape", [(), (1,)], ids=["scalar", "shape1"])
@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_per_tensor_checkpoint(scheme, scale_shape, dtype):
    n, k = 48, 80
    seed(scheme, scale_shape, dtype)
    w = fp8_weight(n, k)
    tensors = {"weight": w, "weight_scale": torch.full(scale_shape, 0.0071)}
    if scheme == "static":
        tensors["input_scale"] = torch.full(scale_shape, 0.0123)
    method = Fp8CheckpointLinearMethod.from_config({"quant_method": "fp8", "activation_scheme": scheme})
    layer = ReplicatedLinear(k, n, bias=True, params_dtype=dtype, quant_method=method, prefix="model.layers.0.mlp.up_proj")
    bias = torch.randn(n).to(dtype)
    layer.bias.weight_loader(layer.bias, bias)
    load(layer, tensors)

    rows = torch.full((n,), 0.0071)
    assert torch.equal(layer.weight.view(torch.uint8), w.view(torch.uint8))
    assert torch.equal(layer.weight_scale, rows)  # one scale per tensor became one per row, exactly
    x = torch.randn(6, k).to(dtype) * 2
    expected = reference(x, w, rows, tensors.get("input_scale"), bias)
    assert rel_err(layer(x), expected) <= TOL[dtype]
    if scheme == "dynamic":
        assert torch.equal(layer(x), torch.ops.pymllm_fx.fp8_linear(x, w, rows, bias))
    else:
        assert torch.equal(layer.input_scale, torch.tensor([0.0123]))
        assert rel_err(reference(x, w, rows, None, bias), expected) > 1e-4  # static is not per-token
    assert scheme in method.describe(layer)


def test_static_scale_saturates():
    w = fp8_weight(8, 16)
    method = Fp8CheckpointLinearMethod(activation_scheme="static")
    layer = load(ReplicatedLinear(16, 8, bias=False, quant_method=method),
                 {"weight": w, "weight_scale": torch.tensor(0.5), "input_scale": torch.tensor(0.001)})
    x = torch.randn(3, 16) * 10  # far beyond +-0.448, the static range
    expected = reference(x.clamp(-0.448, 0.448), w, torch.full((8,), 0.5), torch.tensor(0.001))
    assert rel_err(layer(x), expected) <= 1e-6


def test_merged_layers_keep_one_scale_per_shard():
    """gate/up and q/k/v shards each bring their own per-tensor scale: each row keeps its shard's scale."""
    seed("merged")
    k = 32
    w0, w1 = fp8_weight(16, k), fp8_weight(24, k)
    method = Fp8CheckpointLinearMethod(activation_scheme="static")
    layer = MergedColumnParallelLinear(k, [16, 24], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    load(layer, {"weight": [w0, w1], "weight_scale": [torch.tensor(0.5), torch.tensor(0.25)],
                 "input_scale": [torch.tensor(0.01), torch.tensor(0.02)]}, shard_ids=[0, 1])
    rows = torch.cat([torch.full((16,), 0.5), torch.full((24,), 0.25)])
    assert torch.equal(layer.weight_scale, rows)
    assert torch.equal(layer.input_scale, torch.tensor([0.02]))  # the shards share an input: the largest scale
    x = torch.randn(2, k)
    assert rel_err(layer(x), reference(x, torch.cat([w0, w1]), rows, torch.tensor(0.02))) <= 1e-6

    qkv = QKVParallelLinear(k, 8, 2, 1, bias=False, quant_method=Fp8CheckpointLinearMethod(), prefix="attn.qkv_proj")
    wq, wk, wv = fp8_weight(16, k), fp8_weight(8, k), fp8_weight(8, k)
    load(qkv, {"weight": [wq, wk, wv], "weight_scale": [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]},
         shard_ids=["q", "k", "v"])
    assert qkv.weight_scale.tolist() == [1.0] * 16 + [2.0] * 8 + [4.0] * 8


def test_missing_shard_scale_is_caught():
    method = Fp8CheckpointLinearMethod()
    layer = MergedColumnParallelLinear(32, [16, 16], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    layer.weight.weight_loader(layer.weight, fp8_weight(32, 32))
    layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor(0.5), 0)  # shard 1's scale never comes
    with pytest.raises(ValueError, match=r"mlp.gate_up_proj: tensor 'weight_scale' holds NaN or Inf \(first at index \[1\]\)"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    "tensor, value, pattern",
    [
        ("weight_scale", float("nan"), r"'weight_scale' holds NaN or Inf"),
        ("weight_scale", float("inf"), r"'weight_scale' holds NaN or Inf"),
        ("input_scale", 0.0, r"'input_scale' holds NaN, Inf or non-positive values"),
        ("input_scale", float("nan"), r"'input_scale' holds NaN, Inf or non-positive values"),
    ],
)
def test_bad_scales(tensor, value, pattern):
    tensors = {"weight": fp8_weight(8, 16), "weight_scale": torch.tensor(0.5), "input_scale": torch.tensor(0.01)}
    tensors[tensor] = torch.tensor(value)
    layer = ReplicatedLinear(16, 8, quant_method=Fp8CheckpointLinearMethod(activation_scheme="static"), prefix="blk.proj")
    with pytest.raises(ValueError, match="blk.proj: tensor " + pattern):
        load(layer, tensors)


def test_scale_with_many_values_is_refused():
    layer = ReplicatedLinear(16, 8, quant_method=Fp8CheckpointLinearMethod(), prefix="blk.proj")
    with pytest.raises(ValueError, match=r"expected one per-tensor scale \(shape \(\) or \(1,\)\), found shape \(8, 1\)"):
        layer.weight_scale.weight_loader(layer.weight_scale, torch.ones(8, 1))


@pytest.mark.parametrize(
    "path, patterns, hit",
    [
        ("lm_head", ["lm_head"], "lm_head"),
        ("model.layers.1.mlp.down_proj", ["model.layers.1"], "model.layers.1"),
        ("model.layers.11.mlp.down_proj", ["model.layers.1"], None),  # a module boundary, not a prefix
        ("model.layers.11.mlp.down_proj", ["model.layers.*"], "model.layers.*"),
        ("model.visual.blocks.0.attn.qkv", ["down_proj", "attn.qkv"], "attn.qkv"),  # a suffix
        ("model.layers.0.mlp.gate_proj", ["mlp.gate"], None),
    ],
)
def test_ignored_layer_patterns(path, patterns, hit):
    assert matches_module(path, patterns) == hit


def test_quantize_tiny_model_with_ignored_layer(tmp_path):
    """quantize(model, method, weights=dir): one fp8 layer and one left in float by modules_to_not_convert."""
    seed("tiny-fp8")
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    w0, b0, w2, b2 = fp8_weight(48, 32), torch.randn(48), torch.randn(16, 48), torch.randn(16)
    save_file({"0.weight": w0, "0.weight_scale": torch.tensor(0.01), "0.input_scale": torch.tensor(0.02), "0.bias": b0,
               "2.weight": w2, "2.bias": b2}, str(tmp_path / "model.safetensors"))
    config = {"quant_method": "fp8", "activation_scheme": "static", "modules_to_not_convert": ["2"]}
    pymllm_fx.quantize(model, Fp8CheckpointLinearMethod.from_config(config), weights=tmp_path, progress=False,
                       example_inputs=(torch.randn(1, 32),))
    assert model[2].weight.dtype == torch.float32
    assert model[2].quant_method.describe(model[2]) == "unquantized (ignored by the checkpoint)"
    x = torch.randn(4, 32)
    h = F.gelu(reference(x, w0, torch.full((48,), 0.01), torch.tensor(0.02), b0)).float()
    assert rel_err(model(x), F.linear(h, w2, b2)) <= 1e-5


def test_from_config():
    m = Fp8CheckpointLinearMethod.from_config(
        {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "ignored_layers": ["lm_head"],
         "modules_to_not_convert": ["visual"]}
    )
    assert (m.activation_scheme, m.activation_strategy, m.weight_strategy, m.ignored_layers) == (
        "dynamic", "token", "tensor", ("lm_head", "visual"))
    assert Fp8CheckpointLinearMethod.from_config({"activation_scheme": "static"}).activation_strategy == "tensor"


@pytest.mark.parametrize(
    "config, error, pattern",
    [
        ({"activation_scheme": "static", "weight_block_size": [128, 128]}, ValueError,
         r"block-wise weight scales \(weight_block_size=\[128, 128\]\) run with dynamic activations.*"
         r"activation_scheme is 'static'; set activation_scheme 'dynamic'"),
        ({"weight_block_size": [128, 100]}, ValueError, r"block size must be two powers of two .* got \[128, 100\]"),
        ({"weight_block_size": [128]}, ValueError, r"block size must be two powers of two .* got \[128\]"),
        ({"activation_scheme": "sometimes"}, ValueError, r"activation_scheme 'sometimes' is not 'dynamic' or 'static'"),
        ({"fmt": "e5m2"}, NotImplementedError, r"fmt 'e5m2' is not supported"),
        ({"scale_fmt": "e4m3"}, NotImplementedError, r"scale_fmt 'e4m3' is not supported"),
        ({"expert_dtype": "fp4"}, NotImplementedError, r"expert_dtype.*MoE experts.*cannot honour"),
    ],
    ids=["block-static", "block-size", "block-1d", "scheme", "e5m2", "scale-fmt", "fp4-experts"],
)
def test_from_config_errors(config, error, pattern):
    with pytest.raises(error, match=pattern):
        Fp8CheckpointLinearMethod.from_config({"quant_method": "fp8", **config})


def test_compiles_without_graph_breaks():
    """The static path is plain torch: torch.compile(fullgraph=True) keeps it in one graph."""
    w = fp8_weight(16, 32)
    layer = load(ReplicatedLinear(32, 16, bias=False, quant_method=Fp8CheckpointLinearMethod(activation_scheme="static")),
                 {"weight": w, "weight_scale": torch.tensor(0.5), "input_scale": torch.tensor(0.01)})
    x = torch.randn(2, 32)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert rel_err(compiled(x), layer(x)) <= 1e-6


# --- block-wise checkpoints (DeepSeek-V3 / vLLM "fp8" with weight_block_size) --------------------

BLOCK_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


def block_quantize(w, bn=128, bk=128):
    """The format's definition, block by block: ``scale_inv = amax / 448``, ``value = e4m3(w / scale_inv)``,
    so that the weight is ``value * scale_inv``."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE)
    scale = torch.empty(-(-n // bn), -(-k // bk))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            scale[i, j] = block.abs().amax() / 448.0
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (block / scale[i, j]).to(FP8_DTYPE)
    return q, scale


def block_reference(x, q, scale, bias=None, bn=128, bk=128):
    """Activations quantized per token per group of ``bk`` (scale ``amax / 448``), times the block-scaled
    weight, one group at a time, in float64."""
    xf = x.double().reshape(-1, x.shape[-1])
    out = torch.zeros(xf.shape[0], q.shape[0], dtype=torch.float64)
    rows = torch.arange(q.shape[0]) // bn
    for g in range(scale.shape[1]):
        group = xf[:, g * bk:(g + 1) * bk]
        s = (group.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
        xq = (group / s).float().clamp(-448, 448).to(FP8_DTYPE).double()
        out += (xq @ q[:, g * bk:(g + 1) * bk].double().t()) * s * scale.double()[rows, g][None, :]
    if bias is not None:
        out += bias.double()
    return out.reshape(*x.shape[:-1], q.shape[0])


def expand_blocks(scale, n, k, bn=128, bk=128):
    return scale[torch.arange(n)[:, None] // bn, torch.arange(k)[None, :] // bk]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_checkpoint_golden(dtype):
    """N and K not multiples of 128: the last block row and column are partial."""
    seed("block-golden", dtype)
    n, k = 200, 300
    w = torch.randn(n, k) * torch.logspace(-1, 1, k)  # blocks along K need different scales
    q, scale = block_quantize(w)
    assert scale.shape == (2, 3)
    method = Fp8CheckpointLinearMethod.from_config(BLOCK_CONFIG)
    bias = torch.randn(n).to(dtype)
    layer = build_layer(method, k, n, {"weight": q, "weight_scale_inv": scale}, bias=bias, dtype=dtype,
                        prefix="model.layers.0.mlp.down_proj")
    method.process_weights_after_loading(layer)

    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.weight_scale_inv, scale)
    dequantized = layer.weight.double() * expand_blocks(layer.weight_scale_inv, n, k).double()
    bound = 2.0**-4 * w.double().abs() + 2.0**-10 * expand_blocks(scale, n, k).double()
    assert ((dequantized - w.double()).abs() <= bound).all()  # within one e4m3 rounding of the float weight

    x = (torch.randn(2, 3, k) * torch.logspace(-2, 1, k)).to(dtype)
    out = layer(x)
    assert out.shape == (2, 3, n) and out.dtype == dtype
    assert rel_err(out, block_reference(x, q, scale, bias)) <= TOL[dtype]
    # Against the float layer: two e4m3 roundings (~0.04 on Gaussian data); catches a wrong block scale.
    assert rel_err(out, x.double() @ w.double().t() + bias.double()) <= 0.06
    assert method.describe(layer) == (
        "W8A8 e4m3 checkpoint, 128x128 block weight scales, per-token-group (1x128) dynamic act")


def test_block_merged_and_parallel_layers_load_their_block_rows():
    """Shards of merged layers and tensor-parallel slices land on their own block rows / columns."""
    seed("block-shards")
    k = 256
    method = Fp8CheckpointLinearMethod(weight_block_size=(128, 128))
    (w0, s0), (w1, s1) = block_quantize(torch.randn(128, k)), block_quantize(torch.randn(256, k))
    merged = MergedColumnParallelLinear(k, [128, 256], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    load(merged, {"weight": [w0, w1], "weight_scale_inv": [s0, s1]}, shard_ids=[0, 1])
    assert torch.equal(merged.weight_scale_inv, torch.cat([s0, s1]))
    x = torch.randn(3, k)
    assert rel_err(merged(x), block_reference(x, torch.cat([w0, w1]), torch.cat([s0, s1]))) <= 1e-5
    fused = MergedColumnParallelLinear(k, [128, 256], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    load(fused, {"weight": torch.cat([w0, w1]), "weight_scale_inv": torch.cat([s0, s1])})  # one fused tensor
    assert torch.equal(fused.weight_scale_inv, merged.weight_scale_inv)

    qkv = QKVParallelLinear(k, 128, 2, 1, bias=False, quant_method=method, prefix="attn.qkv_proj")
    scales = [torch.full((2, 2), 1.0), torch.full((1, 2), 2.0), torch.full((1, 2), 4.0)]
    load(qkv, {"weight": [fp8_weight(256, k), fp8_weight(128, k), fp8_weight(128, k)], "weight_scale_inv": scales},
         shard_ids=["q", "k", "v"])
    assert qkv.weight_scale_inv[:, 0].tolist() == [1.0, 1.0, 2.0, 4.0]

    w, scale = block_quantize(torch.randn(256, 512))
    column = ColumnParallelLinear(512, 256, bias=False, quant_method=method, prefix="up", tp_rank=1, tp_size=2)
    column.weight.weight_loader(column.weight, w)
    column.weight_scale_inv.weight_loader(column.weight_scale_inv, scale)
    assert torch.equal(column.weight_scale_inv, scale[1:])
    row = RowParallelLinear(512, 256, bias=False, quant_method=method, prefix="down", tp_rank=1, tp_size=2)
    row.weight.weight_loader(row.weight, w)
    row.weight_scale_inv.weight_loader(row.weight_scale_inv, scale)
    assert torch.equal(row.weight_scale_inv, scale[:, 2:])
    x = torch.randn(2, 512)
    assert rel_err(row(x[:, 256:]), block_reference(x[:, 256:], w[:, 256:], scale[:, 2:])) <= 1e-5


def test_block_scale_name_for_compressed_tensors():
    """compressed-tensors' strategy "block" stores the same scales as ``weight_scale``; older
    versions write block_structure as "128x128"."""
    seed("block-ct")
    method = Fp8CheckpointLinearMethod.for_blocks("128x128", scale_name="weight_scale")
    assert method.weight_block_size == (128, 128)
    q, scale = block_quantize(torch.randn(64, 256))
    layer = build_layer(method, 256, 64, {"weight": q, "weight_scale": scale})
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight_scale_inv")
    x = torch.randn(2, 256)
    assert rel_err(layer(x), block_reference(x, q, scale)) <= 1e-5


def test_block_scale_of_wrong_shape_is_explained():
    q, scale = block_quantize(torch.randn(200, 300))
    method = Fp8CheckpointLinearMethod.from_config(BLOCK_CONFIG)
    with pytest.raises(ValueError, match=r"blk.proj: expected shape \(2, 3\), found \(3, 5\); 'weight_scale_inv' holds "
                                         r"one scale per 128x128 weight block, shape \(ceil\(N/128\), ceil\(K/128\)\) = "
                                         r"\(2, 3\) for this layer's \(200, 300\) weight"):
        build_layer(method, 300, 200, {"weight": q, "weight_scale_inv": torch.ones(3, 5)})


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_block_scale_nan_or_inf_is_refused(value):
    q, scale = block_quantize(torch.randn(200, 300))
    scale[1, 2] = value
    method = Fp8CheckpointLinearMethod.from_config(BLOCK_CONFIG)
    layer = build_layer(method, 300, 200, {"weight": q, "weight_scale_inv": scale})
    with pytest.raises(ValueError, match=r"blk.proj: tensor 'weight_scale_inv' holds NaN or Inf \(first at index \[1, 2\]\)"):
        method.process_weights_after_loading(layer)


def test_block_missing_shard_scale_is_caught():
    method = Fp8CheckpointLinearMethod(weight_block_size=(128, 128))
    layer = MergedColumnParallelLinear(128, [128, 128], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    layer.weight.weight_loader(layer.weight, fp8_weight(256, 128))
    layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, torch.ones(1, 1), 0)  # shard 1's never comes
    with pytest.raises(ValueError, match=r"'weight_scale_inv' holds NaN or Inf \(first at index \[1, 0\]\)"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda m: MergedColumnParallelLinear(256, [100, 156], quant_method=m, prefix="mlp.gate_up_proj"),
         r"mlp.gate_up_proj: output shards \[100, 156\] .* multiple of the 128-row weight blocks, found \[100, 156\]"
         r".*keep these projections as separate layers"),
        (lambda m: QKVParallelLinear(256, 32, 4, 2, quant_method=m, prefix="attn.qkv_proj"),
         r"attn.qkv_proj: output shards \[128, 64, 64\] .* found \[64, 64\]"),
        (lambda m: ColumnParallelLinear(256, 384, quant_method=m, prefix="mlp.up", tp_size=2),
         r"mlp.up: output shards \[192\] .*found \[192\].*tensor-parallel size"),
        (lambda m: RowParallelLinear(384, 128, quant_method=m, prefix="mlp.down", tp_size=2),
         r"mlp.down: this tensor-parallel rank holds 192 of the 384 input features, which is not a multiple of the "
         r"128-wide weight blocks"),
    ],
    ids=["merged", "qkv", "column-tp", "row-tp"],
)
def test_block_shards_must_fall_on_block_boundaries(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(Fp8CheckpointLinearMethod(weight_block_size=(128, 128)))


def test_block_unsplit_layer_may_end_mid_block():
    method = Fp8CheckpointLinearMethod(weight_block_size=(128, 128))
    assert ReplicatedLinear(200, 100, quant_method=method).weight_scale_inv.shape == (1, 2)
    assert ColumnParallelLinear(200, 100, quant_method=method).weight_scale_inv.shape == (1, 2)
