"""Tensor parallelism: gloo process groups of 2 and 4 ranks on CPU, and NCCL at 2 ranks on 2 GPUs
(one process per GPU; skipped without them), spawned with torch.multiprocessing.

Every rank builds the same tiny Llama, quantizes it with ``process_group`` = the default group,
and must produce the logits of the unsharded quantized model (computed in the parent on the same
kind of device); shard shapes and the refusal of a group size that does not divide a rank's inputs
are checked in the same processes. Under NCCL the int4 model also decodes through CUDA graphs
(``GreedyDecoder``, ``mode="reduce-overhead"``, fullgraph) and must give the tokens of tp 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pymllm_fx
from pymllm_fx.evaluation import GreedyDecoder
from pymllm_fx.layers.linear import ColumnParallelLinear, RowParallelLinear
from checks import backend_params, rel_err, spawn_ranks

transformers = pytest.importorskip("transformers")

# 8 query heads and 4 key/value heads of 16: every projection splits into whole heads at tp 2 and 4.
CONFIG = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=256, head_dim=16)
METHODS = {"none": "none", "int8": "int8", "int4": {"quant_method": "int4", "group_size": 32}, "fp8": "fp8"}
# Sharded sums round differently from one matmul (1e-5). Calibrating a row-parallel layer from
# float weights, int8 and fp8 take each output row's scale over this rank's slice of the inputs
# (as vLLM's online quantization does per shard), a slightly different rounding than over the
# whole row; int4's groups lie inside one rank, so it is the same quantization.
TOL = {"none": 1e-5, "int8": 1e-2, "int4": 1e-5}
# fp8 also quantizes each rank's slice of the activations with its own per-token scale (as TP
# engines do), so its rounding noise is a different draw of the same size: tp=N must be as close
# to the float model as tp=1 is (its error at most 1.25x tp=1's), not equal to tp=1.
FP8_NOISE_RATIO = 1.25


def build(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


DECODE_TOKENS = 6


def greedy(model, device, compile: bool) -> torch.Tensor:
    """``DECODE_TOKENS`` greedy tokens after the first prompt of ``ids()``; compiled: one fullgraph
    step under CUDA graphs."""
    prompt = ids()[:1].to(device)
    decoder = GreedyDecoder(model, max_cache_len=prompt.shape[1] + DECODE_TOKENS, compile=compile,
                            mode="reduce-overhead" if compile else None)
    return decoder.generate(prompt, DECODE_TOKENS)[0].cpu()


def check_cuda_graph_decode(model, device, expected: torch.Tensor, what: str) -> None:
    """Greedy decode under CUDA graphs: the tokens of tp 1, one graph, no CUDA graph skipped."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tokens = greedy(model, device, compile=True)
    assert torch.equal(tokens, expected), f"{what}: CUDA-graph decode gave {tokens.tolist()}, tp=1 {expected.tolist()}"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, "CUDA graphs were skipped"
    torch._dynamo.reset()


# Checkpoints written by save_quantized, loaded by from_pretrained on every rank: each keeps only
# its shard of the packed weights, group scales, zero points and GPTQ's g_idx. Weight-only, so the
# sharded model computes what the whole one does up to summation order.
CHECKPOINTS = {
    "awq": ({"quant_method": "int4", "group_size": 32}, "awq"),
    "gptq": ({"quant_method": "int4", "group_size": 32}, "gptq"),
    "ct-int4": ({"quant_method": "int4", "group_size": 32, "sym": True}, "compressed-tensors"),
    "ct-int8": ("int8", "compressed-tensors"),
}


def _body(rank: int, world: int, device: torch.device, expected: dict, checkpoints: dict) -> None:
    float_model = build().to(device)
    for name, method in METHODS.items():
        model = pymllm_fx.quantize(copy.deepcopy(float_model), method, progress=False)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert isinstance(attn.q_proj, ColumnParallelLinear) and isinstance(mlp.up_proj, ColumnParallelLinear)
        assert isinstance(attn.o_proj, RowParallelLinear) and isinstance(mlp.down_proj, RowParallelLinear)
        assert type(model.lm_head) is torch.nn.Linear  # skipped: whole on every rank
        for a, b in ((attn.q_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):  # column siblings fuse per rank
            first = next(iter(a.parameters(recurse=False)))
            assert first.untyped_storage().data_ptr() == next(iter(b.parameters(recurse=False))).untyped_storage().data_ptr()
        if name == "int4":  # packed shards: 8 codes per int32 along K, groups of 32
            assert tuple(attn.k_proj.qweight.shape) == (64 // world, 128 // 8)
            assert tuple(mlp.down_proj.qweight.shape) == (128, 256 // world // 8)
            assert tuple(mlp.down_proj.scales.shape) == (128, 256 // world // 32)
        with torch.no_grad():
            logits = model(ids().to(device)).logits.cpu()
        if name == "fp8":
            err, bound = rel_err(logits, expected["float"]), FP8_NOISE_RATIO * rel_err(expected[name], expected["float"])
            assert err <= bound, f"fp8: tp={world} is {err:.2e} from the float model, tp=1 is {bound / FP8_NOISE_RATIO:.2e}"
        else:
            err = rel_err(logits, expected[name])
            assert err <= TOL[name], f"{name}: tp={world} logits differ from tp=1 by {err:.2e}"
        if name == "int4" and world == 2:  # every rank: the traced forward runs the collectives
            explained = torch._dynamo.explain(model)(ids().to(device))
            assert explained.graph_break_count == 0, explained.break_reasons
            torch._dynamo.reset()
            if device.type == "cuda":  # NCCL
                check_cuda_graph_decode(model, device, expected["decode"], f"int4 tp={world}")
    for name, path in checkpoints.items():
        model = pymllm_fx.from_pretrained(path, device=device, progress=False)
        assert isinstance(model.model.layers[1].mlp.down_proj, RowParallelLinear)
        if name == "gptq":
            assert tuple(model.model.layers[1].mlp.down_proj.scales.shape) == (128, 256 // world // 32)
        with torch.no_grad():
            err = rel_err(model(ids().to(device)).logits.cpu(), expected[name])
        assert err <= 1e-5, f"{name} checkpoint: tp={world} logits differ from tp=1 by {err:.2e}"
    # A group size that does not divide a rank's inputs: refused before any weight is loaded.
    torch.manual_seed(0)  # down_proj's 320 inputs: 160 or 80 a rank (o_proj's 128: 32 at tp 4)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, "intermediate_size": 320})).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = r"self_attn\.o_proj\b.*rank's 32 of 128" if world == 4 else r"mlp\.down_proj\b.*rank's 160 of 320"
    with pytest.raises(ValueError, match=rf"{first} input features are not a multiple of group_size=64"):
        pymllm_fx.quantize(model, {"quant_method": "int4", "group_size": 64}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend, world", backend_params(worlds=(2, 4)))
def test_tensor_parallel_logits_match_one_rank(backend, world, tmp_path):
    """tp=1 runs here on the kind of device the ranks use (the first GPU for NCCL), then moves to the CPU."""
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    float_model = build().to(device)
    x = ids().to(device)
    with torch.no_grad():
        expected = {"float": float_model(x).logits.cpu()}
        for name, method in METHODS.items():
            model = pymllm_fx.quantize(copy.deepcopy(float_model), method, progress=False)
            expected[name] = model(x).logits.cpu()
            if name == "int4" and backend == "nccl":
                expected["decode"] = greedy(model, device, compile=False)
    checkpoints = {}
    for name, (method, fmt) in CHECKPOINTS.items():
        checkpoints[name] = tmp_path / name
        quantized = pymllm_fx.quantize(build(), method, progress=False)
        pymllm_fx.save_quantized(quantized, checkpoints[name], format=fmt, progress=False)
        with torch.no_grad():
            expected[name] = pymllm_fx.from_pretrained(checkpoints[name], device=device, progress=False)(x).logits.cpu()
    del float_model, model
    spawn_ranks(_body, world, backend, expected, checkpoints)


# --- W8A8 int8 ------------------------------------------------------------------------------------


def _w8a8_body(rank: int, world: int, device: torch.device, expected: dict, checkpoints: dict) -> None:
    # Calibrated, and a dynamic checkpoint: each rank quantizes its slice of a row-parallel
    # layer's input per token with its own scale (as TP engines do), so the noise is a new draw
    # of the same size: as close to the float model as tp=1 is (fp8's rule above).
    model = pymllm_fx.quantize(build(), "w8a8", progress=False)
    assert tuple(model.model.layers[0].mlp.down_proj.qweight.shape) == (128, 256 // world)
    runs = {"w8a8": model, "ct-w8a8-dynamic": pymllm_fx.from_pretrained(checkpoints["ct-w8a8-dynamic"], progress=False)}
    for name, run in runs.items():
        with torch.no_grad():
            err = rel_err(run(ids()).logits, expected["float"])
        bound = FP8_NOISE_RATIO * rel_err(expected[name], expected["float"])
        assert err <= bound, f"{name}: tp={world} is {err:.2e} from the float model, tp=1 is {bound / FP8_NOISE_RATIO:.2e}"
    explained = torch._dynamo.explain(model)(ids())
    assert explained.graph_break_count == 0, explained.break_reasons
    # Static scales (and zero points) are the same on every rank: the int8 values are those of
    # tp=1, and the zero-point correction of each rank's slice adds up to the whole.
    static = pymllm_fx.from_pretrained(checkpoints["ct-w8a8-static-asym"], progress=False)
    with torch.no_grad():
        err = rel_err(static(ids()).logits, expected["ct-w8a8-static-asym"])
    assert err <= 1e-5, f"static W8A8 checkpoint: tp={world} logits differ from tp=1 by {err:.2e}"


def test_w8a8_tensor_parallel_matches_one_rank(tmp_path):
    from methods.test_compressed_tensors import w8a8_checkpoint

    float_model = build()
    with torch.no_grad():
        expected = {"float": float_model(ids()).logits}
        expected["w8a8"] = pymllm_fx.quantize(copy.deepcopy(float_model), "w8a8", progress=False)(ids()).logits
    quantized = pymllm_fx.quantize(copy.deepcopy(float_model), "w8a8", progress=False)
    checkpoints = {"ct-w8a8-dynamic": tmp_path / "dynamic", "ct-w8a8-static-asym": tmp_path / "static"}
    pymllm_fx.save_quantized(quantized, checkpoints["ct-w8a8-dynamic"], format="compressed-tensors", progress=False)
    w8a8_checkpoint(float_model, checkpoints["ct-w8a8-static-asym"], "static-asym", torch.float32)
    for name, path in checkpoints.items():
        with torch.no_grad():
            expected[name] = pymllm_fx.from_pretrained(path, progress=False)(ids()).logits
    spawn_ranks(_w8a8_body, 2, "gloo", expected, checkpoints)
