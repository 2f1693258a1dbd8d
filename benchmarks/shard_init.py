"""Random weights for a model no rank holds whole: built on meta, each rank makes only its shards.

Every weight is defined block by block: block ``b`` (``block_size(n)`` rows, or columns for a layer
whose inputs tensor parallelism splits) is normal(0, std) drawn from a generator seeded by
``(seed, tensor name, b)``. A rank draws only the blocks of its own shard, directly on its device, so
the model is the same at every tensor-parallel size (tp 1 and tp 2 runs compare the same weights)
and deterministic per seed. ``pymllm_fx.quantize(..., shard_init=...)`` builds, fills and quantizes
one layer at a time, so even int4 at tp 1 never holds more than one bf16 weight of the 70B model;
embeddings, norms and ``lm_head`` (left whole on every rank) are filled the same way afterwards.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
from torch import nn

STD = 0.02  # transformers' initializer_range for Llama


def block_size(full: int) -> int:
    """Rows (or columns) per random block of a tensor ``full`` long along its split dimension: it
    depends on the whole size only, so every tensor-parallel size cuts shards on block boundaries
    (up to tp 8 for the real shapes, tp 2 for the tiny ones)."""
    return 128 if full % 1024 == 0 else 64


def block_seed(seed: int, name: str, block: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{block}".encode())


@torch.no_grad()
def fill_blocks(t: torch.Tensor, name: str, dim: int, start: int, full: int, seed: int, std: float = STD) -> None:
    """Fill ``t``, the part of tensor ``name`` that starts at ``start`` of ``full`` along ``dim``."""
    size = block_size(full)
    if start % size or t.shape[dim] % size:
        raise ValueError(f"{name}: a shard of {t.shape[dim]} at {start} of {full} along dim {dim} does not lie on "
                         f"random blocks of {size}; use a tensor-parallel size that divides {full // size}")
    gen = torch.Generator(device=t.device)
    shape = list(t.shape)
    shape[dim] = size
    block = torch.empty(shape, dtype=t.dtype, device=t.device)
    for i in range(t.shape[dim] // size):
        gen.manual_seed(block_seed(seed, name, (start + i * size) // size))
        block.normal_(0.0, std, generator=gen)  # drawn contiguous: the values do not depend on t's strides
        t.narrow(dim, i * size, size).copy_(block)


def linear_init(seed: int, std: float = STD) -> Callable:
    """``shard_init`` for ``pymllm_fx.quantize``: a layer's float weight shard, blocks along its
    tensor-parallel dimension (outputs for column-parallel and replicated roles, inputs for
    row-parallel), at its rank's offset; biases zero."""
    from pymllm_fx.layers.linear import ColumnParallelLinear, RowParallelLinear

    def init(site, layer: nn.Module) -> None:
        for pname, param in layer.named_parameters(recurse=False):
            if param.dim() != 2:
                param.zero_()
                continue
            out_dim, in_dim = getattr(param, "output_dim", 0), getattr(param, "input_dim", 1)
            dim = in_dim if site.parallel == "row" else out_dim
            full = site.in_features if dim == in_dim else site.out_features
            start = 0
            if isinstance(layer, ColumnParallelLinear) and dim == out_dim:
                start = layer.tp_rank * param.shape[dim]
            elif isinstance(layer, RowParallelLinear) and dim == in_dim:
                start = layer.tp_rank * param.shape[dim]
            fill_blocks(param.data, f"{site.path}.{pname}", dim, start, full, seed, std)

    return init


@torch.no_grad()
def materialize_rest(model: nn.Module, device: torch.device, seed: int, std: float = STD) -> None:
    """Every parameter still on meta made on ``device``: vectors (norm weights) ones, matrices
    (embeddings, ``lm_head``) random by row blocks. Tied names share one new tensor."""
    new = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.device.type != "meta" or id(param) in new:
            continue
        value = torch.empty(param.shape, dtype=param.dtype, device=device)
        if param.dim() == 1:
            value.fill_(1.0)
        else:
            fill_blocks(value, name, 0, 0, param.shape[0], seed, std)
        new[id(param)] = nn.Parameter(value, requires_grad=False)
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[pname] = new[id(param)]


def build_sharded(config, method, device: torch.device, seed: int, group=None, fuse_siblings: bool = True,
                  dtype: torch.dtype = torch.bfloat16, std: float = STD) -> nn.Module:
    """``config``'s causal LM with random weights, every linear quantized by ``method`` (a pymllm_fx
    method; "none" for bf16) and sharded over ``group`` (None or False: whole), built without ever
    holding a whole float weight of a split layer, nor the whole float model."""
    import pymllm_fx
    from pymllm_fx.loading.hf import materialize_buffers
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pymllm_fx.quantize(model, method, progress=False, process_group=group if group else False, device=device,
                       fuse_siblings=fuse_siblings, shard_init=linear_init(seed, std))
    materialize_rest(model, device, seed, std)
    materialize_buffers(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"build_sharded: {len(leftover)} tensors are still on meta, e.g. {leftover[:3]}")
    return model.eval().requires_grad_(False)

