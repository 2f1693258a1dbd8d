"""End-to-end decode benchmark: a Llama-3-8B-shaped model, bf16 vs pymllm_fx int8 / int4 / fp8 vs torchao int4.

The model is a ``LlamaForCausalLM`` built from a ``LlamaConfig`` with Llama-3-8B's shapes and random
bf16 weights (transformers' own init: normal, std 0.02), created directly on the device: nothing is
downloaded. Every method starts from the same weights (same seed).

For each method, at batch 1 (or ``--batch B`` sequences decoded together; tok/s is then per
sequence, and ``*_batch_tok_s`` counts all B; the prefill timing stays at batch 1):

gen tok/s   ``model.generate(ids, max_new_tokens=T, min_new_tokens=T, do_sample=False,
            cache_implementation="static")``, what users run. On CUDA, transformers compiles the
            forward of the decode steps itself (``GenerationMixin._valid_auto_compile_criteria``: a
            compileable cache on cuda and no ``disable_compile``; ``get_compiled_call`` with the default
            ``CompileConfig``: inductor, mode="reduce-overhead", fullgraph=False); the prefill runs eager.
            The prefill is taken out by difference: decode tok/s = (T - 1) / (median time of
            ``generate(T)`` - median time of ``generate(1)``), since ``generate(T)`` is one prefill (which
            yields the first token) plus T - 1 decode steps and ``generate(1)`` is the prefill alone.
lean tok/s  ``pymllm_fx.evaluation.GreedyDecoder(model, compile=True, mode="reduce-overhead")``, the
            gpt-fast loop (one fixed-shape compiled step per token, CUDA graphs): (T - 1) decode steps
            over the seconds that ``GreedyDecoder.generate`` reports (prefill excluded), median. Under
            CUDA graphs each step's token is cloned (the next replay overwrites a graph's outputs).
prefill ms  eager ``model(ids, use_cache=False, logits_to_keep=1)`` on ``--prefill-len`` random tokens
            under ``torch.no_grad()``, median.
memory      peak ``torch.cuda.max_memory_allocated`` of each phase (the counter is reset after the
            caches are emptied at its start; it includes the weights, the KV cache and the CUDA graph
            pools); the model's weight bytes (parameters + buffers, quantized tensor subclasses counted
            through their inner tensors).

torchao-int4 is ``apply_torchao_int4`` in benchmarks/peers.py with lm_head left in bf16, as pymllm_fx leaves
it; the Inductor options torchao sets process-wide are restored after that method.

Each method runs in a fresh state (previous model freed, ``torch._dynamo.reset()``, which also frees
CUDA-graph trees) and is merged into ``--json`` (default ``benchmarks/results/e2e.json``) as soon as
it finishes, so one method per invocation accumulates one file; a method or phase that fails records
its error and the run goes on.

    python benchmarks/e2e.py --methods bf16                 # on the GPU, one method per command
    python benchmarks/e2e.py --methods int4 --layers 4      # a quick run on a 4-layer model
    python benchmarks/e2e.py --tiny --device cpu --no-compile --methods bf16,int8,int4 --new-tokens 8
    torchrun --nproc-per-node 2 benchmarks/e2e.py --tp 2 --methods bf16,int4   # tensor parallel, NCCL

Under ``--tp N`` every rank holds its shards (pymllm_fx.quantize with the default process group;
bf16 is sharded by the "none" method) and rank 0 reports into ``results/e2e_tpN.json``, with every
rank's peak memory (``peak_bytes_per_rank``: ``torch.cuda.max_memory_allocated`` of each phase). The
``logits`` part compares the logits of a fixed prompt with the same weights quantized whole (tp 1),
computed on rank 0 before the model is sharded and then freed (the model is built again, same seed),
so rank 0 never holds a second copy.

``--model llama3-70b`` (80 layers, hidden 8192, intermediate 28672, 64 heads, 8 key/value heads)
is built with ``--init shards`` (its default; ``benchmarks/shard_init.py``): on the meta device,
every rank drawing only its own shards, block-seeded so that tp 1 and tp N hold the same weights,
and each layer quantized as soon as it is filled (int4 at tp 1 never holds the bf16 model). Its
``logits`` part records a fingerprint (``logits_probe``) that ``benchmarks/tp_summary.py`` compares
between a tp 1 and a tp N run.

``--all-reduce one_shot|two_shot`` (under --tp) switches the layers to torch's symmetric-memory
all-reduce for messages up to ``--symm-max-bytes`` (``pymllm_fx.use_symmetric_memory``);
``inductor`` instead lets Inductor lower the functional all-reduce to its own one-shot kernel
(``torch._inductor.config._collective.auto_select``). The ``split`` part (with ``lean``) profiles
``--split-steps`` CUDA-graph decode steps with torch.profiler and sums kernel time per token into
linears, all-reduce and the rest (``split_ms_per_token``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

# The sibling modules, imported as plain modules. The repository root stays off sys.path: pymllm_fx
# must come from the installed package (pymllm_fx.passes exists only there).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch._inductor.config
from torch import nn

from common import (
    GiB,
    allocated_bytes,
    env_info,
    format_table,
    human_bytes,
    load_json,
    median,
    merge_json,
    model_bytes,
    peak_bytes,
    reset_peak,
    sync,
    timed,
)
from moe import VARIANTS as MOE_VARIANTS, set_variant  # kernels/moe.py's A/B switches

METHODS = ("bf16", "int8", "int4", "fp8", "w8a8", "torchao-int4", "bf16-fused", "int8-unfused", "int4-unfused", "fp8-unfused",
           "w8a8-unfused") + tuple(f"int4-{variant}" for variant in MOE_VARIANTS)
PHASES = ("prefill", "gen", "lean", "logits", "split")
MODELS = ("llama3-8b", "llama3-70b", "qwen3-moe")
ALL_REDUCE = ("nccl", "one_shot", "two_shot", "inductor")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "e2e.json"


# ----------------------------------------------------------------------------------------- model


def make_config(layers: Optional[int], tiny: bool, model: str = "llama3-8b"):
    from transformers import LlamaConfig

    if model == "qwen3-moe":
        return qwen3_moe_config(layers, tiny)

    if tiny and model == "llama3-70b":  # the 70B's proportions in seconds: int4 groups of 128 whole at tp 2
        shape = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    elif tiny:  # seconds on a CPU; int4-friendly widths (multiples of 128)
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    elif model == "llama3-70b":  # 80 layers: ~141 GB of bf16 weights, more than one 141 GB H200 holds
        shape = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    else:  # Llama-3-8B
        shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(
        **shape, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=128000 if not tiny else 1, eos_token_id=128001 if not tiny else 2,
    )


def qwen3_moe_config(layers: Optional[int], tiny: bool):
    """Qwen3-30B-A3B's shape (48 layers, hidden 2048, 128 experts of intermediate 768, 8 active), or a
    tiny one for a CPU check."""
    from transformers import Qwen3MoeConfig

    if tiny:
        shape = dict(hidden_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     vocab_size=1024, intermediate_size=512)
    else:
        shape = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, intermediate_size=6144)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return Qwen3MoeConfig(**shape, max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False,
                          initializer_range=0.02, bos_token_id=1, eos_token_id=2)


def build_model(config, device: torch.device, seed: int) -> nn.Module:
    """Random bf16 weights made on ``device`` directly (transformers' init: normal(0, 0.02) linears,
    experts and embeddings, ones for the norms)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def apply_method(model: nn.Module, method: str, group=None) -> nn.Module:
    """``group``: a tensor-parallel process group (bf16 is then sharded by the "none" method); None
    outside torch.distributed, False for a whole model inside it. Sibling fusion (q/k/v and gate/up
    as one GEMM under torch.compile) is on for pymllm_fx's methods; "<method>-unfused" turns it
    off, and "bf16-fused" is bf16 through pymllm_fx's "none" layers with it on."""
    import pymllm_fx

    if method == "bf16":
        return model if not group else pymllm_fx.quantize(model, "none", progress=False, process_group=group,
                                                          fuse_siblings=False)
    if method == "bf16-fused":
        return pymllm_fx.quantize(model, "none", progress=False, process_group=group)
    base, _, unfused = method.partition("-")
    if base in ("int8", "int4", "fp8", "w8a8") and unfused in ("", "unfused"):
        # int4: group_size 128, asym (the defaults)
        return pymllm_fx.quantize(model, base, progress=False, process_group=group, fuse_siblings=not unfused)
    if group:
        raise ValueError(f"{method}: no tensor-parallel version (pymllm_fx methods and bf16 only)")
    if method == "torchao-int4":
        from peers import apply_torchao_int4  # only this method needs torchao

        # lm_head stays bf16, as pymllm_fx.quantize leaves it by default: the same layers are quantized.
        out = apply_torchao_int4(model, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)
        return out if isinstance(out, nn.Module) else model
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def pymllm_method(method: str) -> Tuple[str, bool]:
    """(pymllm_fx method, sibling fusion) of a benchmark method, for the sharded builder, which runs
    every linear through pymllm_fx (bf16 through the "none" method, as under --tp)."""
    if method in ("bf16", "bf16-fused"):
        return "none", method == "bf16-fused"
    base, _, unfused = method.partition("-")
    if base in ("int8", "int4", "fp8") and unfused in ("", "unfused"):
        return base, not unfused
    raise ValueError(f"{method}: --init shards builds pymllm_fx's methods and bf16 only")


def make_model(method: str, args, config, device: torch.device, group) -> nn.Module:
    """The benchmarked model: built whole and then quantized and sharded (``--init whole``), or
    built shard by shard on meta (``--init shards``, benchmarks/shard_init.py)."""
    if args.init == "shards":
        from shard_init import build_sharded

        spec, fuse = pymllm_method(method)
        return build_sharded(config, spec, device, args.seed, group, fuse_siblings=fuse)
    return apply_method(build_model(config, device, args.seed), method, group)


def setup_all_reduce(model: nn.Module, args) -> None:
    """``--all-reduce``: NCCL (the functional collective, the default), torch's symmetric-memory
    one-shot / two-shot kernels through pymllm_fx.use_symmetric_memory, or Inductor's own lowering
    of the functional all-reduce to a one-shot kernel (process-wide Inductor options, restored
    after the method by run_method)."""
    if args.tp == 1 or args.all_reduce == "nccl":
        return
    if args.all_reduce == "inductor":
        import warnings

        import torch.distributed._symmetric_memory as symm_mem

        collective = getattr(torch._inductor.config, "_collective", None)
        if collective is None or not hasattr(collective, "auto_select"):
            raise RuntimeError(f"torch {torch.__version__}: Inductor has no _collective.auto_select option")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in newer torch, needed in older
            symm_mem.enable_symm_mem_for_group(args.group.group_name)
        collective.auto_select = True
        return
    import pymllm_fx

    pymllm_fx.use_symmetric_memory(model, args.all_reduce, args.symm_max_bytes)


def gather(args, value: Any) -> List[Any]:
    """``value`` of every rank (rank order); a list of one outside --tp."""
    if args.group is None:
        return [value]
    out = [None] * args.tp
    torch.distributed.all_gather_object(out, value, group=args.group)
    return out


def barrier(args) -> None:
    if args.group is not None:
        torch.distributed.barrier(group=args.group)


# ---------------------------------------------------------------------------------------- phases


def compile_counters() -> Dict[str, int]:
    """What dynamo/inductor did since the last ``clear_counters()``: graphs, breaks, cudagraph skips, and
    the linear op calls before and after sibling fusion."""
    from torch._dynamo.utils import counters

    from pymllm_fx.passes import siblings

    return {
        # linear op calls in the compiled graphs before and after sibling fusion (q/k/v, gate/up)
        "linear_calls_before_fusion": sum(e["calls_before"] for e in siblings.FUSION_LOG),
        "linear_calls_after_fusion": sum(e["calls_after"] for e in siblings.FUSION_LOG),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
    }


def clear_counters() -> None:
    from torch._dynamo.utils import counters

    from pymllm_fx.passes import siblings

    counters.clear()
    siblings.FUSION_LOG.clear()


@torch.no_grad()
def phase_prefill(model, args, device) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_len), generator=gen).to(device)
    fn = lambda: model(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    reset_peak(device)
    for _ in range(args.warmup):
        fn()
    times = [timed(fn, device)[0] for _ in range(args.prefill_reps)]
    return {
        "prefill_len": args.prefill_len,
        "prefill_ms": median(times) * 1e3,
        "prefill_ms_all": [t * 1e3 for t in times],
        "prefill_tok_s": args.prefill_len / median(times),
        "prefill_peak_bytes": peak_bytes(device),
    }


def phase_gen(model, prompt, args, device) -> Tuple[Dict[str, Any], torch.Tensor]:
    """HF ``generate`` with a static cache; on CUDA it compiles the decode forward itself."""
    T = args.new_tokens
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), do_sample=False, cache_implementation="static",
        pad_token_id=model.config.eos_token_id,
    )
    if not args.compile:
        kwargs["disable_compile"] = True
    elif device.type != "cuda":
        # transformers auto-compiles only on cuda/xpu/...; this flag makes it take the same compiled
        # path elsewhere (CPU checks of this script). CUDA runs pass nothing: the user's default.
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True
        kwargs["compile_config"] = compile_config

    def gen(n: int) -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)

    reset_peak(device)
    clear_counters()
    # generate(T) first: the static cache is sized to prompt + T and later calls keep that size
    # (`_previous_max_cache_length`), so generate(1) prefills against the very same cache.
    first_s, out = timed(lambda: gen(T), device)
    for _ in range(args.warmup - 1):
        gen(T)
    gen(1)
    times_T: List[float] = []
    times_1: List[float] = []
    for _ in range(args.reps):  # interleaved, so drift hits both alike
        t, out = timed(lambda: gen(T), device)
        times_T.append(t)
        times_1.append(timed(lambda: gen(1), device)[0])
    if out.shape[1] != prompt.shape[1] + T:
        raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, expected {T}")
    decode_s = median(times_T) - median(times_1)
    res = {
        "gen_tok_s": (T - 1) / decode_s if decode_s > 0 else None,
        "gen_batch_tok_s": prompt.shape[0] * (T - 1) / decode_s if decode_s > 0 else None,
        "gen_decode_ms_per_token": decode_s / (T - 1) * 1e3,
        "gen_total_s_all": times_T,
        "gen_prefill_only_s_all": times_1,
        "gen_e2e_tok_s": T / median(times_T),  # prefill included
        "gen_first_call_s": first_s,  # includes compilation
        "gen_autocompiled": getattr(model, "_compiled_call", None) is not None,
        "gen_compile": compile_counters(),
        "gen_peak_bytes": peak_bytes(device),
    }
    return res, out[:, prompt.shape[1]:]


def phase_lean(model, prompt, args, device) -> Tuple[Dict[str, Any], torch.Tensor]:
    """pymllm_fx's GreedyDecoder: a compiled fixed-shape step per token (CUDA graphs)."""
    from pymllm_fx.evaluation import GreedyDecoder

    T = args.new_tokens
    mode = args.lean_mode if args.compile else None
    reset_peak(device)
    clear_counters()
    decoder = GreedyDecoder(model, max_cache_len=prompt.shape[1] + T, compile=args.compile, mode=mode)
    first_s, _ = timed(lambda: decoder.generate(prompt, T), device)
    for _ in range(args.warmup - 1):
        decoder.generate(prompt, T)
    secs: List[float] = []
    for _ in range(args.reps):
        tokens, s = decoder.generate(prompt, T)
        secs.append(s)
    steps = tokens.shape[1] - 1
    res = {
        "lean_tok_s": steps / median(secs),
        "lean_batch_tok_s": prompt.shape[0] * steps / median(secs),
        "lean_ms_per_token": median(secs) / steps * 1e3,
        "lean_decode_s_all": secs,
        "lean_first_call_s": first_s,
        "lean_mode": mode,
        "lean_compile": compile_counters(),
        "lean_peak_bytes": peak_bytes(device),
    }
    if "split" in args.parts:  # the same compiled decoder, profiled
        try:
            t0 = time.perf_counter()
            res.update(phase_split(model, decoder, prompt, args, device, res["lean_ms_per_token"]))
            res["split_phase_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001  (lean's numbers stand)
            res["split_error"] = short_error(err)
            print(f"split FAILED: {res['split_error']['error']}", flush=True)
    return res, tokens


# Kernel names by category, matched case-insensitively in this order. Attention comes before
# linears: PyTorch's memory-efficient attention kernels are CUTLASS kernels ("fmha_cutlass...").
_ALL_REDUCE_KERNELS = ("allreduce", "all_reduce", "nccl")
_ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa")
_LINEAR_KERNELS = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitkreduce", "cublas", "w4a16", "w8a16", "fp8_",
                   "sm90_", "sm80_", "triton_tem")
# On a CPU the profiler sees ops, not kernels: the ops that are linears or all-reduces (outermost only).
_CPU_LINEAR_OPS = ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul")


def event_category(name: str, device_type: str) -> Optional[str]:
    """"linears", "all_reduce", "attention" or "other" for a GPU kernel; for a CPU op the first
    three or None (not counted: the rest is the step time minus these)."""
    low = name.lower()
    if device_type != "cuda":
        if "all_reduce" in low or "allreduce" in low or "wait_tensor" in low:
            return "all_reduce"
        if low.startswith("pymllm_fx::") and "linear" in low or low in _CPU_LINEAR_OPS:
            return "linears"
        if "scaled_dot_product" in low:
            return "attention"
        return None
    if any(k in low for k in _ALL_REDUCE_KERNELS):
        return "all_reduce"
    if any(k in low for k in _ATTENTION_KERNELS):
        return "attention"
    if any(k in low for k in _LINEAR_KERNELS):
        return "linears"
    return "other"


def split_summary(events: List[Tuple[str, float, float]], steps: int, device_type: str,
                  step_ms: Optional[float]) -> Dict[str, Any]:
    """Per-token milliseconds by category from profiler events ``(name, start us, duration us)``.
    GPU kernels are summed; CPU ops nest, so only the outermost counted op of a stack is."""
    totals = {"linears": 0.0, "all_reduce": 0.0, "attention": 0.0, "other": 0.0}
    by_name: Dict[str, float] = {}
    covered = float("-inf")
    for name, ts, dur in sorted(events, key=lambda e: e[1]):
        category = event_category(name, device_type)
        if category is None or (device_type != "cuda" and ts < covered):
            continue
        totals[category] += dur
        by_name[name] = by_name.get(name, 0.0) + dur
        covered = max(covered, ts + dur)
    per_token = {k: v / 1e3 / steps for k, v in totals.items()}
    out: Dict[str, Any] = {"split_steps": steps, "split_events_ms_per_token": per_token,
                           "split_top": [[n[:160], round(d / 1e3 / steps, 4)]
                                         for n, d in sorted(by_name.items(), key=lambda x: -x[1])[:15]]}
    if step_ms is not None:
        out["split_ms_per_token"] = {
            "linears": per_token["linears"], "all_reduce": per_token["all_reduce"],
            "rest": step_ms - per_token["linears"] - per_token["all_reduce"], "step": step_ms,
            # of the rest: attention kernels, other kernels, and time no kernel ran (launch gaps, host)
            "attention": per_token["attention"], "other_kernels": per_token["other"],
            "idle": step_ms - sum(per_token.values()) if device_type == "cuda" else None,
        }
    return out


def profile_decode(decoder, prompt, steps: int, device) -> Tuple[List[Tuple[str, float, float]], float]:
    """Profiler events of ``steps`` decode steps (after a prefill and two unprofiled steps): GPU
    kernels, memcpys and memsets on CUDA, ops on a CPU; and the seconds the steps took (profiled)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    token, cache = decoder.prefill(prompt)
    for _ in range(2):
        token = decoder.step(token, cache).clone()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            token = decoder.step(token, cache).clone()
        sync(device)
        wall_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    kinds = ("kernel", "gpu_memcpy", "gpu_memset") if device.type == "cuda" else ("cpu_op",)
    events = [(e["name"], float(e["ts"]), float(e["dur"])) for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in kinds and "dur" in e]
    return events, wall_s


def phase_split(model, decoder, prompt, args, device, step_ms: float) -> Dict[str, Any]:
    """Decode time per token split into linears, all-reduce and the rest: kernel times of the
    CUDA-graph steps that ``lean`` measured, by name; if the profiler sees no kernel inside the
    graphs, of the same step compiled without CUDA graphs. Every rank profiles (the ranks step
    together); rank 0's split is reported, with every rank's in ``split_ms_per_token_per_rank``."""
    from pymllm_fx.evaluation import GreedyDecoder

    steps = args.split_steps
    if prompt.shape[1] + steps + 3 > decoder.max_cache_len:
        raise ValueError(f"--split-steps {steps} needs --new-tokens >= {steps + 3}")
    events, wall_s = profile_decode(decoder, prompt, steps, device)
    source = "cuda_graph_replays" if device.type == "cuda" else "cpu_ops"
    if device.type == "cuda" and any(not found for found in gather(args, bool(events))):
        plain = GreedyDecoder(model, max_cache_len=decoder.max_cache_len, compile=True, mode=None)
        events, wall_s = profile_decode(plain, prompt, steps, device)
        source = "compiled_without_cuda_graphs"
    # On a GPU, kernel times do not change under the profiler: the rest is taken from lean's
    # unprofiled step. CPU ops do slow down, so there the profiled steps' own time is the whole.
    profiled_ms = wall_s / steps * 1e3
    out = split_summary(events, steps, device.type, step_ms if device.type == "cuda" else profiled_ms)
    out["split_profiled_step_ms"] = profiled_ms
    out["split_source"] = source
    out["split_ms_per_token_per_rank"] = gather(args, out.get("split_ms_per_token"))
    return out


# ---------------------------------------------------------------------------------------- driver


def free(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled code and CUDA-graph trees (their memory pools) go too
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def short_error(err: BaseException) -> Dict[str, str]:
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def setup_key(args, config) -> Dict[str, Any]:
    """What must match for two results to be compared."""
    return {
        "tiny": args.tiny,
        "tp": args.tp,
        "model_name": args.model,
        "init": args.init,
        "all_reduce": args.all_reduce if args.tp > 1 else None,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "model": config.model_type,
        "intermediate": config.intermediate_size,
        "experts": getattr(config, "num_experts", None),
        "vocab": config.vocab_size,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_len": args.prefill_len,
        "compile": args.compile,
        "lean_mode": args.lean_mode if args.compile else None,
    }


def logits_prompt(config, args, device) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(args.seed + 3)).to(device)


def reference_logits_tp1(method: str, args, config, device) -> Optional[torch.Tensor]:
    """Under --tp (``--init whole``), rank 0's logits of the same weights quantized whole (tp 1),
    computed before the sharded model is built and freed right after: rank 0 holds one model at a
    time (the float model and its quantized layers while quantizing), not a tp-1 copy beside its
    shards. The other ranks wait at a barrier. With ``--init shards`` a whole 70B model does not fit
    one GPU: the fingerprint in ``logits_probe`` is compared with a tp 1 run instead."""
    if args.tp == 1 or "logits" not in args.parts or args.init != "whole":
        return None
    logits = None
    if args.rank == 0:
        whole = apply_method(build_model(config, device, args.seed), method, group=False)
        with torch.no_grad():
            logits = whole(logits_prompt(config, args, device), use_cache=False).logits.float()
        del whole
        free(device)
    barrier(args)
    return logits


def phase_logits(model, reference: Optional[torch.Tensor], config, args, device) -> Dict[str, Any]:
    """Eager logits of a fixed 64-token prompt; under --tp, their relative error against tp 1 (rank 0).
    ``logits_probe`` (every 8th position, the first 256 vocabulary entries) and ``logits_argmax``
    let two runs be compared later (benchmarks/tp_summary.py)."""
    with torch.no_grad():
        logits = model(logits_prompt(config, args, device), use_cache=False).logits.float()
    out: Dict[str, Any] = {"logits_norm": logits.norm().item(),
                           "logits_probe": [round(v, 5) for v in logits[0, ::8, :256].flatten().tolist()],
                           "logits_argmax": logits[0].argmax(-1).tolist()}
    if reference is not None:
        out["logits_rel_err_vs_tp1"] = ((logits - reference).norm() / reference.norm()).item()
        out["argmax_agree_vs_tp1"] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return out


def run_method(method: str, args, config, device: torch.device) -> Dict[str, Any]:
    res: Dict[str, Any] = {"method": method, "setup": setup_key(args, config), "parts": list(args.parts),
                           "errors": {}}
    # torchao's quantize_ sets process-wide Inductor options (set_inductor_config=True, its default):
    # they apply to this method's compilations and are undone afterwards, so the next method is unaffected.
    inductor_saved = torch._inductor.config.save_config()
    base, _, variant = method.partition("-")
    switched = variant in MOE_VARIANTS  # "int4-tiles": int4 with one of kernels/moe.py's switches changed
    if switched:
        set_variant(variant)
        torch._inductor.config.force_disable_caches = True
    try:
        return _run_method(base if switched else method, args, config, device, res)
    finally:
        torch._inductor.config.load_config(inductor_saved)
        if switched:
            set_variant("")


def _run_method(method: str, args, config, device: torch.device, res: Dict[str, Any]) -> Dict[str, Any]:
    model = None
    try:
        reset_peak(device)
        t0 = time.perf_counter()
        reference_logits = reference_logits_tp1(method, args, config, device)
        if reference_logits is not None or (args.tp > 1 and "logits" in args.parts and args.init == "whole"):
            res["reference_s"] = time.perf_counter() - t0
        inductor_before = torch._inductor.config.get_config_copy()
        t0 = time.perf_counter()
        if args.init == "shards":  # built, filled and quantized layer by layer: one number
            model = make_model(method, args, config, device, args.group)
            sync(device)
            res["build_s"] = time.perf_counter() - t0
        else:
            model = build_model(config, device, args.seed)
            sync(device)
            res["build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            model = apply_method(model, method, args.group)
            sync(device)
            res["quantize_s"] = time.perf_counter() - t0
        setup_all_reduce(model, args)
        changed = {k: v for k, v in torch._inductor.config.get_config_copy().items() if inductor_before.get(k) != v}
        if changed:
            res["inductor_config_set_by_method"] = {k: repr(v) for k, v in changed.items()}
        free(device)  # drop what quantization left behind before any measurement
        res["weight_bytes"] = model_bytes(model)
        res["allocated_after_load_bytes"] = allocated_bytes(device)
        res["load_peak_bytes"] = peak_bytes(device)
        print(f"[{method}] built in {res['build_s']:.1f}s" + (f", method applied in {res['quantize_s']:.1f}s"
                                                              if "quantize_s" in res else " (shard by shard)")
              + f", weights {human_bytes(res['weight_bytes']['total'])}", flush=True)
    except Exception as err:  # noqa: BLE001  (recorded, the next method still runs)
        res.update(short_error(err))
        print(f"[{method}] FAILED before measuring: {res['error']}", flush=True)
        del model
        free(device)
        return res

    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    tokens: Dict[str, torch.Tensor] = {}
    for phase in args.parts:
        try:
            t0 = time.perf_counter()
            if phase == "logits":
                res.update(phase_logits(model, reference_logits, config, args, device))
            elif phase == "prefill":
                res.update(phase_prefill(model, args, device))
            elif phase == "gen":
                out, tokens["gen"] = phase_gen(model, prompt, args, device)
                res.update(out)
            elif phase == "lean":
                out, tokens["lean"] = phase_lean(model, prompt, args, device)
                res.update(out)
            elif phase == "split":
                continue  # profiled inside lean, with its compiled decoder
            res[f"{phase}_phase_s"] = time.perf_counter() - t0
            print(f"[{method}] {phase} done in {res[f'{phase}_phase_s']:.1f}s", flush=True)
        except Exception as err:  # noqa: BLE001
            res["errors"][phase] = short_error(err)
            print(f"[{method}] {phase} FAILED: {res['errors'][phase]['error']}", flush=True)
        finally:
            if hasattr(model, "_compiled_call"):  # transformers' compiled forward from generate()
                del model._compiled_call
            free(device)
    if "gen" in tokens and "lean" in tokens:  # same greedy decoding two ways: should mostly agree
        a, b = tokens["gen"][0].tolist(), tokens["lean"][0].tolist()
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        res["gen_lean_same_prefix"] = f"{same}/{min(len(a), len(b))}"
    if not res["errors"]:
        del res["errors"]
    del model, tokens, prompt
    free(device)
    # Every rank's peaks (rank 0 writes the file): the memory a GPU needs is its own rank's.
    peaks = {k: v for k, v in res.items() if k.endswith("_peak_bytes") or k == "allocated_after_load_bytes"}
    res["peak_bytes_per_rank"] = gather(args, peaks)
    res["max_peak_bytes_per_rank"] = [max([v for k, v in p.items() if k.endswith("_peak_bytes") and v is not None],
                                          default=None) for p in res["peak_bytes_per_rank"]]
    return res


def combine(old: Optional[Dict[str, Any]], new: Dict[str, Any], parts: List[str]) -> Dict[str, Any]:
    """A method measured in several invocations (``--parts gen`` then ``--parts lean``) keeps the
    phases of the earlier one when the setup and the device are the same; otherwise ``new`` replaces it."""
    if (not old or "error" in old or "error" in new or old.get("setup") != new.get("setup")
            or old.get("env", {}).get("device_name") != new.get("env", {}).get("device_name")):
        return new
    merged = {**old, **new}
    errors = {k: v for k, v in old.get("errors", {}).items() if k not in parts}
    errors.update(new.get("errors", {}))
    merged.pop("errors", None)
    if errors:
        merged["errors"] = errors
    if "gen_lean_same_prefix" in old and not {"gen", "lean"} <= set(parts):
        merged.pop("gen_lean_same_prefix", None)  # compared tokens from one run only
    merged["parts"] = sorted(set(old.get("parts", [])) | set(parts))
    return merged


# ----------------------------------------------------------------------------------------- table


def table(data: Dict[str, Any]) -> str:
    results = data.get("results", {})
    order = [m for m in METHODS if m in results] + [m for m in results if m not in METHODS]
    base = results.get("bf16", {})

    def comparable(r):
        return (base and "error" not in base and r.get("setup") == base.get("setup")
                and r.get("env", {}).get("device_name") == base.get("env", {}).get("device_name"))

    def fmt(x, spec):
        return None if x is None else format(x, spec)

    def ratio(r, key, inverse=False):
        if not comparable(r) or r.get(key) is None or base.get(key) is None:
            return None
        return f"{(base[key] / r[key]) if inverse else (r[key] / base[key]):.2f}x"

    def gib(x):
        return None if x is None else f"{x / GiB:.2f}"

    def split(r):
        parts = r.get("split_ms_per_token")
        return None if not parts else "/".join(f"{parts[k]:.2f}" for k in ("linears", "all_reduce", "rest"))

    def per_rank(r):
        peaks = r.get("max_peak_bytes_per_rank") or []
        return None if not peaks or None in peaks else ",".join(f"{p / GiB:.1f}" for p in peaks)

    rows = []
    for m in order:
        r = results[m]
        setup = r.get("setup", {})
        where = f"{setup.get('tp', 1)}" + (f" {setup['all_reduce']}" if setup.get("all_reduce") not in (None, "nccl") else "")
        if "error" in r:
            rows.append([m, where] + [None] * 10 + ["error: " + r["error"].splitlines()[0][:80]])
            continue
        rows.append([
            m, where, fmt(r.get("gen_tok_s"), ".1f"), fmt(r.get("lean_tok_s"), ".1f"), fmt(r.get("prefill_ms"), ".1f"),
            gib(r.get("gen_peak_bytes") or r.get("lean_peak_bytes")), per_rank(r),
            human_bytes(r.get("weight_bytes", {}).get("total")), split(r),
            ratio(r, "gen_tok_s"), ratio(r, "lean_tok_s"), ratio(r, "prefill_ms", inverse=True),
            ",".join(sorted(r.get("errors", {})) + (["split"] if "split_error" in r else [])) or None,
        ])
    headers = ["method", "tp", "gen tok/s", "lean tok/s", "prefill ms", "peak GiB", "peak GiB/rank", "weights/rank",
               "lin/ar/rest ms", "gen vs bf16", "lean vs bf16", "prefill vs bf16", "failed"]
    return format_table(headers, rows)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="bf16,int8,int4,fp8,torchao-int4",
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--parts", default=",".join(PHASES),
                   help="comma-separated phases to run: prefill,gen,lean,logits,split (default: all; split needs lean)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    p.add_argument("--tiny", action="store_true", help="a tiny config that runs on a CPU in seconds")
    p.add_argument("--model", default="llama3-8b", choices=MODELS,
                   help="the shape: Llama-3-8B (default), Llama-3-70B (built shard by shard: --init shards), or "
                        "Qwen3-30B-A3B (MoE: bf16 runs transformers' own experts implementation, grouped_mm on CUDA)")
    p.add_argument("--init", default="auto", choices=("auto", "whole", "shards"),
                   help="whole: transformers' init of the whole model on the device, then quantize and shard; shards: "
                        "each rank draws only its shards on meta-built layers (benchmarks/shard_init.py); "
                        "auto: shards for llama3-70b, whole otherwise")
    p.add_argument("--all-reduce", default="nccl", choices=ALL_REDUCE,
                   help="under --tp: nccl (functional collective), one_shot / two_shot (symmetric memory, "
                        "pymllm_fx.use_symmetric_memory), inductor (Inductor's own one-shot lowering)")
    p.add_argument("--symm-max-bytes", type=int, default=1 << 20,
                   help="largest all-reduce message sent through symmetric memory (larger ones use NCCL)")
    p.add_argument("--split-steps", type=int, default=8, help="decode steps profiled by the split part")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--new-tokens", type=int, default=128, help="T, tokens generated per decode run")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length for decode")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (tok/s stays per sequence)")
    p.add_argument("--prefill-len", type=int, default=2048, help="random prompt length for the prefill timing")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (the first compiles)")
    p.add_argument("--reps", type=int, default=3, help="timed decode runs (median)")
    p.add_argument("--prefill-reps", type=int, default=5, help="timed prefills (median)")
    p.add_argument("--lean-mode", default="reduce-overhead", help="torch.compile mode of GreedyDecoder")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="eager everywhere: generate(disable_compile=True), GreedyDecoder(compile=False)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size: run under `torchrun --nproc-per-node N` (NCCL, one GPU per rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file, merged per method")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for x in args.parts:
        if x not in PHASES:
            p.error(f"unknown part {x!r}; choose from {', '.join(PHASES)}")
    if args.init == "auto":
        args.init = "shards" if args.model == "llama3-70b" else "whole"
    if args.init == "shards" and args.model == "qwen3-moe":
        p.error("--init shards fills linear layers only; qwen3-moe's experts need --init whole")
    if "split" in args.parts and "lean" not in args.parts:
        p.error("the split part profiles lean's compiled decoder: add lean to --parts")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured over T - 1 steps)")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first call compiles)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.group, args.rank = None, 0
    if args.tp > 1:
        device = init_tensor_parallel(args)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    config = make_config(args.layers, args.tiny, args.model)
    env = env_info(device)
    meta = {"env": env, "config": config.to_dict(), "args": {k: str(v) if isinstance(v, Path) else v
                                                             for k, v in vars(args).items() if k != "group"}}
    print(f"device: {env['device_name']}  torch {env['torch']}  transformers {env['transformers']}  "
          f"triton {env['triton']}  layers {config.num_hidden_layers}", flush=True)
    for method in args.methods:
        res = run_method(method, args, config, device)
        if args.rank != 0:
            continue  # every rank runs the same steps; rank 0 reports
        res["env"] = env
        res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        old = load_json(args.json).get("results", {}).get(method)
        merge_json(args.json, meta, method, combine(old, res, args.parts))
    if args.rank == 0:
        print()
        print(table(load_json(args.json)))
        print(f"\nwritten: {args.json}")
    if args.group is not None:
        torch.distributed.destroy_process_group()
    return 0


def init_tensor_parallel(args) -> torch.device:
    """NCCL over the processes torchrun started, one GPU each (gloo on CPU for a smoke test)."""
    import os

    import torch.distributed as dist

    # NVLink SHARP / multicast stays off on these machines (NCCL, torch's symmetric memory, NVSHMEM).
    for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(key, "0" if key == "NCCL_NVLS_ENABLE" else "1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        raise SystemExit(
            f"--tp {args.tp} needs {args.tp} processes, one per GPU: run "
            f"`torchrun --nproc-per-node {args.tp} benchmarks/e2e.py --tp {args.tp} ...` (WORLD_SIZE={world})"
        )
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    args.group, args.rank = dist.group.WORLD, dist.get_rank()
    if args.json == DEFAULT_JSON:
        args.json = DEFAULT_JSON.with_name(f"e2e_tp{args.tp}.json")
    return device


if __name__ == "__main__":
    sys.exit(main())
