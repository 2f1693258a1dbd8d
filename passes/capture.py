"""Capture an unmodified model into an FX graph without running a real forward.

Non-strict ``torch.export`` traces the model's Python with fake tensors (parameters are
fakified, no arithmetic runs), so it works on real weights and on the ``meta`` device, and on HF
models that ``torch.fx.symbolic_trace`` cannot trace.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from pymllm_fx.passes.inputs import candidate_inputs


class CaptureError(RuntimeError):
    """The model could not be captured into one graph; the caller falls back to a module walk."""


def default_example_inputs(model: torch.nn.Module) -> Dict[str, Any]:
    """The first example inputs tried for a transformers model (see ``passes.inputs``)."""
    return _candidates(model)[0][1]


def _candidates(model: torch.nn.Module) -> List[Tuple[str, Dict[str, Any]]]:
    if not hasattr(model, "config") or not hasattr(model, "main_input_name"):
        raise CaptureError(
            f"{type(model).__name__} is not a transformers model, so no example input can be made; "
            f"pass example_inputs=(...) or {{...}}"
        )
    return candidate_inputs(model)


def capture(model: torch.nn.Module, example_inputs: Optional[Any] = None) -> torch.export.ExportedProgram:
    """Trace ``model`` into an ``ExportedProgram``; ``example_inputs`` is a tuple of args or a dict of
    kwargs. Without them, a transformers model's own kinds of input are tried in turn."""
    if example_inputs is not None:
        return _export(model, example_inputs)
    failures = []
    for name, inputs in _candidates(model):
        try:
            return _export(model, inputs)
        except CaptureError as err:
            failures.append(f"with {name}: {err}")
    raise CaptureError("; ".join(failures) or "no example inputs could be made")


class _TensorOutputs(torch.nn.Module):
    """The model, returning only the tensors of its output: a cache object there (a DynamicCache
    that a vision-language model returns whatever ``use_cache`` says) cannot be captured."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, ...]:
        return tuple(_tensors(self.model(*args, **kwargs)))


def _tensors(value: Any, depth: int = 0) -> List[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if depth > 4:
        return []
    if isinstance(value, dict) or hasattr(value, "to_tuple"):  # dicts and transformers ModelOutputs
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return []
    return [t for item in items for t in _tensors(item, depth + 1)]


def _unwrap(program: torch.export.ExportedProgram, prefix: str = "model") -> torch.export.ExportedProgram:
    """Names in a capture of ``_TensorOutputs`` as they are in the model itself."""

    def strip(path: str) -> str:
        return "" if path == prefix else path[len(prefix) + 1:] if path.startswith(prefix + ".") else path

    for spec in program.graph_signature.input_specs:
        if isinstance(spec.target, str):
            spec.target = strip(spec.target)
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (strip(path), kind) for key, (path, kind) in stack.items() if strip(path) != ""
            }
    return program


def _export(model: torch.nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
    was_training = model.training
    try:
        model.eval()
        try:
            return torch.export.export(model, args=args, kwargs=kwargs, strict=False)
        except Exception as err:
            if "not a known type" not in str(err):
                raise
        return _unwrap(torch.export.export(_TensorOutputs(model), args=args, kwargs=kwargs, strict=False))
    except Exception as err:  # any tracing failure means: fall back, and say why
        raise CaptureError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    finally:
        model.train(was_training)
