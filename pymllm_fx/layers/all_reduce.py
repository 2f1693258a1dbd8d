"""The all-reduce that tensor-parallel layers run on their partial sums.

By default it is torch's functional collective (NCCL on GPUs, gloo on CPUs), which
``torch.compile`` traces into the graph. At batch 1 the message is one token's hidden state (8 KiB
for Llama-3-8B in bf16), so the latency of a collective launch dominates. ``use_symmetric_memory``
switches the layers of a model to torch's symmetric-memory all-reduce for messages up to
``max_bytes``: each rank keeps one buffer that every other rank can read over NVLink (rendezvous
once, ahead of time), and one kernel copies the partial sum in, waits for the peers, and adds their
buffers ("one_shot"), or reduces a slice per rank and gathers the slices ("two_shot"). No NVLink
multicast is used (that is ``multimem_*``, left off on these machines). The kernel runs inside one
custom op, ``torch.ops.pymllm_fx.symm_mem_all_reduce``, which compiled graphs keep as one opaque
call (no graph break) and CUDA graphs capture: the buffer never moves and the kernels fence the
buffer at their start and end, so one buffer serves every layer in turn. Larger messages (prefill)
and other dtypes keep the functional collective.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn

ALGORITHMS = ("nccl", "one_shot", "two_shot")
# torch's symmetric-memory kernels take these (AT_DISPATCH_FLOAT_AND_BFLOAT16), and sizes in whole
# 4-byte words.
_SYMM_DTYPES = (torch.bfloat16, torch.float32)
_WORD = 4

# (group name, CUDA device index) -> this rank's symmetric buffer (uint8), made by use_symmetric_memory.
# The op reads it by name: a custom op takes tensors and strings, not process-group objects.
_BUFFERS: Dict[Tuple[str, int], torch.Tensor] = {}


@dataclass(frozen=True)
class AllReduce:
    """How a layer all-reduces: ``algorithm`` over the process group named ``group_name`` for
    messages of at most ``max_bytes``, the functional collective above. The name is kept here as a
    string, since torch.compile cannot read attributes of a process group while tracing."""

    algorithm: str = "nccl"
    max_bytes: int = 0
    group_name: str = ""


def all_reduce(x: torch.Tensor, group, how: Optional[AllReduce] = None) -> torch.Tensor:
    """Sum ``x`` over ``group``; traced by torch.compile either way (a functional collective, or
    the symmetric-memory op when ``how`` chooses it and the message qualifies)."""
    if how is not None and how.algorithm != "nccl" and _qualifies(x, how.max_bytes):
        return torch.ops.pymllm_fx.symm_mem_all_reduce(x, how.group_name, how.algorithm)
    return funcol.all_reduce(x, "sum", group)


def _qualifies(x: torch.Tensor, max_bytes: int) -> bool:
    """A message the symmetric kernels take: on CUDA, bf16 or float32, whole 4-byte words, at most
    ``max_bytes``, and no gradient wanted (the op has no backward; training keeps NCCL)."""
    nbytes = x.numel() * x.element_size()
    return (x.is_cuda and x.dtype in _SYMM_DTYPES and 0 < nbytes <= max_bytes and nbytes % _WORD == 0
            and not (x.requires_grad and torch.is_grad_enabled()))


@torch.library.custom_op("pymllm_fx::symm_mem_all_reduce", mutates_args=())
def symm_mem_all_reduce(x: torch.Tensor, group_name: str, algorithm: str) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group_name`` through its symmetric buffer (``one_shot`` or
    ``two_shot``); a new contiguous tensor of ``x``'s shape."""
    buffer = _BUFFERS.get((group_name, x.device.index))
    nbytes = x.numel() * x.element_size()
    if buffer is None:
        raise RuntimeError(f"symm_mem_all_reduce: no symmetric buffer for process group {group_name!r} on {x.device}; "
                           f"call pymllm_fx.use_symmetric_memory(model) on every rank first")
    if nbytes > buffer.numel():
        raise RuntimeError(f"symm_mem_all_reduce: {nbytes} bytes exceed the group's buffer of {buffer.numel()} bytes")
    # The copy kernel needs the input and the buffer equally aligned: start at offset 0 of the storage.
    src = x if x.is_contiguous() and x.storage_offset() == 0 else x.clone(memory_format=torch.contiguous_format)
    src = src.view(-1)
    staged = buffer[:nbytes].view(x.dtype)
    ops = torch.ops.symm_mem
    if algorithm == "one_shot":
        if hasattr(ops, "one_shot_all_reduce_copy"):  # the copy into the buffer happens in the same kernel
            out = ops.one_shot_all_reduce_copy(staged, src, "sum", group_name)
        else:
            staged.copy_(src)
            out = ops.one_shot_all_reduce(staged, "sum", group_name)
    elif algorithm == "two_shot":
        staged.copy_(src)
        if hasattr(ops, "two_shot_all_reduce_out"):
            out = ops.two_shot_all_reduce_out(staged, "sum", group_name, torch.empty_like(src))
        else:
            out = ops.two_shot_all_reduce_(staged, "sum", group_name).clone()
    else:
        raise ValueError(f"symm_mem_all_reduce: algorithm must be 'one_shot' or 'two_shot', got {algorithm!r}")
    return out.view(x.shape)


@symm_mem_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str, algorithm: str) -> torch.Tensor:
    return x.new_empty(x.shape)


def tensor_parallel_layers(model: nn.Module):
    """(path, module) of every layer that all-reduces over a process group (row-parallel linears,
    split experts)."""
    return [(path, m) for path, m in model.named_modules()
            if getattr(m, "process_group", None) is not None and getattr(m, "tp_size", 1) > 1]


def use_symmetric_memory(model: nn.Module, algorithm: str = "one_shot", max_bytes: int = 1 << 20) -> nn.Module:
    """Make ``model``'s tensor-parallel layers all-reduce messages of at most ``max_bytes`` through
    torch's symmetric memory (``"one_shot"`` or ``"two_shot"``); ``"nccl"`` goes back to the
    functional collective for all. Collective: call it on every rank, outside ``torch.compile`` and
    CUDA-graph capture, before compiling (a compiled graph keeps the choice it was traced with).
    Each rank allocates one ``max_bytes`` buffer per process group."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"all-reduce algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    layers = tensor_parallel_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel layers (quantize it with a process_group "
                         f"of two or more ranks first); nothing all-reduces")
    if algorithm == "nccl":
        for _, layer in layers:
            layer.all_reduce_with = None
        return model
    if max_bytes < _WORD or max_bytes % _WORD:
        raise ValueError(f"max_bytes must be a positive multiple of {_WORD}, got {max_bytes}")
    devices = {p.device for _, layer in layers for p in layer.parameters()}
    if any(d.type != "cuda" for d in devices) or len(devices) != 1:
        raise ValueError(f"symmetric-memory all-reduce needs the tensor-parallel layers on one CUDA device per rank, "
                         f"found {sorted(map(str, devices))}; use algorithm='nccl' (the functional collective)")
    device = devices.pop()
    for group in {id(layer.process_group): layer.process_group for _, layer in layers}.values():
        _allocate(group, device, max_bytes)
    for _, layer in layers:
        layer.all_reduce_with = AllReduce(algorithm, max_bytes, layer.process_group.group_name)
    return model


def _allocate(group, device: torch.device, max_bytes: int) -> None:
    """This rank's buffer for ``group``, made symmetric with its peers' (a collective rendezvous)."""
    import torch.distributed._symmetric_memory as symm_mem

    key = (group.group_name, device.index)
    if key in _BUFFERS and _BUFFERS[key].numel() >= max_bytes:
        return
    with warnings.catch_warnings():
        # Older torch needs the group registered before a rendezvous; newer torch deprecates the call.
        warnings.simplefilter("ignore", FutureWarning)
        symm_mem.enable_symm_mem_for_group(group.group_name)
    buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
    symm_mem.rendezvous(buffer, group.group_name)
    _BUFFERS[key] = buffer
