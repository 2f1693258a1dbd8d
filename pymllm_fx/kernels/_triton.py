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
        constexpr = None

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


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count
