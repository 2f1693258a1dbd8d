"""A/B timings of kernel variants against bf16 cuBLAS and against the previous version of a kernel
file, in one run on one GPU (the numbers in NOTES_w4a16.md). Each job is ``M=spec,spec,...``;
jobs are separated by ``;``. Specs (``/``-separated integers after the colon):

    deq:BN/TILES/warps  deqonly:BN/TILES/warps     int4 dequantize (+ cuBLAS, or alone: then GB/s)
    mma:BM/BN/BK/SPLIT/warps/stages/SPLIT_K        int4 tensor-core kernel at one config
    w4, w8                                         the op's own path choice
    w8gemv2:BN/BK/warps/ASM                        int8 GEMV at one config (ASM 0: Triton's I2F)
    w8dq:MIN                                       int8 op with its dequantize path from M = MIN
    fp8:BN/BK/warps                                fp8 GEMV at one config
    a8, a8gemv:BN/BK/warps/PREQUANT                W8A8 int8: the op's choice; its GEMV at one config
                                                   (PREQUANT 1: the row quantizer's int8 output)
    a8gemm:BM/BN/BK/warps/stages                   W8A8 int8: the row quantizer + its GEMM at one config
    deq_old, deqonly_old, mma_old:..., w4_old, w8_old, fp8_old   the same from --old-dir

``--old-dir`` holds the previous kernel files (w4a16.py, w8a16.py, fp8_w8a8.py), e.g. from
``git show REV:pymllm_fx/kernels/w4a16.py``; they are loaded without their op registration.

    python benchmarks/ab.py --old-dir /tmp/old --jobs "1=w8_old,w8gemv2:8/1024/4/1;1024=w8_old,w8dq:64"
"""
import argparse
import functools
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules; pymllm_fx is installed

from common import load_kernel_file  # noqa: E402
from timing import copies_for, copy_bandwidth_gbs, graph_time_us  # noqa: E402
from tune import GROUP as G, make_fp8, make_w4, make_w8, rel_err  # noqa: E402
from pymllm_fx.kernels import fp8_w8a8, w4a16, w8a8, w8a16  # noqa: E402

OLD_DIR = None


def make_a8(n, k, device):
    """W8A8 weights: int8 codes and float32 per-channel scales (the op's dtypes)."""
    w = make_w8(n, k, device)
    return dict(qweight=w["qweight"], scales=w["scales"].float())


MAKERS = {"w4": make_w4, "w8": make_w8, "f8": make_fp8, "a8": make_a8}


@functools.lru_cache(maxsize=None)
def _old(name):
    """The kernel file ``name`` from --old-dir, without its op registration."""
    return load_kernel_file(os.path.join(OLD_DIR, name + ".py"), name)


def fn(spec):
    """(weight family, fn(x, weights)) for one spec (see the module docstring)."""
    kind, _, vals = spec.partition(":")
    v = [int(a) for a in vals.split("/")] if vals else []
    if kind in ("deq", "deqonly"):
        def deq(x, w):
            weight = w4a16.w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], G, x.dtype, block_n=v[0],
                                            tiles=v[1], num_warps=v[2])
            return weight if kind == "deqonly" else F.linear(x, weight)
        return "w4", deq
    if kind in ("deq_old", "deqonly_old"):
        def deq_old(x, w):
            weight = _old("w4a16").w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], G, x.dtype)
            return weight if kind == "deqonly_old" else F.linear(x, weight)
        return "w4", deq_old
    if kind in ("mma", "mma_old"):  # BM/BN/BK/SPLIT/warps/stages/SPLIT_K
        cfg = dict(BLOCK_M=v[0], BLOCK_N=v[1], BLOCK_K=v[2], SPLIT=v[3], num_warps=v[4], num_stages=v[5], SPLIT_K=v[6])
        module = w4a16 if kind == "mma" else _old("w4a16")
        return "w4", lambda x, w: module.w4a16_mma(x, w["qweight"], w["scales"], w["zeros"], G, None, dict(cfg))
    if kind in ("w4", "w4_old"):  # the op's own choice
        module = w4a16 if kind == "w4" else _old("w4a16")
        return "w4", lambda x, w: module.w4a16_triton(x, w["qweight"], w["scales"], w["zeros"], G, None)
    if kind in ("fp8", "fp8_old"):
        cfg = dict(BLOCK_N=v[0], BLOCK_K=v[1], num_warps=v[2]) if v else None
        module = fp8_w8a8 if kind == "fp8" else _old("fp8_w8a8")
        return "f8", lambda x, w: module.fp8_gemv(x, w["weight"], w["weight_scale"], None, cfg)
    if kind in ("w8", "w8_old"):
        module = w8a16 if kind == "w8" else _old("w8a16")
        return "w8", lambda x, w: module.w8a16_triton(x, w["qweight"], w["scales"], None)
    if kind == "w8dq":  # the op with the dequantize path from M = v[0]
        def w8dq(x, w):
            w8a16.DEQUANT_MIN_M = v[0]
            return w8a16.w8a16_triton(x, w["qweight"], w["scales"], None)
        return "w8", w8dq
    if kind == "w8gemv2":  # BN/BK/warps/ASM
        cfg = dict(BLOCK_N=v[0], BLOCK_K=v[1], num_warps=v[2], ASM=bool(v[3]))
        return "w8", lambda x, w: w8a16.w8a16_gemv(x, w["qweight"], w["scales"], None, dict(cfg))
    if kind == "a8":
        return "a8", lambda x, w: w8a8.w8a8_triton(x, w["qweight"], w["scales"], None, None, None, None)
    if kind == "a8gemv":  # BN/BK/warps/PREQUANT
        cfg = dict(BLOCK_N=v[0], BLOCK_K=v[1], num_warps=v[2], PREQUANT=bool(v[3]))
        return "a8", lambda x, w: w8a8.w8a8_gemv(x, w["qweight"], w["scales"], None, None, None, None, dict(cfg))
    if kind == "a8gemm":  # BM/BN/BK/warps/stages: the row quantizer and the int8 GEMM at one config
        cfg = dict(BLOCK_M=v[0], BLOCK_N=v[1], BLOCK_K=v[2], GROUP_M=8, num_warps=v[3], num_stages=v[4])
        return "a8", lambda x, w: w8a8.w8a8_gemm(x, w["qweight"], w["scales"], None, None, None, None, dict(cfg))
    raise ValueError(f"unknown spec {spec!r}")


def reference(spec, fam, x, w):
    if spec.startswith("deqonly"):
        return w4a16.dequantize_int4(w["qweight"], w["scales"], w["zeros"], G).to(x.dtype)
    if fam == "w4":
        return w4a16.w4a16_reference(x, w["qweight"], w["scales"], w["zeros"], G)
    if fam == "w8":
        return w8a16.w8a16_reference(x, w["qweight"], w["scales"])
    if fam == "a8":
        return w8a8.w8a8_reference(x, w["qweight"], w["scales"])
    return fp8_w8a8.fp8_linear_reference(x, w["weight"], w["weight_scale"])


def main():
    global OLD_DIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True, help="M=spec,spec;M=spec,...")
    ap.add_argument("--shapes", default="4096:4096,4096:6144,4096:28672,14336:4096")
    ap.add_argument("--budget", type=float, default=500)
    ap.add_argument("--old-dir", default=None, help="the previous kernel files, for the *_old specs")
    args = ap.parse_args()
    OLD_DIR = args.old_dir
    t0 = time.time()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"copy bw {copy_bandwidth_gbs():.0f} GB/s", flush=True)
    shapes = [tuple(int(a) for a in s.split(":")) for s in args.shapes.split(",")]
    for job in args.jobs.split(";"):
        m = int(job.split("=")[0])
        specs = job.split("=", 1)[1].split(",")
        rows, base = {s: [] for s in specs}, []
        for k, n in shapes:
            if time.time() - t0 > args.budget:
                print("budget spent")
                break
            weights = {}
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            bf16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(2 * n * k))]
            base.append(graph_time_us([lambda w=w: F.linear(x, w) for w in bf16]))
            del bf16
            for s in specs:
                fam, f = fn(s)
                if fam not in weights:
                    weights[fam] = [MAKERS[fam](n, k, dev) for _ in range(copies_for(n * k // (2 if fam == "w4" else 1)))]
                w0 = weights[fam][0]
                try:
                    err = rel_err(f(x, w0), reference(s, fam, x, w0))
                    us = graph_time_us([lambda w=w: f(x, w) for w in weights[fam]], replays=9)
                    rate = f"[{n * k * 2.5 / us / 1e3:4.0f}GB/s]" if s.startswith("deqonly") else f"({base[-1] / us:4.2f})"
                    rows[s].append(f"{us:7.1f}{rate}" + ("" if err < 1e-2 else f"!ERR{err:.0e}"))
                except Exception as e:
                    rows[s].append(f"FAIL {type(e).__name__}: {str(e)[:80]}")
            del weights
        print(f"\nM={m}  shapes {shapes}")
        print(f"  {'bf16':34}" + " ".join(f"{b:7.1f}      " for b in base))
        for s, v in rows.items():
            print(f"  {s:34}" + " ".join(v), flush=True)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
