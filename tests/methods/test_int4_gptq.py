"""GPTQ calibration (``{"quant_method": "int4", "gptq": true}`` with ``calibration=``) on tiny Llama
and Qwen2: the solver against a plain loop of the algorithm, the layer error against round to
nearest on the inputs GPTQ saw, act-order through save_quantized / from_pretrained, the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import pymllm_fx
from pymllm_fx import calibration as calibration_module
from pymllm_fx.kernels.w4a16 import unpack_int4
from pymllm_fx.methods.int4 import Int4LinearMethod
from pymllm_fx.methods.int4_gptq import (
    GPTQInt4LinearMethod,
    dequantize,
    gptq_quantize,
    group_grid,
    inverse_cholesky,
    round_to_nearest,
)
from pymllm_fx.calibration import find_blocks
from hf_models import build_model

ARCHS = ["llama", "qwen2"]


def gptq_config(**overrides):
    return {"quant_method": "int4", "gptq": True, "group_size": 32, "sym": True, "desc_act": False, **overrides}


def tokens(count=8, length=24, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(count)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {arch: build_model(arch) for arch in ARCHS}


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def dequantized(layer):
    """The float weight a GPTQ-calibrated layer runs, in the input features' own order."""
    k = layer.input_size_per_partition
    codes = unpack_int4(layer.qweight.data, k)
    return dequantize(codes, layer.scales.data, layer.zeros, layer.quant_method.group_size, layer.perm)


# --- the solver -----------------------------------------------------------------------------------


def plain_gptq(weight, hessian, group_size, sym, damp=0.01):
    """GPTQ written as the paper states it, one column at a time with every update applied at once
    (no lazy blocks), float64: the reference for the blocked solver."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            scale, zero = group_grid(w[:, j:j + group_size].float(), sym, torch.float32)
            scale, zero = scale.double(), zero.double()
        q = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, 15)
        codes[:, j] = q.to(torch.uint8)
        err = (w[:, j] - (q - zero) * scale) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
    return codes


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_blocked_solver_is_the_plain_algorithm(sym, group_size):
    """Lazy 128-column blocks and groups read after every earlier column's update give the codes of
    the column-by-column algorithm (K = 320: two whole blocks and a partial one, a tail group at 128)."""
    torch.manual_seed(group_size + sym)
    x = torch.randn(400, 320) @ (torch.eye(320) + 0.3 * torch.randn(320, 320))  # correlated inputs
    hessian = 2 * x.t() @ x / x.shape[0]
    weight = torch.randn(24, 320)
    codes, scales, zeros, perm = gptq_quantize(weight, hessian, group_size, sym, desc_act=False)
    assert perm is None and (zeros is None) == sym
    expected = plain_gptq(weight, hessian, group_size, sym)
    assert (codes != expected).float().mean() < 1e-3  # float32 against float64: a rare tie may differ


def test_identity_hessian_is_round_to_nearest():
    """Uncorrelated inputs pass no error on: GPTQ then rounds each weight to nearest on the same grid."""
    torch.manual_seed(1)
    weight = torch.randn(16, 128)
    codes, scales, zeros, _ = gptq_quantize(weight, torch.eye(128), 32, sym=False, desc_act=False)
    assert torch.equal(dequantize(codes, scales, zeros, 32, None), round_to_nearest(weight, 32, sym=False))


def test_act_order_numbers_groups_by_decreasing_hessian_diagonal():
    torch.manual_seed(2)
    k = 128
    scale = torch.rand(k) * 4
    x = torch.randn(300, k) * scale
    hessian = 2 * x.t() @ x / 300
    weight = torch.randn(8, k)
    codes, scales, zeros, perm = gptq_quantize(weight, hessian, 32, sym=True, desc_act=True)
    order = torch.argsort(hessian.diagonal(), descending=True)
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[order] = torch.arange(k) // 32
    assert torch.equal(perm.long(), torch.sort(g_idx, stable=True).indices)  # K sorted by group, stable
    assert torch.equal(g_idx[perm.long()], torch.arange(k) // 32)
    # Act-order is GPTQ on the columns taken in that order: the same codes and group grids.
    in_order = gptq_quantize(weight[:, order], hessian[order][:, order], 32, sym=True, desc_act=False)
    position = torch.empty(k, dtype=torch.long)
    position[order] = torch.arange(k)
    assert torch.equal(codes, in_order[0][:, position[perm.long()]])
    assert torch.equal(scales, in_order[1])


def test_dead_inputs_zero_their_weight_column():
    torch.manual_seed(3)
    x = torch.randn(200, 64)
    x[:, 5] = 0
    codes, scales, zeros, _ = gptq_quantize(torch.randn(4, 64), 2 * x.t() @ x / 200, 32, sym=True, desc_act=False)
    assert torch.all(dequantize(codes, scales, zeros, 32, None)[:, 5] == 0)


def test_unfactorable_hessian_is_a_clear_error():
    hessian = torch.full((8, 8), float("nan"))
    with pytest.raises(ValueError, match="cannot be factored"):
        inverse_cholesky(hessian, 0.01, "blk.proj")


# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_found_from_the_module_structure(models, arch):
    paths = [name for name, m in models[arch].named_modules() if isinstance(m, torch.nn.Linear)]
    assert find_blocks(models[arch], paths)[0] == "model.layers"


@pytest.mark.parametrize("arch, desc_act, linears", [
    ("llama", False, 14), ("llama", True, 14), ("qwen2", False, 14), ("qwen2", True, 14),
    ("gpt2", False, 8),  # Conv1D layers (weights stored transposed), blocks in transformer.h
], ids=["llama-plain", "llama-act-order", "qwen2-plain", "qwen2-act-order", "gpt2-plain"])
def test_gptq_layer_error_below_round_to_nearest(models, arch, desc_act, linears):
    """‖W X − Ŵ X‖ over the calibration inputs each linear sees in the quantized model (the inputs
    GPTQ calibrated it on: every earlier layer already quantized), GPTQ against round to nearest on
    the same grid, for every linear."""
    model = models[arch] if arch in models else build_model(arch)
    calibration = tokens()
    quantized = pymllm_fx.quantize(copy.deepcopy(model), gptq_config(desc_act=desc_act), calibration=calibration,
                                   progress=False)
    inputs, handles = {}, []
    for name, module in quantized.named_modules():
        if isinstance(getattr(module, "quant_method", None), GPTQInt4LinearMethod):
            inputs[name] = []
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]))))
    for ids in calibration:
        logits(quantized, ids[None])
    for handle in handles:
        handle.remove()
    assert len(inputs) == linears
    permuted = 0
    for name, xs in inputs.items():
        x = torch.cat(xs)
        layer = quantized.get_submodule(name)
        assert layer.gptq_calibrated
        permuted += layer.perm is not None
        weight = model.get_submodule(name).weight.detach()
        weight = weight.t() if arch == "gpt2" else weight  # Conv1D: (in, out)
        gptq = ((weight - dequantized(layer)) @ x.t()).norm()
        rtn = ((weight - round_to_nearest(weight, 32, sym=True)) @ x.t()).norm()
        assert gptq < rtn, f"{name}: GPTQ {gptq:.4g} >= round to nearest {rtn:.4g}"
    assert (permuted > 0) == desc_act


def test_each_block_calibrates_on_the_quantized_models_own_inputs(monkeypatch):
    """The hidden states GPTQ feeds each block are what the finished quantized model feeds it, on a
    Qwen2 whose layers alternate sliding-window and full attention: each block runs with its own
    recorded arguments (mask included), sequences of equal length batched, the others alone."""
    torch.manual_seed(4)
    model = build_model("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    calibration = tokens(count=3, length=12, seed=2) + tokens(count=1, length=7, seed=3)
    fed, real = [], calibration_module.calibrate_block

    def recording(work, prefix, members, conv1d, calls, hidden, *args):
        fed.append((prefix, [h.clone() for h in hidden], [c.kwargs.get("attention_mask") for c in calls]))
        return real(work, prefix, members, conv1d, calls, hidden, *args)

    monkeypatch.setattr(calibration_module, "calibrate_block", recording)
    quantized = pymllm_fx.quantize(copy.deepcopy(model), gptq_config(desc_act=True), calibration=calibration,
                                   progress=False)
    assert [prefix for prefix, _, _ in fed] == ["model.layers.0.", "model.layers.1.", "model.layers.2."]
    assert [h.shape[:2] for h in fed[0][1]] == [(3, 12), (1, 7)]  # two batches: 3 x 12 tokens, 1 x 7
    masks = [m for _, _, m in fed]
    assert masks[0][0] is not None and masks[1][0] is None and masks[2][0] is not None  # per layer
    seen = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0]))
               for i, layer in enumerate(quantized.model.layers)]
    logits(quantized, torch.stack(calibration[:3]))
    logits(quantized, calibration[3][None])
    for handle in handles:
        handle.remove()
    for i, (_, hidden, _) in enumerate(fed):
        for got, expected in zip(hidden, seen[i]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("arch", ARCHS)
def test_act_order_round_trip_through_gptq_checkpoint(models, arch, sym, tmp_path):
    """save_quantized(format="gptq") writes desc_act and an unsorted g_idx; from_pretrained loads
    the very same tensors and logits."""
    calibration = tokens(seed=1)
    quantized = pymllm_fx.quantize(copy.deepcopy(models[arch]), gptq_config(desc_act=True, sym=sym),
                                   calibration=calibration, progress=False)
    explained = pymllm_fx.explain(quantized, file=None)
    assert sum("GPTQ act-order" in row.detail for row in explained.rows) == 14
    pymllm_fx.save_quantized(quantized, tmp_path, format="gptq", progress=False)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True and config["sym"] is sym and config["group_size"] == 32
    assert config["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
    assert not torch.equal(g_idx, torch.sort(g_idx).values)  # act-order: groups interleave over K
    loaded = pymllm_fx.from_pretrained(tmp_path, device="cpu", progress=False)
    for name, module in quantized.named_modules():
        if hasattr(module, "qweight"):
            other = loaded.get_submodule(name)
            assert torch.equal(other.qweight, module.qweight), name
            assert (other.perm is None and module.perm is None) or torch.equal(other.perm, module.perm), name
            assert torch.equal(other.scales, module.scales), name
    ids = tokens(count=2, length=16, seed=5)
    for x in ids:
        assert torch.equal(logits(loaded, x[None]), logits(quantized, x[None]))


def test_texts_and_tokenizer(models):
    """calibration=(texts, tokenizer): each text one sequence, through the tokenizer's input_ids."""

    def tokenizer(text):
        return {"input_ids": [ord(c) % 128 for c in text]}

    texts = ["the quick brown fox jumps over the lazy dog", "a second, longer text to calibrate on " * 3]
    by_text = pymllm_fx.quantize(copy.deepcopy(models["llama"]), gptq_config(), calibration=(texts, tokenizer),
                                 progress=False)
    by_ids = pymllm_fx.quantize(copy.deepcopy(models["llama"]), gptq_config(),
                                calibration=[torch.tensor(tokenizer(t)["input_ids"]) for t in texts], progress=False)
    ids = tokens(count=1, length=12, seed=3)[0][None]
    assert torch.equal(logits(by_text, ids), logits(by_ids, ids))


def test_config_dict_and_describe(models):
    method = pymllm_fx.resolve(gptq_config(group_size=64, desc_act=True, damp_percent=0.05))
    assert isinstance(method, GPTQInt4LinearMethod)
    assert (method.group_size, method.sym, method.desc_act, method.damp_percent) == (64, True, True, 0.05)
    assert type(pymllm_fx.resolve({"quant_method": "int4", "gptq": False})) is Int4LinearMethod
    with pytest.raises(ValueError, match="desc_act"):
        pymllm_fx.resolve({"quant_method": "int4", "desc_act": True})  # act-order only with GPTQ
    with pytest.raises(ValueError, match="damp_percent"):
        pymllm_fx.resolve(gptq_config(damp_percent=2))
    with pytest.raises(ValueError, match="group_size"):
        pymllm_fx.resolve(gptq_config(group_size=48))


# --- errors: clear, and the model unchanged -------------------------------------------------------


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("calibration, pattern", [
    ([], "calibration is empty"),
    ((), "calibration is empty"),
    ([torch.rand(16)], "dtype torch.float32; token ids must be integers"),
    ([torch.tensor([1, 2, 3]), torch.tensor([5, 300])], r"sequence 1 holds token ids in \[5, 300\], outside the "
                                                        r"model's vocabulary \[0, 128\)"),
    ([torch.tensor([-1, 2])], "outside the model's vocabulary"),
    ([torch.zeros(0, dtype=torch.long)], "sequence 0 has no tokens"),
    ([torch.zeros(2, 0, dtype=torch.long)], "has no tokens"),
    ([[1, 2, 3]], "is a list, not a tensor of token ids"),
    ([torch.zeros(1, 2, 3, dtype=torch.long)], "has shape"),
    ((["", "text"], lambda t: {"input_ids": [ord(c) % 128 for c in t]}), "text 0 tokenizes to no tokens"),
    ("some text", "list of token-id tensors or \\(texts, tokenizer\\)"),
])
def test_bad_calibration_is_a_clear_error(models, calibration, pattern):
    model = copy.deepcopy(models["llama"])
    before = state(model)
    with pytest.raises(ValueError, match=pattern):
        pymllm_fx.quantize(model, gptq_config(), calibration=calibration, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_gptq_needs_calibration_and_calibration_needs_gptq(models, tmp_path):
    model = copy.deepcopy(models["llama"])
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        pymllm_fx.quantize(model, gptq_config(), progress=False)
    with pytest.raises(ValueError, match="calibration= is used by GPTQ only"):
        pymllm_fx.quantize(model, "int4", calibration=tokens(), progress=False)
    with pytest.raises(ValueError, match="not a checkpoint"):
        pymllm_fx.quantize(model, gptq_config(), calibration=tokens(), weights=tmp_path, progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_failure_mid_calibration_leaves_the_model_unchanged(models, monkeypatch):
    """The second block's first GPTQ call fails: nothing of the model has changed, no block keeps
    the recorder's forward, training flags are as they were, and a later run works."""
    model = copy.deepcopy(models["qwen2"])
    before, ids = state(model), tokens(count=1, length=10, seed=7)[0][None]
    expected = logits(model, ids)
    model.train()  # calibration runs in eval mode and puts the flags back
    real, calls = calibration_module.gptq_quantize, []

    def failing(*args, **kwargs):
        calls.append(kwargs["where"])
        if len(calls) == 5:  # q/k/v, o, gate/up, down of block 0, then block 1's q/k/v
            raise RuntimeError("simulated failure in block 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration_module, "gptq_quantize", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pymllm_fx.quantize(model, gptq_config(), calibration=tokens(), progress=False)
    assert calls[4].startswith("model.layers.1.self_attn.q_proj")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert all(module.training for module in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    model.eval()
    assert torch.equal(logits(model, ids), expected)
    monkeypatch.setattr(calibration_module, "gptq_quantize", real)
    pymllm_fx.quantize(model, gptq_config(), calibration=tokens(), progress=False)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
