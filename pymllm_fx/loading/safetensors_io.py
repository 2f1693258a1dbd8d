"""Streaming tensors out of safetensors checkpoints: one file, a directory, or a sharded index.

Pickle-based checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused: unpickling runs
arbitrary code. Every problem is a ``CheckpointError`` that names the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open

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


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{file}: cannot read this safetensors file ({err}); it is truncated or corrupt, "
            f"copy or save it again"
        ) from None


def iter_weights(path: Union[str, Path]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint, one file open at a time."""
    for file, promised in checkpoint_files(path):
        with _open(file) as handle:
            names = list(handle.keys())
            if promised is not None:
                absent = sorted(set(promised) - set(names))
                if absent:
                    raise CheckpointError(
                        f"{file}: the index says it holds {absent[:5]}"
                        f"{' ...' if len(absent) > 5 else ''} but it does not; the checkpoint is inconsistent"
                    )
            for name in names:
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err}); the file is corrupt") from None
                yield name, tensor
