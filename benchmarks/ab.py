"""A/B timings of kernel variants against bf16 cuBLAS and against the previous version of a kernel
file, in one run on one GPU (the numbers in NOTES_w4a16.md). Each job is ``M=spec,spec,...``;
jobs are separated by ``;``. Specs (``/``-separated integers after the colon):

    deq:BN/TILES/warps  deqonly:BN/TILES/warps     int4 dequantize (+ cuBLAS, or alone: then GB/s)
    mma:BM/BN/BK/SPLIT/warps/stages/SPLIT_K        int4 tensor-core kernel at one config
    w4, w8                                         the op's own path choice
    w8gemv2:BN/BK/warps/ASM                        int8 GEMV at one config (ASM 0: Triton's I2F)
    w8dq:MIN                                       int8 op with its dequantize path from M = MIN
    fp8:BN/BK/warps                                fp8 GEMV at one config
    deq_old, deqonly_old, mma_old:..., w4_old, w8_old, fp8_old   the same from --old-dir

``--old-dir`` holds the previous kernel files (w4a16.py, w8a16.py, fp8_w8a8.py), e.g. from
``git show REV:pymllm_fx/kernels/w4a16.py``; they are loaded without their op registration.

    python benchmarks/ab.py --old-dir /tmp/old --jobs "1=w8_old,w8gemv2:8/1024/4/1;1024=w8_old,w8dq:64"
"""
import argparse, functools, importlib.util, os, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import copies_for, graph_time_us, copy_bandwidth_gbs
from pymllm_fx.kernels import w4a16, w8a16

OLD_DIR = None


@functools.lru_cache(maxsize=None)
def _old(name):
    """The kernel file ``name`` from --old-dir, cut before its op registration (which would clash)."""
    src = open(os.path.join(OLD_DIR, name + ".py")).read()
    src = src[:src.index("@torch.library.triton_op")] if "@torch.library.triton_op" in src else src
    path = os.path.join(OLD_DIR, "_ab_" + name + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("_ab_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

G = 128
def w4(n, k):
    g = k // G
    return dict(qweight=w4a16.pack_int4(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)),
                scales=(torch.rand(n, g, device="cuda") * 0.02 + 0.002).to(torch.bfloat16),
                zeros=torch.randint(0, 16, (n, g), device="cuda").to(torch.bfloat16))
def w8(n, k):
    return dict(qweight=torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8),
                scales=(torch.rand(n, device="cuda") * 0.02).to(torch.bfloat16))

def f8(n, k):
    from pymllm_fx.kernels import fp8_w8a8
    weight, scale = fp8_w8a8.quantize_fp8_per_channel(torch.randn(n, k, device="cuda"))
    return dict(weight=weight, weight_scale=scale)

def fn(spec):
    kind, _, vals = spec.partition(":")
    v = [int(a) for a in vals.split("/")] if vals else []
    if kind == "deq":
        return "w4", lambda x, w: F.linear(x, w4a16.w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], G, x.dtype, block_n=v[0], tiles=v[1], num_warps=v[2]))
    if kind == "deqpt":
        return "w4", lambda x, w: w4a16.w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], G, x.dtype, block_n=v[0], tiles=v[1], num_warps=v[2], asm=False)
    if kind == "deqonly":
        return "w4", lambda x, w: w4a16.w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], G, x.dtype, block_n=v[0], tiles=v[1], num_warps=v[2])
    if kind == "deq_old":
        return "w4", lambda x, w: F.linear(x, _old("w4a16").w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], G, x.dtype))
    if kind == "deqonly_old":
        return "w4", lambda x, w: _old("w4a16").w4a16_dequantize(w["qweight"], w["scales"], w["zeros"], G, x.dtype)
    if kind == "mma":  # BM/BN/BK/SPLIT/warps/stages/SPLIT_K
        cfg = dict(BLOCK_M=v[0], BLOCK_N=v[1], BLOCK_K=v[2], SPLIT=v[3], num_warps=v[4], num_stages=v[5], SPLIT_K=v[6])
        return "w4", lambda x, w: w4a16.w4a16_mma(x, w["qweight"], w["scales"], w["zeros"], G, None, dict(cfg))
    if kind == "mma_old":
        cfg = dict(BLOCK_M=v[0], BLOCK_N=v[1], BLOCK_K=v[2], SPLIT=v[3], num_warps=v[4], num_stages=v[5], SPLIT_K=v[6])
        return "w4", lambda x, w: _old("w4a16").w4a16_mma(x, w["qweight"], w["scales"], w["zeros"], G, None, dict(cfg))
    if kind == "w4":  # the op's own choice
        return "w4", lambda x, w: w4a16.w4a16_triton(x, w["qweight"], w["scales"], w["zeros"], G, None)
    if kind == "w4_old":
        return "w4", lambda x, w: _old("w4a16").w4a16_triton(x, w["qweight"], w["scales"], w["zeros"], G, None)
    if kind == "fp8":
        from pymllm_fx.kernels import fp8_w8a8
        return "f8", lambda x, w: fp8_w8a8.fp8_gemv(x, w["weight"], w["weight_scale"], None, dict(BLOCK_N=v[0], BLOCK_K=v[1], num_warps=v[2]))
    if kind == "fp8_old":
        fp8_old = _old("fp8_w8a8")
        return "f8", lambda x, w: fp8_old.fp8_gemv(x, w["weight"], w["weight_scale"], None)
    if kind == "w8_old":
        w8a16_old = _old("w8a16")
        return "w8", lambda x, w: w8a16_old.w8a16_triton(x, w["qweight"], w["scales"], None)
    if kind == "w8dq":  # the op with the dequantize path from M = v[0]
        def f(x, w, lim=v[0]):
            w8a16.DEQUANT_MIN_M = lim
            return w8a16.w8a16_triton(x, w["qweight"], w["scales"], None)
        return "w8", f
    if kind == "w8":
        return "w8", lambda x, w: w8a16.w8a16_triton(x, w["qweight"], w["scales"], None)
    if kind == "w8gemv2":  # BN/BK/warps/ASM
        cfg = dict(BLOCK_N=v[0], BLOCK_K=v[1], num_warps=v[2], ASM=bool(v[3]))
        return "w8", lambda x, w: w8a16.w8a16_gemv(x, w["qweight"], w["scales"], None, dict(cfg))
    raise ValueError(spec)

ap = argparse.ArgumentParser()
ap.add_argument("--jobs", required=True, help="M=spec,spec;M=spec,...")
ap.add_argument("--shapes", default="4096:4096,4096:6144,4096:28672,14336:4096")
ap.add_argument("--budget", type=float, default=500)
ap.add_argument("--old-dir", default=None, help="the previous kernel files, for the *_old specs")
args = ap.parse_args()
OLD_DIR = args.old_dir
t0 = time.time()
torch.manual_seed(0)
print(f"copy bw {copy_bandwidth_gbs():.0f} GB/s", flush=True)
shapes = [tuple(int(a) for a in s.split(":")) for s in args.shapes.split(",")]
for job in args.jobs.split(";"):
    m = int(job.split("=")[0]); specs = job.split("=", 1)[1].split(",")
    rows = {s: [] for s in specs}; base = []
    for k, n in shapes:
        if time.time() - t0 > args.budget:
            print("budget spent"); break
        ws = {"w4": None, "w8": None, "f8": None}
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bw = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(2 * n * k))]
        base.append(graph_time_us([lambda w=w: F.linear(x, w) for w in bw])); del bw
        for s in specs:
            fam, f = fn(s)
            if ws[fam] is None:
                mk = dict(w4=w4, w8=w8, f8=f8)[fam]
                ws[fam] = [mk(n, k) for _ in range(copies_for(n * k // (2 if fam == "w4" else 1)))]
            w0 = ws[fam][0]
            try:
                out = f(x, w0)
                if s.startswith(("deqonly", "deqpt")):
                    ref = w4a16.dequantize_int4(w0["qweight"], w0["scales"], w0["zeros"], G).to(torch.bfloat16)
                elif fam == "w4":
                    ref = w4a16.w4a16_reference(x, w0["qweight"], w0["scales"], w0["zeros"], G)
                elif fam == "w8":
                    ref = w8a16.w8a16_reference(x, w0["qweight"], w0["scales"])
                else:
                    from pymllm_fx.kernels import fp8_w8a8
                    ref = fp8_w8a8.fp8_linear_reference(x, w0["weight"], w0["weight_scale"])
                err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                us = graph_time_us([lambda w=w: f(x, w) for w in ws[fam]], replays=9)
                rows[s].append(f"{us:7.1f}" + (f"({base[-1]/us:4.2f})" if not s.startswith(("deqonly", "deqpt")) else f"[{n*k*2.5/us/1e3:4.0f}GB/s]") + ("" if err < 1e-2 else f"!ERR{err:.0e}"))
            except Exception as e:
                rows[s].append(f"FAIL {type(e).__name__}: {str(e)[:80]}")
        del ws
    print(f"\nM={m}  shapes {shapes}")
    print(f"  {'bf16':34}" + " ".join(f"{b:7.1f}      " for b in base))
    for s, v in rows.items():
        print(f"  {s:34}" + " ".join(v), flush=True)
print(f"total {time.time() - t0:.0f}s")
