"""marl_fgmf.io: atomic writes (old file or new file, never a torn one), synced appends,
JSON-safe values, the per-directory lock."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from marl_fgmf.io import DirLock, append_synced, atomic_write_bytes, atomic_write_text, to_jsonable


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_atomic_write_creates_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "er" / "result.json"
    assert atomic_write_bytes(path, b"one") == path
    assert path.read_bytes() == b"one"
    atomic_write_text(path, "zwei \u00fc")
    assert path.read_bytes() == "zwei \u00fc".encode("utf-8")
    assert leftovers(path.parent, path.name) == []


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.bin"
    atomic_write_bytes(path, b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and leftovers(tmp_path, path.name) == []
    monkeypatch.undo()
    with pytest.raises(TypeError):  # not bytes: fails inside the write, old file kept
        atomic_write_bytes(path, "text")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old" and leftovers(tmp_path, path.name) == []


def test_the_temporary_is_beside_the_destination(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(tmp_path / "a.txt", b"x")
    (src, dst), = seen
    assert src.parent == dst.parent == tmp_path and src != dst  # same filesystem: atomic


def test_append_synced_only_grows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_synced(path, b'{"i": 0}\n')
    append_synced(path, b'{"i": 1}\n')
    assert [json.loads(x)["i"] for x in path.read_text().splitlines()] == [0, 1]


@dataclasses.dataclass
class Point:
    x: float
    tag: tuple


def test_to_jsonable_gives_strict_json():
    value = {1: float("nan"), "inf": -math.inf, "t": (1, 2.5), "p": Path("/a/b"),
             "dc": Point(float("inf"), ("a",)), "np": np.float32(0.5), "arr": np.arange(3),
             "tensor": torch.tensor([[1.0, float("nan")]]), "i64": np.int64(7),
             "obj": object, "nested": [{"ok": True, "none": None}]}
    out = to_jsonable(value)
    text = json.dumps(out, allow_nan=False)  # raises on any NaN/inf left
    back = json.loads(text)
    assert back["1"] is None and back["inf"] is None and back["t"] == [1, 2.5]
    assert back["p"] == "/a/b" and back["dc"] == {"x": None, "tag": ["a"]}
    assert back["np"] == 0.5 and back["arr"] == [0, 1, 2] and back["i64"] == 7
    assert back["tensor"] == [[1.0, None]] and back["obj"] == str(object)
    assert back["nested"] == [{"ok": True, "none": None}]


def test_dir_lock_is_exclusive_and_released(tmp_path):
    with DirLock(tmp_path):
        with pytest.raises(ValueError, match=r"a training run is writing in .* is held") as err:
            with DirLock(tmp_path, what="a training run is writing"):  # even in one process
                pass
    assert "\n" not in str(err.value)
    with DirLock(tmp_path):  # released on exit
        pass


def test_dir_lock_dies_with_its_process(tmp_path):
    code = ("import sys, time; from marl_fgmf.io import DirLock\n"
            f"with DirLock({str(tmp_path)!r}):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="is held"):
            with DirLock(tmp_path):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 5
        while True:  # the kernel drops the lock with the process
            try:
                with DirLock(tmp_path):
                    break
            except ValueError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        assert (tmp_path / ".lock").exists()  # a stale lock file blocks nothing
    finally:
        proc.kill()
