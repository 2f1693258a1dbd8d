"""One MoE block's experts at Qwen3-30B-A3B shapes: transformers' own bf16 experts against
pymllm_fx's FusedMoE (int4, int8, fp8), per layer, from one run on one GPU.

Shapes: hidden 2048, 128 experts, 8 active per token, expert intermediate 768 (Qwen3-30B-A3B).
Each method builds ``--layers`` copies of the experts (random bf16 weights, normal(0, 0.02)),
each call compiled by ``torch.compile`` as it runs inside a compiled model (Inductor fuses the
routing bookkeeping: sorting, offsets); one CUDA graph calls them all in turn, so every call reads
its experts from HBM, not L2, and launch gaps do not count (``timing.graph_time_us``). Routing is
random and the same for every method.
The floor printed is the bytes of the distinct experts a batch touches at the measured copy
bandwidth.

    python benchmarks/moe.py                                  # all methods, tokens 1,8,2048
    python benchmarks/moe.py --methods bf16,int4 --tokens 1,8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).parent))
from common import env_info, format_table  # noqa: E402
from timing import copy_bandwidth_gbs, graph_time_us  # noqa: E402

METHODS = ("bf16", "bf16-batched", "int4", "int8", "fp8")
# A/B variants of pymllm_fx's grouped GEMM (kernels/moe.py's switches), measured in the same run:
# "-reshape" spreads int4 codes into feature order instead of eight nibble dots; "-sorted" runs
# moe_align's sort at decode instead of one block per (token, expert) pair; "-tiles" runs int4 decode
# on 16-row tensor-core tiles instead of the CUDA-core GEMV. benchmarks/e2e.py takes the same variants.
VARIANTS = {"reshape": ("NIBBLE_DOTS", False), "sorted": ("DIRECT_MAX_ASSIGNMENTS", 0), "tiles": ("DECODE_GEMV", False)}
SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)


def _defaults():
    from pymllm_fx.kernels import moe

    return {switch: getattr(moe, switch) for switch, _ in VARIANTS.values()}


DEFAULTS = _defaults()


def set_variant(variant: str) -> None:
    """kernels/moe.py's switches at the library's defaults, except ``variant``'s (a VARIANTS key, or
    "" for none). Run with Inductor's caches off: they key a graph by the op call, not by what the
    op's Python chose inside it, and would replay another variant's kernels."""
    from pymllm_fx.kernels import moe

    for name, (switch, value) in VARIANTS.items():
        setattr(moe, switch, value if variant == name else DEFAULTS[switch])


def build_experts(config, layers: int, seed: int):
    """``layers`` transformers experts modules with their own random bf16 weights."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(seed)
    out = []
    for _ in range(layers):
        with torch.device("cuda"):
            m = Qwen3MoeExperts(config).to(torch.bfloat16)
        with torch.no_grad():
            m.gate_up_proj.normal_(0, 0.02)
            m.down_proj.normal_(0, 0.02)
        out.append(m.eval())
    return out


def apply(method: str, experts: list, config) -> list:
    """The experts as ``method`` runs them: transformers' own implementations for bf16, else a
    FusedMoE built and calibrated the way ``pymllm_fx.quantize`` does it."""
    if method in ("bf16", "bf16-batched"):
        config._experts_implementation = "grouped_mm" if method == "bf16" else "batched_mm"
        return experts
    from pymllm_fx.api.quantize_model import _quantize_own_experts
    from pymllm_fx.methods.registry import resolve

    base, _, variant = method.partition("-")
    set_variant(variant)  # each method starts from the library's defaults
    plan = {f"layer{i}": m for i, m in enumerate(experts)}
    return list(_quantize_own_experts(None, plan, resolve(base), "cuda", progress=False).values())


def routing(tokens: int, config, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, config.num_experts, device="cuda", generator=gen)
    weights, ids = torch.topk(logits.softmax(-1), config.num_experts_per_tok, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="from " + ", ".join(METHODS) + "; int4-reshape, int4-sorted, int4-tiles, int8-sorted: A/B variants")
    p.add_argument("--tokens", default="1,8,2048")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run each call eagerly")
    p.add_argument("--layers", type=int, default=8, help="experts copies cycled in one graph")
    p.add_argument("--json", default="benchmarks/results/moe.json")
    args = p.parse_args(argv)
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**SHAPE)
    torch._inductor.config.force_disable_caches = True  # the variants differ only in Python (set_variant)
    tokens = [int(t) for t in args.tokens.split(",")]
    bandwidth = copy_bandwidth_gbs()  # GB/s, read + written: what a kernel that only reads can reach
    results, rows = {}, []
    for method in args.methods.split(","):
        experts = build_experts(config, args.layers, seed=0)
        layers = apply(method, experts, config)
        calls = [torch.compile(m, fullgraph=True, dynamic=False) if args.compile else m for m in layers]
        weight_bytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
        results[method] = {"weight_bytes_per_layer": weight_bytes, "us_per_layer": {}}
        for t in tokens:
            ids, w = routing(t, config, seed=t)
            x = torch.randn(t, config.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.5
            outs = [None] * len(layers)

            def call(i):
                return lambda: outs.__setitem__(i, calls[i](x, ids, w))

            with torch.no_grad():
                us = graph_time_us([call(i) for i in range(len(layers))])
            results[method]["us_per_layer"][t] = us
            touched = int(ids.unique().numel())
            floor = weight_bytes * touched / config.num_experts / (bandwidth * 1e3)  # us
            rows.append([method, t, touched, f"{us:.1f}", f"{floor:.1f}", f"{floor / us:.0%}"])
        del experts, layers, calls
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    base = results.get("bf16", {}).get("us_per_layer", {})
    for row in rows:
        ref = base.get(row[1])
        row.append(f"{ref / float(row[3]):.2f}x" if ref else "-")
    print(format_table(["method", "tokens", "experts hit", "us/layer", "floor us", "of floor", "vs bf16"], rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"env": env_info(torch.device("cuda")), "shape": SHAPE,
                                           "copy_gbs": bandwidth, "layers": args.layers, "compile": args.compile,
                                           "results": results},
                                          indent=1))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
