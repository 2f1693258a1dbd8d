"""Capture an unmodified model into an FX graph without running a real forward.

Non-strict ``torch.export`` traces the model's Python with fake tensors (parameters are
fakified, no arithmetic runs), so it works on real weights and on the ``meta`` device, and on HF
models that ``torch.fx.symbolic_trace`` cannot trace.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch


class CaptureError(RuntimeError):
    """The model could not be captured into one graph; the caller falls back to a module walk."""


def default_example_inputs(model: torch.nn.Module) -> Dict[str, Any]:
    """A tiny batch of token ids for a transformers model; other models must pass their own."""
    if not hasattr(model, "config") or not hasattr(model, "dummy_inputs"):
        raise CaptureError(
            f"{type(model).__name__} is not a transformers model, so no example input can be made; "
            f"pass example_inputs=(...) or {{...}}"
        )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in model.dummy_inputs.items() if torch.is_tensor(v)}
    accepted = inspect.signature(model.forward).parameters
    if getattr(model.config, "use_cache", None) is not None and "use_cache" in accepted:
        inputs["use_cache"] = False
    return inputs


def capture(model: torch.nn.Module, example_inputs: Optional[Any] = None) -> torch.export.ExportedProgram:
    """Trace ``model`` into an ``ExportedProgram``; ``example_inputs`` is a tuple of args or a dict of kwargs."""
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
    was_training = model.training
    try:
        model.eval()
        return torch.export.export(model, args=args, kwargs=kwargs, strict=False)
    except Exception as err:  # any tracing failure means: fall back, and say why
        raise CaptureError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    finally:
        model.train(was_training)
