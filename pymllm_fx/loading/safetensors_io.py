"""Streaming tensors out of safetensors checkpoints: one file, a directory, or a sharded index.

Pickle-based checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused: unpickling runs
arbitrary code. Every problem is a ``CheckpointError`` that names the file and the fix.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: unreadable, incomplete, or not matching the model."""


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: pickle checkpoints are never loaded (unpickling can run arbitrary code). "
        f"Convert it to safetensors once, in an environment you trust, e.g. "
        f"`model.save_pretrained(dir, safe_serialization=True)`, and load that instead"
    )


def checkpoint_files(path: Union[str, Path]) -> List[Tuple[Path, Optional[List[str]]]]:
    """The safetensors files to read, each with the tensor names an index promises it holds."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(INDEX_SUFFIX):
            return _files_from_index(path)
        if path.suffix == ".safetensors":
            return [(path, None)]
        if path.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        raise CheckpointError(f"{path}: not a .safetensors file or a {INDEX_SUFFIX} index")
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several index files ({[p.name for p in indexes]}); pass one of them")
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if files:
        return [(f, None) for f in files]
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _refuse_pickle(pickles[0])
    raise CheckpointError(f"{path}: no .safetensors files in this directory")


def _files_from_index(index_path: Path) -> List[Tuple[Path, Optional[List[str]]]]:
    try:
        weight_map: Dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from None
    by_file: Dict[str, List[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    missing = [f for f in sorted(by_file) if not (index_path.parent / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: shard(s) {missing} listed in the index are missing (they should hold "
            f"e.g. {by_file[missing[0]][:3]}); copy the complete checkpoint"
        )
    return [(index_path.parent / f, sorted(names)) for f, names in sorted(by_file.items())]


# safetensors dtype names -> torch dtypes (the format's spec; unsigned wide ints need torch >= 2.3).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file, read from the header without touching its data."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Path) -> Dict[str, TensorInfo]:
    """Parse and check a safetensors header: every tensor's dtype, shape and byte range."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: cannot read this safetensors file ({why}); it is truncated or corrupt, copy or save it again")

    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise corrupt("shorter than the 8-byte header length")
            header_len = struct.unpack("<Q", head)[0]
            if header_len > min(_MAX_HEADER, size - 8):
                raise corrupt(f"header length {header_len} exceeds the file size {size}")
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read it ({err})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise corrupt(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    base = 8 + header_len
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has a malformed header entry {entry!r}") from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise corrupt(f"tensor {name!r} spans {end - begin} bytes, its shape {shape} and dtype {entry['dtype']} need {expected}")
        if base + end > size:
            raise corrupt(f"tensor {name!r} ends at byte {base + end}, past the end of the {size}-byte file")
        tensors[name] = TensorInfo(dtype, shape, base + begin, base + end)
    return tensors


def checkpoint_tensors(path: Union[str, Path]) -> Dict[str, TensorInfo]:
    """Every tensor name of a checkpoint with its dtype and shape, from the headers alone."""
    tensors: Dict[str, TensorInfo] = {}
    for file, _ in checkpoint_files(path):
        tensors.update(read_header(file))
    return tensors


def _read(handle, file: Path, name: str, info: TensorInfo) -> torch.Tensor:
    """One tensor, read into its own memory (no mmap: pages of a mapped file would stay resident)."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buffer = bytearray(info.nbytes)
    handle.seek(info.start)
    if handle.readinto(buffer) != info.nbytes:
        raise CheckpointError(f"{file}: tensor {name!r} is cut short; the file is truncated, copy or save it again")
    return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


def iter_weights(path: Union[str, Path]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint, one file and one tensor at a time."""
    for file, promised in checkpoint_files(path):
        header = read_header(file)
        if promised is not None:
            absent = sorted(set(promised) - set(header))
            if absent:
                raise CheckpointError(
                    f"{file}: the index says it holds {absent[:5]}"
                    f"{' ...' if len(absent) > 5 else ''} but it does not; the checkpoint is inconsistent"
                )
        with open(file, "rb") as handle:
            for name, info in sorted(header.items(), key=lambda item: item[1].start):
                yield name, _read(handle, file, name, info)
