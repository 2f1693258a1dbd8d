"""Sweep the Triton kernels' block shapes on the GPU at the Llama-3-8B linear shapes; print the best
per (kernel, shape, M) against bf16 cuBLAS and write every timing to JSON. For w4a16: the decode
GEMV's shapes at M = 1, the tensor-core kernel's (BLOCK_N, BLOCK_K, SPLIT warps on K, stages,
SPLIT_K programs on K) at every M, and dequantize-then-cuBLAS from M = 64. For w8a8: its decode GEMV
(fused quantization or the row quantizer's output) up to M = 8 and its int8 tensor-core GEMM.

The winners become the config tables in ``pymllm_fx/kernels/*.py``. Usage (on a CUDA machine):
    pip install -e . && python benchmarks/tune.py --json benchmarks/results/tune.json [--families w4a16,w8a16,fp8,w8a8]
"""

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules; pymllm_fx is installed

from timing import copies_for, copy_bandwidth_gbs, graph_time_us  # noqa: E402
from pymllm_fx.kernels import fp8_w8a8, w4a16, w8a8, w8a16  # noqa: E402

SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N)
MS = [1, 8, 32, 128, 1024, 4096]
GROUP = 128


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_w4(n, k, device):
    codes = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32)
    g = w4a16.num_groups(k, GROUP)
    return dict(
        qweight=w4a16.pack_int4(codes),
        scales=(torch.rand(n, g, device=device) * 0.02 + 0.002).to(torch.bfloat16),
        zeros=torch.randint(0, 16, (n, g), device=device).to(torch.bfloat16),
    )


def make_w8(n, k, device):
    return dict(
        qweight=torch.randint(-128, 128, (n, k), device=device, dtype=torch.int8),
        scales=(torch.rand(n, device=device) * 0.02).to(torch.bfloat16),
    )


def make_a8(n, k, device):
    """W8A8 int8: int8 codes with float32 per-channel scales (the op's dtypes)."""
    w = make_w8(n, k, device)
    return dict(qweight=w["qweight"], scales=w["scales"].float())


def make_fp8(n, k, device):
    weight, scale = fp8_w8a8.quantize_fp8_per_channel(torch.randn(n, k, device=device))
    return dict(weight=weight, weight_scale=scale)


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)


# Candidate configs per path. Each distinct set of constexprs compiles once and serves every shape.
GEMV_BASE = [  # the 8-bit GEMVs: rows per program, K per step, warps
    dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
    for bn, bk, w in itertools.product([8, 16, 32], [256, 512, 1024], [4])
] + [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=8) for bn, bk in ((16, 1024), (8, 2048), (32, 512))]


def w4_candidates(m):
    """Tensor-core kernel configs for one M: (BLOCK_N, BLOCK_K, SPLIT (warps on K slices), stages, SPLIT_K)."""
    bm = 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if m <= 16:
        grid = [(16, 64, 8, 3, 1), (16, 64, 16, 2, 1), (32, 64, 8, 3, 1), (32, 64, 16, 3, 1), (32, 128, 8, 3, 1),
                (16, 128, 8, 3, 1), (64, 64, 8, 3, 1), (64, 128, 4, 3, 1), (32, 64, 8, 3, 2), (64, 64, 8, 3, 2),
                (64, 128, 4, 3, 4), (32, 128, 4, 4, 4), (32, 64, 4, 4, 1), (16, 64, 4, 4, 2)]
        cfgs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=sp, num_stages=st, SPLIT_K=sk) for bn, bk, sp, st, sk in grid]
        return cfgs + [dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk, SPLIT=1, num_warps=4, num_stages=4, SPLIT_K=sk)
                       for bk, sk in ((256, 1), (256, 4), (128, 2))]
    if m <= 64:
        grid = [(32, 64, 8, 3, 1), (32, 64, 8, 3, 2), (64, 64, 8, 3, 1), (64, 64, 8, 3, 2), (64, 64, 4, 3, 4),
                (64, 128, 4, 3, 2), (32, 128, 4, 3, 4)]
        cfgs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=sp, num_stages=st, SPLIT_K=sk) for bn, bk, sp, st, sk in grid]
        return cfgs + [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT=1, num_warps=w, num_stages=3, SPLIT_K=sk)
                       for bn, w, sk in ((64, 4, 1), (64, 4, 2), (64, 4, 4), (128, 4, 1), (128, 4, 2), (128, 8, 2))]
    grid = [(64, 128, 128, 4, 3, 1), (64, 128, 128, 4, 3, 2), (128, 128, 128, 8, 3, 1), (128, 128, 64, 8, 4, 1),
            (128, 64, 128, 4, 3, 1), (128, 64, 128, 4, 3, 2), (64, 64, 128, 4, 3, 2)]
    if m >= 1024:
        grid += [(256, 128, 128, 8, 3, 1), (128, 256, 128, 8, 3, 1), (128, 256, 64, 8, 3, 1)]
    cfgs = [dict(BLOCK_M=a, BLOCK_N=b, BLOCK_K=c, SPLIT=1, num_warps=w, num_stages=st, SPLIT_K=sk, SCALE_IN=True)
            for a, b, c, w, st, sk in grid]
    return cfgs + [dict(c, SCALE_IN=False) for c in cfgs[:4]]


def gemm_candidates(m, family):
    if m <= 16:
        grid = itertools.product([16], [32, 64, 128], [128], [4], [3, 4, 5])
    elif m <= 32:
        grid = itertools.product([16, 32], [64, 128], [64, 128], [4], [3, 4])
    elif m <= 128:
        grid = itertools.product([32, 64], [64, 128, 256], [64, 128], [4, 8], [3])
    else:
        grid = itertools.product([64, 128], [128, 256], [64, 128], [4, 8], [3, 4])
    cfgs = [dict(BLOCK_M=a, BLOCK_N=b, BLOCK_K=c, GROUP_M=8, num_warps=w, num_stages=s) for a, b, c, w, s in grid]
    return cfgs


def family_paths(family, m):
    """(path name, config or None, fn(x, w, config)) candidates for one M."""
    if family == "w4a16":
        mma = lambda x, w, c: w4a16.w4a16_mma(x, w["qweight"], w["scales"], w["zeros"], GROUP, None, c)  # noqa: E731

        def deq(x, w, c):
            return F.linear(x, w4a16.w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], GROUP, x.dtype))

        ref = lambda x, w: w4a16.w4a16_reference(x, w["qweight"], w["scales"], w["zeros"], GROUP)  # noqa: E731
        paths = [("mma", c, mma) for c in w4_candidates(m)]
        if m == 1:  # the CUDA-core decode GEMV: (BLOCK_N, TILES of 64 features per step, warps)
            gemv = lambda x, w, c: w4a16.w4a16_gemv(x, w["qweight"], w["scales"], w["zeros"], GROUP, None, c)  # noqa: E731
            paths = [("gemv", dict(BLOCK_N=bn, TILES=t, num_warps=nw), gemv)
                     for bn, t, nw in ((16, 64, 8), (16, 32, 8), (16, 16, 4), (8, 32, 8), (32, 16, 8), (8, 16, 4))] + paths
        if m >= 64:
            paths.append(("dequant+cublas", None, deq))
        return paths, ref
    elif family == "w8a8":  # no dequantize path: the int8 tensor cores are the point
        def gemv(x, w, c):
            return w8a8.w8a8_gemv(x, w["qweight"], w["scales"], None, None, None, None, c)

        def gemm(x, w, c):
            return w8a8.w8a8_gemm(x, w["qweight"], w["scales"], None, None, None, None, c)

        ref = lambda x, w: w8a8.w8a8_reference(x, w["qweight"], w["scales"])  # noqa: E731
        paths = [("gemm", c, gemm) for c in gemm_candidates(m, family)]
        if m <= 8:  # the decode GEMV, quantizing in every program or reading the row quantizer's output
            paths = [("gemv", dict(base, PREQUANT=pre), gemv) for base in GEMV_BASE for pre in (False, True)] + paths
        return paths, ref
    elif family == "w8a16":
        gemv = lambda x, w, c: w8a16.w8a16_gemv(x, w["qweight"], w["scales"], None, c)  # noqa: E731
        gemm = lambda x, w, c: w8a16.w8a16_gemm(x, w["qweight"], w["scales"], None, c)  # noqa: E731
        deq = lambda x, w, c: F.linear(x, w8a16.w8a16_dequantize(w["qweight"], w["scales"], x.dtype))  # noqa: E731
        ref = lambda x, w: w8a16.w8a16_reference(x, w["qweight"], w["scales"])  # noqa: E731
    else:
        gemv = lambda x, w, c: fp8_w8a8.fp8_gemv(x, w["weight"], w["weight_scale"], None, c)  # noqa: E731
        gemm = lambda x, w, c: fp8_w8a8.fp8_gemm(x, w["weight"], w["weight_scale"], None, c)  # noqa: E731
        deq = lambda x, w, c: fp8_w8a8.fp8_scaled_mm(x, w["weight"], w["weight_scale"], None)  # noqa: E731
        ref = lambda x, w: fp8_w8a8.fp8_linear_reference(x, w["weight"], w["weight_scale"])  # noqa: E731
    paths = []
    if m <= 8:
        paths += [("gemv", dict(base), gemv) for base in GEMV_BASE]
    paths += [("gemm", c, gemm) for c in gemm_candidates(m, family)]
    if m >= 32:
        paths.append(("dequant+cublas" if family != "fp8" else "scaled_mm", None, deq))
    return paths, ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="w4a16,w8a16,fp8")
    ap.add_argument("--shapes", default=None, help="K:N,K:N (default: the Llama-3-8B shapes)")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--budget-s", type=float, default=400, help="stop sweeping after this many seconds")
    ap.add_argument("--json", default="benchmarks/results/tune.json")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    ms = MS if args.ms is None else [int(v) for v in args.ms.split(",")]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s", flush=True)
    results = dict(device=torch.cuda.get_device_name(), copy_gbs=bw, torch=torch.__version__, rows=[])
    makers = dict(w4a16=make_w4, w8a16=make_w8, fp8=make_fp8, w8a8=make_a8)
    bf16_us = {}
    summary = []
    families = args.families.split(",")
    budgets = dict(w4a16=0.55, w8a16=0.2, fp8=0.25, w8a8=0.25)
    for family in families:
        family_t0 = time.time()
        share = budgets[family] / sum(budgets[f] for f in families) * args.budget_s
        for k, n in shapes:
            one = makers[family](n, k, dev)
            weights = [one] + [makers[family](n, k, dev) for _ in range(copies_for(nbytes(one)) - 1)]
            bf16_w = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(2 * n * k))]
            for m in ms:
                if time.time() - family_t0 > share:
                    print(f"{family}: time share spent; skipping K={k} N={n} M={m}", flush=True)
                    continue
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                base_us = bf16_us.get((k, n, m))
                if base_us is None:
                    base_us = bf16_us[(k, n, m)] = graph_time_us([lambda w=w: F.linear(x, w) for w in bf16_w])
                    results["rows"].append(dict(kernel="bf16", K=k, N=n, M=m, us=base_us))
                paths, ref = family_paths(family, m)
                expect = ref(x, weights[0])
                best = None
                for path, cfg, fn in paths:
                    try:
                        err = rel_err(fn(x, weights[0], cfg), expect)
                        if not err < 2e-2:
                            raise AssertionError(f"rel err {err:.2e}")
                        us = graph_time_us([lambda w=w: fn(x, w, cfg) for w in weights], replays=7)
                    except Exception as exc:  # a config that does not fit (shared memory) or is wrong
                        results["rows"].append(dict(kernel=family, path=path, cfg=cfg, K=k, N=n, M=m, error=str(exc)[:300]))
                        continue
                    results["rows"].append(dict(kernel=family, path=path, cfg=cfg, K=k, N=n, M=m, us=us, err=err))
                    if best is None or us < best[0]:
                        best = (us, path, cfg)
                if best:
                    gbs = nbytes(one) / best[0] / 1e3
                    summary.append((family, k, n, m, best[1], best[0], base_us / best[0], gbs / bw, best[2]))
                    print(f"{family:6} K={k:5} N={n:5} M={m:4} {best[1]:15} {best[0]:9.1f} us  x{base_us / best[0]:5.2f} vs bf16"
                          f" ({base_us:8.1f} us)  {gbs / bw:4.0%} of copy bw  {best[2]}", flush=True)
                os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(results, f)
            del weights, one, bf16_w
    errors = {}
    for row in results["rows"]:
        if "error" in row:
            errors.setdefault((row["kernel"], row["path"], row["error"][:120]), 0)
            errors[(row["kernel"], row["path"], row["error"][:120])] += 1
    for (family, path, msg), count in sorted(errors.items()):
        print(f"failed x{count}: {family} {path}: {msg}")
    print("\nbest per (kernel, shape, M):")
    for row in summary:
        print("%-6s K=%5d N=%5d M=%4d %-15s %9.1f us  x%5.2f  %4.0f%%  %s" % (*row[:7], 100 * row[7], row[8]))


if __name__ == "__main__":
    main()
