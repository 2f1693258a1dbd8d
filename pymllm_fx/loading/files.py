"""Opening a checkpoint's files as a stranger may have made them: nothing outside its directory,
regular files only, and JSON parsed without the liberties Python's parser takes.

A checkpoint directory is a root. A name inside it (an index's shard, ``config.json``) is read
only if it is a plain relative path and its real location, symlinks resolved, lies inside the
root, or, for a Hugging Face hub snapshot (``<repo>/snapshots/<revision>/``), in the repo's
``blobs/`` folder that the snapshot's symlinks point to. Files are opened without blocking and
must be regular files (a FIFO or device would hang a reader or stream without end). Refused files
are never read, so no error can echo their bytes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Optional, Tuple


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: unreadable, incomplete, unsafe, or not matching the model."""


MAX_JSON_BYTES = 64 * 2**20  # config, index and generation files are kilobytes; indexes of huge models a few MB


class CheckpointRoot:
    """The directory a checkpoint's files must stay in (see the module docstring)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        real = Path(os.path.realpath(self.directory))
        allowed = [real]
        # HF hub cache: <repo>/snapshots/<revision>/<file> -> ../../blobs/<hash>
        if self.directory.parent.name == "snapshots":
            blobs = self.directory.parent.parent / "blobs"
            if blobs.is_dir():
                allowed.append(Path(os.path.realpath(blobs)))
        self.allowed: Tuple[Path, ...] = tuple(allowed)

    @classmethod
    def of_file(cls, file: Path) -> "CheckpointRoot":
        """The root of a checkpoint given as one of its files: the file's own directory."""
        return cls(Path(file).parent)

    def child(self, name: Any, what: str) -> Path:
        """``directory / name`` for a name a checkpoint file gave (an index's shard): a plain
        relative path, no ``..``, no absolute or drive-qualified name."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise CheckpointError(f"{what}: file name {name!r} is not a non-empty string")
        parts = Path(name).parts
        if Path(name).is_absolute() or "\\" in name or ":" in name or any(p in ("..", "") for p in parts):
            raise CheckpointError(
                f"{what}: file name {name!r} is not a plain relative path inside the checkpoint directory; "
                f"a checkpoint may only name files beside it"
            )
        return self.directory / name

    def check_inside(self, path: Path) -> Path:
        """The real path of ``path``, refused unless it lies inside the root (or the hub's blobs)."""
        real = Path(os.path.realpath(path))
        if not any(real == root or root in real.parents for root in self.allowed):
            raise CheckpointError(
                f"{path}: resolves to a location outside the checkpoint directory {self.directory} "
                f"(through a symlink or an absolute name); a checkpoint may only read its own files, so it "
                f"is refused without being read"
            )
        return real

    def open(self, path: Path) -> BinaryIO:
        """A binary reader of ``path``, which must be inside the root and a regular file."""
        real = self.check_inside(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open it ({err.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(
                    f"{path}: not a regular file ({_kind(info.st_mode)}); a checkpoint's files must be plain files"
                )
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def is_regular(self, path: Path) -> bool:
        """Whether ``path`` exists as a regular file (after symlinks), without opening it."""
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            return False

    def read_json(self, path: Path, what: str) -> Any:
        """``path`` parsed as strict JSON (see :func:`loads_strict`), at most MAX_JSON_BYTES."""
        with self.open(path) as handle:
            raw = handle.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a {what}")
        return loads_strict(raw, f"{path}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def loads_strict(raw: bytes, where: str) -> Any:
    """JSON as RFC 8259 defines it: no NaN or Infinity (nor numbers too large for a float), no
    duplicate keys (Python's parser keeps the last silently), and nesting a stack can hold."""

    def refuse_constant(name: str):
        raise CheckpointError(f"{where}: {name} is not a JSON number; write a finite number")

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise CheckpointError(f"{where}: the number {text[:40]} is out of range for a float")
        return value

    def unique_keys(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise CheckpointError(f"{where}: key {key!r} appears more than once in one object")
            obj[key] = value
        return obj

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text, parse_constant=refuse_constant, parse_float=finite_float, object_pairs_hook=unique_keys)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply to be a checkpoint file") from None
    except ValueError as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{where}: not valid JSON ({err})") from None


def expect(value: Any, kind: type, where: str, form: str) -> Any:
    """``value`` if it is a ``kind`` (bools are not ints here), else a CheckpointError naming the form."""
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool) and kind in (int, float))
    if not ok:
        raise CheckpointError(f"{where}: expected {form}, found {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def optional_regular(root: CheckpointRoot, name: str) -> Optional[Path]:
    """``root.directory / name`` if something is there (it is then opened and checked), else None."""
    path = root.directory / name
    return path if os.path.lexists(path) else None
