"""Kernel microbenchmark: pymllm_fx's quantized linears against bf16 cuBLAS and the int4 / fp8 peers,
at the Llama-3-8B linear shapes, in one run on one GPU.

Shapes (K, N): (4096, 4096) qkv-ish/o, (4096, 6144) fused qkv, (4096, 28672) fused gate+up,
(14336, 4096) down; M (tokens) in 1, 8, 32, 128, 1024, 4096; bf16 activations, group size 128.

Implementations (``--impls``):

bf16              ``F.linear(x, w)`` with a bf16 weight (cuBLAS): the baseline of every speedup.
tinygemm          ``aten._weight_int4pack_mm`` (the int4 kernel torchao calls), ``peers.make_tinygemm``.
gemlite           gemlite 0.6 A16W4 Triton kernels with gemlite's default settings
                  (``peers.make_gemlite``); warmed up (autotuned) at every M before it is checked/timed.
ref-compiled      our pure-torch ``w4a16_reference`` (dequantize, then ``F.linear``) under
                  ``torch.compile(dynamic=False, fullgraph=True)``: what Inductor fuses on its own. One
                  row per ``--ref-modes`` entry: ``default`` (mode=None) and ``max-autotune``
                  (mode="max-autotune-no-cudagraphs"). Compiled once per (shape, M); the compile time is
                  recorded. These entries run LAST (after every other row of every shape), mode by mode
                  in ``--ref-modes`` order and M-major inside a mode (the --ms order, then every shape), so
                  the per-M geomeans fill in one M at a time. Before each compile the script estimates
                  its cost (the previous compile of that mode, a guess for the first) and, if it would
                  end past ``--budget-s``, records that entry and every later one of the mode as
                  "skipped: time budget".
ours-int4         ``torch.ops.pymllm_fx.w4a16_linear`` (int4, asymmetric, group 128).
ours-int8         ``torch.ops.pymllm_fx.w8a16_linear`` (int8, one scale per output channel).
ours-fp8          ``torch.ops.pymllm_fx.fp8_linear`` (e4m3 weights per channel, activations per token).
scaled-mm-eager   the fp8 peer: per-token quantization in unfused eager torch ops
                  (``x.abs().amax(-1) / 448``, divide, clamp, cast to e4m3) then ``torch._scaled_mm`` with
                  row-wise scales and bf16 output, on the same fp8 weights as ours-fp8.
ours-w8a8         ``torch.ops.pymllm_fx.w8a8_linear`` (int8 weights per channel, int8 activations per token:
                  fused GEMV at M = 1, else the row quantizer and the int8 tensor-core GEMM).
int_mm            the int8 peer: per-token quantization in unfused eager torch ops (``x.abs().amax(-1) / 127``,
                  divide, round, clamp, cast to int8), ``torch._int_mm`` (cuBLAS int8, int32 out; its M > 16
                  rule is met by padding smaller M to 17 rows) and both scales in eager ops, on the same
                  int8 weights as ours-w8a8.

Method. Every timing is ``timing.graph_time_us``: the calls are captured in one CUDA graph (no launch
gaps, no Python overhead) and the graph is replayed; the median replay over the number of calls is
the time per call. The calls cycle through ``timing.copies_for(weight bytes)`` independent copies of
the weights (peers: ``PeerLinear.copies``; ours and bf16: fresh random tensors per copy), so one pass
overflows L2 and every call reads its weights from HBM, as in a model's forward. Before timing, each
implementation is called once to compile / autotune, then checked once:
``rel.err = ||out - ref|| / ||ref||`` with ref = ``x @ reference_weight.T`` in fp32 for bf16 and the
peers, and the op's own torch reference for ours (``w4a16_reference``, ``w8a16_reference``,
``fp8_linear_reference``, ``w8a8_reference``); ref-compiled is checked against eager ``w4a16_reference``,
scaled-mm-eager against ``fp8_linear_reference`` (same per-token fp8 math) and int_mm against
``w8a8_reference`` (same per-token int8 math). A row with rel.err above
2e-2 is still timed but flagged ``!`` (gemlite's default bf16-atomic split-K paths for M < 64 can land
near 2e-2).

Columns of the per-row table:
us        microseconds per call (CUDA-graph replay, L2 defeated).
GB/s      bytes / time, where bytes = the weight representation one call reads (packed weights +
          scales + zeros; bf16: 2*N*K) + the bf16 activations (2*M*K) + the bf16 output (2*M*N).
          For ref-compiled the bytes are those of the int4 representation (an effective rate).
%copy     GB/s as a fraction of the measured device-to-device copy bandwidth
          (``timing.copy_bandwidth_gbs``), the practical HBM ceiling.
x bf16    bf16 time / this time at the same (shape, M): above 1 is faster than cuBLAS bf16.
rel.err   the check above; ``!`` marks > 2e-2.

Also printed: the int4 roofline floor per (shape, M), max(int4 bytes / copy bandwidth,
2*M*N*K / peak), with peak = a measured 8192^3 bf16 matmul rate; and a summary per M: the geomean
speedup over bf16 across the shapes for each implementation, and whether ours-int4 is faster than
both int4 peers (tinygemm and gemlite) at every shape.

Everything goes to ``--json`` (default benchmarks/results/kernels.json), rewritten after each shape
(and after each ref-compiled entry), so an interrupted run keeps what it measured. ``--budget-s``
stops the run gracefully: rows not started in time are recorded as "skipped: time budget".

    python benchmarks/kernels.py                                      # everything (~7 min on an H100)
    python benchmarks/kernels.py --impls bf16,ours-int4,tinygemm --ms 1,8 --shapes 4096:4096
    python benchmarks/kernels.py --ref-modes max-autotune,default     # max-autotune gets the budget first

pymllm_fx must be pip-installed (``pip install -e .``); only this directory goes on sys.path.
"""

import time

_T0 = time.time()  # the budget counts from here (before torch's import)

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules; pymllm_fx is installed

from timing import copies_for, copy_bandwidth_gbs, graph_time_us  # noqa: E402

SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N)
MS = [1, 8, 32, 128, 1024, 4096]
GROUP = 128
ERR_FLAG = 2e-2
IMPLS = ["bf16", "tinygemm", "gemlite", "ref-compiled", "ours-int4", "ours-int8", "ours-fp8", "scaled-mm-eager",
         "ours-w8a8", "int_mm"]
REF_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}  # --ref-modes -> torch.compile mode
FIRST_COMPILE_GUESS_S = {"default": 20.0, "max-autotune": 60.0}  # budget estimate before any compile was seen
INT4_PEERS = ("tinygemm", "gemlite")


# --- weights and small helpers ------------------------------------------------------------------


@dataclass
class Spec:
    """One implementation at one shape: a callable per weight copy, the check's reference, and the
    bytes of one copy's weight representation."""

    fns: List[Callable[[torch.Tensor], torch.Tensor]]
    ref: Callable[[torch.Tensor], torch.Tensor]
    weight_bytes: int


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def int4_bytes(n: int, k: int) -> int:
    """Our int4 representation: packed codes + bf16 scales + bf16 zeros."""
    return n * k // 2 + 2 * 2 * n * math.ceil(k / GROUP)


def io_bytes(m: int, k: int, n: int) -> int:
    """bf16 activations read + bf16 output written."""
    return 2 * m * k + 2 * m * n


def make_w4(n: int, k: int) -> dict:
    """Random int4 weights in our runtime layout (as benchmarks/tune.py makes them)."""
    from pymllm_fx.kernels import w4a16

    g = w4a16.num_groups(k, GROUP)
    return dict(
        qweight=w4a16.pack_int4(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)),
        scales=(torch.rand(n, g, device="cuda") * 0.02 + 0.002).to(torch.bfloat16),
        zeros=torch.randint(0, 16, (n, g), device="cuda").to(torch.bfloat16),
    )


def make_w8(n: int, k: int) -> dict:
    return dict(
        qweight=torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8),
        scales=(torch.rand(n, device="cuda") * 0.02).to(torch.bfloat16),
    )


def make_fp8(n: int, k: int) -> dict:
    from pymllm_fx.kernels import fp8_w8a8

    weight, scale = fp8_w8a8.quantize_fp8_per_channel(torch.randn(n, k, device="cuda"))
    return dict(weight=weight, weight_scale=scale)


def make_w8a8(n: int, k: int) -> dict:
    return dict(
        qweight=torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8),
        weight_scale=torch.rand(n, device="cuda") * 0.0002 + 0.0001,
    )


def make_copies(maker: Callable[[int, int], dict], n: int, k: int) -> List[dict]:
    first = maker(n, k)
    return [first] + [maker(n, k) for _ in range(copies_for(nbytes(first)) - 1)]


def scaled_mm_eager(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The fp8 baseline: per-token quantization in separate eager ops, then cuBLASLt's fp8 GEMM.

    Same values as fp8_w8a8.quantize_fp8_per_token: amax is exact in bf16, and bf16 x / fp32 scale
    promotes to fp32, as the reference's x.float() / scale does."""
    x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / 448.0).clamp(min=1e-12)  # (M, 1) fp32
    xq = (x / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale[None, :], out_dtype=torch.bfloat16
    )


def int_mm_eager(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The int8 baseline: per-token quantization in separate eager ops, cuBLAS's int8 GEMM
    (``torch._int_mm``, int32 out), then both scales. Same values as w8a8.quantize_int8_per_token:
    amax is exact in bf16, and bf16 x / fp32 scale promotes to fp32."""
    m = x.shape[0]
    x_scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=1e-12)  # (M, 1) fp32
    xq = torch.round(x / x_scale).clamp(-128, 127).to(torch.int8)
    if m <= 16:  # _int_mm needs M > 16
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, qweight.t())[:m]
    return (acc.float() * x_scale * weight_scale).to(torch.bfloat16)


def _ref_w4(x, qweight, scales, zeros):
    """What ref-compiled compiles: our pure-torch int4 reference (group size fixed, no bias)."""
    from pymllm_fx.kernels import w4a16

    return w4a16.w4a16_reference(x, qweight, scales, zeros, GROUP)


def measure_peak_tflops(size: int = 8192) -> float:
    """bf16 matmul rate of one size^3 GEMM (cuBLAS), replayed in a CUDA graph."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(size, size, device="cuda", dtype=torch.bfloat16)
    us = graph_time_us([lambda: torch.mm(a, b, out=c)])
    return 2 * size**3 / us / 1e6


def version_of(dist: str) -> Optional[str]:
    """An installed distribution's version, without importing it (importing torchao would change
    Inductor's config process-wide)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def sync_quietly() -> None:
    """Synchronize after a failed call; a sticky CUDA error then surfaces in the next call instead."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def short_error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {lines[0][:300] if lines else ''}"


# --- recording --------------------------------------------------------------------------------------


class Recorder:
    """Holds the JSON document, prints rows as they come, rewrites the file on flush()."""

    def __init__(self, path: str, results: dict, copy_gbs: float, budget_s: float):
        self.path = path
        self.results = results
        self.copy_gbs = copy_gbs
        self.budget_s = budget_s
        self.bf16_us: Dict[tuple, float] = {}

    def elapsed(self) -> float:
        return time.time() - _T0

    def over_budget(self, extra_s: float = 0.0) -> bool:
        return self.elapsed() + extra_s > self.budget_s

    def add(self, impl: str, k: int, n: int, m: int, status: str, us: Optional[float] = None,
            err: Optional[float] = None, weight_bytes: Optional[int] = None, copies: Optional[int] = None,
            **extra) -> dict:
        row = dict(impl=impl, K=k, N=n, M=m, status=status, us=us, err=err, flagged=None,
                   bytes=None, gbs=None, frac_copy_bw=None, speedup_vs_bf16=None, copies=copies, **extra)
        if err is not None:
            row["flagged"] = not err <= ERR_FLAG
        if us is not None:
            total = weight_bytes + io_bytes(m, k, n)
            row.update(bytes=total, gbs=total / us / 1e3)
            row["frac_copy_bw"] = row["gbs"] / self.copy_gbs
            if impl == "bf16":
                self.bf16_us[(k, n, m)] = us
            base = self.bf16_us.get((k, n, m))
            if base is not None:
                row["speedup_vs_bf16"] = base / us
        self.results["rows"].append(row)
        if status.startswith("skipped"):
            self.results["skipped"].append(f"{impl} K={k} N={n} M={m}: {status}")
        self.print_row(row)
        return row

    @staticmethod
    def print_header() -> None:
        print(f"  {'impl':<26} {'K':>5} {'N':>5} {'M':>4} {'us':>9} {'GB/s':>7} {'%copy':>6} {'x bf16':>7} {'rel.err':>9}",
              flush=True)

    @staticmethod
    def print_row(row: dict) -> None:
        head = f"  {row['impl']:<26} {row['K']:>5} {row['N']:>5} {row['M']:>4}"
        if row["us"] is None:
            print(f"{head}   {row['status']}", flush=True)
            return
        sp = f"{row['speedup_vs_bf16']:6.2f}x" if row["speedup_vs_bf16"] is not None else f"{'-':>7}"
        err = f"{row['err']:9.1e}" if row["err"] is not None else f"{'-':>9}"
        flag = " ! rel.err > 2e-2" if row["flagged"] else ""
        note = f"  (compile {row['compile_s']:.1f} s)" if row.get("compile_s") is not None else ""
        print(f"{head} {row['us']:9.1f} {row['gbs']:7.0f} {row['frac_copy_bw']:6.0%} {sp} {err}{flag}{note}", flush=True)

    def flush(self) -> None:
        self.results["elapsed_s"] = self.elapsed()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # never leaves a half-written file behind


def time_spec(rec: Recorder, impl: str, k: int, n: int, m: int, spec: Spec, x: torch.Tensor, **extra) -> dict:
    """Warm up (compile/autotune), check once, then time over all weight copies; one row."""
    try:
        spec.fns[0](x)  # first call: Triton JIT, gemlite autotune for this M, torch.compile
        torch.cuda.synchronize()
        out = spec.fns[0](x)
        err = rel_err(out, spec.ref(x))
        del out
        us = graph_time_us([lambda f=f: f(x) for f in spec.fns])
    except Exception as exc:  # an implementation that fails is recorded, the run goes on
        sync_quietly()
        return rec.add(impl, k, n, m, short_error(exc), **extra)
    return rec.add(impl, k, n, m, "ok", us=us, err=err, weight_bytes=spec.weight_bytes, copies=len(spec.fns), **extra)


# --- building the implementations at one shape ---------------------------------------------------------


def build(impl: str, k: int, n: int, w0: torch.Tensor, fp8_ws: list, int4_ws: list, peers, w8a8_ws: list = None) -> Spec:
    """Weight copies and per-copy callables of ``impl`` at (K, N). ``w0`` is the bf16 weight the
    peers quantize (and bf16's first copy)."""
    if impl == "bf16":
        ws = [w0] + [torch.randn_like(w0) * 0.02 for _ in range(copies_for(2 * n * k) - 1)]
        return Spec([lambda x, w=w: F.linear(x, w) for w in ws], lambda x: x.float() @ w0.float().t(), 2 * n * k)
    if impl in INT4_PEERS:
        if peers is None:
            raise RuntimeError("benchmarks/peers.py did not import")
        make = peers.make_tinygemm if impl == "tinygemm" else peers.make_gemlite
        p0 = make(w0, group_size=GROUP)
        ps = [p0] + p0.copies(copies_for(p0.nbytes) - 1)
        ref_w = p0.reference_weight
        return Spec([p.fn for p in ps], lambda x: x.float() @ ref_w.float().t(), p0.nbytes)
    if impl == "ours-int4":
        from pymllm_fx.kernels import w4a16

        op = torch.ops.pymllm_fx.w4a16_linear
        return Spec([lambda x, w=w: op(x, w["qweight"], w["scales"], w["zeros"], GROUP, None) for w in int4_ws],
                    lambda x: w4a16.w4a16_reference(x, **int4_ws[0], group_size=GROUP), nbytes(int4_ws[0]))
    if impl == "ours-int8":
        from pymllm_fx.kernels import w8a16

        ws = make_copies(make_w8, n, k)
        op = torch.ops.pymllm_fx.w8a16_linear
        return Spec([lambda x, w=w: op(x, w["qweight"], w["scales"], None) for w in ws],
                    lambda x: w8a16.w8a16_reference(x, **ws[0]), nbytes(ws[0]))
    if impl in ("ours-fp8", "scaled-mm-eager"):
        from pymllm_fx.kernels import fp8_w8a8

        ref = lambda x: fp8_w8a8.fp8_linear_reference(x, **fp8_ws[0])  # noqa: E731
        if impl == "ours-fp8":
            op = torch.ops.pymllm_fx.fp8_linear
            fns = [lambda x, w=w: op(x, w["weight"], w["weight_scale"], None) for w in fp8_ws]
        else:
            fns = [lambda x, w=w: scaled_mm_eager(x, w["weight"], w["weight_scale"]) for w in fp8_ws]
        return Spec(fns, ref, nbytes(fp8_ws[0]))
    if impl in ("ours-w8a8", "int_mm"):
        from pymllm_fx.kernels import w8a8

        ws = w8a8_ws
        ref = lambda x: w8a8.w8a8_reference(x, **ws[0])  # noqa: E731
        if impl == "ours-w8a8":
            op = torch.ops.pymllm_fx.w8a8_linear
            fns = [lambda x, w=w: op(x, w["qweight"], w["weight_scale"], None, None, None, None) for w in ws]
        else:
            fns = [lambda x, w=w: int_mm_eager(x, w["qweight"], w["weight_scale"]) for w in ws]
        return Spec(fns, ref, nbytes(ws[0]))
    raise ValueError(impl)


# --- the two phases --------------------------------------------------------------------------------------


def run_shape(rec: Recorder, k: int, n: int, ms: List[int], impls: List[str], peers, floors: dict,
              int4_cache: Optional[dict]) -> None:
    """Phase 1 at one shape: every implementation but ref-compiled, at every M."""
    print(f"\nK={k} N={n}", flush=True)
    if rec.over_budget():
        for m in ms:
            for impl in impls:
                rec.add(impl, k, n, m, "skipped: time budget")
        return
    torch.manual_seed(k * 100003 + n)
    w0 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    shared = {}  # int4 copies (ours-int4, later ref-compiled), fp8 (ours-fp8, scaled-mm-eager), w8a8 (ours-w8a8, int_mm)
    users_of = {"int4": {"ours-int4"}, "fp8": {"ours-fp8", "scaled-mm-eager"}, "w8a8": {"ours-w8a8", "int_mm"}}
    for key, maker in (("int4", make_w4), ("fp8", make_fp8), ("w8a8", make_w8a8)):
        users = users_of[key]
        if users & set(impls) or (key == "int4" and int4_cache is not None):
            try:
                shared[key] = make_copies(maker, n, k)
            except Exception as exc:
                shared[key] = short_error(exc)
    if int4_cache is not None:
        int4_cache[(k, n)] = shared["int4"]  # ref-compiled reuses these later (or records the error)
    specs: Dict[str, object] = {}
    for impl in impls:
        try:
            for key, value in shared.items():
                if isinstance(value, str) and impl in users_of[key]:
                    raise RuntimeError(f"making the {key} weights failed: {value}")
            specs[impl] = build(impl, k, n, w0, shared.get("fp8"), shared.get("int4"), peers, shared.get("w8a8"))
        except Exception as exc:
            specs[impl] = short_error(exc)
    for m in ms:
        fl = floors[(k, n, m)]
        print(f" M={m}: int4 roofline floor {fl['floor_us']:.1f} us ({fl['bound']}-bound)", flush=True)
        Recorder.print_header()
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for impl in impls:
            spec = specs[impl]
            if rec.over_budget():
                rec.add(impl, k, n, m, "skipped: time budget")
            elif isinstance(spec, str):
                rec.add(impl, k, n, m, spec)
            else:
                time_spec(rec, impl, k, n, m, spec, x)
        del x
    del specs, w0, shared
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    rec.flush()


def run_ref_compiled(rec: Recorder, shapes: List[tuple], ms: List[int], modes: List[str], int4_cache: dict) -> None:
    """Phase 2: w4a16_reference under torch.compile, mode by mode, M-major, guarded by the budget."""
    estimate = dict(FIRST_COMPILE_GUESS_S)
    for mode in modes:
        impl = f"ref-compiled:{mode}"
        print(f"\n{impl}: torch.compile(mode={REF_MODES[mode]!r}, dynamic=False, fullgraph=True) of w4a16_reference",
              flush=True)
        Recorder.print_header()
        tripped = False
        for m in ms:
            for k, n in shapes:
                if not tripped and rec.over_budget(estimate[mode]):
                    tripped = True  # skip this and every later entry of the mode
                    print(f"  {impl}: next compile estimated at {estimate[mode]:.0f} s, "
                          f"{rec.budget_s - rec.elapsed():.0f} s of budget left: skipping the rest", flush=True)
                if tripped:
                    rec.add(impl, k, n, m, "skipped: time budget")
                    continue
                ws = int4_cache[(k, n)]
                if isinstance(ws, str):  # making the int4 weights failed in phase 1
                    rec.add(impl, k, n, m, ws)
                    continue
                t0 = time.time()
                torch._dynamo.reset()  # a fresh cache per (shape, M): no recompile limit, no mixing of modes
                compiled = torch.compile(_ref_w4, mode=REF_MODES[mode], dynamic=False, fullgraph=True)
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                spec = Spec([lambda x, w=w, c=compiled: c(x, w["qweight"], w["scales"], w["zeros"]) for w in ws],
                            lambda x, w0=ws[0]: _ref_w4(x, **w0), nbytes(ws[0]))
                compile_s = None
                try:  # compile here, so the time is known (time_spec's first call then just runs)
                    spec.fns[0](x)
                    torch.cuda.synchronize()
                    compile_s = time.time() - t0
                except Exception as exc:
                    sync_quietly()
                    rec.add(impl, k, n, m, short_error(exc))
                else:
                    time_spec(rec, impl, k, n, m, spec, x, compile_s=compile_s, mode=REF_MODES[mode])
                estimate[mode] = time.time() - t0  # this entry's whole cost predicts the next one
                del spec, compiled, x
                rec.flush()
    torch._dynamo.reset()


# --- summary --------------------------------------------------------------------------------------------


def geomean(xs: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in xs) / len(xs))


def summarize(rec: Recorder, shapes: List[tuple], ms: List[int], impl_names: List[str]) -> None:
    us = {(r["impl"], r["K"], r["N"], r["M"]): r["us"] for r in rec.results["rows"] if r["us"] is not None}
    flagged = {(r["impl"], r["K"], r["N"], r["M"]) for r in rec.results["rows"] if r["flagged"]}
    cols = [i for i in impl_names if i != "bf16"]
    label = {i: i.replace("ref-compiled:", "ref:") for i in cols}
    summary = {}
    for m in ms:
        per_impl = {}
        for impl in cols:
            sp = [us[("bf16", k, n, m)] / us[(impl, k, n, m)] for k, n in shapes
                  if ("bf16", k, n, m) in us and (impl, k, n, m) in us]
            per_impl[impl] = dict(geomean=geomean(sp), shapes=len(sp)) if sp else None
        lost, missing = [], []
        for k, n in shapes:
            ours = us.get(("ours-int4", k, n, m))
            for peer in INT4_PEERS:
                theirs = us.get((peer, k, n, m))
                if ours is None or theirs is None:
                    missing.append(f"{k}x{n} {peer}")
                elif not ours < theirs:
                    lost.append(f"{k}x{n}: {peer} {theirs:.1f} us <= ours {ours:.1f} us")
        if "ours-int4" not in impl_names:
            verdict, missing = "n/a (ours-int4 not run)", []
        elif lost:
            verdict = "NO (" + "; ".join(lost) + ")" + (f" [missing: {', '.join(missing)}]" if missing else "")
        elif missing:
            verdict = f"incomplete (missing: {', '.join(missing)})"
        else:
            verdict = "yes"
        summary[str(m)] = dict(geomean_speedup_vs_bf16=per_impl, ours_int4_faster_than_both_int4_peers=verdict,
                               ours_int4_lost=lost, missing=missing)
    rec.results["summary"] = summary

    print(f"\nGeomean speedup over bf16 across the {len(shapes)} shapes (n/{len(shapes)}: fewer shapes measured; "
          f"'!': some row flagged for rel.err > 2e-2)")
    widths = {i: max(len(label[i]), 9) for i in cols}
    print(f"{'M':>5}  " + "  ".join(f"{label[i]:>{widths[i]}}" for i in cols) + "  ours-int4 < both int4 peers at every shape")
    for m in ms:
        cells = []
        for impl in cols:
            g = summary[str(m)]["geomean_speedup_vs_bf16"][impl]
            if g is None:
                cell = "-"
            else:
                cell = f"{g['geomean']:.2f}x"
                if g["shapes"] < len(shapes):
                    cell += f" {g['shapes']}/{len(shapes)}"
                if any((impl, k, n, m) in flagged for k, n in shapes):
                    cell += "!"
            cells.append(f"{cell:>{widths[impl]}}")
        print(f"{m:>5}  " + "  ".join(cells) + "  " + summary[str(m)]["ours_int4_faster_than_both_int4_peers"])

    print("\nint4 roofline floor = max(int4 bytes / copy bandwidth, 2*M*N*K / peak bf16) vs ours-int4")
    print(f"{'K':>6} {'N':>6} {'M':>5} {'floor us':>9} {'bound':>8} {'ours us':>9} {'floor/ours':>10}")
    for fl in rec.results["floors"]:
        ours = us.get(("ours-int4", fl["K"], fl["N"], fl["M"]))
        tail = f"{ours:9.1f} {fl['floor_us'] / ours:10.0%}" if ours else f"{'-':>9} {'-':>10}"
        print(f"{fl['K']:>6} {fl['N']:>6} {fl['M']:>5} {fl['floor_us']:9.1f} {fl['bound']:>8} {tail}")

    if rec.results["skipped"]:
        print(f"\nskipped ({len(rec.results['skipped'])}):")
        for s in rec.results["skipped"]:
            print(f"  {s}")
    errors = [r for r in rec.results["rows"] if r["status"].startswith("error")]
    if errors:
        print(f"\nerrors ({len(errors)}):")
        for r in errors:
            print(f"  {r['impl']} K={r['K']} N={r['N']} M={r['M']}: {r['status']}")
    if rec.results["peer_errors"]:
        print(f"\npeers that did not import: {rec.results['peer_errors']}")


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time pymllm_fx's int4/int8/fp8 linears against bf16 cuBLAS, tinygemm, gemlite, "
                    "torch.compile'd references and eager _scaled_mm (CUDA graphs, L2 defeated).")
    ap.add_argument("--shapes", default=None, help="K:N,K:N,... (default: the 4 Llama-3-8B shapes "
                    + ",".join(f"{k}:{n}" for k, n in SHAPES) + ")")
    ap.add_argument("--ms", default=None, help="comma list of M (default: " + ",".join(map(str, MS)) + ")")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list from: " + ",".join(IMPLS) + " (default: all)")
    ap.add_argument("--ref-modes", default="default,max-autotune",
                    help="torch.compile modes for ref-compiled, run in this order: default (mode=None), "
                         "max-autotune (mode='max-autotune-no-cudagraphs') (default: default,max-autotune)")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="wall-clock budget from start; later rows are recorded as 'skipped: time budget' "
                         "(default: 390)")
    ap.add_argument("--json", default="benchmarks/results/kernels.json", help="output file (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
        args.ms = MS if args.ms is None else [int(v) for v in args.ms.split(",")]
    except ValueError as exc:
        ap.error(f"--shapes / --ms: {exc}")
    if any(len(s) != 2 or s[0] <= 0 or s[1] <= 0 or s[0] % GROUP for s in shapes):
        ap.error(f"--shapes {args.shapes}: expected K:N pairs with K a multiple of the group size {GROUP}")
    if any(m <= 0 for m in args.ms):
        ap.error("--ms: M must be positive")
    args.shapes = shapes
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        ap.error(f"unknown --impls {bad}; choose from {IMPLS}")
    args.impls = [i for i in IMPLS if i in impls]  # canonical order: bf16 first, so speedups are known
    args.ref_modes = [r.strip() for r in args.ref_modes.split(",") if r.strip()]
    bad = [r for r in args.ref_modes if r not in REF_MODES]
    if bad:
        ap.error(f"unknown --ref-modes {bad}; choose from {list(REF_MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device (torch.cuda.is_available() is False). This benchmark times "
              "GPU kernels and only runs on a CUDA machine; nothing was run.", file=sys.stderr)
        return 2

    import pymllm_fx.kernels  # noqa: F401  (registers torch.ops.pymllm_fx.*)
    import triton

    results = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        gemlite=version_of("gemlite"), torchao=version_of("torchao"), cuda=torch.version.cuda,
        group_size=GROUP, err_flag=ERR_FLAG, args=dict(shapes=args.shapes, ms=args.ms, impls=args.impls,
                                                       ref_modes=args.ref_modes, budget_s=args.budget_s),
        rows=[], floors=[], skipped=[], peer_errors={},
    )

    # Peers are imported lazily: a failure is recorded and the peer dropped.
    peers = None
    if INT4_PEERS[0] in args.impls or INT4_PEERS[1] in args.impls:
        try:
            import peers
        except Exception as exc:
            results["peer_errors"]["peers"] = short_error(exc)
    if "gemlite" in args.impls:
        try:
            import gemlite  # noqa: F401  (needs CUDA; loads gemlite's bundled autotune configs for this GPU)
        except Exception as exc:
            results["peer_errors"]["gemlite"] = short_error(exc)
            args.impls.remove("gemlite")
    if "tinygemm" in args.impls and not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        results["peer_errors"]["tinygemm"] = "torch has no aten._weight_int4pack_mm"
        args.impls.remove("tinygemm")
    for name, msg in results["peer_errors"].items():
        print(f"peer {name} unavailable: {msg}", flush=True)

    copy_gbs = copy_bandwidth_gbs()
    peak = measure_peak_tflops()
    results.update(copy_gbs=copy_gbs, peak_bf16_tflops=peak)
    print(f"{results['device']}: torch {torch.__version__}, triton {triton.__version__}, gemlite {results['gemlite']}, "
          f"torchao {results['torchao']}; copy bandwidth {copy_gbs:.0f} GB/s, bf16 peak {peak:.0f} TFLOP/s "
          f"(8192^3); {time.time() - _T0:.0f} s in", flush=True)

    floors = {}
    for k, n in args.shapes:
        for m in args.ms:
            b, flops = int4_bytes(n, k) + io_bytes(m, k, n), 2 * m * n * k
            mem_us, comp_us = b / copy_gbs / 1e3, flops / peak / 1e6
            floors[(k, n, m)] = fl = dict(K=k, N=n, M=m, bytes=b, flops=flops, floor_us=max(mem_us, comp_us),
                                          bound="memory" if mem_us >= comp_us else "compute")
            results["floors"].append(fl)

    rec = Recorder(args.json, results, copy_gbs, args.budget_s)
    phase1 = [i for i in args.impls if i != "ref-compiled"]
    ref_modes = args.ref_modes if "ref-compiled" in args.impls else []
    impl_names = []  # the table's order: --impls in canonical order, ref-compiled expanded into its modes
    for impl in args.impls:
        impl_names += [f"ref-compiled:{m}" for m in ref_modes] if impl == "ref-compiled" else [impl]
    int4_cache = {} if ref_modes else None
    try:
        for k, n in args.shapes:
            run_shape(rec, k, n, args.ms, phase1, peers, floors, int4_cache)
        if ref_modes:
            missing = [s for s in args.shapes if s not in int4_cache]  # shapes skipped in phase 1
            for k, n in missing:
                for mode in ref_modes:
                    for m in args.ms:
                        rec.add(f"ref-compiled:{mode}", k, n, m, "skipped: time budget")
            run_ref_compiled(rec, [s for s in args.shapes if s in int4_cache], args.ms, ref_modes, int4_cache)
    finally:  # an interrupted run still writes and summarizes what it measured
        try:
            summarize(rec, args.shapes, args.ms, impl_names)
        except Exception as exc:  # noqa: BLE001  (never hide the run's own error behind the summary's)
            print(f"summary failed: {short_error(exc)}", flush=True)
        rec.flush()
        print(f"\nwrote {args.json} ({rec.elapsed():.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
