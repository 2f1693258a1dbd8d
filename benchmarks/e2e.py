"""End-to-end decode benchmark: a Llama-3-8B-shaped model, bf16 vs pymllm_fx int8 / int4 / fp8 vs torchao int4.

The model is a ``LlamaForCausalLM`` built from a ``LlamaConfig`` with Llama-3-8B's shapes and random
bf16 weights (transformers' own init: normal, std 0.02), created directly on the device: nothing is
downloaded. Every method starts from the same weights (same seed).

For each method, at batch 1:

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
bf16 is sharded by the "none" method), rank 0 reports into ``results/e2e_tpN.json``, and the
``logits`` part compares the logits of a fixed prompt with the same weights quantized whole on
rank 0's GPU (tp 1).
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

METHODS = ("bf16", "int8", "int4", "fp8", "w8a8", "torchao-int4", "bf16-fused", "int8-unfused", "int4-unfused", "fp8-unfused",
           "w8a8-unfused")
PHASES = ("prefill", "gen", "lean", "logits")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "e2e.json"


# ----------------------------------------------------------------------------------------- model


def make_config(layers: Optional[int], tiny: bool, model: str = "llama3-8b"):
    from transformers import LlamaConfig

    if model == "qwen3-moe":
        return qwen3_moe_config(layers, tiny)

    if tiny:  # seconds on a CPU; int4-friendly widths (multiples of 128)
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
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
        "lean_ms_per_token": median(secs) / steps * 1e3,
        "lean_decode_s_all": secs,
        "lean_first_call_s": first_s,
        "lean_mode": mode,
        "lean_compile": compile_counters(),
        "lean_peak_bytes": peak_bytes(device),
    }
    return res, tokens


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
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "model": config.model_type,
        "intermediate": config.intermediate_size,
        "experts": getattr(config, "num_experts", None),
        "vocab": config.vocab_size,
        "batch": 1,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_len": args.prefill_len,
        "compile": args.compile,
        "lean_mode": args.lean_mode if args.compile else None,
    }


def logits_prompt(config, args, device) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(args.seed + 3)).to(device)


def reference_logits_tp1(model, method: str, args, config, device) -> Optional[torch.Tensor]:
    """Under --tp, rank 0's logits of the same weights quantized whole on one GPU (tp 1)."""
    if args.tp == 1 or "logits" not in args.parts or args.rank != 0:
        return None
    import copy

    whole = apply_method(copy.deepcopy(model), method, group=False)
    with torch.no_grad():
        logits = whole(logits_prompt(config, args, device), use_cache=False).logits.float()
    del whole
    free(device)
    return logits


def phase_logits(model, reference: Optional[torch.Tensor], config, args, device) -> Dict[str, Any]:
    """Eager logits of a fixed 64-token prompt; under --tp, their relative error against tp 1 (rank 0)."""
    with torch.no_grad():
        logits = model(logits_prompt(config, args, device), use_cache=False).logits.float()
    out: Dict[str, Any] = {"logits_norm": logits.norm().item()}
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
    try:
        return _run_method(method, args, config, device, res)
    finally:
        torch._inductor.config.load_config(inductor_saved)


def _run_method(method: str, args, config, device: torch.device, res: Dict[str, Any]) -> Dict[str, Any]:
    model = None
    try:
        reset_peak(device)
        t0 = time.perf_counter()
        model = build_model(config, device, args.seed)
        sync(device)
        res["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        inductor_before = torch._inductor.config.get_config_copy()
        reference_logits = reference_logits_tp1(model, method, args, config, device)
        model = apply_method(model, method, args.group)
        sync(device)
        res["quantize_s"] = time.perf_counter() - t0
        changed = {k: v for k, v in torch._inductor.config.get_config_copy().items() if inductor_before.get(k) != v}
        if changed:
            res["inductor_config_set_by_method"] = {k: repr(v) for k, v in changed.items()}
        free(device)  # drop what quantization left behind before any measurement
        res["weight_bytes"] = model_bytes(model)
        res["allocated_after_load_bytes"] = allocated_bytes(device)
        res["load_peak_bytes"] = peak_bytes(device)
        print(f"[{method}] built in {res['build_s']:.1f}s, method applied in {res['quantize_s']:.1f}s, "
              f"weights {human_bytes(res['weight_bytes']['total'])}", flush=True)
    except Exception as err:  # noqa: BLE001  (recorded, the next method still runs)
        res.update(short_error(err))
        print(f"[{method}] FAILED before measuring: {res['error']}", flush=True)
        del model
        free(device)
        return res

    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len),
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

    rows = []
    for m in order:
        r = results[m]
        if "error" in r:
            rows.append([m] + [None] * 8 + ["error: " + r["error"].splitlines()[0][:80]])
            continue
        rows.append([
            m, fmt(r.get("gen_tok_s"), ".1f"), fmt(r.get("lean_tok_s"), ".1f"), fmt(r.get("prefill_ms"), ".1f"),
            gib(r.get("gen_peak_bytes") or r.get("lean_peak_bytes")), human_bytes(r.get("weight_bytes", {}).get("total")),
            ratio(r, "gen_tok_s"), ratio(r, "lean_tok_s"), ratio(r, "prefill_ms", inverse=True),
            ",".join(sorted(r.get("errors", {}))) or None,
        ])
    headers = ["method", "gen tok/s", "lean tok/s", "prefill ms", "peak GiB", "weights",
               "gen vs bf16", "lean vs bf16", "prefill vs bf16", "failed"]
    return format_table(headers, rows)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="bf16,int8,int4,fp8,torchao-int4",
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--parts", default=",".join(PHASES),
                   help="comma-separated phases to run: prefill,gen,lean (default: all)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    p.add_argument("--tiny", action="store_true", help="a tiny config that runs on a CPU in seconds")
    p.add_argument("--model", default="llama3-8b", choices=("llama3-8b", "qwen3-moe"),
                   help="the shape: Llama-3-8B (default) or Qwen3-30B-A3B (MoE: bf16 runs transformers' own "
                        "experts implementation, grouped_mm on CUDA)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--new-tokens", type=int, default=128, help="T, tokens generated per decode run")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length for decode")
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
