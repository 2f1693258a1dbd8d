"""compressed-tensors checkpoints: golden tensors packed here by the format's own definition.

``ct_pack`` re-implements ``pack_to_int32`` from compressed-tensors'
``compressors/quantized_compressors/pack_quantized.py`` (signed value + 2**(bits-1), value j of a
word at bits ``bits*j``, tail padded with zeros; zero points packed along the output dim), written
as the original loop rather than the method's vectorized unpacking.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import pymllm_fx
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE
from pymllm_fx.kernels.w4a16 import dequantize_int4
from pymllm_fx.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from pymllm_fx.loading.export import export_layer
from pymllm_fx.loading import CheckpointError
from pymllm_fx.methods.compressed_tensors import CompressedTensorsLinearMethod, PackedIntLinearMethod
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod, Fp8WeightOnlyLinearMethod
from pymllm_fx.methods.w8a8 import W8A8CheckpointLinearMethod
from checks import build_layer, rel_err, seed

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def ct_pack(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed integers ``(R, C)`` -> int32 words, packed along ``dim`` as compressed-tensors does."""
    per_word = 32 // bits
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    assert int(unsigned.min()) >= 0 and int(unsigned.max()) < (1 << bits)
    if dim == 0:
        unsigned = unsigned.t()
    rows, cols = unsigned.shape
    padded = -(-cols // per_word) * per_word
    unsigned = F.pad(unsigned, (0, padded - cols))
    words = torch.zeros(rows, padded // per_word, dtype=torch.int64)
    for j in range(per_word):
        words |= unsigned[:, j::per_word] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the uint32 bits as int32
    return words if dim == 1 else words.t().contiguous()


def int_config(bits=4, strategy="group", group_size=128, symmetric=True, targets=("Linear",), ignore=(), **extra):
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group_size if strategy == "group" else None, "dynamic": False, "actorder": None,
               "observer": "minmax", "observer_kwargs": {}, **extra}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": list(targets), "weights": weights, "input_activations": None,
                                      "output_activations": None}},
        "ignore": list(ignore), "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None, "version": "0.11.0",
    }


def fp8_config(weight_strategy="channel", act_strategy="token", dynamic=True, targets=("Linear",), ignore=()):
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": weight_strategy, "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": act_strategy, "dynamic": dynamic}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": list(targets), "weights": weights, "input_activations": acts}},
        "ignore": list(ignore),
    }


def make_int(n, k, bits, strategy, group_size, symmetric, dtype):
    """Checkpoint tensors of one layer, and its reference weight in float64."""
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (n, k))
    groups = -(-k // group_size) if strategy == "group" else 1
    scale = (torch.rand(n, groups) * 0.05 + 0.01).to(dtype)
    zp = torch.zeros(n, groups, dtype=torch.long) if symmetric else torch.randint(-half, half, (n, groups))
    column_group = torch.arange(k) // group_size if strategy == "group" else torch.zeros(k, dtype=torch.long)
    ref = (q - zp[:, column_group]).double() * scale.double()[:, column_group]
    tensors = {"weight_packed": ct_pack(q, bits), "weight_scale": scale, "weight_shape": torch.tensor([n, k])}
    if not symmetric:
        tensors["weight_zero_point"] = ct_pack(zp, bits, dim=0)
    return tensors, ref


def load_layer(method, k, n, tensors, bias=None, dtype=torch.float32, prefix="model.layers.0.mlp.down_proj"):
    """create_weights, each tensor through its parameter's weight_loader, then post-processing."""
    layer = build_layer(method, k, n, tensors, bias, dtype, prefix)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def runtime_weight(layer) -> torch.Tensor:
    """What the layer's runtime parameters encode, in float64."""
    scheme = layer.scheme
    if scheme.num_bits == 8:
        return layer.qweight.double() * layer.scales.double()[:, None]
    zeros = None if layer.zeros is None else layer.zeros.double()
    return dequantize_int4(layer.qweight, layer.scales.double(), zeros, scheme._runtime_group())


# --- golden words --------------------------------------------------------------------------------


def test_pack_golden_words():
    """The packer against values worked out by hand from the format's definition and docstring."""
    assert ct_pack(torch.tensor([[1, 2]]), 8).tolist() == [[33409]]  # pack_to_int32's own docstring example
    assert ct_pack(torch.arange(-8, 0)[None], 4).tolist() == [[0x76543210]]
    assert ct_pack(torch.arange(-8, 0)[:, None], 4, dim=0).tolist() == [[0x76543210]]
    assert ct_pack(torch.full((1, 8), 7), 4).tolist() == [[-1]]  # all nibbles 15: 0xFFFFFFFF


def test_int4_single_word_through_the_method():
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [7, 6, 5, 4, 3, 2, 1, 0]])
    tensors = {"weight_packed": ct_pack(q, 4), "weight_scale": torch.ones(2, 1), "weight_shape": torch.tensor([2, 8])}
    layer = load_layer(CompressedTensorsLinearMethod.from_config(int_config(strategy="group", group_size=32)), 8, 2, tensors)
    assert layer.qweight.tolist() == [[0x75316420], [0x8ACE9BDF - 2**32]]  # runtime order: features 0,2,4,6 | 1,3,5,7
    assert torch.equal(runtime_weight(layer), q.double())


def test_int8_docstring_example_through_the_method():
    tensors = {"weight_packed": torch.tensor([[33409]], dtype=torch.int32), "weight_scale": torch.tensor([[0.5]]),
               "weight_shape": torch.tensor([1, 2])}
    layer = load_layer(CompressedTensorsLinearMethod.from_config(int_config(bits=8, strategy="channel")), 2, 1, tensors)
    assert layer.qweight.tolist() == [[1, 2]] and layer.qweight.dtype == torch.int8
    assert torch.equal(runtime_weight(layer), torch.tensor([[0.5, 1.0]], dtype=torch.float64))


# --- int schemes, exact ---------------------------------------------------------------------------

INT_SCHEMES = [
    pytest.param(4, "group", 32, True, id="int4-g32-sym"),
    pytest.param(4, "group", 32, False, id="int4-g32-asym"),
    pytest.param(4, "group", 64, True, id="int4-g64-sym"),
    pytest.param(4, "group", 128, True, id="int4-g128-sym"),
    pytest.param(4, "group", 128, False, id="int4-g128-asym"),
    pytest.param(4, "channel", None, True, id="int4-channel-sym"),
    pytest.param(4, "channel", None, False, id="int4-channel-asym"),
    pytest.param(8, "channel", None, True, id="int8-channel-sym"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits, strategy, group_size, symmetric", INT_SCHEMES)
def test_int_schemes_load_exactly(bits, strategy, group_size, symmetric, dtype):
    # k=384: 3 groups of 128; channel layers use k=200 (not a multiple of 128: a runtime tail group).
    # n=36 is not a multiple of 8, so the packed zero points carry padding rows.
    k = 200 if strategy == "channel" else 384
    n = 36
    seed(bits, strategy, group_size, symmetric, dtype)
    tensors, ref = make_int(n, k, bits, strategy, group_size, symmetric, dtype)
    bias = torch.randn(n).to(dtype)
    method = CompressedTensorsLinearMethod.from_config(int_config(bits, strategy, group_size, symmetric))
    layer = load_layer(method, k, n, tensors, bias, dtype)

    assert torch.equal(runtime_weight(layer), ref)
    assert not any(hasattr(layer, name) for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"))
    x = torch.randn(3, k).to(dtype)
    expected = F.linear(x.double(), ref, bias.double())
    assert rel_err(layer(x), expected) <= TOL[dtype]
    assert layer.scales.dtype == dtype  # the checkpoint's bf16/fp32 scales fit the layer's dtype exactly


def test_float32_scales_stay_float32_in_a_bf16_layer():
    """Random float32 scales that bfloat16 cannot hold are kept in float32 rather than rounded."""
    seed("fp32-scales")
    tensors, ref = make_int(16, 64, 4, "group", 32, True, torch.float32)
    layer = load_layer(CompressedTensorsLinearMethod.from_config(int_config(group_size=32)), 64, 16, tensors, dtype=torch.bfloat16)
    assert layer.scales.dtype == torch.float32
    assert torch.equal(runtime_weight(layer), ref)


# --- fp8 schemes ----------------------------------------------------------------------------------


def fp8_reference(x, w_fp8, w_scale_rows, act, input_scale=None, bias=None):
    """The W8A8 product computed here from the definitions: e4m3 activations times e4m3 weights."""
    xf = x.float()
    if act == "token":
        s = (xf.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=1e-12)
    elif act == "tensor":
        s = (xf.abs().amax() / 448.0).clamp(min=1e-12)
    else:
        s = input_scale.float().reshape(())
    xq = (xf / s).clamp(-448, 448).to(FP8_DTYPE).double()
    out = xq @ w_fp8.double().t() * s.double() * w_scale_rows.double()
    return out if bias is None else out + bias.double()


def make_fp8(n, k, weight_strategy, dtype):
    w = (torch.randn(n, k) * 64).clamp(-448, 448).to(FP8_DTYPE)
    if weight_strategy == "tensor":
        scale = torch.tensor([0.0123])
        rows = scale.expand(n)
    else:
        scale = (torch.rand(n, 1) * 0.02 + 0.001).to(dtype)
        rows = scale.float().reshape(n)
    return {"weight": w, "weight_scale": scale}, rows


FP8_ACTS = [
    pytest.param("token", True, id="dynamic-token"),
    pytest.param("tensor", True, id="dynamic-tensor"),
    pytest.param("tensor", False, id="static-tensor"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act_strategy, dynamic", FP8_ACTS)
@pytest.mark.parametrize("weight_strategy", ["tensor", "channel"])
def test_fp8_schemes(weight_strategy, act_strategy, dynamic, dtype):
    n, k = 40, 96
    seed(weight_strategy, act_strategy, dynamic, dtype)
    tensors, rows = make_fp8(n, k, weight_strategy, dtype)
    if not dynamic:
        tensors["input_scale"] = torch.tensor([0.01])
    bias = torch.randn(n).to(dtype)
    method = CompressedTensorsLinearMethod.from_config(fp8_config(weight_strategy, act_strategy, dynamic))
    layer = load_layer(method, k, n, tensors, bias, dtype)
    assert isinstance(layer.scheme, Fp8CheckpointLinearMethod)
    # The e4m3 values are untouched; the scale became one float32 per row, exactly.
    assert torch.equal(layer.weight.view(torch.uint8), tensors["weight"].view(torch.uint8))
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, rows.float())

    x = torch.randn(5, k).to(dtype) * 3
    act = act_strategy if dynamic else "static"
    expected = fp8_reference(x, tensors["weight"], rows, act, tensors.get("input_scale"), bias)
    assert rel_err(layer(x), expected) <= TOL[dtype]
    if act != "token":  # a per-tensor scale gives other fp8 values than per-token scales
        assert rel_err(fp8_reference(x, tensors["weight"], rows, "token", None, bias), expected) > 1e-4


def test_static_input_scale_clamps():
    """Activations beyond 448 * input_scale saturate, as static quantization defines."""
    tensors, rows = make_fp8(8, 16, "tensor", torch.float32)
    tensors["input_scale"] = torch.tensor([0.001])  # representable range +-0.448
    layer = load_layer(CompressedTensorsLinearMethod.from_config(fp8_config("tensor", "tensor", False)), 16, 8, tensors)
    x = torch.randn(2, 16) * 10
    assert rel_err(layer(x), fp8_reference(x.clamp(-0.448, 0.448), tensors["weight"], rows, "static", tensors["input_scale"])) <= 1e-6


# --- which scheme a layer gets --------------------------------------------------------------------


def mixed_config():
    int4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    int4_channel = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    fp8_act = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    return {
        "quant_method": "compressed-tensors", "format": "mixed-precision",
        "config_groups": {
            "down": {"targets": ["re:.*mlp\\.down_proj$"], "weights": int4, "format": "pack-quantized"},
            "all": {"targets": ["Linear"], "weights": fp8, "input_activations": fp8_act, "format": "float-quantized"},
            "q0": {"targets": ["model.layers.0.self_attn.q_proj"], "weights": int4_channel, "format": "pack-quantized"},
        },
        "ignore": ["lm_head", "re:.*layers\\.1\\.mlp\\..*"],
    }


@pytest.mark.parametrize(
    "prefix, group, kind",
    [
        ("model.layers.0.mlp.down_proj", "down", "W4A16 g32 sym"),  # a regex beats the class name
        ("model.layers.0.self_attn.q_proj", "q0", "W4A16 per-channel asym"),  # an exact name beats both
        ("model.layers.0.self_attn.k_proj", "all", "W8A8 e4m3"),  # only the class name matches
        ("model.layers.1.mlp.down_proj", "", "unquantized (compressed-tensors ignore"),  # ignore wins
        ("model.layers.1.self_attn.k_proj", "all", "W8A8 e4m3"),
        ("lm_head", "", "unquantized (compressed-tensors ignore 'lm_head')"),
    ],
)
def test_scheme_by_target_and_ignore(prefix, group, kind):
    method = CompressedTensorsLinearMethod.from_config(mixed_config())
    layer = ReplicatedLinear(64, 32, bias=False, quant_method=method, prefix=prefix)
    assert layer.scheme_group == group
    assert kind in method.describe(layer)
    if group == "":
        assert layer.weight.dtype == torch.float32 and set(dict(layer.named_parameters())) == {"weight"}


def test_layer_no_group_targets_stays_float():
    method = CompressedTensorsLinearMethod.from_config(int_config(targets=["re:.*down_proj"]))
    layer = ReplicatedLinear(64, 32, quant_method=method, prefix="model.layers.0.self_attn.q_proj")
    assert method.describe(layer) == "unquantized (no compressed-tensors config group targets it)"
    w, b = torch.randn(32, 64), torch.randn(32)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, b)
    method.process_weights_after_loading(layer)
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), F.linear(x, w, b))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 40, bias=False)
        self.head = nn.Linear(40, 24)

    def forward(self, x):
        return self.head(F.gelu(self.down(F.gelu(self.up(x)))))


def test_quantize_tiny_model_from_safetensors(tmp_path):
    """quantize(model, method, weights=dir): int4 asym group, fp8 static channel, an ignored layer."""
    seed("tiny")
    int4 = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    fp8_static = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    config = {
        "quant_method": "compressed-tensors", "format": "mixed-precision",
        "config_groups": {
            "group_0": {"targets": ["re:^up$"], "weights": int4, "format": "pack-quantized"},
            "group_1": {"targets": ["Linear"], "weights": fp8, "input_activations": fp8_static, "format": "float-quantized"},
        },
        "ignore": ["head"],
    }
    up, up_ref = make_int(96, 64, 4, "group", 32, False, torch.float32)
    down, down_rows = make_fp8(40, 96, "channel", torch.float32)
    down["input_scale"] = torch.tensor([0.02])
    head_w, head_b, up_b = torch.randn(24, 40), torch.randn(24), torch.randn(96)
    state = {f"up.{k}": v for k, v in up.items()} | {f"down.{k}": v for k, v in down.items()}
    state |= {"up.bias": up_b, "head.weight": head_w, "head.bias": head_b}
    save_file(state, str(tmp_path / "model.safetensors"))

    model = Tiny()
    method = CompressedTensorsLinearMethod.from_config(config)
    pymllm_fx.quantize(model, method, weights=tmp_path, progress=False, example_inputs=(torch.randn(1, 64),))
    assert [model.up.scheme_group, model.down.scheme_group, model.head.scheme_group] == ["group_0", "group_1", ""]

    x = torch.randn(4, 64)
    h = F.gelu(F.linear(x.double(), up_ref, up_b.double())).float()
    h = F.gelu(fp8_reference(h, down["weight"], down_rows, "static", down["input_scale"])).float()
    expected = F.linear(h, head_w, head_b)
    assert rel_err(model(x), expected) <= 1e-5
    # The per-layer scheme dispatch traces into one graph.
    assert rel_err(torch.compile(model, fullgraph=True, backend="eager")(x), model(x)) <= 1e-6


# --- errors ----------------------------------------------------------------------------------------


def test_wrong_group_size_for_the_checkpoint(tmp_path):
    """Config says group_size 64, the checkpoint has a scale per 32 inputs: a loading error that says so."""
    tensors, _ = make_int(16, 128, 4, "group", 32, True, torch.float32)
    method = CompressedTensorsLinearMethod.from_config(int_config(group_size=64))
    layer = ReplicatedLinear(128, 16, bias=False, quant_method=method, prefix="proj")
    with pytest.raises(ValueError, match=r"expected shape \(16, 2\), found \(16, 4\); group_size=64 gives 2 scales"):
        layer.weight_scale.weight_loader(layer.weight_scale, tensors["weight_scale"])
    # Through quantize(), the same message comes back naming the layer and the tensor.
    model = nn.Sequential(OrderedDict(proj=nn.Linear(128, 16, bias=False)))
    save_file({f"proj.{k}": v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"proj: tensor 'proj.weight_scale': .*another group_size"):
        pymllm_fx.quantize(model, method, weights=tmp_path, progress=False, example_inputs=(torch.randn(1, 128),))
    assert isinstance(model.proj, nn.Linear)  # left unchanged


def test_wrong_bits_for_the_checkpoint():
    tensors, _ = make_int(16, 64, 8, "channel", None, True, torch.float32)  # 8-bit words: 16 per row
    method = CompressedTensorsLinearMethod.from_config(int_config(bits=4, strategy="channel"))
    layer = ReplicatedLinear(64, 16, bias=False, quant_method=method, prefix="proj")
    with pytest.raises(ValueError, match=r"found \(16, 16\); 4-bit weights pack 8 values per int32.*num_bits"):
        layer.weight_packed.weight_loader(layer.weight_packed, tensors["weight_packed"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("config", [int_config(group_size=32), fp8_config("channel")], ids=["int4", "fp8"])
def test_nan_inf_scales(config, bad):
    if config["format"] == "pack-quantized":
        tensors, _ = make_int(8, 64, 4, "group", 32, True, torch.float32)
    else:
        tensors, _ = make_fp8(8, 64, "channel", torch.float32)
    tensors["weight_scale"][3, 0] = bad
    with pytest.raises(ValueError, match=r"proj: tensor 'weight_scale' holds NaN or Inf \(first at index \[3, 0\]\)"):
        load_layer(CompressedTensorsLinearMethod.from_config(config), 64, 8, tensors, prefix="proj")


def test_weight_shape_mismatch():
    layer = ReplicatedLinear(64, 8, bias=False, quant_method=CompressedTensorsLinearMethod.from_config(int_config(group_size=32)))
    with pytest.raises(ValueError, match=r"weight_shape says the checkpoint weight is \[8, 72\], but this layer is \[out=8, in=64\]"):
        layer.weight_shape.weight_loader(layer.weight_shape, torch.tensor([8, 72]))


def test_in_features_not_a_multiple_of_8_for_int4():
    method = CompressedTensorsLinearMethod.from_config(int_config(strategy="channel"))
    with pytest.raises(ValueError, match=r"blk.proj: .*in_features=60 is not a multiple of 8; add this layer to skip"):
        ReplicatedLinear(60, 8, quant_method=method, prefix="blk.proj")


def _with_weights(**changes):
    config = int_config()
    config["config_groups"]["group_0"]["weights"].update(changes)
    return config


@pytest.mark.parametrize(
    "config, error, pattern",
    [
        (_with_weights(strategy="rowwise"), ValueError, r"unknown strategy 'rowwise'"),
        (_with_weights(group_size=96), ValueError, r"group_size 96 is not supported"),
        (_with_weights(num_bits=3), ValueError, r"num_bits=3 is not supported"),
        (_with_weights(strategy="tensor", group_size=None), NotImplementedError, r"int weight strategy 'tensor'"),
        (_with_weights(num_bits=8), NotImplementedError, r"8-bit weights load only as symmetric 'channel'"),
        (_with_weights(typo=1), ValueError, r"unknown keys \['typo'\]"),
        (fp8_config() | {"kv_cache_scheme": {"num_bits": 8}}, NotImplementedError, r"kv_cache_scheme"),
        (int_config() | {"moe_sparsity_config": {"method": "prune"}}, NotImplementedError, r"prunes MoE experts"),
        (int_config() | {"format": "int-quantized"}, NotImplementedError, r"int weights load from format 'pack-quantized'"),
        (int_config() | {"config_groups": {"W4A16": ["Linear"]}}, NotImplementedError, r"preset scheme name"),
    ],
    ids=["unknown-strategy", "group-96", "bits-3", "int-tensor", "int8-group", "args-key",
         "kv-cache", "moe-sparsity", "int-quantized", "preset"],
)
def test_config_errors(config, error, pattern):
    with pytest.raises(error, match=pattern):
        CompressedTensorsLinearMethod.from_config(config)


def test_fp8_config_errors():
    block = fp8_config()  # per-token activations: FP8_BLOCK quantizes them per group of 128
    block["config_groups"]["group_0"]["weights"].update(strategy="block", block_structure=[128, 128])
    with pytest.raises(NotImplementedError, match=r"block-wise fp8 weights \(block_structure \[128, 128\]\) run with "
                                                  r"dynamic input_activations of strategy 'group'"):
        CompressedTensorsLinearMethod.from_config(block)
    weight_only = fp8_config()
    weight_only["config_groups"]["group_0"]["input_activations"] = None
    weight_only["config_groups"]["group_0"]["weights"].update(strategy="block", block_structure=[128, 128])
    with pytest.raises(NotImplementedError, match=r"fp8 weight-only weights load with strategy 'tensor' or 'channel', not 'block'"):
        CompressedTensorsLinearMethod.from_config(weight_only)
    int8_acts = int_config(bits=8, strategy="channel")
    int8_acts["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    with pytest.raises(NotImplementedError, match=r"W8A8 .* loads from format 'int-quantized', not 'pack-quantized'"):
        CompressedTensorsLinearMethod.from_config(int8_acts)
    group_acts = fp8_config()
    group_acts["config_groups"]["group_0"]["input_activations"].update(strategy="group", group_size=128)
    with pytest.raises(NotImplementedError, match=r"input_activations strategy 'group'"):
        CompressedTensorsLinearMethod.from_config(group_acts)


def test_strategy_inferred_from_group_size():
    """compressed-tensors infers the strategy when it is missing: -1 is channel, a positive size is group."""
    channel = _with_weights(strategy=None, group_size=-1)
    group = _with_weights(strategy=None, group_size=64)
    assert CompressedTensorsLinearMethod.from_config(channel).targets["Linear"][1] == PackedIntLinearMethod(4, "channel", None, True)
    assert CompressedTensorsLinearMethod.from_config(group).targets["Linear"][1] == PackedIntLinearMethod(4, "group", 64, True)


def test_fp8_block_preset_loads_and_matches_the_block_definition():
    """FP8_BLOCK: e4m3 weight, one ``weight_scale`` per 128x128 block, activations per token and group of 128."""
    from pymllm_fx.kernels.fp8_block import dequantize_fp8_block, quantize_fp8_per_token_group

    seed("fp8-block")
    config = fp8_config(weight_strategy="block", act_strategy="group")
    config["config_groups"]["group_0"]["weights"]["block_structure"] = [128, 128]
    config["config_groups"]["group_0"]["input_activations"]["group_size"] = 128
    method = CompressedTensorsLinearMethod.from_config(config)
    n, k = 200, 256
    weight = (torch.randn(n, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2) * 0.01 + 0.001
    layer = build_layer(method, k, n, {"weight": weight, "weight_scale": scale})
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, k)
    xq, xs = quantize_fp8_per_token_group(x, 128)
    x_deq = (xq.double().view(3, 2, 128) * xs.double()[..., None]).view(3, k)
    expected = x_deq @ dequantize_fp8_block(weight, scale, (128, 128)).double().t()
    assert rel_err(layer(x), expected) <= 1e-5


# --- W8A8 int8 (int-quantized) --------------------------------------------------------------------
# compressed-tensors' IntQuantizationCompressor (compressors/naive_quantized/base.py) stores the
# int8 ``weight`` as it is, ``weight_scale`` (N, 1) for "channel" or (1,) for "tensor" in the
# model's dtype, and for static activations ``input_scale`` (1,) plus, only when they are
# asymmetric, ``input_zero_point`` (1,) int8 (``_remove_symmetric_zp`` drops it otherwise).


def w8a8_config(weight_strategy="channel", act="dynamic", fmt="int-quantized"):
    """The W8A8 preset (dynamic) or its static variants, as llm-compressor's config.json has them."""
    common = {"group_size": None, "block_structure": None, "actorder": None, "observer_kwargs": {}}
    weights = {**common, "num_bits": 8, "type": "int", "symmetric": True, "strategy": weight_strategy,
               "dynamic": False, "observer": "minmax"}
    dynamic = act == "dynamic"
    acts = {**common, "num_bits": 8, "type": "int", "symmetric": act != "static-asym",
            "strategy": "token" if dynamic else "tensor", "dynamic": dynamic, "observer": None if dynamic else "minmax"}
    if act == "static-asym":
        acts["zp_dtype"] = "torch.int8"
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": fmt}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None, "version": "0.12.2",
    }


def make_w8a8(n, k, weight_strategy, act, dtype, input_scale=0.03, zero=-9):
    """One layer's checkpoint tensors, and its weight scale per output row in float32."""
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    if weight_strategy == "tensor":
        scale = torch.tensor([0.0123]).to(dtype)
        rows = scale.float().expand(n)
    else:
        scale = (torch.rand(n, 1) * 0.02 + 0.001).to(dtype)
        rows = scale.float().reshape(n)
    tensors = {"weight": q, "weight_scale": scale}
    if act != "dynamic":
        tensors["input_scale"] = torch.tensor([input_scale]).to(dtype)
    if act == "static-asym":
        tensors["input_zero_point"] = torch.tensor([zero], dtype=torch.int8)
    return tensors, rows


def w8a8_definition(x, tensors, rows, act, bias=None):
    """The scheme's product, from its definition: activations to int8 (per token: max|x| / 127 as
    vLLM runs the W8A8 preset; static: the checkpoint's scale and zero point, values beyond the int8
    range clamp), then (xq - z) @ q.T times both scales, in float64."""
    xf = x.float()
    if act == "dynamic":
        s = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
        z = torch.zeros(())
    else:
        s = tensors["input_scale"].float()
        z = tensors.get("input_zero_point", torch.zeros(1)).float()
    xq = (torch.round(xf / s) + z).clamp(-128, 127)
    out = ((xq - z).double() @ tensors["weight"].double().t()) * s.double() * rows.double()
    return out if bias is None else out + bias.double()


W8A8_ACTS = ["dynamic", "static", "static-asym"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", W8A8_ACTS)
@pytest.mark.parametrize("weight_strategy", ["channel", "tensor"])
def test_w8a8_schemes_match_the_definition(weight_strategy, act, dtype):
    n, k = 40, 96
    seed("w8a8", weight_strategy, act, dtype)
    tensors, rows = make_w8a8(n, k, weight_strategy, act, dtype)
    bias = torch.randn(n).to(dtype)
    layer = load_layer(CompressedTensorsLinearMethod.from_config(w8a8_config(weight_strategy, act)), k, n, tensors, bias, dtype)
    assert isinstance(layer.scheme, W8A8CheckpointLinearMethod)
    assert torch.equal(layer.qweight, tensors["weight"])  # the codes as stored
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, rows)
    if act == "static-asym":
        assert torch.equal(layer.weight_sums, tensors["weight"].sum(1, dtype=torch.int32))
    x = torch.randn(5, k).to(dtype) * 3  # some activations beyond the static range clamp
    expected = w8a8_definition(x, tensors, rows, act, bias)
    assert rel_err(layer(x), expected) <= TOL[dtype]
    if act != "dynamic":  # a per-tensor scale gives other int8 values than per-token scales
        assert rel_err(w8a8_definition(x, tensors, rows, "dynamic", bias), expected) > 1e-3


def test_w8a8_zero_point_shifts_the_range():
    """Asymmetric static activations: the zero point moves the representable range to
    [(-128 - z) * s, (127 - z) * s]; values outside clamp there."""
    tensors, rows = make_w8a8(8, 16, "channel", "static-asym", torch.float32, input_scale=0.01, zero=100)
    layer = load_layer(CompressedTensorsLinearMethod.from_config(w8a8_config("channel", "static-asym")), 16, 8, tensors)
    x = torch.linspace(-3, 1, 32).reshape(2, 16)
    clamped = x.clamp(-2.28, 0.27)  # (-128 - 100) * 0.01, (127 - 100) * 0.01
    expected = (torch.round(clamped / 0.01).double() @ tensors["weight"].double().t()) * 0.01 * rows.double()
    assert rel_err(layer(x), expected) <= 1e-6


def test_w8a8_merged_shards_need_one_input_scale():
    tensors, _ = make_w8a8(16, 32, "channel", "static", torch.float32)
    method = CompressedTensorsLinearMethod.from_config(w8a8_config("channel", "static"))
    layer = MergedColumnParallelLinear(32, [16, 16], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    for shard in (0, 1):
        for name, tensor in tensors.items():
            getattr(layer, name).weight_loader(getattr(layer, name), tensor, shard)
    method.process_weights_after_loading(layer)
    assert torch.equal(layer.input_scale, tensors["input_scale"])

    layer = MergedColumnParallelLinear(32, [16, 16], bias=False, quant_method=method, prefix="mlp.gate_up_proj")
    for shard, scale in ((0, 0.03), (1, 0.05)):
        for name, tensor in {**tensors, "input_scale": torch.tensor([scale])}.items():
            getattr(layer, name).weight_loader(getattr(layer, name), tensor, shard)
    with pytest.raises(ValueError, match=r"mlp\.gate_up_proj: the merged projections .* different static input_scale"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (("input_scale", torch.tensor([float("nan")])), ValueError, r"proj: tensor 'input_scale' holds NaN, Inf or non-positive"),
        (("input_scale", torch.tensor([0.0])), ValueError, r"proj: tensor 'input_scale' holds NaN, Inf or non-positive"),
        (("input_zero_point", torch.tensor([300], dtype=torch.int32)), ValueError, r"zero point 300 is outside the int8 range"),
        (("input_zero_point", torch.tensor([1.0])), TypeError, r"expected an integer zero point"),
        (("weight", torch.zeros(8, 16, dtype=torch.int32)), TypeError, r"expected dtype torch.int8"),
        (("weight_scale", torch.ones(8, 2)), ValueError, r"one weight_scale per output row"),
    ],
    ids=["nan-scale", "zero-scale", "zero-point-range", "float-zero-point", "int32-weight", "scale-shape"],
)
def test_w8a8_bad_tensors(change, error, pattern):
    tensors, _ = make_w8a8(8, 16, "channel", "static-asym", torch.float32)
    tensors[change[0]] = change[1]
    with pytest.raises(error, match=pattern):
        load_layer(CompressedTensorsLinearMethod.from_config(w8a8_config("channel", "static-asym")), 16, 8, tensors, prefix="proj")


def _w8a8_with(weights=None, acts=None, **top):
    config = w8a8_config()
    group = config["config_groups"]["group_0"]
    group["weights"].update(weights or {})
    group["input_activations"].update(acts or {})
    return config | top


@pytest.mark.parametrize(
    "config, pattern",
    [
        (w8a8_config(fmt="pack-quantized"), r"W8A8 \(int weights, int activations\) loads from format 'int-quantized', not 'pack-quantized'"),
        (_w8a8_with(acts={"symmetric": False}), r"asymmetric dynamic int8 input_activations"),
        (_w8a8_with(acts={"strategy": "tensor"}), r"input_activations strategy 'tensor' \(dynamic=True\)"),
        (_w8a8_with(acts={"dynamic": "local"}), r"input_activations strategy 'token' \(dynamic=local\)"),
        (_w8a8_with(weights={"strategy": "group", "group_size": 128}), r"W8A8 int8 weight strategy 'group'"),
        (_w8a8_with(weights={"num_bits": 4}), r"W4A8 \(int weights, int activations\) is not supported"),
        (_w8a8_with(acts={"type": "float"}), r"W8A8 \(int weights, float activations\) is not supported"),
        (_w8a8_with(weights={"symmetric": False}), r"static symmetric weights"),
        (_w8a8_with(weights={"actorder": "group"}), r"without activation ordering"),
    ],
    ids=["pack-quantized", "dynamic-asym", "dynamic-tensor", "dynamic-local", "weight-group", "w4a8", "float-acts",
         "asym-weights", "actorder"],
)
def test_w8a8_config_errors(config, pattern):
    with pytest.raises(NotImplementedError, match=pattern):
        CompressedTensorsLinearMethod.from_config(config)


def w8a8_checkpoint(model, path, act, dtype):
    """A compressed-tensors W8A8 checkpoint of ``model`` written here by the format's definition
    (every linear but lm_head: int8 codes round(w / s) with s = max|w_row| / 127 in ``dtype``;
    static activations with a scale and zero point per layer). Returns the written tensors."""
    import json

    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for i, (name, module) in enumerate(n for n in model.named_modules() if isinstance(n[1], nn.Linear)):
        if name == "lm_head":
            continue
        w = state.pop(f"{name}.weight").float()
        scale = (w.abs().amax(1, keepdim=True) / 127).to(dtype)
        state[f"{name}.weight"] = torch.round(w / scale.float()).clamp(-128, 127).to(torch.int8)
        state[f"{name}.weight_scale"] = scale
        if act != "dynamic":
            state[f"{name}.input_scale"] = torch.tensor([0.01 + 0.002 * i]).to(dtype)
        if act == "static-asym":
            state[f"{name}.input_zero_point"] = torch.tensor([(-1) ** i * (i % 7)], dtype=torch.int8)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    config = model.config.to_dict() | {"quantization_config": w8a8_config("channel", act)}
    (path / "config.json").write_text(json.dumps(config))
    return state


def simulate_w8a8(model, state, act):
    """``model`` with each W8A8 linear replaced by its definition (fake quantization, float32)."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if f"{name}.weight_scale" not in state:
            continue
        module.weight.data = state[f"{name}.weight"].float() * state[f"{name}.weight_scale"].float()

        def fake_quantize(mod, args, name=name):
            x = args[0].float()
            if act == "dynamic":
                s, z = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12), 0.0
            else:
                s = state[f"{name}.input_scale"].float()
                z = state[f"{name}.input_zero_point"].float() if act == "static-asym" else 0.0
            return ((torch.round(x / s) + z).clamp(-128, 127) - z) * s,

        module.register_forward_pre_hook(fake_quantize)
    return model


@pytest.mark.parametrize("act, dtype", [(act, torch.float32) for act in W8A8_ACTS] + [("static-asym", torch.bfloat16)],
                         ids=W8A8_ACTS + ["static-asym-bf16"])
def test_w8a8_checkpoint_from_pretrained_and_saved_back_exactly(tmp_path, act, dtype):
    """A W8A8 checkpoint built here (scales in the model's dtype, as llm-compressor writes them)
    loads through from_pretrained, computes its definition, and save_quantized writes the same
    tensors back, dtypes included."""
    from hf_models import build_model
    import json

    torch.manual_seed(0)
    float_model = build_model("llama").to(dtype)
    float_model.config.dtype = dtype
    state = w8a8_checkpoint(float_model, tmp_path / "src", act, dtype)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    as_fp32 = pymllm_fx.from_pretrained(tmp_path / "src", dtype=torch.float32, progress=False)  # bf16 would blur the check
    with torch.no_grad():
        out, expected = as_fp32(ids).logits, simulate_w8a8(float_model.float(), state, act)(ids).logits
    assert rel_err(out, expected) <= 1e-5
    model = pymllm_fx.from_pretrained(tmp_path / "src", progress=False)
    assert model.lm_head.weight.dtype == dtype
    # Siblings share one input: dynamic layers quantize it once as one fused call (under compile);
    # a static scale is one value per layer, not per row, and keeps them apart.
    report = pymllm_fx.explain(model, file=None)
    if act == "dynamic":
        assert len(report.fused_groups) == 4
    else:
        assert not report.fused_groups and "input_scale is not one contiguous row" in str(report.unfused_groups)

    pymllm_fx.save_quantized(model, tmp_path / "out", format="compressed-tensors", progress=False)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        written = {name: f.get_tensor(name) for name in f.keys()}
    assert sorted(written) == sorted(state)
    for name, tensor in state.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    source = w8a8_config("channel", act)
    assert config["format"] == "int-quantized" and config["ignore"] == source["ignore"]
    (group,) = config["config_groups"].values()
    for key in ("weights", "input_activations"):
        for arg in ("num_bits", "type", "symmetric", "strategy", "dynamic"):
            assert group[key][arg] == source["config_groups"]["group_0"][key][arg], (key, arg)


# --- int4 actorder "group" (weight_g_idx) ---------------------------------------------------------
# compressed-tensors' _process_group sorts the inputs by weight_g_idx (argsort) and quantizes group
# i of the sorted inputs with scale column i; weight_packed keeps the original input order.


def act_order_g_idx(k, group_size, seed_value):
    """A GPTQ act-order numbering: the groups of group_size inputs in a random order of the inputs."""
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed_value))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k, group_size", [(128, 32), (256, 128)])
def test_actorder_group_matches_the_definition_and_saves_back(k, group_size, symmetric):
    n = 24
    seed("actorder", k, group_size, symmetric)
    q = torch.randint(-8, 8, (n, k))
    groups = k // group_size
    scale = torch.rand(n, groups) * 0.05 + 0.01
    zp = torch.randint(-8, 8, (n, groups)) if not symmetric else torch.zeros(n, groups, dtype=torch.long)
    g_idx = act_order_g_idx(k, group_size, k + group_size)
    ref = (q - zp[:, g_idx.long()]).double() * scale.double()[:, g_idx.long()]  # the definition, column by column
    tensors = {"weight_packed": ct_pack(q, 4), "weight_scale": scale, "weight_shape": torch.tensor([n, k]),
               "weight_g_idx": g_idx}
    if not symmetric:
        tensors["weight_zero_point"] = ct_pack(zp, 4, dim=0)
    config = int_config(group_size=group_size, symmetric=symmetric, actorder="group")
    layer = load_layer(CompressedTensorsLinearMethod.from_config(config), k, n, tensors)
    assert layer.scheme.actorder and "act-order" in layer.scheme.describe(layer)
    x = torch.randn(3, k)
    assert rel_err(layer(x), x.double() @ ref.t()) <= 1e-5
    written = export_layer(layer, "compressed-tensors", ["model.layers.0.mlp.down_proj"])
    expected = {f"model.layers.0.mlp.down_proj.{name}": t for name, t in tensors.items()}
    assert sorted(written) == sorted(expected)
    for name, t in expected.items():
        assert written[name].dtype == t.dtype and torch.equal(written[name], t), name


def test_actorder_bad_g_idx_and_row_parallel_split():
    tensors, _ = make_int(8, 64, 4, "group", 32, True, torch.float32)
    tensors["weight_g_idx"] = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)  # groups of 40 and 24
    method = CompressedTensorsLinearMethod.from_config(int_config(group_size=32, actorder="group"))
    with pytest.raises(ValueError, match=r"proj: tensor 'weight_g_idx' does not split the 64 inputs into groups of 32"):
        load_layer(method, 64, 8, tensors, prefix="proj")
    with pytest.raises(NotImplementedError, match=r"down: actorder 'group' \(weight_g_idx\) .* keep this layer unsplit"):
        RowParallelLinear(64, 8, bias=False, quant_method=method, prefix="down", tp_rank=0, tp_size=2)


# --- fp8 weight-only (float-quantized, no input_activations) --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight_strategy", ["tensor", "channel"])
def test_fp8_weight_only_keeps_activations_in_float_and_saves_back(weight_strategy, dtype):
    n, k = 40, 96
    seed("fp8-wo", weight_strategy, dtype)
    tensors, rows = make_fp8(n, k, weight_strategy, dtype)
    bias = torch.randn(n).to(dtype)
    config = fp8_config(weight_strategy)
    config["config_groups"]["group_0"]["input_activations"] = None
    layer = load_layer(CompressedTensorsLinearMethod.from_config(config), k, n, tensors, bias, dtype)
    assert isinstance(layer.scheme, Fp8WeightOnlyLinearMethod)
    assert torch.equal(layer.qweight.view(torch.uint8), tensors["weight"].view(torch.uint8))
    x = torch.randn(5, k).to(dtype) * 3
    expected = x.double() @ (tensors["weight"].double() * rows.double()[:, None]).t() + bias.double()
    assert rel_err(layer(x), expected) <= TOL[dtype]
    # Not the W8A8 product: the activations are not rounded to e4m3.
    assert rel_err(fp8_reference(x, tensors["weight"], rows, "token", None, bias), expected) > 1e-3
    written = export_layer(layer, "compressed-tensors", ["blk.proj"])
    assert torch.equal(written["blk.proj.weight"].view(torch.uint8), tensors["weight"].view(torch.uint8))
    assert torch.equal(written["blk.proj.weight_scale"], tensors["weight_scale"].float())  # float32, as the fp8 writer stores
    assert "blk.proj.input_scale" not in written


def test_fp8_weight_only_checkpoint_through_from_pretrained(tmp_path):
    """A tiny Llama with fp8 weight-only layers, written here: from_pretrained computes the float
    model with the e4m3 weights, and save_quantized -> from_pretrained gives the same logits."""
    import json

    from hf_models import build_model

    torch.manual_seed(0)
    float_model = build_model("llama")
    state = {name: t.detach().clone() for name, t in float_model.state_dict().items()}
    expected_model = copy.deepcopy(float_model)
    for name, module in expected_model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            w = state.pop(f"{name}.weight")
            scale = w.abs().amax(1, keepdim=True) / 448
            state[f"{name}.weight"] = (w / scale).to(FP8_DTYPE)
            state[f"{name}.weight_scale"] = scale
            module.weight.data = state[f"{name}.weight"].float() * scale
    config = fp8_config("channel", ignore=["lm_head"])
    config["config_groups"]["group_0"]["input_activations"] = None
    (tmp_path / "src").mkdir()
    save_file(state, str(tmp_path / "src" / "model.safetensors"))
    (tmp_path / "src" / "config.json").write_text(json.dumps(float_model.config.to_dict() | {"quantization_config": config}))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    model = pymllm_fx.from_pretrained(tmp_path / "src", progress=False)
    assert "W8A16 e4m3 checkpoint, per-channel weight scale" in str(pymllm_fx.explain(model, file=None))
    with torch.no_grad():
        out = model(ids).logits
        assert rel_err(out, expected_model(ids).logits) <= 1e-5
        pymllm_fx.save_quantized(model, tmp_path / "out", format="compressed-tensors", progress=False)
        saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        assert [g["input_activations"] for g in saved["config_groups"].values()] == [None]
        assert torch.equal(pymllm_fx.from_pretrained(tmp_path / "out", progress=False)(ids).logits, out)
