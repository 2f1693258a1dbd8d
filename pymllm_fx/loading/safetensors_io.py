"""Streaming tensors out of safetensors checkpoints: one file, a directory, or a sharded index.

Pickle-based checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused: unpickling runs
arbitrary code. Every file is read through :class:`~pymllm_fx.loading.files.CheckpointRoot` (inside
the checkpoint's directory, regular files only), and every header is checked against the format's
rules before a byte of tensor data is trusted. Every problem is a ``CheckpointError`` that names the
file and the fix.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from pymllm_fx.loading.files import CheckpointError, CheckpointRoot, expect, loads_strict

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_SUFFIX = ".safetensors.index.json"
MAIN_FILE, MAIN_INDEX = "model.safetensors", "model.safetensors.index.json"

log = logging.getLogger(__name__)


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: pickle checkpoints are never loaded (unpickling can run arbitrary code). "
        f"Convert it to safetensors once, in an environment you trust, e.g. "
        f"`model.save_pretrained(dir, safe_serialization=True)`, and load that instead"
    )


CheckpointFiles = List[Tuple[Path, Optional[List[str]]]]


def checkpoint_files(path: Union[str, Path]) -> CheckpointFiles:
    """The safetensors files to read, each with the tensor names an index promises it holds.

    A directory is read as transformers reads one: ``model.safetensors.index.json`` if present,
    else ``model.safetensors``; failing both, its one index or its one safetensors file. Any other
    file is ignored (named in a debug log), so an adapter or Mistral's ``consolidated.safetensors``
    beside the model does not join it.
    """
    return _checkpoint_files(Path(path))[1]


def _checkpoint_files(path: Path) -> Tuple[CheckpointRoot, CheckpointFiles]:
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        root = CheckpointRoot.of_file(path)
        if path.name.endswith(INDEX_SUFFIX):
            return root, _files_from_index(root, path)
        if path.suffix == ".safetensors":
            return root, [(path, None)]
        if path.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        raise CheckpointError(f"{path}: not a .safetensors file or a {INDEX_SUFFIX} index")
    root = CheckpointRoot(path)
    names = sorted(p.name for p in path.iterdir())
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    files = [n for n in names if n.endswith(".safetensors")]
    if MAIN_INDEX in names:
        chosen = [MAIN_INDEX]
        result = _files_from_index(root, path / MAIN_INDEX)
    elif MAIN_FILE in names:
        chosen = [MAIN_FILE]
        result = [(path / MAIN_FILE, None)]
    elif len(indexes) == 1:
        chosen = indexes
        result = _files_from_index(root, path / indexes[0])
    elif len(indexes) > 1:
        raise CheckpointError(f"{path}: several index files ({indexes}) and no {MAIN_INDEX}; pass one of them")
    elif len(files) == 1:
        chosen = files
        result = [(path / files[0], None)]
    elif files:
        raise CheckpointError(
            f"{path}: several safetensors files ({files[:5]}{' ...' if len(files) > 5 else ''}) and no index; "
            f"name the model's file {MAIN_FILE}, add a {MAIN_INDEX}, or pass one file"
        )
    else:
        pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
        if pickles:
            raise _refuse_pickle(path / pickles[0])
        raise CheckpointError(f"{path}: no .safetensors files in this directory")
    used = set(chosen) | {f.name for f, _ in result}
    ignored = [n for n in files + indexes if n not in used]
    if ignored:
        log.debug("%s: reading %s; ignoring %s", path, sorted(used), ignored)
    return root, result


def _files_from_index(root: CheckpointRoot, index_path: Path) -> CheckpointFiles:
    index = root.read_json(index_path, "safetensors index")
    where = f"{index_path}"
    expect(index, dict, where, "a JSON object with a 'weight_map'")
    if "weight_map" not in index:
        raise CheckpointError(f"{where}: no 'weight_map' (a safetensors index maps every tensor name to its shard)")
    weight_map = expect(index["weight_map"], dict, f"{where}: weight_map", "an object of tensor name -> shard file")
    by_file: Dict[str, List[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(expect(file_name, str, f"{where}: weight_map[{name!r}]", "a shard file name"), []).append(name)
    shards = {f: root.child(f, f"{where}: weight_map") for f in by_file}
    missing = [f for f in sorted(by_file) if not shards[f].exists()]
    if missing:
        raise CheckpointError(
            f"{index_path}: shard(s) {missing} listed in the index are missing (they should hold "
            f"e.g. {by_file[missing[0]][:3]}); copy the complete checkpoint"
        )
    return [(shards[f], sorted(names)) for f, names in sorted(by_file.items())]


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


def read_header(file: Path, root: Optional[CheckpointRoot] = None) -> Dict[str, TensorInfo]:
    """Parse and check a safetensors header: every tensor's dtype, shape and byte range.

    The format's rules, as the safetensors library enforces them: an 8-byte little-endian length,
    a JSON object (no duplicate names) of ``{"dtype", "shape", "data_offsets"}`` entries plus an
    optional ``__metadata__`` of strings; shapes and offsets non-negative integers; each tensor's
    byte span its shape times its dtype's size; the spans, in order, contiguous and covering the
    data that follows the header exactly. ``root``: the directory the file must stay in (default:
    its own).
    """
    root = root or CheckpointRoot.of_file(file)
    with root.open(file) as handle:
        return _read_header(handle, file)


def _read_header(handle, file: Path) -> Dict[str, TensorInfo]:
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: not a valid safetensors file ({why}); it is truncated or corrupt, copy or save it again")

    size = os.fstat(handle.fileno()).st_size
    head = handle.read(8)
    if len(head) < 8:
        raise corrupt("shorter than the 8-byte header length")
    header_len = struct.unpack("<Q", head)[0]
    if header_len > min(_MAX_HEADER, size - 8):
        raise corrupt(f"its header length field exceeds the file's {size} bytes or the format's 100 MiB limit")
    raw = handle.read(header_len)
    if len(raw) != header_len:
        raise corrupt("the header is cut short")
    if not raw.startswith(b"{"):
        raise corrupt("the header does not start with '{'")
    try:
        header = loads_strict(raw.rstrip(b" "), "header")
    except CheckpointError as err:
        raise corrupt(str(err)) from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    base = 8 + header_len
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise corrupt("__metadata__ is not an object of strings")
    spans = []
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise corrupt(f"{where} has no dtype, shape and data_offsets")
        dtype_name = entry["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise corrupt(f"{where} has dtype {dtype_name!r}; supported: {sorted(_DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise corrupt(f"{where} has shape {_clip(shape)}; dimensions must be non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise corrupt(f"{where} has data_offsets {_clip(offsets)}; expected [begin, end] with 0 <= begin <= end")
        dtype = _DTYPES[dtype_name]
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise corrupt(f"{where} spans {end - begin} bytes, its shape {tuple(shape)} and dtype {dtype_name} need {expected}")
        spans.append((begin, end, name, dtype, tuple(shape)))
    spans.sort(key=lambda span: (span[0], span[1]))
    at = 0
    for begin, end, name, _, _ in spans:
        if begin != at:
            what = "overlaps the previous tensor" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise corrupt(f"tensor {name!r} starts at data byte {begin}: it {what} (tensors must be stored back to back)")
        at = end
    if base + at > size:
        cut = next(span for span in spans if base + span[1] > size)
        raise corrupt(f"tensor {cut[2]!r} ends at byte {base + cut[1]}, past the end of the {size}-byte file")
    if base + at < size:
        raise corrupt(f"{size - base - at} bytes follow the last tensor; the header does not describe them")
    return {name: TensorInfo(dtype, shape, base + begin, base + end) for begin, end, name, dtype, shape in spans}


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _clip(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def checkpoint_tensors(path: Union[str, Path]) -> Dict[str, TensorInfo]:
    """Every tensor name of a checkpoint with its dtype and shape, from the headers alone."""
    root, files = _checkpoint_files(Path(path))
    tensors: Dict[str, TensorInfo] = {}
    for file, promised in files:
        header = read_header(file, root)
        _check_promised(file, promised, header)
        doubled = sorted(set(header) & set(tensors))
        if doubled:
            raise CheckpointError(f"{file}: holds {doubled[:5]} which another shard holds too; the checkpoint is inconsistent")
        tensors.update(header)
    return tensors


def _check_promised(file: Path, promised: Optional[List[str]], header: Dict[str, TensorInfo]) -> None:
    """An index's shard must hold exactly the names the index gives it."""
    if promised is None:
        return
    absent = sorted(set(promised) - set(header))
    if absent:
        raise CheckpointError(
            f"{file}: the index says it holds {absent[:5]}{' ...' if len(absent) > 5 else ''} but it does not; "
            f"the checkpoint is inconsistent"
        )
    extra = sorted(set(header) - set(promised))
    if extra:
        raise CheckpointError(
            f"{file}: holds {extra[:5]}{' ...' if len(extra) > 5 else ''} which the index does not list for it "
            f"(the index maps them elsewhere or not at all); the checkpoint is inconsistent"
        )


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
    """Yield ``(name, tensor)`` for every tensor of a checkpoint, one file and one tensor at a time.

    Every header is checked before the first tensor is read, so a bad shard fails before any data
    moves; a name held by two shards is refused."""
    root, files = _checkpoint_files(Path(path))
    headers = []
    seen: set = set()
    for file, promised in files:
        header = read_header(file, root)
        _check_promised(file, promised, header)
        doubled = sorted(set(header) & seen)
        if doubled:
            raise CheckpointError(f"{file}: holds {doubled[:5]} which another shard holds too; the checkpoint is inconsistent")
        seen |= set(header)
        headers.append((file, header))
    for file, header in headers:
        with root.open(file) as handle:
            for name, info in sorted(header.items(), key=lambda item: item[1].start):
                yield name, _read(handle, file, name, info)
