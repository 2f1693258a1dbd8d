"""Helpers the tests share: per-case seeding, the relative error they compare with, and loading
checkpoint-format tensors into a layer through its parameters' weight loaders."""

import zlib

import torch

from pymllm_fx.layers.linear import ReplicatedLinear


def seed(*args) -> None:
    """Seed from the test case's parameters, so each case draws its own inputs reproducibly."""
    torch.manual_seed(zlib.crc32(repr(args).encode()))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (DESIGN.md convention 1)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def build_layer(method, k: int, n: int, tensors: dict, bias=None, dtype=torch.float32, prefix: str = "blk.proj"):
    """A ReplicatedLinear running ``method``, each tensor loaded through its parameter's weight
    loader, as the checkpoint loader does; post-processing is left to the caller."""
    layer = ReplicatedLinear(k, n, bias=bias is not None, params_dtype=dtype, quant_method=method, prefix=prefix)
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias)
    return layer


def spawn_ranks(body, world: int, *args) -> None:
    """Run ``body(rank, world, *args)`` in ``world`` spawned processes joined in a gloo process group
    (one thread each; a barrier after the body) and fail with every rank's traceback."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    mp.start_processes(_rank, args=(body, world, port, args, errors), nprocs=world, join=True, start_method="spawn")
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, "\n".join(problems)


def _rank(rank: int, body, world: int, port: int, args: tuple, errors) -> None:
    """One spawned rank of :func:`spawn_ranks`: its traceback goes on ``errors``, the group is torn down."""
    import os
    import traceback

    import torch.distributed as dist

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        body(rank, world, *args)
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}/{world}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
