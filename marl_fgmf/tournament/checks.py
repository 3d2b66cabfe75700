"""Checks of a tournament config against the world, before any match: envs that build,
readable checkpoints, training specs (and a changed spec never resumed on an old run),
attack names and settings, learned adversary runs. Each returns its problems, one line each;
nothing is trained or loaded beyond reading run settings."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from agents.checkpoint import CheckpointError, policy_ids, read_run_config, resolve_module_root
from agents.train import TrainConfig
from attacks import build_external, list_attacks, make_attack
from envs import is_import_path, list_envs, make_env
from marl_fgmf.io import to_jsonable
from marl_fgmf.tournament.errors import first_line

__all__ = ["check_attackers", "check_checkpoint", "check_defenders", "check_env",
           "check_train_spec", "dummy_policy", "duplicates", "try_env"]


def dummy_policy() -> Any:
    """A placeholder policy on the protocol (with ``value`` and ``input_filter``), so that
    attack names and settings are validated without loading any checkpoint."""
    class Placeholder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_filter = nn.Identity()
            self.lin = nn.Linear(3, 2)

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.lin(self.input_filter(obs).mean(dim=(1, 2)))

        def value(self, obs: torch.Tensor) -> torch.Tensor:
            return obs.mean(dim=(1, 2, 3))

    return Placeholder()


def duplicates(what: str, values: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    return [f"duplicate {what} {v!r} ({n} times)" for v, n in seen.items() if n > 1]


def try_env(name: str, kwargs: dict[str, Any], where: str) -> list[str]:
    try:
        make_env(name, **kwargs).close()
    except Exception as exc:
        return [f"{where}: cannot build env {name!r}: {first_line(exc)}"]
    return []


def check_checkpoint(d: Any) -> list[str]:
    path = Path(d.checkpoint)
    if not path.exists():
        return [f"defender {d.name}: checkpoint not found: {path}"]
    try:
        ids = policy_ids(resolve_module_root(path))
    except (CheckpointError, OSError) as exc:
        return [f"defender {d.name}: {first_line(exc)}"]
    if not ids:
        return [f"defender {d.name}: checkpoint holds no policies: {path}"]
    if d.policy_id is not None and d.policy_id not in ids:
        return [f"defender {d.name}: unknown policy_id {d.policy_id!r}; allowed: {', '.join(ids)}"]
    return []


def check_train_spec(d: Any, out: str | os.PathLike | None = None) -> list[str]:
    """A training spec's settings, and, when ``out`` already holds this defender's run, that
    the run was trained with the same settings (a changed spec is never resumed silently on
    top of the old run, and the old run is never deleted)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d.train) - names)
    if unknown:
        return [f"defender {d.name}: unknown training setting(s) {', '.join(unknown)}"]
    try:
        cfg = TrainConfig.from_json(d.train)
        cfg.validate()
    except (ValueError, TypeError) as exc:
        return [f"defender {d.name}: bad training spec: {first_line(exc)}"]
    if out is None:
        return []
    run_file = d.run_dir(Path(out)) / "run.json"
    if not run_file.is_file():
        return []
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"defender {d.name}: cannot read {run_file}: {first_line(exc)}"]
    wanted = to_jsonable(cfg.resolved().to_json())  # as run.json saves it
    changed = sorted(k for k in wanted if k != "iterations"
                     and to_jsonable(saved.get(k)) != wanted[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in changed[:4])
        return [f"defender {d.name}: its training spec changed since {run_file.parent} was "
                f"trained ({diff}); move that run away (it is never deleted) or restore the "
                f"spec"]
    return []


def check_env(env: str | None, env_kwargs: dict[str, Any] | None) -> list[str]:
    """The config's env override: a registered env that builds with its settings."""
    if env is None:
        return []
    if env not in list_envs() and not is_import_path(env):
        return [f"unknown env {env!r}; allowed: {', '.join(list_envs())}"]
    return try_env(env, env_kwargs or {}, "env")


def check_defenders(defenders: Iterable[Any], env: str | None,
                    out: str | os.PathLike | None) -> list[str]:
    """Each defender's checkpoint (and its run's env when the config sets none) or training
    spec (:func:`check_train_spec`)."""
    errors: list[str] = []
    for d in defenders:
        if d.checkpoint is not None:
            errors += check_checkpoint(d)
            if env is None:
                try:
                    run_env = read_run_config(d.checkpoint).get("env")
                except Exception as exc:
                    errors.append(f"defender {d.name}: {first_line(exc)}")
                    continue
                if run_env is not None and run_env not in list_envs() \
                        and not is_import_path(run_env):
                    errors.append(f"defender {d.name}: unknown env {run_env!r} in its "
                                  f"run.json; allowed: {', '.join(list_envs())}")
        elif d.train is not None:
            errors += check_train_spec(d, out)
    return errors


def check_attackers(attackers: Iterable[Any], eps: list[float]) -> list[str]:
    """Each attacker: a readable learned adversary run, or an attack name and settings, or an
    external import path and settings, that build (on :func:`dummy_policy`, at the first
    eps)."""
    errors: list[str] = []
    dummy = dummy_policy()
    for a in attackers:
        if a.adversary is not None:
            if not Path(a.adversary).exists():
                errors.append(f"attacker {a.name}: adversary run not found: {a.adversary}")
                continue
            try:  # lazy: agents.adversary imports RLlib, needed for learned adversaries only
                from agents.adversary import read_adversary_config
            except ImportError:
                errors.append(f"attacker {a.name}: learned adversaries need agents.adversary, "
                              f"which is not available in this installation")
                continue
            try:
                read_adversary_config(a.adversary)
            except Exception as exc:
                errors.append(f"attacker {a.name}: {first_line(exc)}")
            continue
        reserved = sorted({"eps", "seed"} & set(a.settings))
        if reserved:
            errors.append(f"attacker {a.name}: setting(s) {', '.join(reserved)} are set by the "
                          f"tournament (eps list and seeds), remove them")
            continue
        if a.external is not None:  # imported and built (not run) on the placeholder policy
            try:
                build_external(a.external, eps[0] if eps else 8 / 255, a.settings, norm=a.norm,
                               seed=0, policy=dummy)
            except ValueError as exc:
                errors.append(f"attacker {a.name}: {first_line(exc)}")
            continue
        try:
            make_attack(a.attack, dummy, eps=eps[0] if eps else 8 / 255, seed=0,
                        **a.settings)
        except ValueError as exc:
            msg = first_line(exc)
            if "unknown attack" in msg:
                msg = f"unknown attack {a.attack!r}; allowed: {', '.join(list_attacks())}"
            errors.append(f"attacker {a.name}: {msg}")
        except TypeError as exc:
            errors.append(f"attacker {a.name}: bad settings: {first_line(exc)}")
    return errors
