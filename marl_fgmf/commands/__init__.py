"""Subcommands of the ``marl-fgmf`` CLI (one module each) and their shared argument helpers.

A command module is argparse only: ``add_arguments(parser)`` and ``run(args) -> int`` (check
the arguments, call one workflow of :mod:`marl_fgmf.workflows`, print). The errors the CLI maps
to exit codes (:class:`UsageError` 2, :class:`CommandFailed` 1) and :func:`check_output` live
in :mod:`marl_fgmf.workflows.common` and are re-exported here.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from typing import Any, Callable

from marl_fgmf.workflows.common import (CommandFailed, UsageError,  # noqa: F401 (re-exported)
                                        check_output, enclosing_run, run_failure)


def parse_eps(text: str) -> float:
    """Parse a perturbation budget such as ``8/255``, ``0.03`` or ``4/255``; must be in (0, 1]."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"eps must be a number or fraction such as 8/255, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"eps must be in (0, 1], got {text} = {value:g}")
    return value


def parse_eps_list(text: str) -> list[float]:
    """Comma-separated budgets: ``2/255,4/255,8/255``."""
    return [parse_eps(t) for t in text.split(",") if t.strip()]


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what} (>= {minimum}), got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    return _int_at_least(text, 0, "an integer >= 0")


def parse_settings(text: str) -> dict[str, Any]:
    """``key=value,key=value`` (values parsed as JSON where possible, e.g. numbers, true;
    ``True``/``False``/``yes``/``no`` in any case as booleans; fractions such as ``8/255`` as
    numbers) or a JSON object. Whether a value fits its setting is checked where the setting
    is used (a boolean setting refuses ``maybe``)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"invalid JSON settings {text!r}: {exc}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"settings must be a JSON object, got {text!r}")
        return value
    out: dict[str, Any] = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"settings must look like key=value,key=value; got {item!r}")
        key, raw = item.split("=", 1)
        if raw.strip().lower() in ("true", "yes", "false", "no"):
            out[key.strip()] = raw.strip().lower() in ("true", "yes")
            continue
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            try:
                out[key.strip()] = float(Fraction(raw))
            except (ValueError, ZeroDivisionError):
                out[key.strip()] = raw
    return out


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint DIR`` (required) and ``--env`` / ``--env-kwargs`` defaulting to the run's
    own (its ``run.json``): the arguments of every command that evaluates a trained run.

    Any RLlib new-API-stack checkpoint is accepted (``agents.load_policy``); one that names no
    env (no ``run.json``: a checkpoint RLlib wrote itself) needs ``--env``, refused on one line
    with exit 2 otherwise (there is no default env)."""
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="run directory (marl-fgmf train --out), or any RLlib checkpoint "
                        "(Algorithm.save_to_path, an rl_module folder, one RLModule folder)")
    p.add_argument("--env", default=None,
                   help="environment (default: the run's, from its run.json; required for a "
                        "checkpoint without one, e.g. one RLlib wrote)")
    p.add_argument("--env-kwargs", type=parse_settings, default=None, metavar="K=V,...",
                   help="environment settings (default: the run's when --env is the run's "
                        "env, else the env's defaults)")


def add_cluster_arguments(p: argparse.ArgumentParser, default: str = "a local Ray") -> None:
    """``--address`` and ``--runtime-env FILE``: where the work runs and what code the nodes
    get (checked by :func:`cluster_settings` before anything is written)."""
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help=f"Ray cluster: the head's GCS address host:6379, ray://host:10001 "
                        f"(Ray Client, the 'cluster' extra) or auto (default: {default})")
    p.add_argument("--runtime-env", default=None, metavar="FILE",
                   help="Ray runtime_env (YAML/JSON: working_dir, py_modules, pip, env_vars, "
                        "...) for nodes that lack the package (default: none, the nodes need "
                        "a shared install)")


def cluster_settings(args: argparse.Namespace) -> tuple[str | None, dict[str, Any] | None]:
    """``(address, runtime_env)`` from ``--address``/``--runtime-env``, validated: an
    unreachable address, ``ray://`` without Ray Client, or a bad runtime-env file raise
    :class:`UsageError` (one line) before anything is written."""
    # lazy: agents imports torch (1 s); this module is imported at CLI start-up
    from agents.ray_session import check_address, load_runtime_env
    try:
        runtime_env = load_runtime_env(getattr(args, "runtime_env", None))
        address = check_address(getattr(args, "address", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return address, runtime_env


def run_training(start: Callable[[], dict[str, Any]], out: str, target: int) -> dict[str, Any]:
    """``start()`` (a call of ``agents.train.train`` or ``agents.adversary.train_adversary``)
    for a command: bad input and Ctrl-C pass through, any other failure (a lost env runner, a
    Ray error) becomes :class:`CommandFailed` naming the root cause on one line, and a run in
    ``out`` that already reached its ``target`` iterations is a :class:`UsageError`. Returns
    the training result (``result["last"]`` is the last iteration's record)."""
    try:
        result = start()
    except (ValueError, FileNotFoundError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the root cause on one line
        raise run_failure(exc) from exc
    if not result["last"]:
        raise UsageError(f"nothing to do: {out} already reached {target} iterations")
    return result


def check_device(text: str | None) -> str | None:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` where such a GPU is visible (one-line
    :class:`UsageError` otherwise); None keeps the default (CUDA if available, else CPU)."""
    if text is None:
        return None
    value = str(text).strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise UsageError(f"unknown --device {text!r}; allowed: cpu, cuda, cuda:N")
    if value.startswith("cuda"):
        import torch  # lazy: torch (1 s) only for --device cuda, not at CLI start-up
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= n:
            raise UsageError(f"--device {text}: no such GPU visible to torch ({n} found); "
                             f"use --device cpu")
    return value


def print_failures(command: str, errors: list[str], kept: str) -> int:
    """Every failed job on its own line, then what was kept and that a rerun retries them;
    returns exit code 1 (work that ran on Ray and partly failed)."""
    for line in errors:
        print(f"marl-fgmf {command}: failed: {line}", file=sys.stderr)
    print(f"marl-fgmf {command}: {len(errors)} job(s) failed; {kept}; rerun to retry them",
          file=sys.stderr)
    return 1
