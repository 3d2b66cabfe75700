"""The files of a run directory: the append-only metrics log and its views, atomic
checkpoints, the run lock, and where a resumed run continues (see :mod:`agents.train`)."""
from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from agents.checkpoint import latest_checkpoint, newest_complete_checkpoint
from agents.settings import is_int
from marl_fgmf.io import DirLock, append_synced, atomic_write_text

# --------------------------------------------------------------------------- metrics
METRICS = "metrics.jsonl"
CORRUPT = "metrics.corrupt.txt"
CKPT_ROWS = "metrics_rows.jsonl"  # inside each checkpoint: the rows it completes


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _encode_rows(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, default=_json_default) + "\n" for r in rows)


def _parse_row(text: str) -> dict[str, Any] | None:
    """One metrics row from a JSON line, or None if the line is damaged."""
    try:
        row = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(row, dict) or not is_int(row.get("iteration")) or row["iteration"] < 1:
        return None
    return row


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The rows of a ``metrics.jsonl`` file (one per iteration, the last line of an iteration
    wins, sorted) and its damaged lines as ``(line number, text)``; a missing file has none."""
    path = Path(path)
    if not path.is_file():
        return [], []
    rows: dict[int, dict[str, Any]] = {}
    damaged: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        text = line.decode("utf-8", errors="replace")
        row = _parse_row(text)
        if row is None:
            damaged.append((number, text))
        else:
            rows[row["iteration"]] = row
    return [rows[i] for i in sorted(rows)], damaged


def append_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to ``out/metrics.jsonl`` in one write, flushed to disk."""
    if not rows:
        return
    append_synced(out / METRICS, _encode_rows(rows).encode("utf-8"))


def write_metric_views(out: Path, rows: list[dict[str, Any]]) -> None:
    """Regenerate ``metrics.json`` and ``metrics.csv`` from ``rows`` (each atomically)."""
    atomic_write_text(out / "metrics.json", json.dumps(rows, indent=1, default=_json_default))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def _rows_from_json(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.json`` view; raises ValueError when it is not a list of rows."""
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not all(isinstance(r, dict) and is_int(r.get("iteration"))
                                             for r in data):
        raise ValueError("not a list of rows with an integer iteration")
    return data


def _csv_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _rows_from_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv`` view (numbers parsed back; empty cells left out)."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {k: _csv_value(v) for k, v in raw.items() if k and v not in (None, "")}
            if not is_int(row.get("iteration")):
                raise ValueError("a row without an integer iteration")
            rows.append(row)
    return rows


def _read_view(out: Path, name: str) -> tuple[list[dict[str, Any]] | None, str]:
    """(rows, "") from ``metrics.json``/``metrics.csv``, or (None, why not)."""
    path = out / name
    if not path.is_file():
        return None, "missing"
    try:
        return (_rows_from_json(path) if name.endswith(".json") else _rows_from_csv(path)), ""
    except (ValueError, OSError, UnicodeDecodeError, csv.Error) as exc:
        return None, f"damaged: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _has_metrics(out: Path) -> bool:
    """Whether the run logged any metrics row (in any of its metrics files)."""
    for name, least in ((METRICS, 1), ("metrics.json", 1), ("metrics.csv", 2)):
        try:
            text = (out / name).read_bytes()
        except OSError:
            continue
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if name == "metrics.json" and text.strip() in (b"", b"[]"):
            continue
        if len(lines) >= least:
            return True
    return False


def _spans(numbers_: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    parts: list[str] = []
    for n in sorted(numbers_):
        if parts and parts[-1][1] == n - 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def restore_metrics(out: Path, upto: int, say: Callable[[str], None] = warn
                    ) -> list[dict[str, Any]]:
    """The metrics rows of iterations ``1..upto`` of a run being resumed (caller holds the
    run lock), with ``metrics.jsonl`` repaired and the views regenerated.

    * A run without ``metrics.jsonl`` (an older version) gets one from ``metrics.json`` if
      it parses, else from ``metrics.csv`` (said on one line).
    * Damaged lines (truncated, garbled) are reported with their line numbers, appended to
      ``metrics.corrupt.txt`` and left out; they never cut other rows.
    * Rows after ``upto`` (logged after the checkpoint being resumed) are dropped: those
      iterations are trained again.
    * Iterations up to ``upto`` missing from ``metrics.jsonl`` are recovered from the rows
      saved with each checkpoint, then from ``metrics.json``, then ``metrics.csv``.
    * ``metrics.json`` and ``metrics.csv`` are rewritten from the result (a damaged or
      missing view is simply rebuilt).
    """
    source = out / METRICS
    rows, damaged = read_metrics(source)
    rewrite = False
    if not source.exists():
        found, why_json = _read_view(out, "metrics.json")
        origin = "metrics.json"
        if found is None:
            found, why_csv = _read_view(out, "metrics.csv")
            origin = f"metrics.csv (metrics.json {why_json})"
        if found:
            say(f"note: {out} has no {METRICS} (a run of an older version): created it from "
                f"{origin}, {len(found)} rows")
            rows = sorted({r["iteration"]: r for r in found}.values(),
                          key=lambda r: r["iteration"])
            rewrite = True
    if damaged:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        corrupt = out / CORRUPT
        kept = corrupt.read_text(errors="replace") if corrupt.is_file() else ""
        kept += "".join(f"# {METRICS} line {n}, set aside {stamp}\n{text}\n" for n, text in damaged)
        atomic_write_text(corrupt, kept)
        lines = ", ".join(str(n) for n, _ in damaged)
        say(f"warning: {source} line{'s' if len(damaged) > 1 else ''} {lines} damaged "
            f"(truncated or garbled): set aside in {corrupt}, not used")
        rewrite = True
    by_iter = {r["iteration"]: r for r in rows}
    late = [i for i in by_iter if i > upto]
    if late:
        say(f"note: dropping the metrics rows of iteration{'s' if len(late) > 1 else ''} "
            f"{_spans(late)}, logged after the checkpoint of iteration {upto} (trained again)")
        for i in late:
            del by_iter[i]
        rewrite = True
    missing = [i for i in range(1, upto + 1) if i not in by_iter]
    if missing:
        sources: list[tuple[str, list[dict[str, Any]]]] = []
        for ckpt in sorted((out / "checkpoints").glob(f"iter_*/{CKPT_ROWS}")):
            sources.append((f"checkpoint {ckpt.parent.name}", read_metrics(ckpt)[0]))
        for name in ("metrics.json", "metrics.csv"):
            found, _ = _read_view(out, name)
            sources.append((name, found or []))
        used: list[str] = []
        for name, found in sources:
            hit = [r for r in found if r["iteration"] in missing and r["iteration"] not in by_iter]
            for r in hit:
                by_iter[r["iteration"]] = r
            if hit:
                used.append(name)
        recovered = [i for i in missing if i in by_iter]
        if recovered:
            say(f"note: recovered the metrics row{'s' if len(recovered) > 1 else ''} of "
                f"iteration{'s' if len(recovered) > 1 else ''} {_spans(recovered)} from "
                f"{', '.join(used)}")
            rewrite = True
        lost = [i for i in missing if i not in by_iter]
        if lost:
            say(f"warning: no metrics row of iteration{'s' if len(lost) > 1 else ''} "
                f"{_spans(lost)} in any copy; {'they stay' if len(lost) > 1 else 'it stays'} "
                f"missing")
    rows = [by_iter[i] for i in sorted(by_iter)]
    if rewrite:
        atomic_write_text(source, _encode_rows(rows))
    if rows or source.exists():
        write_metric_views(out, rows)
    return rows


def save_checkpoint(algo, out: Path, iteration: int, keep: int,
                    rows: list[dict[str, Any]] | None = None) -> Path:
    """Save ``algo`` as ``checkpoints/iter_NNNNN`` (temporary folder, renamed into place, then
    ``latest``), with ``rows`` (the metrics rows it completes) inside, so that a kill between
    the checkpoint and the append to ``metrics.jsonl`` loses no row."""
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:05d}"
    for stale in ckpt_root.glob(".tmp_*"):  # left by a hard kill mid-save (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp_{name}"
    try:
        algo.save_to_path(str(tmp.resolve()))
        if rows:
            with open(tmp / CKPT_ROWS, "wb") as fh:
                fh.write(_encode_rows(rows).encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:  # Ctrl-C or an error mid-save: leave no partial checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", name)
    done = sorted(p for p in ckpt_root.glob("iter_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- run directory
RUN_LOCK = ".run.lock"
_HELD_RUN_LOCKS: set[str] = set()


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold ``DirLock(out, ".run.lock")`` (one process trains a run at a time); re-entrant
    within this process. Creates ``out`` (call it after the checks passed); a folder it
    created is removed again when the block fails before writing anything but the lock."""
    out = Path(out)
    key = os.path.realpath(out)
    if key in _HELD_RUN_LOCKS:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with DirLock(out, RUN_LOCK, "another process is training"):
            _HELD_RUN_LOCKS.add(key)
            try:
                yield
            finally:
                _HELD_RUN_LOCKS.discard(key)
    finally:
        if created and out.is_dir() and set(os.listdir(out)) <= {RUN_LOCK}:
            (out / RUN_LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()


def _ckpt_iteration(ckpt: Path) -> int | None:
    try:
        return int(ckpt.name.split("_")[-1])
    except ValueError:
        return None


def resume_checkpoint(out: Path, say: Callable[[str], None] | None = None
                      ) -> tuple[Path | None, int]:
    """``(checkpoint, iteration)`` a resumed run continues from: ``checkpoints/latest``, or
    when it is missing or dangling the newest complete ``checkpoints/iter_*`` (``say`` gets
    one warning line), or ``(None, 0)`` for a run that never saved a checkpoint nor logged
    metrics. Raises ``ValueError`` when the run logged iterations or saved checkpoints but
    none is complete: restarting would throw its history away."""
    ckpt = latest_checkpoint(out)
    if ckpt is not None and _ckpt_iteration(ckpt) is not None:
        return ckpt, int(_ckpt_iteration(ckpt))
    pointer = out / "checkpoints" / "latest"
    if pointer.is_file():
        try:
            named = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = "?"
        problem = f"{pointer} names {named!r}, which is missing or incomplete"
    else:
        problem = f"{pointer} is missing"
    fallback = newest_complete_checkpoint(out)
    if fallback is not None:
        if say is not None:
            say(f"warning: {problem}; resuming from the newest complete checkpoint "
                f"{fallback.name}")
        return fallback, int(_ckpt_iteration(fallback) or 0)
    saved = pointer.exists() or any((out / "checkpoints").glob("iter_*"))
    if saved or _has_metrics(out):
        what = "logged metrics" if _has_metrics(out) else "saved checkpoints"
        raise ValueError(f"--resume: {out} has no complete checkpoint ({problem}, no complete "
                         f"checkpoints/iter_*) but the run {what}: resuming would restart at "
                         f"iteration 1 and lose them; restore a checkpoint or start a new run "
                         f"with another --out")
    return None, 0


def check_run_dir(out: Path, resume: bool) -> None:
    """The checks of :func:`prepare_run` that need no settings (before Ray starts or anything
    is written): a run to resume exists and has a checkpoint to continue from (or never saved
    one), or ``out`` is a new or empty folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if resume:
        if not (out / "run.json").is_file():
            raise ValueError(f"--resume: no run to resume in {out} (run.json missing)")
        resume_checkpoint(out)
        return
    if (out / "run.json").exists() or (out / "checkpoints").exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or "
                         "choose another --out")
    if out.is_dir():
        entries = sorted(p for p in os.listdir(out) if p != RUN_LOCK)
        if entries:
            raise ValueError(f"--out {out} is not empty and holds no run ({len(entries)} "
                             f"entr{'ies' if len(entries) > 1 else 'y'}, e.g. {entries[0]!r}); "
                             f"choose a new or empty folder")
