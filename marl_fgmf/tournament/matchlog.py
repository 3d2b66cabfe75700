"""``matches.jsonl``, the tournament's match log: one record per finished match, appended
atomically; corrupt or truncated lines reported and set aside, stale records moved away."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from marl_fgmf.io import append_synced, atomic_write_bytes, to_jsonable
from marl_fgmf.tournament.errors import first_line

__all__ = ["RECORD_VERSION", "REQUIRED_FIELDS", "MatchLog", "record_problem"]


RECORD_VERSION = 1


class MatchLog:
    """``matches.jsonl``: one JSON object per finished match, appended atomically.

    Each record is written as one line by ONE ``os.write`` call on an ``O_APPEND`` file
    descriptor, then ``fsync`` ed, from the driver only: on a local POSIX filesystem an append
    of one buffer is never interleaved with another and a crash leaves at most one incomplete
    LAST line, which :meth:`load` detects.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def load(self, warn: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
        """Read the finished matches by key.

        A line that is not a complete JSON record (truncated, garbled, missing fields) is
        reported through ``warn`` with its line number and moved to ``matches.corrupt.txt``
        (the log is rewritten atomically without it), so its match is played again. A repeated
        key keeps its first record (also reported).
        """
        warn = warn or (lambda msg: None)
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        records: dict[str, dict[str, Any]] = {}
        keep: list[bytes] = []
        bad: list[bytes] = []
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                problem = record_problem(rec)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                rec, problem = None, f"invalid JSON ({type(exc).__name__}: {first_line(exc)})"
            truncated = number == len(lines) and not raw.endswith(b"\n")
            if problem is not None:
                what = "truncated" if truncated else "corrupt"
                warn(f"{self.path.name} line {number} is {what}: {problem}; skipped (moved to "
                     f"{self.path.stem}.corrupt.txt), its match will be played again")
                bad.append(line)
                continue
            if rec["key"] in records:
                warn(f"{self.path.name} line {number} repeats match {rec['key']!r}; the first "
                     f"record is kept")
                continue
            records[rec["key"]] = rec
            keep.append(line)
        clean_text = b"".join(line + b"\n" for line in keep)
        if bad or clean_text != raw:
            if bad:
                append_synced(self.path.with_name(f"{self.path.stem}.corrupt.txt"),
                              b"".join(b + b"\n" for b in bad))
            atomic_write_bytes(self.path, clean_text)
        return records

    def set_aside(self, keys: Iterable[str]) -> int:
        """Move the records of ``keys`` to ``matches.stale.jsonl`` (appended there and
        ``fsync`` ed first), then rewrite the log atomically without them, so that the log
        never holds two records of one match and no record is lost. Returns how many moved."""
        keys = set(keys)
        if not keys or not self.path.exists():
            return 0
        self.close()  # the rewrite replaces the file: never append to the old one
        keep: list[bytes] = []
        moved: list[bytes] = []
        for line in self.path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                key = json.loads(line.decode("utf-8")).get("key")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                key = None  # not a record of ours: left for load() to report
            (moved if key in keys else keep).append(line)
        if moved:
            append_synced(self.path.with_name(f"{self.path.stem}.stale.jsonl"),
                          b"".join(line + b"\n" for line in moved))
            atomic_write_bytes(self.path, b"".join(line + b"\n" for line in keep))
        return len(moved)

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line: a single ``os.write`` of the whole line + ``fsync``."""
        data = (json.dumps(to_jsonable(record), sort_keys=True, allow_nan=False) + "\n").encode()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        written = os.write(self._fd, data)
        if written != len(data):  # never seen for small buffers on local disks; be loud
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


REQUIRED_FIELDS = ("key", "defender", "attacker", "seed", "team_return", "team_returns", "episodes")


def record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if rec.get("status", "ok") != "ok":
        return f"status {rec.get('status')!r}"
    return None
