"""Float MoE checkpoints as transformers writes them (per-expert tensors, renamed modules, or the
stacked tensors themselves) load through from_pretrained, experts quantized as they stream in."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import pymllm_fx
from pymllm_fx.layers.fused_moe import FusedMoE
from pymllm_fx.loading import CheckpointError
from checks import rel_err

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, tie_word_embeddings=False)
CONFIGS = {  # per-expert w1/w2/w3 under block_sparse_moe; gate_proj/up_proj/down_proj; stacked, transposed
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(moe_intermediate_size=32, intermediate_size=128, num_experts=4, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, layer_types=None),
}


def saved(arch: str, tmp_path):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(arch, **COMMON, **CONFIGS[arch])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # fresh biases are zeros, which would hide a bias loaded wrong
        for name, param in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path / arch)
    return model, tmp_path / arch


def ids():
    return torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_float_moe_checkpoint_loads_with_experts_quantized(arch, method, tmp_path):
    model, path = saved(arch, tmp_path)
    names = list(load_file(path / "model.safetensors"))
    if arch != "gpt_oss":
        assert any(".experts.0." in n for n in names), "transformers wrote the experts per expert"
    loaded = quiet(pymllm_fx.from_pretrained, path, method=method, device="cpu", progress=False)
    assert sum(isinstance(m, FusedMoE) for m in loaded.modules()) == 2
    expected = quiet(pymllm_fx.quantize, model, method, progress=False)
    with torch.no_grad():
        assert rel_err(loaded(ids()).logits, expected(ids()).logits) <= 1e-5


def test_experts_left_float_load_expert_by_expert(tmp_path):
    model, path = saved("mixtral", tmp_path)
    loaded = quiet(pymllm_fx.from_pretrained, path, method="int8", device="cpu", progress=False,
                   skip=["lm_head", "*.experts"])
    assert not any(isinstance(m, FusedMoE) for m in loaded.modules())
    assert torch.equal(loaded.model.layers[1].mlp.experts.gate_up_proj, model.model.layers[1].mlp.experts.gate_up_proj)
    assert torch.equal(loaded.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj)


@pytest.mark.parametrize("skip", [("lm_head",), ("lm_head", "*.experts")], ids=["quantized", "float"])
def test_a_missing_expert_is_named(skip, tmp_path):
    _, path = saved("mixtral", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.2\.(up|w3)"):
        quiet(pymllm_fx.from_pretrained, path, method="int4", device="cpu", progress=False, skip=list(skip))


def test_explain_checkpoint_predicts_the_experts_layers(tmp_path):
    model, path = saved("qwen3_moe", tmp_path)
    report = quiet(pymllm_fx.explain_checkpoint, path, method="int4", file=None)
    rows = {r.path: r for r in report.rows if r.path.endswith("mlp.experts")}
    assert len(rows) == 2 and all(r.method == "int4" for r in rows.values())
    loaded = quiet(pymllm_fx.from_pretrained, path, method="int4", device="cpu", progress=False)
    for path_, row in rows.items():
        layer = loaded.get_submodule(path_)
        assert row.bytes_after == sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))


def test_missing_expert_biases_are_named(tmp_path):
    _, path = saved("gpt_oss", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.down_proj_bias"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for skip in (["lm_head"], ["lm_head", "*.experts"]):
        with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.experts\.(w2_bias|down_proj_bias)"):
            quiet(pymllm_fx.from_pretrained, path, method="int8", device="cpu", progress=False, skip=skip)


# Golden packing, written from each format's definition (not pymllm_fx's packers).


def pack_low_first(values: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Unsigned ``(R, C)`` -> int32 ``(R, C * bits / 32)``: value j of each word at bits ``bits * j``,
    the order of GPTQ's ``pack`` and compressed-tensors' ``pack_to_int32``."""
    per_word = 32 // bits
    words = torch.zeros(values.shape[0], values.shape[1] // per_word, dtype=torch.int64)
    for j in range(per_word):
        words |= (values[:, j::per_word].long() & ((1 << bits) - 1)) << (bits * j)
    return (words - ((words >> 31) << 32)).to(torch.int32)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ WQLinear_GEMM.from_linear: nibble i holds column 8c + AWQ_ORDER[i]


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """``(R, C)`` codes -> int32 ``(R, C / 8)`` in AutoAWQ's GEMM order."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        words |= values[:, column::8].long() << (4 * i)
    return (words - ((words >> 31) << 32)).to(torch.int32)


EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def expert_checkpoint(tmp_path, arch: str, fmt: str, dense_method, projection):
    """A quantized ``arch`` checkpoint as its tools lay it out: the dense layers written by
    save_quantized in ``fmt``, each expert's gate / up / down projection written as one linear of
    that format by ``projection(weight (out, in)) -> {tensor name: tensor}``; the router stays float."""
    model, _ = saved(arch, tmp_path)
    dense = quiet(pymllm_fx.quantize, copy_of(model), dense_method, progress=False, skip=["lm_head", "*.experts"])
    out = tmp_path / fmt
    pymllm_fx.save_quantized(dense, out, fmt, progress=False)
    tensors = load_file(out / "model.safetensors")
    block, gate, up, down = EXPERT_NAMES[arch]
    for layer in range(2):
        for key in [k for k in tensors if k.startswith(f"model.layers.{layer}.") and ".experts." in k]:
            del tensors[key]
        experts = model.model.layers[layer].mlp.experts
        inter = experts.down_proj.shape[2]
        for e in range(experts.gate_up_proj.shape[0]):
            weights = {gate: experts.gate_up_proj[e, :inter], up: experts.gate_up_proj[e, inter:], down: experts.down_proj[e]}
            for proj, w in weights.items():
                for key, value in projection(w.detach()).items():
                    tensors[f"model.layers.{layer}.{block}.experts.{e}.{proj}.{key}"] = value
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return model, out


def gptq_projection(group: int, sym: bool):
    """GPTQ: qweight (K/8, N) packed along K, qzeros (G, N/8) along N (v1: zero points minus one, as
    save_quantized writes symmetric layers; v2: as they are), scales (G, N), g_idx (K,)."""
    from pymllm_fx.methods.int4 import quantize_int4

    def write(w):
        codes, scales, zeros = quantize_int4(w, group, sym)
        n, k = w.shape
        stored = torch.full((n, k // group), 7) if sym else zeros.to(torch.int32)
        return {"qweight": pack_low_first(codes).t().contiguous(), "qzeros": pack_low_first(stored.t()),
                "scales": scales.t().contiguous(), "g_idx": (torch.arange(k) // group).to(torch.int32)}

    return write


def awq_projection(group: int):
    """AutoAWQ GEMM: qweight (K, N/8) and qzeros (K/g, N/8) packed along N in AWQ's order, scales (K/g, N)."""
    from pymllm_fx.methods.int4 import quantize_int4

    def write(w):
        codes, scales, zeros = quantize_int4(w, group, False)
        return {"qweight": pack_awq(codes.t()), "qzeros": pack_awq(zeros.t().to(torch.int32)),
                "scales": scales.t().contiguous()}

    return write


def ct_int4_projection(group: int, sym: bool):
    """compressed-tensors pack-quantized: weight_packed (N, K/8) holds q + 8 of each signed code q,
    eight per int32 along K, low bits first; weight_scale (N, G); weight_zero_point (N/8, G): the signed
    zero points + 8, packed the same way along N; weight_shape [N, K]."""
    from pymllm_fx.methods.int4 import quantize_int4

    def write(w):
        codes, scales, zeros = quantize_int4(w, group, sym)  # codes are q + 8, zeros zero_point + 8
        out = {"weight_packed": pack_low_first(codes), "weight_scale": scales.contiguous(),
               "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
        if not sym:
            out["weight_zero_point"] = pack_low_first(zeros.t().to(torch.int32)).t().contiguous()
        return out

    return write


def gptq_expert_checkpoint(tmp_path, group: int = 32, sym: bool = True):
    method = {"quant_method": "int4", "group_size": group, "sym": sym}
    return expert_checkpoint(tmp_path, "mixtral", "gptq", method, gptq_projection(group, sym))


def copy_of(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("sym", [True, False], ids=["sym-v1", "asym-v2"])
def test_gptq_moe_checkpoint_loads_its_experts(tmp_path, sym):
    model, path = gptq_expert_checkpoint(tmp_path, sym=sym)
    loaded = quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)
    layers = [m for m in loaded.modules() if isinstance(m, FusedMoE)]
    assert len(layers) == 2 and all(m.quant_method.name == "gptq" for m in layers)
    expected = quiet(pymllm_fx.quantize, model, {"quant_method": "int4", "group_size": 32, "sym": sym},
                     progress=False)
    with torch.no_grad():
        assert rel_err(loaded(ids()).logits, expected(ids()).logits) <= 1e-5
    kind = "sym" if sym else "asym"
    assert f"GPTQ W4A16 g32 {kind}, 4 experts" in str(pymllm_fx.explain(loaded, file=None))


def test_gptq_moe_checkpoint_missing_an_expert_tensor_is_named(tmp_path):
    _, path = gptq_expert_checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.1.w2.scales"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.1\.down"):
        quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)


def test_awq_moe_checkpoint_loads_its_experts(tmp_path):
    model, path = expert_checkpoint(tmp_path, "qwen3_moe", "awq", {"quant_method": "int4", "group_size": 32},
                                    awq_projection(32))
    loaded = quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)
    layers = [m for m in loaded.modules() if isinstance(m, FusedMoE)]
    assert len(layers) == 2 and all(m.quant_method.name == "awq" for m in layers)
    expected = quiet(pymllm_fx.quantize, model, {"quant_method": "int4", "group_size": 32}, progress=False)
    with torch.no_grad():
        assert rel_err(loaded(ids()).logits, expected(ids()).logits) <= 1e-5
    assert "AWQ W4A16 g32 asym, 4 experts" in str(pymllm_fx.explain(loaded, file=None))
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.qzeros"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.2\.up \(stacked into w13_qzeros\)"):
        quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)


@pytest.mark.parametrize("arch,sym", [("mixtral", True), ("qwen3_moe", False)], ids=["sym", "asym"])
def test_compressed_tensors_int4_moe_checkpoint_loads_its_experts(tmp_path, arch, sym):
    method = {"quant_method": "int4", "group_size": 32, "sym": sym}
    model, path = expert_checkpoint(tmp_path, arch, "compressed-tensors", method, ct_int4_projection(32, sym))
    loaded = quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)
    layers = [m for m in loaded.modules() if isinstance(m, FusedMoE)]
    assert len(layers) == 2 and all(m.quant_method.name == "compressed-tensors" for m in layers)
    expected = quiet(pymllm_fx.quantize, model, method, progress=False)
    with torch.no_grad():
        assert rel_err(loaded(ids()).logits, expected(ids()).logits) <= 1e-5
    assert f"W4A16 g32 {'sym' if sym else 'asym'}, 4 experts" in str(pymllm_fx.explain(loaded, file=None))


def test_compressed_tensors_expert_with_a_wrong_weight_shape_is_named(tmp_path):
    method = {"quant_method": "int4", "group_size": 32, "sym": True}
    _, path = expert_checkpoint(tmp_path, "mixtral", "compressed-tensors", method, ct_int4_projection(32, True))
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight_shape"] = torch.tensor([64, 128])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight_shape.*\[64, 128\].*\[out=64, in=64\]"):
        quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)


def fp8_expert_checkpoint(tmp_path, arch: str, quantization_config: dict, projection):
    """A float ``arch`` checkpoint whose experts alone are stored as fp8 linears, each written by
    ``projection(weight) -> ({tensor name: tensor}, the weight it dequantizes to)``; returns the float
    model with those dequantized expert weights (what the loaded experts must compute) and the path."""
    import json

    model, path = saved(arch, tmp_path)
    tensors = load_file(path / "model.safetensors")
    block, gate, up, down = EXPERT_NAMES[arch]
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        inter = experts.down_proj.shape[2]
        for e in range(experts.gate_up_proj.shape[0]):
            for proj, rows, stack in ((gate, slice(0, inter), experts.gate_up_proj),
                                      (up, slice(inter, 2 * inter), experts.gate_up_proj),
                                      (down, slice(None), experts.down_proj)):
                written, dequantized = projection(stack[e, rows].detach())
                name = f"model.layers.{layer}.{block}.experts.{e}.{proj}"
                del tensors[f"{name}.weight"]
                tensors.update({f"{name}.{key}": value for key, value in written.items()})
                with torch.no_grad():
                    stack[e, rows] = dequantized
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))
    return model, path


def fp8_projection(strategy: str, block=(32, 32), block_scale_name: str = "weight_scale_inv"):
    """e4m3 ``weight`` (N, K) and its scale: per tensor (vLLM / AutoFP8 ``weight_scale``, one value),
    per channel (compressed-tensors ``weight_scale`` (N, 1)) or per block (DeepSeek-V3
    ``weight_scale_inv`` (N/bn, K/bk): despite the name, the weight is code times scale)."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max

    def write(w):
        n, k = w.shape
        if strategy == "tensor":
            scale = w.abs().amax() / fp8_max
            per_weight = scale.expand(n, k)
        elif strategy == "channel":
            scale = w.abs().amax(dim=1, keepdim=True) / fp8_max
            per_weight = scale.expand(n, k)
        else:
            bn, bk = block
            scale = w.reshape(n // bn, bn, k // bk, bk).abs().amax(dim=(1, 3)) / fp8_max
            per_weight = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        q = (w / per_weight).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        name = block_scale_name if strategy == "block" else "weight_scale"
        return {"weight": q, name: scale.float().contiguous()}, q.float() * per_weight

    return write


def ct_fp8_config(strategy: str) -> dict:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    if strategy == "block":  # the FP8_BLOCK preset, at a tiny block
        weights["block_structure"] = [32, 32]
        acts.update(strategy="group", group_size=32)
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


FP8_CHECKPOINTS = {  # name -> (quantization_config, projection, explain() detail)
    "fp8-tensor": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, fp8_projection("tensor"),
                   "per-tensor weight scale"),
    "ct-fp8-channel": (ct_fp8_config("channel"), fp8_projection("channel"), "per-channel weight scale"),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
                  fp8_projection("block"), "32x32 block weight scales"),
    "ct-fp8-block": (ct_fp8_config("block"), fp8_projection("block", block_scale_name="weight_scale"),
                     "32x32 block weight scales"),
}


@pytest.mark.parametrize("name", list(FP8_CHECKPOINTS))
def test_fp8_moe_checkpoint_loads_its_experts_as_stored(tmp_path, name):
    config, projection, detail = FP8_CHECKPOINTS[name]
    model, path = fp8_expert_checkpoint(tmp_path, "qwen3_moe", config, projection)
    loaded = quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)
    layers = [m for m in loaded.modules() if isinstance(m, FusedMoE)]
    assert len(layers) == 2 and all(m.w13_qweight.dtype == torch.float8_e4m3fn for m in layers)
    with torch.no_grad():  # weight-only: the float model with the dequantized expert weights
        assert rel_err(loaded(ids()).logits, model(ids()).logits) <= 1e-5
    assert f"W8A16 e4m3 checkpoint, {detail}, 4 experts" in str(pymllm_fx.explain(loaded, file=None))


def test_fp8_block_experts_whose_gate_would_share_a_scale_row_with_up_are_refused(tmp_path):
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 32]}
    _, path = fp8_expert_checkpoint(tmp_path, "qwen3_moe", config, fp8_projection("block", (32, 32)))
    with pytest.raises(ValueError, match=r"mlp\.experts: w13 stacks projections of 32 rows, not a multiple of the 64-row"):
        quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)


def same_experts(a, b) -> None:
    """Every experts layer of ``b`` holds exactly the tensors of ``a``'s."""
    layers = [(name, m) for name, m in a.named_modules() if isinstance(m, FusedMoE)]
    assert layers
    for name, layer in layers:
        other = b.get_submodule(name)
        mine, theirs = dict(layer.named_parameters(recurse=False)), dict(other.named_parameters(recurse=False))
        assert mine.keys() == theirs.keys(), (name, sorted(mine), sorted(theirs))
        for key, tensor in mine.items():
            assert tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), f"{name}.{key}"


ROUND_TRIPS = {  # experts quantized by quantize(method), saved as format; a tensor each expert projection has
    "int4-awq": ({"quant_method": "int4", "group_size": 32}, "awq", "qweight"),
    "int4-gptq-sym": ({"quant_method": "int4", "group_size": 32, "sym": True}, "gptq", "g_idx"),
    "int4-gptq-asym": ({"quant_method": "int4", "group_size": 32}, "gptq", "qzeros"),
    "int4-ct": ({"quant_method": "int4", "group_size": 32}, "compressed-tensors", "weight_zero_point"),
    "int8-ct": ("int8", "compressed-tensors", "weight_packed"),
    "fp8-ct": ("fp8", "compressed-tensors", "weight_scale"),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_quantized_experts_save_per_expert_and_load_back_exactly(tmp_path, name):
    method, fmt, tensor = ROUND_TRIPS[name]
    model, _ = saved("mixtral", tmp_path)
    quantized = quiet(pymllm_fx.quantize, model, method, progress=False)
    out = pymllm_fx.save_quantized(quantized, tmp_path / "out", fmt, progress=False)
    names = set(load_file(out / "model.safetensors"))
    for proj in ("w1", "w3", "w2"):  # the names transformers saves the float experts under
        assert f"model.layers.1.block_sparse_moe.experts.3.{proj}.{tensor}" in names
    assert not any("experts.gate_up_proj" in n or "w13_" in n for n in names)
    loaded = quiet(pymllm_fx.from_pretrained, out, device="cpu", progress=False)
    same_experts(quantized, loaded)
    with torch.no_grad():
        assert rel_err(loaded(ids()).logits, quantized(ids()).logits) <= 1e-6


@pytest.mark.parametrize("name,fmt", [("fp8-tensor", "fp8"), ("fp8-block", "fp8"), ("ct-fp8-block", "compressed-tensors")])
def test_fp8_checkpoint_experts_save_and_load_back_exactly(tmp_path, name, fmt):
    config, projection, _ = FP8_CHECKPOINTS[name]
    _, path = fp8_expert_checkpoint(tmp_path, "qwen3_moe", config, projection)
    loaded = quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)
    out = pymllm_fx.save_quantized(loaded, tmp_path / "out", fmt, progress=False)
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in load_file(out / "model.safetensors")
    again = quiet(pymllm_fx.from_pretrained, out, device="cpu", progress=False)
    same_experts(loaded, again)
    with torch.no_grad():
        assert rel_err(again(ids()).logits, loaded(ids()).logits) <= 1e-6


def test_saving_experts_a_format_cannot_load_back_is_refused_before_writing(tmp_path):
    model, _ = saved("mixtral", tmp_path)
    quantized = quiet(pymllm_fx.quantize, model, "int8", progress=False)
    with pytest.raises(ValueError, match=r"block_sparse_moe\.experts\.0\.w[123]: cannot write an int8 per-channel layer as 'gptq': GPTQ experts"):
        pymllm_fx.save_quantized(quantized, tmp_path / "out", "gptq", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_failure_calibrating_experts_leaves_the_model_unchanged(tmp_path, monkeypatch):
    from pymllm_fx.methods.int8 import Int8MoEMethod

    _, path = saved("mixtral", tmp_path)
    torch.manual_seed(5)
    config = transformers.AutoConfig.for_model("mixtral", **COMMON, **CONFIGS["mixtral"])
    other = transformers.AutoModelForCausalLM.from_config(config).eval()
    before = {k: v.clone() for k, v in other.state_dict().items()}

    def fail(self, layer):
        raise RuntimeError("simulated failure while calibrating experts")

    monkeypatch.setattr(Int8MoEMethod, "process_weights_after_loading", fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        quiet(pymllm_fx.quantize, other, "int8", weights=path, progress=False)
    assert not any(isinstance(m, FusedMoE) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def unanchored_rules(real_rules):
    """transformers 5.17's renaming, whose source patterns are not anchored at the end: a
    quantized projection's ``gate_proj.weight_scale`` matches ``gate_proj.weight`` and is renamed to
    ``gate_up_proj_scale``, a stack that no model has."""
    def rules(model):
        found = real_rules(model)
        if found is None:
            return None
        rename, renamings, converters = found

        def rename_unanchored(name, renamings, converters):
            stem, _, suffix = name.rpartition(".")
            if suffix.startswith("weight_"):
                new, source = rename(f"{stem}.weight", renamings, converters)
                if source is not None:
                    return new + suffix[len("weight"):], source
            return rename(name, renamings, converters)

        return rename_unanchored, renamings, converters
    return rules


@pytest.mark.parametrize("fmt", ["ct-int4", "fp8-block"])
def test_expert_checkpoints_load_under_unanchored_renaming(tmp_path, fmt, monkeypatch):
    """The GPU machine's transformers (5.17) renamed experts' ``weight_scale``/``weight_packed`` onto
    stacks that do not exist, and every compressed-tensors and fp8 expert checkpoint failed to load."""
    from pymllm_fx.loading import renames

    monkeypatch.setattr(renames, "_rules", unanchored_rules(renames._rules))
    rename, renamings, converters = renames._rules(saved("qwen3_moe", tmp_path / "probe")[0])
    assert rename("model.layers.0.mlp.experts.0.gate_proj.weight_scale", renamings, converters)[0].endswith("_proj_scale")
    if fmt == "ct-int4":
        method = {"quant_method": "int4", "group_size": 32, "sym": True}
        model, path = expert_checkpoint(tmp_path, "qwen3_moe", "compressed-tensors", method, ct_int4_projection(32, True))
        expected = quiet(pymllm_fx.quantize, model, method, progress=False)
    else:
        config, projection, _ = FP8_CHECKPOINTS[fmt]
        expected, path = fp8_expert_checkpoint(tmp_path, "qwen3_moe", config, projection)
    loaded = quiet(pymllm_fx.from_pretrained, path, device="cpu", progress=False)
    assert len([m for m in loaded.modules() if isinstance(m, FusedMoE)]) == 2
    with torch.no_grad():
        assert rel_err(loaded(ids()).logits, expected(ids()).logits) <= 1e-5
