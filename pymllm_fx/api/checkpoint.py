"""A checkpoint held against the planned layers and loaded into them: the header check before
anything is allocated, then every tensor of the model staged until all fit (quantize(weights=),
from_pretrained, explain_checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from pymllm_fx.layers.fused_moe import FusedMoE
from pymllm_fx.loading import CheckpointError, LoadTarget, iter_weights, load_weights
from pymllm_fx.loading.loader import check_headers
from pymllm_fx.loading.renames import checkpoint_targets

def _load_checkpoint(
    model: nn.Module,
    layers: Dict[str, nn.Module],
    weights: Union[str, Path],
    headers: Dict[str, Any],
    progress: bool,
    device: Optional[Union[str, torch.device]] = None,
    experts: Optional[Dict[str, Tuple[nn.Module, nn.Module]]] = None,
) -> None:
    """Load every tensor of the model from a checkpoint (``headers``: its ``checkpoint_tensors``); the
    model's own tensors are staged until all fit.

    Tensors still on ``meta`` (a model built without weights) are staged on ``device`` and become
    the model's parameters at the end; real ones are copied in place, keeping their device.
    """
    experts = experts or {}
    targets = _layer_targets(layers)
    replaced = set(layers) | set(experts)
    staged: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def stage(name: str, tensor: torch.Tensor, required: bool, finite: bool = True) -> None:
        if id(tensor) not in staged:
            where = tensor.device
            if where.type == "meta":
                if device is None:
                    raise ValueError(f"{name} is on the meta device; pass device= to say where to load it")
                where = torch.device(device)
            staged[id(tensor)] = (tensor, torch.empty_like(tensor, device=where))
        targets[name] = LoadTarget(staged[id(tensor)][1], required=required, owner=name.rpartition(".")[0], finite=finite)

    for name, param in model.named_parameters(remove_duplicate=False):
        if name.rpartition(".")[0] not in replaced:
            stage(name, param, required=True)
    for name, buffer in model.named_buffers():
        if name.rpartition(".")[0] not in replaced:
            # Buffers computed at construction (non-persistent) may still be in old checkpoints.
            stage(name, buffer, required=_is_persistent(model, name) and buffer.device.type == "meta", finite=False)
    targets.update(checkpoint_targets(model, targets, headers, experts))
    seen = set()
    stream = tqdm(iter_weights(weights), desc="loading", unit="tensor", disable=not progress)
    try:
        load_weights(targets, ((seen.add(name) or name, tensor) for name, tensor in stream))
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}\nThe model was left unchanged.") from None
    filled = {id(targets[name].param) for name in seen if name in targets}
    for layer in [*layers.values(), *(layer for layer, _ in experts.values())]:  # before the model changes
        layer.quant_method.process_weights_after_loading(layer)
    new_params: Dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, (tensor, value) in staged.items():
            if id(value) not in filled:
                continue  # an optional buffer the checkpoint does not hold keeps its value
            if tensor.device.type == "meta":
                is_param = isinstance(tensor, nn.Parameter)
                new_params[key] = nn.Parameter(value, requires_grad=tensor.requires_grad) if is_param else value
            else:
                tensor.copy_(value)
    _rebind(model, new_params)


def _check_fits(model: nn.Module, dry: Dict[str, nn.Module], tensors: Dict[str, Any], weights,
                experts: Optional[Dict[str, Tuple[nn.Module, nn.Module]]] = None) -> None:
    """The checkpoint's headers against what the model would allocate (see ``check_headers``)."""
    experts = experts or {}
    targets = _load_targets(model, {**dry, **{path: layer for path, (layer, _) in experts.items()}})
    targets.update(checkpoint_targets(model, targets, tensors, experts))
    try:
        check_headers(targets, tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}\nNothing was allocated and the model was left unchanged.") from None


def _layer_targets(layers: Dict[str, nn.Module]) -> Dict[str, LoadTarget]:
    """Checkpoint name -> parameter, for the new layers (a Conv1D's weight arrives transposed)."""
    targets: Dict[str, LoadTarget] = {}
    for path, layer in layers.items():
        if isinstance(layer, FusedMoE):  # its targets follow the checkpoint's names (checkpoint_targets)
            continue
        for name, param in layer.named_parameters():
            transform = (lambda t: t.t()) if (layer.checkpoint_transposed and name == "weight") else None
            targets[f"{path}.{name}"] = LoadTarget(param, transform=transform, owner=path)
    return targets


def _load_targets(model: nn.Module, layers: Dict[str, nn.Module]) -> Dict[str, LoadTarget]:
    """Every name a checkpoint must (or may) hold for ``model`` with ``layers`` swapped in; the
    parameters are the tensors as they are now (meta, for the check before allocation)."""
    targets = _layer_targets(layers)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.rpartition(".")[0] not in layers:
            targets[name] = LoadTarget(param, owner=name.rpartition(".")[0])
    for name, buffer in model.named_buffers():
        if name.rpartition(".")[0] not in layers:
            required = _is_persistent(model, name) and buffer.device.type == "meta"
            targets[name] = LoadTarget(buffer, required=required, owner=name.rpartition(".")[0], finite=False)
    return targets


def _rebind(model: nn.Module, new: Dict[int, torch.Tensor]) -> None:
    """Point every name of a replaced tensor (tied weights share one) at its new value."""
    if not new:
        return
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[name] = new[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and id(buffer) in new:
                module._buffers[name] = new[id(buffer)]


def _is_persistent(model: nn.Module, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    return leaf not in module._non_persistent_buffers_set
