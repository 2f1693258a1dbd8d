"""One buffer per tensor for a group of sibling layers (q/k/v, gate/up): the storage half of
sibling fusion (the compiled-graph half is ``pymllm_fx.passes.siblings``).

A fused group's layers keep their own parameters, as views of consecutive rows of a shared
buffer, each tagged with a ``SiblingTag``. Moving or casting the model (``.to()``, ``.half()``)
gives each tensor new storage; the last layer of a group to move puts the group back into one
buffer, so fusion survives ``model.cuda()``.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

TAG = "_pymllm_fx_sibling"
_group_ids = itertools.count()
_GROUPS: Dict[int, List["weakref.ref[nn.Module]"]] = {}


@dataclass(frozen=True)
class SiblingTag:
    """Where a parameter's rows sit in its group's buffer."""

    group: int
    index: int  # the member's position in the group
    members: int
    offset: int  # first row in the buffer
    rows: int
    total: int  # rows of the whole buffer


def _rows(layer: nn.Module) -> int:
    return int(sum(layer.output_partition_sizes))


def why_not_fusable(layers: Sequence[nn.Module]) -> Optional[str]:
    """Why these layers cannot share one kernel call, or None: they need the same layer class and
    tensor-parallel position, the same method object, the same input size, the same tensor names,
    dtypes, devices and trailing shapes, and every tensor one contiguous row per output feature."""
    first = layers[0]
    for layer in layers[1:]:
        if type(layer) is not type(first) or getattr(layer, "tp_size", 1) != getattr(first, "tp_size", 1):
            return "different layer classes or tensor-parallel positions"
        if layer.quant_method is not first.quant_method:
            return "different quantization methods"
        if layer.input_size_per_partition != first.input_size_per_partition:
            return "different input sizes"
    names = [sorted(n for n, p in layer.named_parameters(recurse=False) if p is not None) for layer in layers]
    if any(n != names[0] for n in names):
        return "different tensors (one has a bias and another not, or another method's tensors)"
    if any(len(list(layer.buffers(recurse=False))) for layer in layers):
        return "a layer holds buffers"
    for name in names[0]:
        tensors = [getattr(layer, name) for layer in layers]
        for layer, t in zip(layers, tensors):
            if t.dim() == 0 or t.shape[0] != _rows(layer) or not t.is_contiguous():
                return f"{name} is not one contiguous row per output feature"
        if len({(t.dtype, t.device, tuple(t.shape[1:])) for t in tensors}) > 1:
            return f"{name} differs in dtype, device or shape between them"
        if tensors[0].device.type == "meta":
            return "on the meta device"
    return None


def fuse_group(layers: Sequence[nn.Module], group: Optional[int] = None) -> Optional[str]:
    """Put the layers' tensors into one buffer each (rows in the given order); None when done,
    else why not (nothing is changed then)."""
    why = why_not_fusable(layers)
    if why:
        return why
    group = next(_group_ids) if group is None else group
    rows = [_rows(layer) for layer in layers]
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    for name, _ in list(layers[0].named_parameters(recurse=False)):
        olds = [getattr(layer, name) for layer in layers]
        buffer = torch.cat([p.detach() for p in olds])
        for i, (layer, old) in enumerate(zip(layers, olds)):
            new = nn.Parameter(buffer[offsets[i]:offsets[i] + rows[i]], requires_grad=old.requires_grad)
            for key, value in vars(old).items():  # weight_loader, output_dim, ...
                if key != TAG:
                    setattr(new, key, value)
            setattr(new, TAG, SiblingTag(group, i, len(layers), offsets[i], rows[i], sum(rows)))
            layer._parameters[name] = new
    _GROUPS[group] = [weakref.ref(layer) for layer in layers]
    for layer in layers:
        if hasattr(layer, "refresh_weight_view"):
            layer.refresh_weight_view()
    return None


def fuse_again_after_move(layer: nn.Module) -> None:
    """After ``layer``'s tensors were moved or cast: if they left their group's buffer and every
    member of the group now matches again (the last one moved), fuse the group anew."""
    tag = next((getattr(p, TAG) for p in layer.parameters(recurse=False) if hasattr(p, TAG)), None)
    if tag is None or tag.group not in _GROUPS:
        return
    members = [ref() for ref in _GROUPS[tag.group]]
    if any(m is None for m in members):
        return
    first = list(members[0].parameters(recurse=False))
    if all(at_its_rows(p, base) for m in members for p, base in zip(m.parameters(recurse=False), first)):
        return
    fuse_group(members, tag.group)  # a no-op (with its reason) while some member has not moved yet


def at_its_rows(t: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether the tagged tensor ``t`` still sits at its rows of the buffer that ``first`` (the
    same tensor of its group's first member) begins: same storage, the tagged offset, the same
    trailing shape and strides."""
    tag = getattr(t, TAG, None)
    row = first.stride(0) if first.dim() else 1
    return (tag is not None and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and t.storage_offset() == first.storage_offset() + tag.offset * row
            and t.shape[1:] == first.shape[1:] and t.stride() == first.stride())
