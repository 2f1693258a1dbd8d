"""Checkpoint iteration, strict weight loading, and the post-load pass."""

from pymllm_fx.loading.loader import LoadTarget, load_weights, process_weights_after_loading
from pymllm_fx.loading.safetensors_io import CheckpointError, TensorInfo, checkpoint_files, checkpoint_tensors, iter_weights

__all__ = [
    "CheckpointError",
    "LoadTarget",
    "TensorInfo",
    "checkpoint_files",
    "checkpoint_tensors",
    "iter_weights",
    "load_weights",
    "process_weights_after_loading",
]
