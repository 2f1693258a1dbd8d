"""from_pretrained: a checkpoint directory -> a ready model, built on meta, loaded tensor by tensor."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import save_file

import pymllm_fx
from pymllm_fx.api import explain_checkpoint
from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.loading import CheckpointError
from checks import rel_err
from hf_models import build_model
from methods.test_awq import make_awq, reference_weight as awq_reference
from methods.test_gptq import make_gptq, reference_weight as gptq_reference

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def float_checkpoint(tmp_path, arch, **overrides):
    torch.manual_seed(0)
    model = build_model(arch, **overrides)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_float_checkpoint_quantized_while_loading_matches_quantize(tmp_path, arch, method):
    model = float_checkpoint(tmp_path, arch)
    expected = pymllm_fx.quantize(copy.deepcopy(model), method, progress=False)
    with warnings.catch_warnings():  # the graph is captured on meta, not from a module walk
        warnings.filterwarnings("error", message="pymllm_fx: graph capture")
        loaded = pymllm_fx.from_pretrained(tmp_path, method=method, device="cpu", progress=False)
    assert not loaded.training
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert all(b.device.type == "cpu" for b in loaded.buffers())
    assert torch.equal(logits(loaded), logits(expected))


def test_tied_embeddings_stay_tied_and_dtype_applies(tmp_path):
    float_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    loaded = pymllm_fx.from_pretrained(tmp_path, method="int8", device="cpu", dtype=torch.bfloat16, progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(loaded.model.layers[0].mlp.up_proj, ReplicatedLinear)
    assert torch.isfinite(logits(loaded)).all()


def quantized_checkpoint(tmp_path, arch, fmt, config_keys=None, lm_head=False):
    """A tiny model's checkpoint in AWQ or GPTQ (act-order, v1) tensors packed by the formats' own
    definitions, and a float model holding exactly the weights they encode. ``config_keys`` replace
    the quantization_config's; ``lm_head`` stores the (untied) output head quantized too."""
    torch.manual_seed(0)
    model = build_model(arch, **({"tie_word_embeddings": False} if lm_head else {}))
    reference = copy.deepcopy(model)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (name == "lm_head" and not lm_head):
            continue
        n, k = module.weight.shape
        del state[f"{name}.weight"]
        if fmt == "awq":
            tensors, q, z, s, group_of = make_awq(k, n, 32)
            weight = awq_reference(q, z, s, group_of, torch.float32)
        else:
            tensors, q, z, s, g_idx = make_gptq(k, n, 32, 4, False, "gptq", act_order=True)
            weight = gptq_reference(q, z, s, g_idx, torch.float32)
        state |= {f"{name}.{key}": t for key, t in tensors.items()}
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(weight)
    if "lm_head.weight" in state and model.lm_head.weight is model.model.embed_tokens.weight:
        del state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"} if fmt == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True, "checkpoint_format": "gptq"}
    )
    if config_keys is not None:
        config["quantization_config"] = config_keys
    (tmp_path / "config.json").write_text(json.dumps(config))
    return reference


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_checkpoint_matches_the_dequantized_reference(tmp_path, arch, fmt):
    reference = quantized_checkpoint(tmp_path, arch, fmt)
    loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    assert loaded.model.layers[0].self_attn.q_proj.quant_method.name == fmt
    assert type(loaded.lm_head) is torch.nn.Linear  # stored float in the checkpoint: stays float
    assert rel_err(logits(loaded), logits(reference)) <= 1e-5
    with torch.no_grad():
        compiled = torch.compile(loaded, fullgraph=True)(IDS).logits
    assert rel_err(compiled, logits(reference)) <= 1e-4


# What GPTQModel 7.7.0 writes (gptqmodel/quantization/config.py to_dict): ``method`` beside
# ``quant_method``, ``pack_dtype``, ``meta`` with its calibration settings, ``lm_head``.
GPTQMODEL_7_7 = {
    "bits": 4, "group_size": 32, "desc_act": True, "sym": False, "lm_head": False, "quant_method": "gptq",
    "method": "gptq", "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
    "meta": {"quantizer": ["gptqmodel:7.7.0"], "uri": "https://github.com/modelcloud/gptqmodel",
             "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False, "true_sequential": True,
             "mse": 0.0, "gptaq": None, "act_group_aware": True},
}


def test_gptqmodel_7_config_loads_without_a_word(tmp_path):
    reference = quantized_checkpoint(tmp_path, "llama", "gptq", config_keys=GPTQMODEL_7_7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    assert rel_err(logits(loaded), logits(reference)) <= 1e-5


def test_gptq_quantized_lm_head_loads_quantized(tmp_path):
    reference = quantized_checkpoint(tmp_path, "llama", "gptq", config_keys=GPTQMODEL_7_7 | {"lm_head": True}, lm_head=True)
    loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    assert loaded.lm_head.quant_method.name == "gptq"  # the checkpoint decides over the default skip
    assert rel_err(logits(loaded), logits(reference)) <= 1e-5


@pytest.mark.parametrize(
    "extra, error, pattern",
    [
        ({"rotation": "hadamard"}, NotImplementedError, r"rotation.*Hadamard.*cannot honour"),
        ({"activation": {"mode": "w4afp8"}}, NotImplementedError, r"activation.*quantizes activations"),
        ({"method": "awq"}, ValueError, r"method 'awq'"),
    ],
)
def test_gptqmodel_keys_that_change_the_math_are_refused(tmp_path, extra, error, pattern):
    quantized_checkpoint(tmp_path, "llama", "gptq", config_keys=GPTQMODEL_7_7 | extra)
    with pytest.raises(CheckpointError if error is ValueError else error, match=pattern):
        pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)


def test_unknown_config_key_warns_and_loads(tmp_path):
    reference = quantized_checkpoint(tmp_path, "llama", "gptq", config_keys=GPTQMODEL_7_7 | {"future_knob": 1})
    with pytest.warns(UserWarning, match=r"gptq: quantization_config has keys \['future_knob'\].*ignored"):
        loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    assert rel_err(logits(loaded), logits(reference)) <= 1e-5


def test_explain_checkpoint_reads_headers_only(tmp_path):
    quantized_checkpoint(tmp_path, "llama", "awq")
    out = io.StringIO()
    report = explain_checkpoint(tmp_path, file=out)
    printed = out.getvalue()
    assert "model.layers.0.mlp.down_proj" in printed and "lm_head" in printed
    assert "stays float: stored as a float weight in the checkpoint" in printed
    assert report.quantized_layers == 14 and report.linear_bytes_after < report.linear_bytes_before


def test_cli_explain_and_errors(tmp_path):
    float_checkpoint(tmp_path, "llama")
    run = lambda *args: subprocess.run([sys.executable, "-m", "pymllm_fx", *args], capture_output=True, text=True)
    done = run("explain", str(tmp_path), "--method", "int4")
    assert done.returncode == 0, done.stderr
    assert "W4A16 g128 asym" in done.stdout and "whole model" in done.stdout
    missing = run("explain", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "local checkpoint directory" in missing.stderr


# --- bad checkpoints: a clear error naming the file or tensor ------------------------------------


def test_float_checkpoint_without_method(tmp_path):
    float_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="float weights.*pass method="):
        pymllm_fx.from_pretrained(tmp_path, device="cpu")


def test_quantized_checkpoint_with_another_method(tmp_path):
    quantized_checkpoint(tmp_path, "llama", "awq")
    with pytest.raises(ValueError, match="already quantized \\('awq'"):
        pymllm_fx.from_pretrained(tmp_path, method="int4", device="cpu")


def test_unknown_method_in_config(tmp_path):
    float_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*'bitsandbytes' is not a checkpoint format"):
        pymllm_fx.from_pretrained(tmp_path, device="cpu")


def test_pickle_checkpoint_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        pymllm_fx.from_pretrained(tmp_path, method="int8", device="cpu")
    float_checkpoint(tmp_path / "both", "llama")
    (tmp_path / "both" / "model.safetensors").unlink()
    (tmp_path / "both" / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle"):
        pymllm_fx.from_pretrained(tmp_path / "both", method="int8", device="cpu")


def test_truncated_file_names_the_tensor(tmp_path):
    float_checkpoint(tmp_path, "llama")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"tensor '.*' ends at byte .* past the end"):
        pymllm_fx.from_pretrained(tmp_path, method="int8", device="cpu")


def test_shard_missing_from_the_index(tmp_path):
    torch.manual_seed(0)
    build_model("llama").save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}.*missing"):
        pymllm_fx.from_pretrained(tmp_path, method="int8", device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scales_name_the_tensor(tmp_path, bad):
    quantized_checkpoint(tmp_path, "llama", "gptq")
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.scales"][0, 3] = bad
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*'scales' holds NaN or Inf"):
        pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)


def test_missing_and_wrong_group_size_tensors(tmp_path):
    quantized_checkpoint(tmp_path, "llama", "awq")
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.0.self_attn.k_proj.qzeros"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.qzeros"):
        pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64  # the tensors hold groups of 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"scales.*expected shape"):
        pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("stored", ["float", "int8"])
def test_peak_memory_stays_near_the_checkpoint_size(tmp_path, stored):
    """Peak resident memory while loading stays under 1.3x the checkpoint's size on disk, measured
    in a fresh process after the imports: a quantized checkpoint (compressed-tensors int8) and a
    float one quantized while it streams (every float weight is held until its layer calibrates)."""
    torch.manual_seed(0)
    model = build_model("llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    if stored == "float":
        model.save_pretrained(tmp_path)
    else:
        pymllm_fx.save_quantized(pymllm_fx.quantize(model, "int8", progress=False), tmp_path,
                                 format="compressed-tensors", progress=False)
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    method = "int8" if stored == "float" else None
    script = textwrap.dedent(f"""
        import resource, torch, pymllm_fx
        from pymllm_fx.loading.hf import build_on_meta
        build_on_meta({str(tmp_path)!r}, None)  # warm the imports and transformers' caches
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = pymllm_fx.from_pretrained({str(tmp_path)!r}, method={method!r}, device="cpu", progress=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1])
    assert peak < 1.3 * size, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB checkpoint"


# --- quantize -> save_quantized -> from_pretrained ------------------------------------------------

ROUND_TRIPS = [
    ({"quant_method": "int4", "group_size": 32}, "awq"),
    ({"quant_method": "int4", "group_size": 32}, "gptq"),
    ({"quant_method": "int4", "group_size": 64, "sym": True}, "gptq"),
    ({"quant_method": "int4", "group_size": 32, "sym": True}, "compressed-tensors"),
    ({"quant_method": "int4", "group_size": 32}, "compressed-tensors"),
    ("int8", "gptq"),
    ("int8", "compressed-tensors"),
    ("fp8", "compressed-tensors"),
    ({"quant_method": "fp8", "weight_strategy": "tensor"}, "fp8"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method, fmt", ROUND_TRIPS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_save_quantized_then_from_pretrained_round_trips(tmp_path, arch, method, fmt):
    torch.manual_seed(0)
    quantized = pymllm_fx.quantize(build_model(arch), method, progress=False)
    pymllm_fx.save_quantized(quantized, tmp_path, format=fmt, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    assert torch.equal(logits(loaded), logits(quantized))


def test_cli_quantize_writes_a_checkpoint_from_pretrained_loads(tmp_path):
    model = float_checkpoint(tmp_path / "src", "qwen2")
    method = '{"quant_method": "int4", "group_size": 32}'  # hidden 64: AWQ has no tail groups
    done = subprocess.run([sys.executable, "-m", "pymllm_fx", "quantize", str(tmp_path / "src"), "--method", method,
                           "--out", str(tmp_path / "dst"), "--format", "awq", "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "linear layers" in done.stdout
    expected = pymllm_fx.quantize(model, json.loads(method), progress=False)
    assert torch.equal(logits(pymllm_fx.from_pretrained(tmp_path / "dst", device="cpu", progress=False)), logits(expected))
    refused = subprocess.run([sys.executable, "-m", "pymllm_fx", "quantize", str(tmp_path / "src"), "--method", "int8",
                              "--out", str(tmp_path / "bad"), "--format", "awq", "--device", "cpu"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "awq" in refused.stderr and not (tmp_path / "bad" / "config.json").exists()


def test_wrong_bits_for_the_tensors(tmp_path):
    quantized_checkpoint(tmp_path, "llama", "gptq")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].update(bits=8, group_size=-1, desc_act=False, sym=True)  # the tensors pack 4-bit codes
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj.*'model\.layers\.0\.self_attn\."
                                              r"q_proj\.qweight': expected shape \(16, 64\), found \(8, 64\)"):
        pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_skipped_layers_round_trip_through_the_formats_skip_lists(tmp_path, fmt):
    """Layers left float are written in AWQ's modules_to_not_convert / GPTQModel's "-:" dynamic rules;
    both from_pretrained and quantize(weights=) with the written config keep them float."""
    from pymllm_fx.methods.registry import resolve_checkpoint

    torch.manual_seed(0)
    method = {"quant_method": "int4", "group_size": 32}
    quantized = pymllm_fx.quantize(build_model("llama"), method, skip=("lm_head", "*.mlp.down_proj"), progress=False)
    pymllm_fx.save_quantized(quantized, tmp_path, format=fmt, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    assert torch.equal(logits(loaded), logits(quantized))
    torch.manual_seed(1)
    fresh = pymllm_fx.quantize(build_model("llama"), resolve_checkpoint(config), weights=tmp_path, progress=False)
    down = fresh.model.layers[0].mlp.down_proj
    assert "unquantized" in down.quant_method.describe(down) and down.weight.dtype == torch.float32
    assert torch.equal(logits(fresh), logits(quantized))
    pymllm_fx.save_quantized(fresh, tmp_path / "again", format=fmt, progress=False)
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    unordered = lambda c: {k: sorted(v) if isinstance(v, list) else v for k, v in c.items()}  # noqa: E731
    assert unordered(again) == unordered(config)
