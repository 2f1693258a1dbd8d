"""Feeding tensors to parameters through their ``weight_loader``, with strict accounting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from pymllm_fx.layers.parameter import default_weight_loader, load_expert
from pymllm_fx.layers.quantize_base import QuantizeMethodBase
from pymllm_fx.loading.safetensors_io import CheckpointError

_MAX_LISTED = 20
_CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LoadTarget:
    """Where one named tensor goes: a parameter, the shard of it, and a layout change on the way.

    ``transform`` adapts the tensor first, e.g. the transpose of a GPT-2 ``Conv1D`` weight.
    ``required=False`` marks targets (persistent buffers) a checkpoint may leave out. ``finite``:
    a float tensor holding NaN or Inf is refused (weights; buffers may hold -inf masks).
    """

    param: torch.Tensor
    shard_id: Any = None
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    required: bool = True
    owner: str = ""
    finite: bool = True
    numel: Optional[int] = None  # elements it fills, when that is a part of ``param`` (one expert's rows)


def load_weights(targets: Dict[str, LoadTarget], weights: Iterable[Tuple[str, torch.Tensor]]) -> int:
    """Load every tensor of ``weights`` into its target; returns the count loaded.

    Strict: a tensor with no target, a target no tensor filled, a tensor loaded twice, or one the
    loader refuses (shape, dtype) is collected, and one ``CheckpointError`` lists them all.
    """
    problems: List[str] = []
    unexpected: List[str] = []
    seen: Dict[str, int] = {}
    for name, tensor in weights:
        target = targets.get(name)
        if target is None:
            unexpected.append(name)
            continue
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == 2:
            problems.append(f"{name}: appears more than once in the checkpoint")
            continue
        where = f"{target.owner}: " if target.owner else ""
        if target.finite and tensor.dtype in _CHECKED_FLOATS and not bool(torch.isfinite(tensor).all()):
            first = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            problems.append(f"{where}tensor {name.rpartition('.')[2]!r} holds NaN or Inf (first at index {first}); "
                            f"the checkpoint is corrupt")
            continue
        try:
            if target.transform is not None:
                tensor = target.transform(tensor)
            loader = getattr(target.param, "weight_loader", None)
            if target.shard_id is None:
                (loader or default_weight_loader)(target.param, tensor)
            elif loader is None:  # one expert's rows of a float stack (E, N, K) left float: shard_id = (expert, first row)
                load_expert(target.param, tensor, target.shard_id, output_dim=1)
            else:
                loader(target.param, tensor, target.shard_id)
        except (ValueError, TypeError, RuntimeError) as err:
            problems.append(f"{where}tensor {name!r}: {err}")
    missing = [n for n, t in targets.items() if t.required and n not in seen and not _alias_loaded(n, t, targets, seen)]
    if problems or unexpected or missing:
        raise CheckpointError(_report(problems, unexpected, missing))
    return len(seen)


def check_headers(targets: Dict[str, LoadTarget], headers: Dict[str, Any]) -> None:
    """A checkpoint's headers against the parameters before they are allocated, so allocation is
    bounded by what the checkpoint holds: a parameter larger than the tensor meant to fill it, or a
    module the checkpoint holds no tensor of (a config that does not describe this checkpoint:
    more layers, wider layers) is one ``CheckpointError`` with both shapes. Everything else (exact
    shapes, single missing or extra tensors) the loaders check as the tensors arrive."""
    present = {name: 1 for name in headers if name in targets}
    prefixes = {name.rpartition(".")[0] for name in headers}
    prefixes |= {p for name in prefixes for p in _parents(name)}
    too_big, absent = [], []
    for name, target in targets.items():
        info = headers.get(name)
        fills = target.numel if target.numel is not None else target.param.numel()
        if info is not None and fills > math.prod(info.shape):
            where = f"{target.owner}: " if target.owner else ""
            expected = f"shape {tuple(target.param.shape)}" if target.numel is None else \
                f"{fills} elements (its share of the stacked {tuple(target.param.shape)})"
            too_big.append(f"{where}tensor {name!r}: expected {expected}, found {tuple(info.shape)} "
                           f"(the model would allocate {fills} elements, the checkpoint holds {math.prod(info.shape)})")
        elif info is None and target.required and target.owner not in prefixes \
                and not _alias_loaded(name, target, targets, present):
            absent.append(name)
    if too_big or absent:
        raise CheckpointError(_report(too_big, [], absent))


def _parents(path: str):
    parts = path.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts)))


def _alias_loaded(name: str, target: LoadTarget, targets: Dict[str, LoadTarget], seen: Dict[str, int]) -> bool:
    """A tied parameter counts as loaded when any of its names was."""
    return any(other in seen for other, t in targets.items() if t.param is target.param and t.shard_id == target.shard_id)


def _report(problems: List[str], unexpected: List[str], missing: List[str]) -> str:
    def listing(title: str, items: List[str], fix: str) -> str:
        shown = "\n".join(f"  - {item}" for item in items[:_MAX_LISTED])
        more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        return f"{title} ({len(items)}); {fix}:\n{shown}{more}"

    parts = []
    if problems:
        parts.append(listing("tensors that do not fit their parameter", problems, "check the checkpoint matches this model and method"))
    if missing:
        parts.append(listing("parameters no checkpoint tensor filled", missing, "the checkpoint is incomplete or for another model"))
    if unexpected:
        parts.append(listing("checkpoint tensors no parameter takes", unexpected, "the checkpoint is for another model or method"))
    return "weight loading failed.\n" + "\n".join(parts)


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """The ModelRunner loop: let every module's quant method repack or calibrate its weights."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, QuantizeMethodBase):
            method.process_weights_after_loading(module)
