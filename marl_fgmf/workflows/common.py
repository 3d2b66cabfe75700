"""What every workflow shares with the command line: its two errors and the output-path check.

Standard library only: the CLI imports this at start-up (``marl-fgmf --help``), and
:mod:`marl_fgmf.commands` re-exports every name here, so the direction stays one way (the
commands call the workflows, never the reverse).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CommandFailed", "UsageError", "check_output", "enclosing_run", "run_failure"]


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits 2."""


class CommandFailed(Exception):
    """A runtime failure (not bad input): the CLI prints the message on one line, exits 1."""


def run_failure(exc: BaseException) -> CommandFailed:
    """A :class:`CommandFailed` naming the root cause of an exception from Ray/RLlib work."""
    # lazy: agents imports torch (1 s); this module is imported at CLI start-up
    from agents.ray_session import describe_error
    return CommandFailed(describe_error(exc))


def enclosing_run(path: str | Path) -> Path | None:
    """The training run directory (a folder with ``run.json``) that ``path`` is or lies in."""
    p = Path(os.path.abspath(path))
    for candidate in (p, *p.parents):
        if (candidate / "run.json").is_file():
            return candidate
    return None


def check_output(path: str | Path, flag: str = "--out", kind: str = "file",
                 allow_run: bool = False) -> Path:
    """Check an output path before any work: ``kind`` "file" or "dir"; not inside a training
    run directory (a command never writes into a run it was not asked to train; with
    ``allow_run`` the path may BE a run, as for ``train --out``); the nearest existing folder
    writable. Returns the absolute path; raises :class:`UsageError` (one line) otherwise."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    run = enclosing_run(p)
    if run is not None and not (allow_run and run == p):
        raise UsageError(f"{flag} {path} is inside the training run {run}; write results "
                         f"elsewhere (a command never writes into a run it did not train)")
    if kind == "file" and p.is_dir():
        raise UsageError(f"{flag} must be a file path, {path} is a directory")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a directory")
    existing = p if p.exists() else next(q for q in p.parents if q.exists())
    if not existing.is_dir() and existing != p:
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{flag} {path}: {folder} is not writable (read-only or no "
                         f"permission); choose another path")
    return p
