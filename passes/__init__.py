"""Graph passes over unmodified models: capture, find the linears, swap modules atomically.

Depends only on torch; never on a quantization method or a kernel.
"""

from pymllm_fx.passes.capture import CaptureError, capture, default_example_inputs
from pymllm_fx.passes.linears import LinearSite, find_linears, is_conv1d, is_linear_module, swap_linears

__all__ = [
    "CaptureError",
    "LinearSite",
    "capture",
    "default_example_inputs",
    "find_linears",
    "is_conv1d",
    "is_linear_module",
    "swap_linears",
]
