"""The int4 tensor-core kernel's block shapes at small M, on the GPU, at the Llama-3-8B shapes.

A: M = 2..5 as the op runs them (rows past M masked), against the activations zero-padded to 8
rows or padded with copies of the last row, and the GEMV run per row at M = 2, 3.
B: block shapes for M = 8, 16, 32, 64 (the candidates behind ``w4a16._config``).
Usage (CUDA): ``python benchmarks/w4a16_blocks.py [--json PATH] [--budget-s 300]`` (about 2.5
minutes on an H200). ``results/mma_sweep2.json`` is its run of 2026-11-30, made while the kernel
still read clamped rows past M; its "masked" column is today's default.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules; pymllm_fx is installed

from timing import copies_for, graph_time_us  # noqa: E402
from tune import GROUP, make_w4, nbytes, rel_err  # noqa: E402
from pymllm_fx.kernels import w4a16  # noqa: E402

SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N)
MS = (2, 3, 4, 5, 8, 16, 32, 64)
CANDIDATES = {  # rows a program (BLOCK_N), K per step, warps on K slices (SPLIT) or programs on K (SPLIT_K)
    "n64k4": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=1, SPLIT_K=4, num_warps=4, num_stages=3),
    "n64k4w8": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=1, SPLIT_K=4, num_warps=8, num_stages=3),
    "n64k8": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=1, SPLIT_K=8, num_warps=4, num_stages=3),
    "n64k2w8": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=1, SPLIT_K=2, num_warps=8, num_stages=3),
    "n64k4s4": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=1, SPLIT_K=4, num_warps=4, num_stages=4),
    "n64k4bk64": dict(BLOCK_N=64, BLOCK_K=64, SPLIT=1, SPLIT_K=4, num_warps=4, num_stages=4),
    "n32k4": dict(BLOCK_N=32, BLOCK_K=128, SPLIT=1, SPLIT_K=4, num_warps=4, num_stages=3),
    "n128w8": dict(BLOCK_N=128, BLOCK_K=128, SPLIT=1, SPLIT_K=1, num_warps=8, num_stages=3),
    "n128k2w8": dict(BLOCK_N=128, BLOCK_K=128, SPLIT=1, SPLIT_K=2, num_warps=8, num_stages=3),
    "n128k4w8": dict(BLOCK_N=128, BLOCK_K=128, SPLIT=1, SPLIT_K=4, num_warps=8, num_stages=3),
    "n64s4": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=4, num_stages=3),
}


def mma_calls(x, weights, cfg):
    return [lambda w=w: w4a16.w4a16_mma(x, w["qweight"], w["scales"], w["zeros"], GROUP, None,
                                        None if cfg is None else dict(cfg)) for w in weights]


def time_one_m(m, k, weights, bf16_weights, dev, deadline):
    """Microseconds per path for one M (a string where a config failed)."""
    one = weights[0]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ref = w4a16.w4a16_reference(x, one["qweight"], one["scales"], one["zeros"], GROUP)
    res = {"bf16": graph_time_us([lambda w=w: F.linear(x, w) for w in bf16_weights])}
    res["default"] = graph_time_us(mma_calls(x, weights, None))
    if m < 8:
        pad = torch.zeros(8, k, device=dev, dtype=torch.bfloat16)
        pad[:m] = x
        res["pad_zero"] = graph_time_us(mma_calls(pad, weights, None))
        copies = x[-1:].expand(8, k).contiguous()
        copies[:m] = x
        res["pad_copy"] = graph_time_us(mma_calls(copies, weights, None))
        if m <= 3:
            res["gemv"] = graph_time_us([lambda w=w: w4a16.w4a16_gemv(x, w["qweight"], w["scales"], w["zeros"], GROUP,
                                                                      None) for w in weights])
        return res
    for name, base in CANDIDATES.items():
        for block_m in {8: (8,), 16: (16,), 32: (32,), 64: (32, 64)}[m]:
            if time.time() > deadline:
                return res
            cfg = dict(base, BLOCK_M=block_m)
            key = f"{name}/bm{block_m}"
            try:
                out = w4a16.w4a16_mma(x, one["qweight"], one["scales"], one["zeros"], GROUP, None, dict(cfg))
                err = rel_err(out, ref)
                if not err < 2e-2:
                    raise AssertionError(f"rel err {err:.2e}")
                res[key] = graph_time_us(mma_calls(x, weights, cfg), replays=7)
            except Exception as exc:  # a config that does not fit (shared memory) or is wrong
                res[key] = str(exc)[:80]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "w4a16_blocks.json"))
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop sweeping after this many seconds")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        one = make_w4(n, k, dev)
        weights = [one] + [make_w4(n, k, dev) for _ in range(copies_for(nbytes(one)) - 1)]
        bf16_weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                        for _ in range(copies_for(2 * n * k))]
        for m in MS:
            if time.time() > deadline:
                print(f"budget spent: K={k} N={n} M={m} not run", flush=True)
                continue
            res = time_one_m(m, k, weights, bf16_weights, dev, deadline)
            timed = sorted((v, key) for key, v in res.items() if isinstance(v, float) and key != "bf16")
            print(f"K={k:5} N={n:5} M={m:3}: bf16 {res['bf16']:6.1f} | "
                  + " ".join(f"{key} {v:.1f}" for v, key in timed[:6]), flush=True)
            rows.append(dict(K=k, N=n, M=m, us=res))
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        del weights, bf16_weights, one


if __name__ == "__main__":
    main()
