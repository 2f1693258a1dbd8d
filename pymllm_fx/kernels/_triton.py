"""What every Triton kernel file needs: triton (or a stand-in where it is not installed), and
the rule for when an op runs its Triton kernel instead of its torch reference."""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton ships for Linux x86-64 only; elsewhere the ops run their references
    HAS_TRITON = False

    class _Stub:
        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

# Under TRITON_INTERPRET=1 kernels run on CPU tensors through Triton's interpreter (the CI tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_triton(x: torch.Tensor) -> bool:
    """The ops take the Triton path for CUDA tensors; the CPU (and meta) path is the reference."""
    return HAS_TRITON and x.device.type == "cuda"


def check_contiguous(op: str, **tensors) -> None:
    """Weights reach the kernels by raw pointer, so a strided view would be read as garbage."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (got strides {t.stride()}); call .contiguous() on it")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., K)`` -> ``(M, K)`` with unit stride along K (a copy only when the view needs one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def gemv_8bit_config(n: int, k: int) -> dict:
    """Block shapes of the one-row GEMVs over 8-bit weights (int8, fp8), from the H200 at the
    Llama-3-8B shapes (benchmarks/NOTES_w4a16.md): longer K runs per program for long rows or
    few of them, more rows per program otherwise."""
    if k >= 8192 or n <= 4096:
        return dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)
    return dict(BLOCK_N=16, BLOCK_K=512, num_warps=4)


# --- pieces shared by the kernels (Triton inlines these into each kernel) ----------------------


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row block, column block) of program ``pid``, walking GROUP_M row blocks per column
    block so that neighbouring programs share weight tiles in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """A GEMM program's output rows and columns (``grouped_tile``'s order) and their in-bounds masks."""
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def store_tile(out_ptr, acc, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, HAS_BIAS: tl.constexpr):
    """A GEMM program's float32 tile: bias, cast to the output dtype, masked store."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
