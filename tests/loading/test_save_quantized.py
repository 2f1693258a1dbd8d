"""save_quantized: checkpoints in AutoAWQ / GPTQ / compressed-tensors / fp8 form that load back
bit for bit, with the quantization_config each tool writes.

The golden packers below are written here, loop by loop, from each tool's own code; they share
nothing with pymllm_fx/loading/export.py:

- AutoAWQ ``WQLinear_GEMM.from_linear`` (awq/modules/linear/gemm.py):
  ``qweight[:, col] |= q[:, col * 8 + ORDER[i]] << 4i``, ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
- GPTQModel ``pack`` (gptqmodel/nn_modules/qlinear/__init__.py): ``qweight[row] |= q[row * f + j] << bits*j``
  (along K), ``qzeros[:, col] |= z[:, col * f + j] << bits*j`` (along N); v1 stores ``z - 1``.
- compressed-tensors ``pack_to_int32``: value + 2**(bits-1), value j of a word at bits*j, the last
  word zero-padded; zero points packed along the output dim.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from torch import nn

import pymllm_fx
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE, FP8_MAX, quantize_fp8_per_channel
from pymllm_fx.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear
from pymllm_fx.loading.export import export_layer, parse_size, save_quantized
from pymllm_fx.methods.awq import AWQLinearMethod
from pymllm_fx.methods.compressed_tensors import CompressedTensorsLinearMethod
from pymllm_fx.methods.fp8 import Fp8LinearMethod
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod
from pymllm_fx.methods.gptq import GPTQLinearMethod
from pymllm_fx.methods.int4 import Int4LinearMethod, quantize_int4
from pymllm_fx.methods.int8 import Int8LinearMethod, quantize_int8
from pymllm_fx.methods.registry import resolve_checkpoint
from checks import seed
from hf_models import build_model
# The formats' packers, written from AutoAWQ's and GPTQModel's code in the method tests.
from methods.test_awq import awq_pack, to_int32
from methods.test_gptq import pack_cols as gptq_pack_cols, pack_rows as gptq_pack_rows

INT4_ASYM = {"quant_method": "int4", "group_size": 32}
INT4_SYM = {"quant_method": "int4", "group_size": 32, "sym": True}
FP8_TENSOR = {"quant_method": "fp8", "weight_strategy": "tensor"}


# --- golden packers ----------------------------------------------------------------------------------


def ct_pack(signed: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors ``pack_to_int32``: signed values + 2**(bits-1), packed along ``dim``."""
    per_word = 32 // bits
    unsigned = signed.long() + (1 << (bits - 1))
    if dim == 0:
        unsigned = unsigned.t()
    rows, cols = unsigned.shape
    words = torch.zeros(rows, -(-cols // per_word), dtype=torch.int64)
    for c in range(cols):
        words[:, c // per_word] |= unsigned[:, c] << (bits * (c % per_word))
    words = to_int32(words)
    return words if dim == 1 else words.t().contiguous()


def assert_bits_equal(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for name, want in expected.items():
        got = found[name]
        assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), name
        if want.dtype == FP8_DTYPE:
            got, want = got.view(torch.uint8), want.view(torch.uint8)
        assert torch.equal(got, want), name


# --- whole models: save, load a fresh float copy from the checkpoint, same logits ---------------------


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return build_model("llama")


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def reload(base, path, skip=pymllm_fx.DEFAULT_SKIP):
    """A fresh copy of ``base`` quantized from the checkpoint at ``path`` with its config.json's
    quantization_config (resolve_checkpoint: a config's "fp8" means fp8 checkpoint tensors)."""
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    return pymllm_fx.quantize(copy.deepcopy(base), resolve_checkpoint(config), weights=path, skip=skip, progress=False), config


AWQ_G32 = {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
           "modules_to_not_convert": ["lm_head"]}
GPTQ_G32 = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "lm_head": False, "pack_dtype": "int32"}


def ct_config(weights: dict, acts=None, fmt="pack-quantized") -> dict:
    args = {"group_size": None, "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}, "symmetric": True}
    group = {"targets": ["Linear"], "weights": {**args, **weights}, "input_activations": acts and {**args, **acts},
             "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "version": "0.12.2", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


TOKEN_ACTS = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "observer": None}
CONFIGS = {
    ("int4-asym", "awq"): AWQ_G32,
    ("int4-asym", "gptq"): {**GPTQ_G32, "sym": False, "checkpoint_format": "gptq_v2"},
    ("int4-asym", "compressed-tensors"): ct_config({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                                    "group_size": 32}),
    ("int4-sym", "awq"): AWQ_G32,
    ("int4-sym", "gptq"): {**GPTQ_G32, "sym": True, "checkpoint_format": "gptq"},
    ("int4-sym", "compressed-tensors"): ct_config({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}),
    ("int8", "gptq"): {**GPTQ_G32, "bits": 8, "group_size": -1, "sym": True, "checkpoint_format": "gptq"},
    ("int8", "compressed-tensors"): ct_config({"num_bits": 8, "type": "int", "strategy": "channel"}),
    ("fp8-channel", "compressed-tensors"): ct_config({"num_bits": 8, "type": "float", "strategy": "channel"}, TOKEN_ACTS,
                                                     "float-quantized"),
    ("fp8-tensor", "compressed-tensors"): ct_config({"num_bits": 8, "type": "float", "strategy": "tensor"}, TOKEN_ACTS,
                                                    "float-quantized"),
    ("fp8-tensor", "fp8"): {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]},
}


@pytest.mark.parametrize(
    "source, method, formats",
    [
        ("int4-asym", INT4_ASYM, ["awq", "gptq", "compressed-tensors", "awq"]),
        ("int4-sym", INT4_SYM, ["gptq", "compressed-tensors", "awq", "gptq"]),
        ("int8", "int8", ["gptq", "compressed-tensors", "gptq"]),
        ("fp8-channel", "fp8", ["compressed-tensors", "compressed-tensors"]),
        ("fp8-tensor", FP8_TENSOR, ["fp8", "compressed-tensors", "fp8"]),
    ],
)
def test_round_trip_chain(llama, tmp_path, source, method, formats):
    """Calibrated -> format A -> loaded as A -> format B -> ...: every step has the first step's logits,
    so each checkpoint method also writes each format it can."""
    model = pymllm_fx.quantize(copy.deepcopy(llama), method, progress=False)
    expected = logits(model)
    for step, fmt in enumerate(formats):
        path = save_quantized(model, tmp_path / f"{step}-{fmt}", fmt, progress=False)
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
        model, config = reload(llama, path)
        assert config == CONFIGS[(source, fmt)]
        assert torch.equal(logits(model), expected), f"step {step}: {fmt}"


def test_config_json_is_the_models_config(llama, tmp_path):
    model = pymllm_fx.quantize(copy.deepcopy(llama), INT4_ASYM, progress=False)
    save_quantized(model, tmp_path, "awq", progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    expected = llama.config.to_dict()
    assert {k: config[k] for k in ("model_type", "hidden_size", "num_key_value_heads", "vocab_size")} == \
        {k: expected[k] for k in ("model_type", "hidden_size", "num_key_value_heads", "vocab_size")}
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names


@pytest.mark.parametrize("fmt", ["awq", "gptq", "compressed-tensors", "fp8"])
def test_skipped_layers_are_listed_and_stay_float(llama, tmp_path, fmt):
    """A linear skipped at quantize time is written as a float weight and named in the format's
    not-converted field; from_pretrained builds the model from config.json alone and matches."""
    method = {"awq": INT4_ASYM, "gptq": INT4_ASYM, "compressed-tensors": "int8", "fp8": FP8_TENSOR}[fmt]
    skip = ("lm_head", "model.layers.1.mlp.down_proj")
    model = pymllm_fx.quantize(copy.deepcopy(llama), method, skip=skip, progress=False)
    save_quantized(model, tmp_path, fmt, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    floats = ["model.layers.1.mlp.down_proj", "lm_head"]
    listed = {"awq": config.get("modules_to_not_convert"), "compressed-tensors": config.get("ignore"),
              "fp8": config.get("ignored_layers"), "gptq": list(config.get("dynamic", {}))}[fmt]
    assert listed == (["-:^model\\.layers\\.1\\.mlp\\.down_proj$"] if fmt == "gptq" else floats)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {n for n in f.keys() if "layers.1.mlp.down_proj" in n} == {"model.layers.1.mlp.down_proj.weight"}
    if fmt == "gptq":
        # gptq.py refuses any "dynamic" key yet, even skip-only rules; load it with the skip spelled out.
        loaded = pymllm_fx.quantize(copy.deepcopy(llama), resolve_checkpoint({**config, "dynamic": None}),
                                    weights=tmp_path, skip=skip, progress=False)
    else:
        loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
        assert isinstance(loaded.model.layers[1].mlp.down_proj, nn.Linear)
    assert torch.equal(logits(loaded), logits(model))


def test_sharded_checkpoint_and_index(llama, tmp_path):
    model = pymllm_fx.quantize(copy.deepcopy(llama), INT4_SYM, progress=False)
    save_quantized(model, tmp_path, "gptq", max_shard_size="40KB", progress=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total, held = 0, {}
    for name in files:
        with safe_open(str(tmp_path / name), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
                held[key] = name
        # each shard stays within 40 kB unless one tensor alone is bigger (the 32 kB embeddings are not)
        assert (tmp_path / name).stat().st_size <= 40_000 + 8_192
    assert index["weight_map"] == held and index["metadata"] == {"total_size": total}
    loaded, _ = reload(llama, tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    # Saving again, unsharded, into the same directory leaves no stale shard or index behind.
    save_quantized(model, tmp_path, "gptq", max_shard_size=10**9, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_gpt2_conv1d_keeps_its_layout_and_tied_weights_are_written_once(tmp_path):
    """GPT-2's Conv1D weights are (in, out): fp8 weights and skipped Conv1D stay in that layout, under
    the original names; lm_head (tied to wte) is not written, as save_pretrained does."""
    torch.manual_seed(0)
    gpt2 = build_model("gpt2")
    skip = ("lm_head", "transformer.h.1.mlp.c_proj")
    model = pymllm_fx.quantize(copy.deepcopy(gpt2), "fp8", skip=skip, progress=False)
    save_quantized(model, tmp_path, "compressed-tensors", progress=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        c_attn = f.get_tensor("transformer.h.0.attn.c_attn.weight")
        skipped = f.get_tensor("transformer.h.1.mlp.c_proj.weight")
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert c_attn.dtype == FP8_DTYPE and tuple(c_attn.shape) == tuple(gpt2.transformer.h[0].attn.c_attn.weight.shape)
    assert torch.equal(c_attn.t().view(torch.uint8), model.transformer.h[0].attn.c_attn.weight.view(torch.uint8))
    assert torch.equal(skipped, gpt2.transformer.h[1].mlp.c_proj.weight)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    # Conv1D's class is not "Linear": the group targets name the modules.
    assert "transformer.h.0.attn.c_attn" in config["config_groups"]["group_0"]["targets"]
    loaded, _ = reload(gpt2, tmp_path, skip=skip)
    assert torch.equal(logits(loaded), logits(model))


def mixed_model(methods, k=64, n=32):
    """nn.Sequential of pymllm_fx layers, each quantized by its own method, with bias."""
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict((f"l{i}", nn.Linear(k, n if i == len(methods) - 1 else k)) for i in range(len(methods))))
    for i, method in enumerate(methods):
        others = [f"l{j}" for j in range(len(methods)) if j != i]
        pymllm_fx.quantize(model, method, skip=others, example_inputs=(torch.randn(1, k),), progress=False)
    return model


def test_mixed_schemes_become_compressed_tensors_config_groups(tmp_path):
    methods = [INT4_ASYM, "int8", "fp8"]
    model = mixed_model(methods)
    save_quantized(model, tmp_path, "compressed-tensors", progress=False)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision" and config["ignore"] == []
    groups = config["config_groups"]
    assert [g["targets"] for g in groups.values()] == [["l0"], ["l1"], ["l2"]]
    assert [g["format"] for g in groups.values()] == ["pack-quantized", "pack-quantized", "float-quantized"]
    fresh = nn.Sequential(OrderedDict((f"l{i}", nn.Linear(64, 32 if i == 2 else 64)) for i in range(3)))
    pymllm_fx.quantize(fresh, resolve_checkpoint(config), weights=tmp_path, skip=(), progress=False,
                       example_inputs=(torch.randn(1, 64),))
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


# --- golden tensors: one layer per format, against the packers above ---------------------------------


def calibrated(method, k=128, n=16, dtype=torch.float32):
    """(layer, its float weight): a ReplicatedLinear quantized from a random weight."""
    seed("golden", str(method), k, n)
    weight = (torch.randn(n, k) * 0.05).to(dtype)
    layer = ReplicatedLinear(k, n, bias=False, params_dtype=dtype, quant_method=method, prefix="blk.proj")
    layer.weight.weight_loader(layer.weight, weight)
    method.process_weights_after_loading(layer)
    return layer, weight


def test_golden_awq_and_gptq_int4():
    layer, weight = calibrated(Int4LinearMethod(group_size=32, sym=False))
    codes, scales, zeros = quantize_int4(weight, 32, False)
    q, z = codes.long().t(), zeros.long().t()  # (K, N), (G, N)
    awq = export_layer(layer, "awq")
    assert_bits_equal(awq, {"blk.proj.qweight": awq_pack(q), "blk.proj.qzeros": awq_pack(z), "blk.proj.scales": scales.t()})
    gptq = export_layer(layer, "gptq")  # asymmetric: v2 stores the zero points as they are
    assert_bits_equal(gptq, {"blk.proj.qweight": gptq_pack_rows(q, 4), "blk.proj.qzeros": gptq_pack_cols(z, 4),
                             "blk.proj.scales": scales.t(), "blk.proj.g_idx": (torch.arange(128) // 32).int()})


def test_golden_gptq_v1_symmetric_and_8bit():
    layer, weight = calibrated(Int4LinearMethod(group_size=64, sym=True))
    codes, scales, _ = quantize_int4(weight, 64, True)
    v1_zeros = torch.full((2, 16), 7)  # zero point 8, stored minus one
    assert_bits_equal(export_layer(layer, "gptq"), {
        "blk.proj.qweight": gptq_pack_rows(codes.long().t(), 4), "blk.proj.qzeros": gptq_pack_cols(v1_zeros, 4),
        "blk.proj.scales": scales.t(), "blk.proj.g_idx": (torch.arange(128) // 64).int()})
    layer, weight = calibrated(Int8LinearMethod())
    q8, s8 = quantize_int8(weight)
    assert_bits_equal(export_layer(layer, "gptq"), {
        "blk.proj.qweight": gptq_pack_rows(q8.long().t() + 128, 8), "blk.proj.qzeros": gptq_pack_cols(torch.full((1, 16), 127), 8),
        "blk.proj.scales": s8[None], "blk.proj.g_idx": torch.zeros(128, dtype=torch.int32)})


def test_golden_compressed_tensors_int():
    layer, weight = calibrated(Int4LinearMethod(group_size=32, sym=False))
    codes, scales, zeros = quantize_int4(weight, 32, False)
    assert_bits_equal(export_layer(layer, "compressed-tensors"), {
        "blk.proj.weight_packed": ct_pack(codes.long() - 8, 4), "blk.proj.weight_scale": scales,
        "blk.proj.weight_zero_point": ct_pack(zeros.long() - 8, 4, dim=0), "blk.proj.weight_shape": torch.tensor([16, 128])})
    layer, weight = calibrated(Int8LinearMethod(), k=70)  # 70 inputs: the last int8 word is half padding
    q8, s8 = quantize_int8(weight)
    assert_bits_equal(export_layer(layer, "compressed-tensors"), {
        "blk.proj.weight_packed": ct_pack(q8, 8), "blk.proj.weight_scale": s8[:, None],
        "blk.proj.weight_shape": torch.tensor([16, 70])})


def test_golden_fp8():
    layer, weight = calibrated(Fp8LinearMethod(weight_strategy="tensor"))
    scale = weight.abs().amax() / FP8_MAX
    fp8 = export_layer(layer, "fp8")
    assert_bits_equal(fp8, {"blk.proj.weight": (weight / scale).to(FP8_DTYPE), "blk.proj.weight_scale": scale})
    assert fp8["blk.proj.weight_scale"].dim() == 0  # AutoFP8 writes 0-dim scales
    layer, weight = calibrated(Fp8LinearMethod())
    q, rows = quantize_fp8_per_channel(weight)
    assert_bits_equal(export_layer(layer, "compressed-tensors"), {"blk.proj.weight": q, "blk.proj.weight_scale": rows[:, None]})


def test_awq_word_order_spelled_out():
    """A GPTQ layer whose output features 0..7 have codes 1, 2, 3, 4, 5, 6, 7, 9 written as AWQ: nibble
    i of a word holds feature [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 9])
    method = GPTQLinearMethod(4, 32, True, False, "gptq")
    layer = ReplicatedLinear(32, 8, bias=False, params_dtype=torch.float16, quant_method=method, prefix="blk.proj")
    tensors = {"qweight": gptq_pack_rows(codes.expand(32, 8), 4), "qzeros": gptq_pack_cols(torch.full((1, 8), 7), 4),
               "scales": torch.ones(1, 8, dtype=torch.float16), "g_idx": torch.zeros(32, dtype=torch.int32)}
    for key, tensor in tensors.items():
        getattr(layer, key).weight_loader(getattr(layer, key), tensor)
    method.process_weights_after_loading(layer)
    word = int(export_layer(layer, "awq")["blk.proj.qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [1, 3, 5, 7, 2, 4, 6, 9]


# --- merged layers: exported per shard exactly as the shards were loaded --------------------------------


def awq_shard(n, k):
    return {"qweight": awq_pack(torch.randint(0, 16, (k, n))), "qzeros": awq_pack(torch.randint(0, 16, (k // 32, n))),
            "scales": (torch.rand(k // 32, n) * 0.02 + 0.001).half()}


def gptq_shard(n, k, bits, group, sym, g_idx):
    groups, top = -(-k // group), 1 << bits
    zeros = torch.full((groups, n), top // 2) if sym else torch.randint(0, top, (groups, n))
    if sym:  # v1: zero points minus one
        zeros = zeros - 1
    return {"qweight": gptq_pack_rows(torch.randint(0, top, (k, n)), bits), "qzeros": gptq_pack_cols(zeros, bits),
            "scales": (torch.rand(groups, n) * 0.02 + 0.001).half(), "g_idx": g_idx.clone()}


def ct_int_shard(n, k, bits, group, sym):
    half, groups = 1 << (bits - 1), 1 if group is None else k // group
    out = {"weight_packed": ct_pack(torch.randint(-half, half, (n, k)), bits),
           "weight_scale": (torch.rand(n, groups) * 0.05 + 0.01).half(), "weight_shape": torch.tensor([n, k])}
    if not sym:
        out["weight_zero_point"] = ct_pack(torch.randint(-half, half, (n, groups)), bits, dim=0)
    return out


def fp8_shard(n, k, scale_shape, static):
    out = {"weight": (torch.randn(n, k) * 64).clamp(-448, 448).to(FP8_DTYPE),
           "weight_scale": torch.rand(scale_shape) * 0.01 + 0.001}
    if static:
        out["input_scale"] = torch.rand(scale_shape[:1] if scale_shape == (1,) else ()) * 0.01 + 0.001
    return out


def block_scale_inv(tensors):
    """DeepSeek-V3 names its block scales weight_scale_inv."""
    return {"weight": tensors["weight"], "weight_scale_inv": tensors["weight_scale"]}


def ct_method(weights, acts=None, fmt="pack-quantized"):
    config = ct_config(weights, acts, fmt)
    config["ignore"] = []
    return CompressedTensorsLinearMethod.from_config(config)


ACT_ORDER = torch.randperm(128, generator=torch.Generator().manual_seed(3))
G_IDX_ACT = torch.empty(128, dtype=torch.int32).index_put_((ACT_ORDER,), (torch.arange(128) // 32).int())
STATIC_ACTS = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
MERGED_CASES = {
    "awq": ("awq", lambda: AWQLinearMethod(group_size=32), awq_shard),
    "gptq-v1-sym": ("gptq", lambda: GPTQLinearMethod(4, 32, True, False, "gptq"),
                    lambda n, k: gptq_shard(n, k, 4, 32, True, (torch.arange(k) // 32).int())),
    "gptq-v2-act-order": ("gptq", lambda: GPTQLinearMethod(4, 32, False, True, "gptq_v2"),
                          lambda n, k: gptq_shard(n, k, 4, 32, False, G_IDX_ACT)),
    "gptq-8bit": ("gptq", lambda: GPTQLinearMethod(8, -1, True, False, "gptq"),
                  lambda n, k: gptq_shard(n, k, 8, k, True, torch.zeros(k, dtype=torch.int32))),
    "ct-int4-group-asym": ("compressed-tensors",
                           lambda: ct_method({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}),
                           lambda n, k: ct_int_shard(n, k, 4, 32, False)),
    "ct-int4-channel": ("compressed-tensors", lambda: ct_method({"num_bits": 4, "type": "int", "strategy": "channel"}),
                        lambda n, k: ct_int_shard(n, k, 4, None, True)),
    "ct-int8": ("compressed-tensors", lambda: ct_method({"num_bits": 8, "type": "int", "strategy": "channel"}),
                lambda n, k: ct_int_shard(n, k, 8, None, True)),
    "ct-fp8-channel": ("compressed-tensors", lambda: ct_method({"num_bits": 8, "type": "float", "strategy": "channel"},
                                                               TOKEN_ACTS, "float-quantized"),
                       lambda n, k: fp8_shard(n, k, (n, 1), False)),
    "ct-fp8-tensor-static": ("compressed-tensors", lambda: ct_method({"num_bits": 8, "type": "float", "strategy": "tensor"},
                                                                     STATIC_ACTS, "float-quantized"),
                             lambda n, k: fp8_shard(n, k, (1,), True)),
    "ct-fp8-block": ("compressed-tensors",
                     lambda: ct_method({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [16, 32]},
                                       {**TOKEN_ACTS, "strategy": "group", "group_size": 32}, "float-quantized"),
                     lambda n, k: fp8_shard(n, k, (n // 16, k // 32), False)),
    "fp8": ("fp8", lambda: Fp8CheckpointLinearMethod(), lambda n, k: fp8_shard(n, k, (), False)),
    "fp8-block": ("fp8", lambda: Fp8CheckpointLinearMethod(weight_block_size=(16, 32)),
                  lambda n, k: block_scale_inv(fp8_shard(n, k, (n // 16, k // 32), False))),
    "fp8-static": ("fp8", lambda: Fp8CheckpointLinearMethod(activation_scheme="static"), lambda n, k: fp8_shard(n, k, (), True)),
}


@pytest.mark.parametrize("layout", ["qkv", "gate_up"])
@pytest.mark.parametrize("case", list(MERGED_CASES))
def test_merged_layer_exports_its_shards(case, layout):
    """Each shard's tensors loaded with weight_loader(param, tensor, shard_id) come back out of
    export_layer under that shard's name, bit for bit; static fp8 input scales come back as the
    largest, which is the one the merged layer runs with."""
    fmt, method, make = MERGED_CASES[case]
    seed("merged", case, layout)
    if layout == "qkv":
        layer = QKVParallelLinear(128, 16, 4, 2, bias=True, params_dtype=torch.float16, quant_method=method(),
                                  prefix="attn.qkv_proj")
        shard_ids, names = ["q", "k", "v"], ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    else:
        layer = MergedColumnParallelLinear(128, [32, 48], bias=True, params_dtype=torch.float16, quant_method=method(),
                                           prefix="mlp.gate_up_proj")
        shard_ids, names = [0, 1], ["mlp.gate_proj", "mlp.up_proj"]
    expected = {}
    for shard_id, name, n in zip(shard_ids, names, layer.output_partition_sizes):
        tensors = {**make(n, 128), "bias": torch.randn(n).half()}
        for key, tensor in tensors.items():
            param = getattr(layer, key)
            param.weight_loader(param, tensor, shard_id)
            expected[f"{name}.{key}"] = tensor
    layer.quant_method.process_weights_after_loading(layer)
    if case.endswith("static"):
        largest = torch.stack([expected[f"{name}.input_scale"] for name in names]).amax(0)
        expected.update({f"{name}.input_scale": largest for name in names})
    assert_bits_equal(export_layer(layer, fmt, names), expected)


# --- refusals: what a format cannot hold exactly is never written ------------------------------------------


@pytest.mark.parametrize(
    "method, fmt, pattern",
    [
        ("int8", "awq", r"model\.layers\.0\.self_attn\.q_proj: cannot write an int8 per-channel layer as 'awq'.*4-bit "
                        r"weights only; use format='gptq'"),
        ("fp8", "fp8", r"q_proj: cannot write an fp8 layer \(per-channel weight scale\) as 'fp8': its rows have "
                       r"different scales.*'compressed-tensors'.*'weight_strategy': 'tensor'"),
        ("fp8", "gptq", r"q_proj: cannot write an fp8 layer.*as 'gptq'.*use format='compressed-tensors' or 'fp8'"),
        (INT4_ASYM, "fp8", r"q_proj: cannot write an int4 layer \(group_size 32, asymmetric\) as 'fp8'"),
        ({"quant_method": "int4", "group_size": 128}, "awq",
         r"q_proj: cannot write an int4 layer \(group_size 128, asymmetric\) as 'awq': in_features=64 is not a multiple "
         r"of group_size 128 \(a tail group\).*use format='gptq'"),
    ],
)
def test_impossible_conversions_raise_and_write_nothing(llama, tmp_path, method, fmt, pattern):
    model = pymllm_fx.quantize(copy.deepcopy(llama), method, progress=False)
    with pytest.raises(ValueError, match=pattern):
        save_quantized(model, tmp_path / "out", fmt, progress=False)
    assert not (tmp_path / "out").exists()


def test_format_wide_settings_that_differ_between_layers(tmp_path):
    with pytest.raises(ValueError, match=r"'gptq': it has one bit width for the whole model, but the layers have 4 \(l0\), "
                                         r"8 \(l1\); use format='compressed-tensors'"):
        save_quantized(mixed_model([INT4_ASYM, "int8"]), tmp_path, "gptq", progress=False)
    with pytest.raises(ValueError, match=r"'awq': it has one group_size.*32 \(l0\), 64 \(l1\)"):
        save_quantized(mixed_model([INT4_ASYM, {"quant_method": "int4", "group_size": 64}]), tmp_path, "awq", progress=False)


def test_act_order_writes_gptq_and_compressed_tensors():
    method = GPTQLinearMethod(4, 32, False, True, "gptq_v2")
    layer = ReplicatedLinear(128, 32, bias=False, params_dtype=torch.float16, quant_method=method, prefix="blk.proj")
    for key, tensor in gptq_shard(32, 128, 4, 32, False, G_IDX_ACT).items():
        getattr(layer, key).weight_loader(getattr(layer, key), tensor)
    method.process_weights_after_loading(layer)
    assert torch.equal(export_layer(layer, "gptq")["blk.proj.g_idx"], G_IDX_ACT)
    with pytest.raises(ValueError, match=r"blk\.proj: cannot write an int4 layer \(group_size 32, asymmetric, act-order\) "
                                         r"as 'awq': AWQ has no g_idx.*use format='gptq'"):
        export_layer(layer, "awq")
    ct = export_layer(layer, "compressed-tensors")  # actorder "group": the same permutation as weight_g_idx
    assert torch.equal(ct["blk.proj.weight_g_idx"], G_IDX_ACT)


def test_fp8_dynamic_per_tensor_activations_refused_by_fp8_format():
    method = ct_method({"num_bits": 8, "type": "float", "strategy": "tensor"},
                       {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": True}, "float-quantized")
    layer = ReplicatedLinear(64, 16, bias=False, quant_method=method, prefix="blk.proj")
    for key, tensor in fp8_shard(16, 64, (1,), False).items():
        getattr(layer, key).weight_loader(getattr(layer, key), tensor)
    method.process_weights_after_loading(layer)
    with pytest.raises(ValueError, match=r"blk\.proj: .*per tensor at run time.*use format='compressed-tensors'"):
        export_layer(layer, "fp8")


def test_awq_refuses_a_float_layer_whose_name_is_inside_a_quantized_one(tmp_path):
    """transformers and vLLM match modules_to_not_convert as substrings: listing "gate" would leave
    "gate_proj" float too."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(64, 8)
            self.gate_proj = nn.Linear(64, 64)

        def forward(self, x):
            return self.gate_proj(x).sum(-1, keepdim=True) + self.gate(x)

    model = pymllm_fx.quantize(Block(), INT4_ASYM, skip=("gate",), example_inputs=(torch.randn(1, 64),), progress=False)
    with pytest.raises(ValueError, match=r"gate: cannot write 'awq'.*substring.*gate_proj.*compressed-tensors"):
        save_quantized(model, tmp_path, "awq", progress=False)


def test_argument_errors(llama, tmp_path):
    model = pymllm_fx.quantize(copy.deepcopy(llama), INT4_ASYM, progress=False)
    with pytest.raises(ValueError, match=r"unknown checkpoint format 'gguf'; use one of awq, gptq, compressed-tensors, fp8"):
        save_quantized(model, tmp_path, "gguf")
    with pytest.raises(ValueError, match=r"max_shard_size '5 parsecs' is not a size"):
        save_quantized(model, tmp_path, "awq", max_shard_size="5 parsecs")
    with pytest.raises(ValueError, match=r"has no quantized layers; quantize it first"):
        save_quantized(copy.deepcopy(llama), tmp_path, "awq")
    with pytest.raises(ValueError, match=r"merged_layers names \['model.norm'\], which are not pymllm_fx linear layers"):
        save_quantized(model, tmp_path, "awq", merged_layers={"model.norm": ["a", "b"]})
    assert not any(tmp_path.iterdir())
    assert (parse_size("5GB"), parse_size("2MiB"), parse_size(1000)) == (5 * 10**9, 2 * 2**20, 1000)


def test_save_quantized_splits_merged_layers(tmp_path):
    """A model holding a QKVParallelLinear is saved with q/k/v under the names merged_layers gives."""
    seed("merged-model")
    attn = nn.Module()
    attn.qkv_proj = QKVParallelLinear(128, 16, 4, 2, bias=False, params_dtype=torch.float16,
                                      quant_method=AWQLinearMethod(group_size=32), prefix="attn.qkv_proj")
    model = nn.Module()
    model.attn = attn
    expected = {}
    for shard_id, n in zip("qkv", attn.qkv_proj.output_partition_sizes):
        for key, tensor in awq_shard(n, 128).items():
            getattr(attn.qkv_proj, key).weight_loader(getattr(attn.qkv_proj, key), tensor, shard_id)
            expected[f"attn.{shard_id}_proj.{key}"] = tensor
    attn.qkv_proj.quant_method.process_weights_after_loading(attn.qkv_proj)
    with pytest.raises(ValueError, match=r"attn\.qkv_proj: this layer holds 3 merged weights.*merged_layers="):
        save_quantized(model, tmp_path, "awq", progress=False)
    names = ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    save_quantized(model, tmp_path, "awq", merged_layers={"attn.qkv_proj": names}, progress=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert_bits_equal({key: f.get_tensor(key) for key in f.keys()}, expected)


def test_merged_layer_needs_its_names():
    layer = MergedColumnParallelLinear(64, [32, 32], bias=False, quant_method=Int8LinearMethod(), prefix="mlp.gate_up_proj")
    with pytest.raises(ValueError, match=r"mlp\.gate_up_proj: this layer holds 2 merged weights.*merged_layers="):
        export_layer(layer, "gptq")


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_block_fp8_checkpoint_round_trip(tmp_path, fmt):
    """A block-scaled fp8 checkpoint (DeepSeek-V3 layout) re-saved as ``fmt`` loads back to the same outputs."""
    from safetensors.torch import save_file

    seed("block", fmt)
    source = tmp_path / "source"
    source.mkdir()
    tensors = block_scale_inv(fp8_shard(64, 128, (2, 4), False))
    save_file({**{f"0.{k}": v for k, v in tensors.items()}, "0.bias": torch.randn(64)}, str(source / "model.safetensors"))

    def fresh():
        return nn.Sequential(nn.Linear(128, 64))

    model = pymllm_fx.quantize(fresh(), Fp8CheckpointLinearMethod(weight_block_size=(32, 32)), weights=source,
                               example_inputs=(torch.randn(1, 128),), progress=False)
    save_quantized(model, tmp_path / "out", fmt, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if fmt == "fp8":
        assert config == {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": [],
                          "weight_block_size": [32, 32]}
    else:
        group = config["config_groups"]["group_0"]
        assert (group["weights"]["strategy"], group["weights"]["block_structure"]) == ("block", [32, 32])
        assert (group["input_activations"]["strategy"], group["input_activations"]["group_size"]) == ("group", 32)
    loaded = pymllm_fx.quantize(fresh(), resolve_checkpoint(config), weights=tmp_path / "out",
                                example_inputs=(torch.randn(1, 128),), progress=False)
    x = torch.randn(3, 128)
    assert torch.equal(loaded(x), model(x))
