"""Atomic file writes and JSON-safe values, shared by every workflow that writes results.

Checkpoints, metrics, match logs, reports and figures are never written in place: the bytes go
to a temporary file in the destination folder (same filesystem), are flushed to disk, and the
file is renamed over the destination with ``os.replace`` (atomic on POSIX). A crash leaves
either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import dataclasses
import fcntl
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["DirLock", "append_synced", "atomic_write_bytes", "atomic_write_text", "to_jsonable"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file beside it, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def append_synced(path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` to ``path`` in one write and ``fsync`` it (logs that only grow:
    metrics rows, set-aside records)."""
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: dict keys as strings, tuples as lists, paths as strings,
    non-finite floats as ``None``, dataclasses as dicts, numpy scalars and torch tensors as
    Python numbers or lists; anything else as its ``str``."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return to_jsonable(value.tolist())
    return str(value)


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``folder/name`` held for a ``with`` block: one
    writer per run or tournament directory. The lock dies with its process (a SIGKILL frees
    it), so a stale lock file never blocks a later run.

    Raises (on entry):
        ValueError: another process holds the lock; the message names ``what`` and the folder.
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".lock",
                 what: str = "another process is writing"):
        self.path = Path(folder) / name
        self.what = what
        self._fh: Any = None

    def __enter__(self) -> "DirLock":
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            self._fh = None
            raise ValueError(f"{self.what} in {self.path.parent} (lock {self.path} is held); "
                             f"wait for it to finish or stop it") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
