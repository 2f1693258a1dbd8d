"""Shared helpers for the benchmarks: timing, memory, byte counts, environment, JSON merging, tables.

Every timing is wall-clock between two device synchronizations (``torch.cuda.synchronize`` then
``time.perf_counter``), so it covers everything the host launched in between, kernels included.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

GiB = float(1 << 30)


def load_kernel_file(path: str, name: str):
    """An older copy of a ``pymllm_fx/kernels`` file as a module, cut before its op registration
    (which would clash with the installed op): its kernels and launchers, for same-run A/Bs."""
    import importlib.util

    src = Path(path).read_text()
    marker = "@torch.library.triton_op"
    cut = Path(path).with_name(f"_cut_{name}.py")
    cut.write_text(src[:src.index(marker)] if marker in src else src)
    spec = importlib.util.spec_from_file_location(f"_cut_{name}", cut)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple:
    """Run ``fn()`` once between two synchronizations; returns (seconds, result)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int = 1, reps: int = 3) -> List[float]:
    """Seconds of each of ``reps`` timed calls of ``fn()``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device)[0] for _ in range(reps)]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def reset_peak(device: torch.device) -> None:
    """Free what the allocator caches and restart the peak counter (CUDA only; a no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> Optional[int]:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def allocated_bytes(device: torch.device) -> Optional[int]:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds; a wrapper subclass (torchao's quantized tensors, DTensor...) is
    counted through the inner tensors it flattens to, not through its logical shape and dtype."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the parameters and of the buffers of ``model``, each tensor counted once."""
    seen = set()
    totals = {"parameters": 0, "buffers": 0}
    for kind, tensors in (("parameters", model.parameters()), ("buffers", model.buffers())):
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            totals[kind] += tensor_bytes(t)
    totals["total"] = totals["parameters"] + totals["buffers"]
    return totals


def env_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device_type": torch.device(device).type,
    }
    for name in ("transformers", "triton", "torchao"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # not installed, or broken: the version is simply unknown
            info[name] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            device_memory_gib=round(props.total_memory / GiB, 2),
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    return info


def load_json(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        return {}
    with path.open() as f:
        return json.load(f)


def merge_json(path: Path, meta: Dict[str, Any], method: str, result: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``result`` under ``results[method]`` of the JSON at ``path`` (kept: the other methods),
    with ``meta`` as the file's latest run description; written atomically. Returns the whole file."""
    path = Path(path)
    data = load_json(path)
    data["meta"] = meta
    data.setdefault("results", {})[method] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return data


def human_bytes(x: Optional[int]) -> Optional[str]:
    if x is None:
        return None
    return f"{x / GiB:.2f} GiB" if x >= GiB / 4 else f"{x / (1 << 20):.1f} MiB"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    out = [line(headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [line(r) for r in rows]
    return "\n".join(out)
