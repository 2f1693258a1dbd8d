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


# NVLink SHARP / multicast stays off on the project's GPU machines: NCCL's NVLS, torch's
# symmetric-memory multicast and NVSHMEM's.
TP_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def backend_params(worlds=(2,)) -> list:
    """pytest params (backend, world): gloo on CPU at each size in ``worlds``, and nccl at 2 ranks
    on 2 CUDA GPUs (one process per GPU), skipped without them."""
    import pytest

    return [pytest.param("gloo", w, id=f"gloo-{w}") for w in worlds] + [
        pytest.param("nccl", 2, id="nccl-2",
                     marks=pytest.mark.skipif(not two_gpus(), reason="NCCL tests need 2 CUDA GPUs (one process per GPU)"))]


def init_rank(rank: int, world: int, port: int, backend: str) -> torch.device:
    """Join the process group of a spawned test worker; returns its device (cuda:rank under NCCL)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **TP_ENV)
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        return device
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    return torch.device("cpu")


def _rank_main(rank: int, world: int, port: int, backend: str, body, args: tuple, errors) -> None:
    """One spawned rank: join the group, run ``body``, meet the others, and report any failure."""
    import traceback

    import torch.distributed as dist

    try:
        device = init_rank(rank, world, port, backend)
        body(rank, world, device, *args)
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}/{world}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(body, world: int, backend: str, *args) -> None:
    """Run ``body(rank, world, device, *args)`` in ``world`` spawned processes joined in a ``backend``
    process group (gloo on CPU, or NCCL with one GPU a rank), and fail with every rank's traceback.
    ``body`` must be a module-level function (the ranks import it)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    mp.start_processes(_rank_main, args=(world, port, backend, body, args, errors), nprocs=world, join=True,
                       start_method="spawn")
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, "\n".join(problems)
