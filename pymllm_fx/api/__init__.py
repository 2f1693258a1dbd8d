"""The public entry points: orchestration only, no math; the one package that knows every part
(methods, passes, loading, kernels).

plan.py           the skip rules, tensor-parallel position, building the new layers and experts
checkpoint.py     a checkpoint's headers held against the planned layers, then loaded into them
quantize_model.py quantize() and its own-weights, calibration and bookkeeping steps
pretrained.py     from_pretrained() and explain_checkpoint(): a checkpoint directory opened on meta
"""

from pymllm_fx.api.plan import DEFAULT_SKIP, TensorParallel, skip_reason
from pymllm_fx.api.pretrained import explain_checkpoint, from_pretrained
from pymllm_fx.api.quantize_model import quantize
from pymllm_fx.loading.export import save_quantized  # noqa: F401  (public, re-exported here)

__all__ = [
    "DEFAULT_SKIP",
    "TensorParallel",
    "explain_checkpoint",
    "from_pretrained",
    "quantize",
    "save_quantized",
    "skip_reason",
]
