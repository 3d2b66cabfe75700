"""Adversarial tournaments: every defender against every attacker, on Ray, resumable.

A tournament plays each **match** ``(defender, attacker, eps, seed)``: the defender's policy
(a trained checkpoint, loaded with :func:`agents.load_policy`) is rolled out in its environment
for ``episodes`` episodes with every agent's observation perturbed by the attacker
(:func:`attacks.evaluate`). A **clean** pseudo-attacker per defender and seed gives the
unattacked return. Each match is one Ray task (DESIGN.md section 2: local Ray by default,
``address=`` for a cluster, no home-made scheduler); the driver keeps at most
``max_concurrency`` of them in flight and, as results arrive (``ray.wait``), appends each
finished match to ``DIR/matches.jsonl`` as ONE line, written with a single ``os.write`` on an
``O_APPEND`` descriptor and ``fsync`` ed.

Reruns: every record carries a **fingerprint**, a sha256 over everything that decides the
match: the defender's weights (``defender_hash``: every module's class and ``state_dict``, as
loaded, so a retrained defender differs even in the same checkpoint folder), its
``policy_id``, the env and its settings, ``episodes``, seed, eps, and the attacker (kind,
attack, settings; a learned adversary's weights and settings). Rerunning a tournament reuses a
finished record only if its fingerprint equals the current one, so a killed tournament loses
at most the matches in flight. A record with another fingerprint (settings or weights
changed), or none (an older log), is replayed: it is first moved from ``matches.jsonl`` to
``DIR/matches.stale.jsonl`` (never silently dropped; the log holds one record per match). One
line reports ``N reused, M replayed (settings changed), K new``. Records of defenders or
attackers no longer in the config stay in the log untouched and are not shown. A corrupt or
truncated line (a crash mid-write on a filesystem without atomic appends) is reported with its
line number, moved to ``DIR/matches.corrupt.txt`` and its match is played again.

Then, per defender, the gradient-masking audit (:func:`marl_fgmf.audit.audit`, also a Ray
task) on observations from the defender's own environment, stored in
``DIR/audit_<defender>.json`` with its own fingerprint (the defender's weights, env, env
settings, ``policy_id`` and the audit settings): it is rerun when that changes, and an audit of
other weights or settings is never shown. Last the leaderboard: defenders ranked by **robust
return**, the minimum over the attack ensemble of the mean team return (DESIGN.md section 3),
per eps, with the clean return beside it and flagged defenders marked. Outputs (all written
atomically)::

    DIR/matches.jsonl          one JSON object per finished match
    DIR/matches.stale.jsonl    records replaced because their fingerprint changed
    DIR/audit_<defender>.json  the audit of each defender
    DIR/leaderboard.json/.md   the ranking, per-eps robust returns, every cell
    DIR/heatmap_<eps>.png      defenders x attackers team return, one per eps
    DIR/robust_vs_eps.png      robust return against eps, one curve per defender
    DIR/report.md              all of the above tied together with the audit tables
    DIR/defenders/<name>/      defenders given as training specs, trained first

On a Ray cluster (``address``) weights travel and paths do not: the driver loads every
defender and learned adversary once and ships it through Ray's object store, so the nodes
need this package (a shared install or ``runtime_env``) but not the driver's files. The match
log and the reports are written by the driver only; every record names the Ray node that
played it (``node_id``), and ``report.md`` lists the nodes. A node whose last
``max_node_failures`` tasks failed with the same cause gets no more work while another node is
healthy, and its failed tasks are played elsewhere.

The configuration (YAML or JSON; relative paths are relative to the config file's folder)::

    env: beacon                 # optional: override every defender's env (else its run.json)
    env_kwargs: {}              # optional
    episodes: 5
    seeds: [0, 1]
    eps: [4/255, 8/255]
    defenders:
      - {name: ppo, checkpoint: runs/ppo}
      - {name: fgmf, train: {defense: fgmf, iterations: 20}}   # trained into DIR/defenders/fgmf
    attackers:
      - fgsm                                                   # name = attack, default settings
      - {name: pgd20, attack: pgd, settings: {steps: 20}}
      - {name: square, attack: square, settings: {n_queries: 200}}
      - {name: rl-adv, adversary: runs/adv}                    # a learned adversary run
    audit: {eps: 8/255, n_obs: 64}                             # or false
    num_cpus_per_match: 1
    max_concurrency: 2          # matches in flight (default: the cluster's CPUs / num_cpus)

Example::

    >>> cfg = TournamentConfig.from_file("tournament.yaml")
    >>> result = run_tournament(cfg, "results/t1", workers=2)
    >>> print(format_leaderboard(result.leaderboard))
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from marl_fgmf.io import (DirLock, append_synced, atomic_write_bytes, atomic_write_text,
                          to_jsonable)

__all__ = [
    "AttackerSpec", "AuditSpec", "ConfigError", "DefenderSpec", "Match", "MatchLog",
    "TournamentConfig", "TournamentError", "TournamentResult", "build_leaderboard",
    "format_leaderboard", "run_tournament", "write_outputs", "eps_label", "eps_slug",
]

CLEAN = "clean"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
RECORD_VERSION = 1
_TOP_KEYS = {"name", "env", "env_kwargs", "episodes", "seeds", "eps", "defenders", "attackers",
             "audit", "num_cpus_per_match", "max_concurrency", "address"}
_AUDIT_KEYS = {"enabled", "eps", "n_obs", "steps", "restarts", "large_eps", "n_queries",
               "objective", "margin", "alpha", "seed", "episodes"}


class ConfigError(ValueError):
    """An invalid tournament configuration; ``errors`` holds one line per problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class TournamentError(RuntimeError):
    """Some matches or audits failed; ``errors`` holds one line per failure."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------- configuration
@dataclass
class DefenderSpec:
    """A defender: a checkpoint (run dir) or a training spec trained into ``DIR/defenders``."""

    name: str
    checkpoint: Path | None = None
    """run directory or checkpoint of a trained policy"""
    train: dict[str, Any] | None = None
    """``agents.train.TrainConfig`` fields; trained into ``DIR/defenders/<name>`` first"""
    policy_id: str | None = None
    """restrict to one module of the checkpoint (default: every module, mapped per agent)"""

    def run_dir(self, out: Path) -> Path:
        """Where the defender's checkpoint lives (for a training spec, inside ``out``)."""
        return Path(self.checkpoint) if self.checkpoint is not None else Path(out) / "defenders" / self.name


@dataclass
class AttackerSpec:
    """An attacker: an analytic attack of :mod:`attacks` or a learned adversary run."""

    name: str
    attack: str | None = None
    """registry name (``attacks.list_attacks()``)"""
    settings: dict[str, Any] = field(default_factory=dict)
    """constructor settings of the attack (not ``eps`` or ``seed``: the tournament sets them)"""
    adversary: Path | None = None
    """run directory of a learned adversary (``agents.adversary.load_adversary``)"""

    @property
    def kind(self) -> str:
        return "learned" if self.adversary is not None else "analytic"


@dataclass
class AuditSpec:
    """Settings of the per-defender gradient-masking audit (see :func:`marl_fgmf.audit.audit`)."""

    enabled: bool = True
    eps: float | None = None
    """audited budget (default: the largest eps of the tournament)"""
    n_obs: int = 64
    """observations collected from the defender's env"""
    episodes: int = 4
    """episodes rolled out (clean, greedy) to collect them"""
    steps: list[int] = field(default_factory=lambda: [1, 10, 50])
    restarts: list[int] = field(default_factory=lambda: [1, 5])
    large_eps: float = 1.0
    n_queries: int = 300
    objective: str = "margin"
    margin: float = 0.05
    alpha: float = 0.01
    seed: int = 0

    def audit_kwargs(self) -> dict[str, Any]:
        return {"steps": tuple(self.steps), "restarts": tuple(self.restarts),
                "large_eps": self.large_eps, "n_queries": self.n_queries,
                "objective": self.objective, "margin": self.margin, "alpha": self.alpha,
                "seed": self.seed}


@dataclass
class TournamentConfig:
    """A tournament: defenders x attackers x eps x seeds (see the module docstring).

    Build it with :meth:`from_file` / :meth:`from_dict`; :meth:`validate` returns every
    problem (one line each) and :meth:`check` raises :class:`ConfigError` with all of them.
    """

    defenders: list[DefenderSpec]
    attackers: list[AttackerSpec]
    eps: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    episodes: int = 5
    env: str | None = None
    env_kwargs: dict[str, Any] | None = None
    audit: AuditSpec = field(default_factory=AuditSpec)
    num_cpus_per_match: float = 1.0
    max_concurrency: int | None = None
    address: str | None = None
    name: str = "tournament"
    parse_errors: list[str] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TournamentConfig":
        """Read a YAML (``.yaml``/``.yml``) or JSON file; relative paths resolve against its
        folder. Raises :class:`ConfigError` if the file cannot be read or parsed."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"])
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError([f"cannot parse {path}: {first}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: the config must be a mapping, got {type(data).__name__}"])
        return cls.from_dict(data, base_dir=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | os.PathLike | None = None
                  ) -> "TournamentConfig":
        """Build a config from plain data; structural problems are kept for :meth:`validate`
        (so that every problem is reported at once)."""
        errors: list[str] = []
        # absolute paths: RLlib refuses relative checkpoint paths, and Ray workers need not
        # share the driver's working directory
        base = Path(os.path.abspath(base_dir)) if base_dir is not None else Path.cwd()
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            errors.append(f"unknown config key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(_TOP_KEYS))}")

        def path_of(value: Any) -> Path:
            p = Path(os.path.expanduser(str(value)))
            return Path(os.path.abspath(p if p.is_absolute() else base / p))

        defenders: list[DefenderSpec] = []
        raw_def = data.get("defenders")
        if not isinstance(raw_def, list) or not raw_def:
            errors.append("defenders must be a non-empty list")
            raw_def = []
        for i, d in enumerate(raw_def):
            if not isinstance(d, dict):
                errors.append(f"defender #{i + 1} must be a mapping with name and checkpoint "
                              f"or train, got {d!r}")
                continue
            extra = sorted(set(d) - {"name", "checkpoint", "train", "policy_id"})
            name = str(d.get("name", f"#{i + 1}"))
            if extra:
                errors.append(f"defender {name}: unknown key(s) {', '.join(extra)}; allowed: "
                              f"name, checkpoint, train, policy_id")
            if "name" not in d:
                errors.append(f"defender #{i + 1}: missing name")
            has_ckpt, has_train = d.get("checkpoint") is not None, d.get("train") is not None
            if has_ckpt == has_train:
                errors.append(f"defender {name}: give exactly one of checkpoint or train")
            train = d.get("train")
            if has_train and not isinstance(train, dict):
                errors.append(f"defender {name}: train must be a mapping of training settings")
                train = None
            defenders.append(DefenderSpec(
                name=name, checkpoint=path_of(d["checkpoint"]) if has_ckpt else None,
                train=dict(train) if isinstance(train, dict) else None,
                policy_id=None if d.get("policy_id") is None else str(d["policy_id"])))

        attackers: list[AttackerSpec] = []
        raw_att = data.get("attackers")
        if not isinstance(raw_att, list) or not raw_att:
            errors.append("attackers must be a non-empty list")
            raw_att = []
        for i, a in enumerate(raw_att):
            if isinstance(a, str):  # a bare registry name: the attack with default settings
                attackers.append(AttackerSpec(name=a, attack=a))
                continue
            if not isinstance(a, dict):
                errors.append(f"attacker #{i + 1} must be an attack name or a mapping, got {a!r}")
                continue
            extra = sorted(set(a) - {"name", "attack", "settings", "adversary"})
            name = str(a.get("name", a.get("attack", f"#{i + 1}")))
            if extra:
                errors.append(f"attacker {name}: unknown key(s) {', '.join(extra)}; allowed: "
                              f"name, attack, settings, adversary")
            has_attack, has_adv = a.get("attack") is not None, a.get("adversary") is not None
            if has_attack and has_adv:
                errors.append(f"attacker {name}: give attack or adversary, not both")
            if not has_attack and not has_adv and "name" not in a:
                errors.append(f"attacker #{i + 1}: give a name and an attack or an adversary")
            settings = a.get("settings") or {}
            if not isinstance(settings, dict):
                errors.append(f"attacker {name}: settings must be a mapping")
                settings = {}
            if has_adv and settings:
                errors.append(f"attacker {name}: settings apply to analytic attacks only")
            attack = str(a["attack"]) if has_attack else (None if has_adv else name)
            attackers.append(AttackerSpec(name=name, attack=attack, settings=dict(settings),
                                          adversary=path_of(a["adversary"]) if has_adv else None))

        eps: list[float] = []
        raw_eps = data.get("eps")
        if not isinstance(raw_eps, list) or not raw_eps:
            raw_eps = [raw_eps] if isinstance(raw_eps, (int, float, str)) else []
            if not raw_eps:
                errors.append("eps must be a non-empty list of budgets in (0, 1] such as 8/255")
        from marl_fgmf.protocol import parse_budget
        for e in raw_eps:
            try:
                eps.append(parse_budget(e))
            except ValueError as exc:
                errors.append(f"invalid eps {e!r}: {exc}")

        seeds_raw = data.get("seeds", [0])
        if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool):
            seeds_raw = [seeds_raw]
        seeds: list[int] = []
        if not isinstance(seeds_raw, list) or not seeds_raw:
            errors.append(f"seeds must be a non-empty list of integers, got {seeds_raw!r}")
        else:
            for s in seeds_raw:
                if isinstance(s, bool) or not isinstance(s, int):
                    errors.append(f"invalid seed {s!r}: seeds must be integers")
                else:
                    seeds.append(s)

        episodes = data.get("episodes", 5)
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            errors.append(f"episodes must be an integer >= 1, got {episodes!r}")
            episodes = 1

        audit = AuditSpec()
        raw_audit = data.get("audit", True)
        if raw_audit is False or raw_audit is None:
            audit.enabled = False
        elif isinstance(raw_audit, dict):
            extra = sorted(set(raw_audit) - _AUDIT_KEYS)
            if extra:
                errors.append(f"audit: unknown key(s) {', '.join(extra)}; allowed: "
                              f"{', '.join(sorted(_AUDIT_KEYS))}")
            for key in _AUDIT_KEYS & set(raw_audit):
                value = raw_audit[key]
                if key in ("eps", "large_eps") and value is not None:
                    try:
                        value = parse_budget(value, f"audit {key}")
                    except ValueError as exc:
                        errors.append(f"invalid audit {key} {raw_audit[key]!r}: {exc}")
                        continue
                setattr(audit, key, value)
            for key in ("n_obs", "episodes", "n_queries"):
                v = getattr(audit, key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    errors.append(f"audit {key} must be an integer >= 1, got {v!r}")
            for key in ("steps", "restarts"):
                v = getattr(audit, key)
                if not isinstance(v, list) or not v or any(
                        isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                    errors.append(f"audit {key} must be a non-empty list of integers >= 1, "
                                  f"got {v!r}")
            if audit.objective not in ("margin", "ce"):
                errors.append(f"audit objective must be 'margin' or 'ce', got {audit.objective!r}")
            for key in ("margin", "alpha"):
                v = getattr(audit, key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    errors.append(f"audit {key} must be a number in [0, 1], got {v!r}")
            if isinstance(audit.seed, bool) or not isinstance(audit.seed, int):
                errors.append(f"audit seed must be an integer, got {audit.seed!r}")
        elif raw_audit is not True:
            errors.append(f"audit must be true, false or a mapping of settings, got {raw_audit!r}")

        env = data.get("env")
        env_kwargs = data.get("env_kwargs")
        if env_kwargs is not None and not isinstance(env_kwargs, dict):
            errors.append("env_kwargs must be a mapping")
            env_kwargs = None
        cpus = data.get("num_cpus_per_match", 1.0)
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0:
            errors.append(f"num_cpus_per_match must be a number > 0, got {cpus!r}")
            cpus = 1.0
        conc = data.get("max_concurrency")
        if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
            errors.append(f"max_concurrency must be an integer >= 1, got {conc!r}")
            conc = None
        return cls(defenders=defenders, attackers=attackers, eps=eps, seeds=seeds,
                   episodes=episodes, env=None if env is None else str(env),
                   env_kwargs=env_kwargs, audit=audit, num_cpus_per_match=float(cpus),
                   max_concurrency=conc, address=data.get("address"),
                   name=str(data.get("name", "tournament")), parse_errors=errors)

    # ------------------------------------------------------------------ validation
    def validate(self, out: str | os.PathLike | None = None) -> list[str]:
        """Every problem of the configuration, one line each (empty when it is valid).

        Checks: unknown attack or attack setting, missing or unreadable defender checkpoint,
        bad training spec, unknown env or env setting, duplicate defender/attacker/match
        names, invalid or duplicate eps and seeds, learned adversaries that cannot be read.
        Nothing is trained or loaded beyond reading run settings.
        """
        errors = list(self.parse_errors)
        duplicates = (_duplicates("defender name", [d.name for d in self.defenders])
                      + _duplicates("attacker name", [a.name for a in self.attackers])
                      + _duplicates("eps", [eps_label(e) for e in self.eps])
                      + _duplicates("seed", [str(s) for s in self.seeds]))
        errors += duplicates
        for kind, names in (("defender", [d.name for d in self.defenders]),
                            ("attacker", [a.name for a in self.attackers])):
            for n in names:
                if not NAME_RE.match(n):
                    errors.append(f"{kind} name {n!r} must start with a letter or digit and use "
                                  f"only letters, digits and _ . + -")
        if any(a.name == CLEAN for a in self.attackers):
            errors.append(f"attacker name {CLEAN!r} is reserved for the clean (unattacked) run")
        seen_keys: dict[str, int] = {}
        for m in self.matches():
            seen_keys[m.key] = seen_keys.get(m.key, 0) + 1
        for key, count in seen_keys.items():
            if count > 1 and not duplicates:  # otherwise already explained by the names
                errors.append(f"duplicate match {key!r} ({count} times)")
        errors += self._validate_env()
        errors += self._validate_defenders(out)
        errors += self._validate_attackers()
        return errors

    def check(self, out: str | os.PathLike | None = None) -> None:
        """Raise :class:`ConfigError` listing every problem, if there is any."""
        errors = self.validate(out)
        if errors:
            raise ConfigError(errors)

    def _validate_env(self) -> list[str]:
        from envs import list_envs
        if self.env is None:
            return []
        if self.env not in list_envs():
            return [f"unknown env {self.env!r}; allowed: {', '.join(list_envs())}"]
        return _try_env(self.env, self.env_kwargs or {}, "env")

    def _validate_defenders(self, out: str | os.PathLike | None) -> list[str]:
        from envs import list_envs
        errors: list[str] = []
        for d in self.defenders:
            if d.checkpoint is not None:
                errors += _check_checkpoint(d)
                if self.env is None:
                    try:
                        from agents.checkpoint import read_run_config
                        run_env = read_run_config(d.checkpoint).get("env")
                    except Exception as exc:
                        errors.append(f"defender {d.name}: {_first_line(exc)}")
                        continue
                    if run_env is not None and run_env not in list_envs():
                        errors.append(f"defender {d.name}: unknown env {run_env!r} in its "
                                      f"run.json; allowed: {', '.join(list_envs())}")
            elif d.train is not None:
                errors += _check_train_spec(d, out)
        return errors

    def _validate_attackers(self) -> list[str]:
        from attacks import list_attacks, make_attack
        errors: list[str] = []
        dummy = _dummy_policy()
        for a in self.attackers:
            if a.adversary is not None:
                if not Path(a.adversary).exists():
                    errors.append(f"attacker {a.name}: adversary run not found: {a.adversary}")
                    continue
                try:
                    from agents.adversary import read_adversary_config
                except ImportError:
                    errors.append(f"attacker {a.name}: learned adversaries need agents.adversary, "
                                  f"which is not available in this installation")
                    continue
                try:
                    read_adversary_config(a.adversary)
                except Exception as exc:
                    errors.append(f"attacker {a.name}: {_first_line(exc)}")
                continue
            reserved = sorted({"eps", "seed"} & set(a.settings))
            if reserved:
                errors.append(f"attacker {a.name}: setting(s) {', '.join(reserved)} are set by the "
                              f"tournament (eps list and seeds), remove them")
                continue
            try:
                make_attack(a.attack, dummy, eps=self.eps[0] if self.eps else 8 / 255, seed=0,
                            **a.settings)
            except ValueError as exc:
                msg = _first_line(exc)
                if "unknown attack" in msg:
                    msg = f"unknown attack {a.attack!r}; allowed: {', '.join(list_attacks())}"
                errors.append(f"attacker {a.name}: {msg}")
            except TypeError as exc:
                errors.append(f"attacker {a.name}: bad settings: {_first_line(exc)}")
        return errors

    # ------------------------------------------------------------------ matches
    def matches(self) -> list["Match"]:
        """Every match, clean ones first: per defender and seed one clean match, then
        defender x attacker x eps x seed."""
        out: list[Match] = []
        for d in self.defenders:
            for s in self.seeds:
                out.append(Match(d.name, CLEAN, None, s))
        for d in self.defenders:
            for a in self.attackers:
                for e in self.eps:
                    for s in self.seeds:
                        out.append(Match(d.name, a.name, e, s))
        return out

    def audit_eps(self) -> float:
        return self.audit.eps if self.audit.eps is not None else max(self.eps)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings), e.g. for ``DIR/tournament.json``."""
        data = dataclasses.asdict(self)
        data.pop("parse_errors", None)
        return to_jsonable(data)


@dataclass(frozen=True)
class Match:
    """One match; ``eps`` is None for the clean pseudo-attacker."""

    defender: str
    attacker: str
    eps: float | None
    seed: int

    @property
    def key(self) -> str:
        """Stable identity of the match in ``matches.jsonl``."""
        e = "-" if self.eps is None else format(self.eps, ".10g")
        return f"{self.defender}|{self.attacker}|{e}|{self.seed}"


def eps_label(e: float | None) -> str:
    """``8/255`` for multiples of 1/255, else ``0.05``; ``-`` for None (clean)."""
    if e is None:
        return "-"
    k = e * 255
    if abs(k - round(k)) < 1e-6 and round(k) >= 1 and e < 1:
        return f"{int(round(k))}/255"
    return f"{e:g}"


def eps_slug(e: float) -> str:
    """File-name form of a budget: ``eps8_255``, ``eps0.05``."""
    return "eps" + eps_label(e).replace("/", "_")


# --------------------------------------------------------------------------- validation helpers
def _dummy_policy() -> Any:
    """A placeholder policy on the protocol (with ``value`` and ``input_filter``), so that
    attack names and settings are validated without loading any checkpoint."""
    import torch
    from torch import nn

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


def _duplicates(what: str, values: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    return [f"duplicate {what} {v!r} ({n} times)" for v, n in seen.items() if n > 1]


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _try_env(name: str, kwargs: dict[str, Any], where: str) -> list[str]:
    from envs import make_env
    try:
        make_env(name, **kwargs).close()
    except Exception as exc:
        return [f"{where}: cannot build env {name!r}: {_first_line(exc)}"]
    return []


def _check_checkpoint(d: DefenderSpec) -> list[str]:
    from agents.checkpoint import CheckpointError, policy_ids, resolve_module_root
    path = Path(d.checkpoint)
    if not path.exists():
        return [f"defender {d.name}: checkpoint not found: {path}"]
    try:
        ids = policy_ids(resolve_module_root(path))
    except (CheckpointError, OSError) as exc:
        return [f"defender {d.name}: {_first_line(exc)}"]
    if not ids:
        return [f"defender {d.name}: checkpoint holds no policies: {path}"]
    if d.policy_id is not None and d.policy_id not in ids:
        return [f"defender {d.name}: unknown policy_id {d.policy_id!r}; allowed: {', '.join(ids)}"]
    return []


def _check_train_spec(d: DefenderSpec, out: str | os.PathLike | None = None) -> list[str]:
    """A training spec's settings, and, when ``out`` already holds this defender's run, that
    the run was trained with the same settings (a changed spec is never resumed silently on
    top of the old run, and the old run is never deleted)."""
    from agents.train import TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d.train) - names)
    if unknown:
        return [f"defender {d.name}: unknown training setting(s) {', '.join(unknown)}"]
    try:
        cfg = TrainConfig.from_json(d.train)
        cfg.validate()
    except (ValueError, TypeError) as exc:
        return [f"defender {d.name}: bad training spec: {_first_line(exc)}"]
    if out is None:
        return []
    run_file = d.run_dir(Path(out)) / "run.json"
    if not run_file.is_file():
        return []
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"defender {d.name}: cannot read {run_file}: {_first_line(exc)}"]
    wanted = to_jsonable(cfg.to_json())
    changed = sorted(k for k in wanted if k != "iterations"
                     and to_jsonable(saved.get(k)) != wanted[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in changed[:4])
        return [f"defender {d.name}: its training spec changed since {run_file.parent} was "
                f"trained ({diff}); move that run away (it is never deleted) or restore the "
                f"spec"]
    return []


# --------------------------------------------------------------------------- the match log
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
                problem = _record_problem(rec)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                rec, problem = None, f"invalid JSON ({type(exc).__name__}: {_first_line(exc)})"
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


_REQUIRED = ("key", "defender", "attacker", "seed", "team_return", "team_returns", "episodes")


def _record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if rec.get("status", "ok") != "ok":
        return f"status {rec.get('status')!r}"
    return None


# --------------------------------------------------------------------------- work on Ray workers
# Weights travel, paths do not (DESIGN.md section 2): the driver loads every defender and
# learned adversary once (:func:`_load_weights`) and ships them through Ray's object store;
# these functions receive the objects and never open a path of the driver's.
def _defender_env(cfg: "TournamentConfig", d: "DefenderSpec", out: Path
                  ) -> tuple[str, dict[str, Any]]:
    """The defender's env and settings (on the driver): the config's override, else its run's."""
    from agents.checkpoint import run_env
    try:
        return run_env(d.run_dir(out), cfg.env, cfg.env_kwargs)
    except ValueError:
        raise ConfigError([f"defender {d.name}: its checkpoint names no env (no run.json); "
                           f"set env in the config"]) from None


def play_match(spec: dict[str, Any], policy: Any, adversary: Any = None) -> dict[str, Any]:
    """Play one match (the body of a Ray task; also callable directly).

    Args:
        spec: ``key, defender, attacker, kind (clean|analytic|learned), attack, settings, eps,
            seed, episodes, env, env_kwargs, checkpoint`` (:func:`_match_spec`; its
            ``fingerprint`` and ``defender_hash`` are added to the record by the driver).
        policy: the defender (one module, or ``{agent: module}``), shipped by the driver.
        adversary: for ``kind == "learned"``, the adversary attack shipped by the driver
            (rebound here to the defender, ``eps`` and ``seed``).
    Returns:
        The match record (``status`` "ok"); exceptions propagate (the task wrapper reports
        them with the node).
    """
    from attacks import evaluate, make_attack
    from marl_fgmf.protocol import parse_budget
    from envs import make_env
    env = make_env(spec["env"], **spec["env_kwargs"])
    try:
        first = policy if not isinstance(policy, dict) else next(iter(policy.values()))
        attack = None
        if spec["kind"] == "analytic":
            attack = make_attack(spec["attack"], first, eps=spec["eps"], seed=spec["seed"],
                                 **spec.get("settings", {}))
        elif spec["kind"] == "learned":
            attack = adversary.with_policy(first)
            attack.eps = parse_budget(spec["eps"])
            attack.set_seed(spec["seed"])
        t_eval = time.perf_counter()
        result = evaluate(policy, env, attack, episodes=spec["episodes"], seed=spec["seed"],
                          progress=False, compare_clean=False)
    finally:
        env.close()
    record = {
        "version": RECORD_VERSION, "status": "ok", "key": spec["key"],
        "defender": spec["defender"], "attacker": spec["attacker"], "kind": spec["kind"],
        "attack": spec.get("attack"), "eps": spec["eps"], "eps_label": eps_label(spec["eps"]),
        "seed": spec["seed"], "episodes": spec["episodes"], "env": spec["env"],
        "env_kwargs": spec["env_kwargs"], "checkpoint": spec["checkpoint"],
        "team_return": result["team_return"], "team_returns": result["team_returns"],
        "agent_return": result["agent_return"], "success_rate": result["success_rate"],
        "mean_linf": result["mean_linf"], "mean_l2": result["mean_l2"],
        "agent_steps": result["agent_steps"], "attack_settings": result.get("attack"),
        "eval_s": time.perf_counter() - t_eval,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if attack is not None and getattr(attack, "eps", None) is not None:
        record["eps_actual"] = float(attack.eps)
    return record


def audit_defender(spec: dict[str, Any], policy: Any) -> dict[str, Any]:
    """Audit one defender (the body of a Ray task): :func:`marl_fgmf.audit.audit_policies`
    on observations from the defender's env, every policy module of it."""
    from marl_fgmf.audit import audit_policies
    a = dict(spec["audit"])
    kwargs = {k: v for k, v in a.items() if k not in ("n_obs", "episodes", "eps", "enabled", "seed")}
    for k in ("steps", "restarts"):
        kwargs[k] = tuple(kwargs[k])
    reports = audit_policies(policy, env=spec["env"], env_kwargs=spec["env_kwargs"],
                             policy_id=spec.get("policy_id"), eps=a["eps"], n_obs=a["n_obs"],
                             episodes=a["episodes"], seed=a["seed"], **kwargs)
    return {"status": "ok", "defender": spec["defender"], "env": spec["env"],
            "checkpoint": spec["checkpoint"], "audit_settings": a,
            "flagged": any(r.flagged for r in reports.values()),
            "policies": {pid: r.to_dict() for pid, r in reports.items()}}


# --------------------------------------------------------------------------- the driver
@dataclass
class TournamentResult:
    """What :func:`run_tournament` did and wrote.

    ``reused`` matches had a record with the current fingerprint, ``replayed`` ones a record
    with another fingerprint or none (moved to ``matches.stale.jsonl``), ``new`` ones no record;
    ``played`` = replayed + new, ``skipped`` = reused.
    """

    out: Path
    leaderboard: dict[str, Any]
    played: int
    skipped: int
    warnings: list[str]
    files: dict[str, Path]
    seconds: float
    reused: int
    replayed: int
    new: int


def _fingerprint(fields: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``fields`` and :data:`RECORD_VERSION`."""
    data = to_jsonable({"version": RECORD_VERSION, **fields})
    return hashlib.sha256(json.dumps(data, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _weights_hash(modules: Any, extra: Any = None) -> str:
    """sha256 (hex) of what a policy computes with: one module or ``{name: module}``. Per name
    (sorted), each distinct module once: its class qualname and every ``state_dict`` entry
    (name, dtype, shape, bytes); a name sharing an earlier module records that instead.
    ``extra`` (plain data, e.g. an attack's settings) is hashed after the modules."""
    import torch
    named = sorted(modules.items()) if isinstance(modules, dict) else [("", modules)]
    h = hashlib.sha256()
    seen: dict[int, str] = {}
    for name, module in named:
        h.update(f"module {name!r}\n".encode())
        if id(module) in seen:
            h.update(f"same as {seen[id(module)]!r}\n".encode())
            continue
        seen[id(module)] = name
        h.update(f"class {type(module).__qualname__}\n".encode())
        for key, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode())
            try:
                h.update(t.numpy().tobytes())
            except TypeError:  # a dtype numpy lacks (bfloat16): hash its raw bytes
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if extra is not None:
        h.update(json.dumps(to_jsonable(extra), sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class _Shipped:
    """What the driver loaded and put in Ray's object store, by defender / attacker name, and
    the content hashes of those weights (:func:`_weights_hash`)."""

    policies: dict[str, Any]
    adversaries: dict[str, Any]
    envs: dict[str, tuple[str, dict[str, Any]]]
    defender_hash: dict[str, str] = field(default_factory=dict)
    adversary_hash: dict[str, str] = field(default_factory=dict)


def _match_spec(cfg: TournamentConfig, m: Match, out: Path, shipped: _Shipped
                ) -> dict[str, Any]:
    """The task spec of a match (see :func:`play_match`), with its ``defender_hash`` and its
    ``fingerprint``: the hash of everything that decides its result (module docstring)."""
    d = next(x for x in cfg.defenders if x.name == m.defender)
    env_name, env_kwargs = shipped.envs[d.name]
    spec: dict[str, Any] = {
        "key": m.key, "defender": m.defender, "attacker": m.attacker, "eps": m.eps,
        "seed": m.seed, "episodes": cfg.episodes, "checkpoint": str(d.run_dir(out)),
        "env": env_name, "env_kwargs": env_kwargs, "kind": "clean",
        "defender_hash": shipped.defender_hash[d.name],
    }
    if m.attacker != CLEAN:
        a = next(x for x in cfg.attackers if x.name == m.attacker)
        spec.update(kind=a.kind, attack=a.attack, settings=dict(a.settings),
                    adversary=None if a.adversary is None else str(a.adversary))
    spec["fingerprint"] = _fingerprint({
        "defender_hash": spec["defender_hash"], "policy_id": d.policy_id, "env": env_name,
        "env_kwargs": env_kwargs, "episodes": cfg.episodes, "seed": m.seed, "eps": m.eps,
        "kind": spec["kind"], "attack": spec.get("attack"),
        "settings": spec.get("settings") if spec["kind"] == "analytic" else None,
        "adversary_hash": shipped.adversary_hash.get(m.attacker)
        if spec["kind"] == "learned" else None})
    return spec


def _load_weights(cfg: TournamentConfig, out: Path, log: Callable[[str], None]) -> _Shipped:
    """Load every defender and learned adversary ONCE on the driver, check it against its
    env, hash its weights (:func:`_weights_hash`) and ship it through Ray's object store
    (workers never read these paths)."""
    from agents.adversary import load_adversary
    from agents.checkpoint import check_policy_fits_env, load_agent_policies
    from agents.ray_session import ship
    from envs import make_env
    shipped = _Shipped({}, {}, {})
    for d in cfg.defenders:
        env_name, env_kwargs = _defender_env(cfg, d, out)
        env = make_env(env_name, **env_kwargs)
        try:
            agents = list(env.possible_agents)
            policy = load_agent_policies(str(d.run_dir(out)), agents, d.policy_id,
                                         device="cpu", single_if_shared=True)
            for agent in agents:
                check_policy_fits_env(policy[agent] if isinstance(policy, dict) else policy,
                                      env, agent)
        except ValueError as exc:
            raise ConfigError([f"defender {d.name}: {_first_line(exc)}"]) from None
        finally:
            env.close()
        shipped.envs[d.name] = (env_name, env_kwargs)
        shipped.defender_hash[d.name] = _weights_hash(policy)
        shipped.policies[d.name] = ship(policy)
    for a in cfg.attackers:
        if a.adversary is not None:
            adversary = load_adversary(str(a.adversary), device="cpu")
            log_std = None if adversary.log_std is None else adversary.log_std.tolist()
            shipped.adversary_hash[a.name] = _weights_hash(
                {"adversary": adversary.adversary},
                extra={"settings": adversary.settings(), "log_std": log_std})
            shipped.adversaries[a.name] = ship(adversary)
    log(f"loaded {len(shipped.policies)} defender(s) and {len(shipped.adversaries)} learned "
        f"adversary(ies) on the driver; their weights travel through Ray's object store")
    return shipped


def _audit_settings(cfg: TournamentConfig) -> dict[str, Any]:
    a = dataclasses.asdict(cfg.audit)
    a["eps"] = cfg.audit_eps()
    return a


def _audit_spec(cfg: TournamentConfig, d: DefenderSpec, out: Path, shipped: _Shipped
                ) -> dict[str, Any]:
    """The task spec of a defender's audit (see :func:`audit_defender`), with its
    ``defender_hash`` and its ``fingerprint`` (weights, env, env settings, ``policy_id``,
    audit settings). ``checkpoint`` (the latest checkpoint's path) is for humans only."""
    from agents.checkpoint import latest_checkpoint
    env_name, env_kwargs = shipped.envs[d.name]
    settings = _audit_settings(cfg)
    decisive = {k: v for k, v in settings.items() if k != "enabled"}
    ckpt = latest_checkpoint(d.run_dir(out))
    spec = {"defender": d.name, "policy_id": d.policy_id, "env": env_name,
            "env_kwargs": env_kwargs, "audit": settings,
            "checkpoint": str(ckpt if ckpt is not None else Path(d.run_dir(out)).resolve()),
            "defender_hash": shipped.defender_hash[d.name]}
    spec["fingerprint"] = _fingerprint({
        "audit": decisive, "defender_hash": spec["defender_hash"], "policy_id": d.policy_id,
        "env": env_name, "env_kwargs": env_kwargs})
    return spec


def _audit_is_current(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` holds a finished audit with this fingerprint."""
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(data, dict) and data.get("status") == "ok"
            and data.get("fingerprint") == fingerprint)


def _train_defenders(cfg: TournamentConfig, out: Path, address: str | None, progress: bool,
                     log: Callable[[str], None]) -> None:
    from agents.checkpoint import latest_checkpoint
    from agents.train import TrainConfig, train
    for d in cfg.defenders:
        if d.train is None:
            continue
        run_dir = d.run_dir(out)
        tcfg = TrainConfig.from_json(d.train)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None and int(ckpt.name.split("_")[-1]) >= tcfg.iterations:
            log(f"defender {d.name}: trained run found in {run_dir}, reused")
            continue
        resume = (run_dir / "run.json").is_file()
        log(f"defender {d.name}: {'resuming' if resume else 'training'} {tcfg.defense} "
            f"on {tcfg.env} for {tcfg.iterations} iterations into {run_dir}")
        # Ray already runs (the tournament's session): the learner and checkpoints stay on
        # the driver, env runners may go to any node
        train(tcfg, run_dir, resume=resume, address=None, progress=progress)


def run_tournament(config: TournamentConfig, out: str | os.PathLike, *,
                   address: str | None = None, workers: int | None = None,
                   progress: bool = True, audit: bool | None = None,
                   log: Callable[[str], None] | None = None,
                   runtime_env: dict[str, Any] | None = None,
                   max_node_failures: int = 3,
                   _fail_after: int | None = None) -> TournamentResult:
    """Play every match without a current record in ``DIR/matches.jsonl`` (one with the
    match's fingerprint; see the module docstring), audit, and write the leaderboard.

    Args:
        config: the tournament (validated here first; nothing runs if it is invalid).
        out: the tournament directory ``DIR``.
        address: Ray cluster address (default: ``config.address``, else a local Ray);
            checked before anything is written.
        workers: matches in flight at once (default: ``config.max_concurrency``, else the
            cluster's CPUs divided by ``num_cpus_per_match``).
        progress: show a progress bar over the matches.
        audit: run the audit (default: ``config.audit.enabled``).
        log: where status lines go (default: print).
        runtime_env: Ray ``runtime_env`` (code for nodes that lack the package).
        max_node_failures: a node whose last this-many tasks failed with the same cause gets
            no more work while another node is healthy (its failed tasks are retried there).
        _fail_after: test hook: raise ``RuntimeError`` after writing this many matches in
            this run (simulates a crash with matches in flight).

    Returns:
        A :class:`TournamentResult` (leaderboard dict, counts of reused, replayed and new
        matches, warnings, written files).

    Raises:
        ConfigError: invalid configuration (every problem, one line each).
        TournamentError: some matches or audits failed (the others are written, and the
            leaderboard is written from what finished).
        ValueError: an unreachable or unsupported Ray address.
    """
    t0 = time.perf_counter()
    log = log or print
    out = Path(os.path.abspath(out))
    config.check(out)
    from agents.ray_session import check_address, cluster_summary, ensure_ray
    address = check_address(address or config.address)
    run_audit = config.audit.enabled if audit is None else bool(audit)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log(f"warning: {msg}")

    import ray

    started = ensure_ray(address, runtime_env=runtime_env, log=log)  # before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
        with DirLock(out, ".tournament.lock", "another tournament is running"):
            atomic_write_text(out / "tournament.json", json.dumps(config.to_dict(), indent=2))
            _train_defenders(config, out, address, progress, log)
            shipped = _load_weights(config, out, log)
            specs = {m.key: _match_spec(config, m, out, shipped) for m in config.matches()}
            match_log = MatchLog(out / "matches.jsonl")
            finished = match_log.load(warn)
            reused = {k for k, spec in specs.items()
                      if k in finished and finished[k].get("fingerprint") == spec["fingerprint"]}
            stale = {k for k in specs if k in finished and k not in reused}
            match_log.set_aside(stale)  # before anything is appended: one record per match
            pending = [spec for k, spec in specs.items() if k not in reused]
            if reused:
                log(f"resuming: {len(reused)} of {len(specs)} matches already finished")
            log(f"{len(reused)} reused, {len(stale)} replayed (settings changed), "
                f"{len(pending) - len(stale)} new" + (
                    f"; the replaced records are in {match_log.path.stem}.stale.jsonl"
                    if stale else ""))
            audit_specs = {d.name: _audit_spec(config, d, out, shipped) for d in config.defenders}
            audit_jobs = [spec for name, spec in audit_specs.items() if run_audit and not
                          _audit_is_current(out / f"audit_{name}.json", spec["fingerprint"])]
            try:
                errors = _play(config, out, pending, audit_jobs, shipped, match_log, workers,
                               progress, _fail_after, log, max_node_failures)
            finally:
                match_log.close()
            nodes = cluster_summary()["nodes"]
            # only this config's matches with the current fingerprint are shown (others stay
            # in the log untouched)
            records = {k: r for k, r in MatchLog(out / "matches.jsonl").load(warn).items()
                       if k in specs and r.get("fingerprint") == specs[k]["fingerprint"]}
            audits = _read_audits(config, out, audit_specs, warn)
            leaderboard = build_leaderboard(config, records, audits)
            leaderboard["nodes"] = _node_table(records, audits, nodes)
            files = write_outputs(config, out, leaderboard, records, audits, warn)
    finally:
        if started:
            ray.shutdown()
    if errors:
        raise TournamentError(errors)
    return TournamentResult(out=out, leaderboard=leaderboard, played=len(pending),
                            skipped=len(reused), warnings=warnings, files=files,
                            seconds=time.perf_counter() - t0, reused=len(reused),
                            replayed=len(stale), new=len(pending) - len(stale))


def _node_table(records: dict[str, dict[str, Any]], audits: dict[str, dict[str, Any]],
                nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Ray node that ran a match or audit of this tournament: its id, address, CPUs and
    how many matches and audits it ran (records from earlier runs included)."""
    known = {n["node_id"]: n for n in nodes}
    table: dict[str, dict[str, Any]] = {}
    for kind, items in (("matches", records.values()), ("audits", audits.values())):
        for rec in items:
            nid = rec.get("node_id") or "unknown"
            row = table.setdefault(nid, {"node_id": nid, "ip": rec.get("node_ip"),
                                         "host": rec.get("host"), "matches": 0, "audits": 0,
                                         "cpus": known.get(nid, {}).get("cpus")})
            row[kind] += 1
    return sorted(table.values(), key=lambda r: (-r["matches"], r["node_id"]))


def _play(cfg: TournamentConfig, out: Path, specs: list[dict[str, Any]],
          audit_jobs: list[dict[str, Any]], shipped: _Shipped, match_log: MatchLog,
          workers: int | None, progress: bool, fail_after: int | None,
          log: Callable[[str], None], max_node_failures: int) -> list[str]:
    """Submit the matches (:func:`_match_spec`) and audits (:func:`_audit_spec`) as Ray tasks
    (:func:`agents.ray_session.run_jobs`); append each finished match to the log as it arrives,
    stamped with its spec's ``fingerprint`` and ``defender_hash``. Returns the failures, one
    line each."""
    from agents.ray_session import Job, run_jobs
    # longest first (audits, then by estimated cost): the short matches fill the gaps at the
    # end, which keeps the last worker from finishing long after the others
    jobs = [Job(audit_defender, a, (shipped.policies[a["defender"]],),
                title=f"audit of {a['defender']}", tag="audit") for a in audit_jobs]
    for spec in sorted(specs, key=_cost_estimate, reverse=True):
        objs = (shipped.policies[spec["defender"]],)
        if spec["kind"] == "learned":
            objs += (shipped.adversaries[spec["attacker"]],)
        jobs.append(Job(play_match, spec, objs, title=_match_title(spec), tag="match"))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="tournament", unit="match")
    written = 0

    def on_result(job: Job, result: dict[str, Any]) -> None:
        nonlocal written
        node = result.get("node") or {}
        record = {**result["value"], "node_id": node.get("node_id"), "node_ip": node.get("ip"),
                  "host": node.get("host"), "pid": node.get("pid"), "wall_s": result["wall_s"],
                  "fingerprint": job.spec["fingerprint"],
                  "defender_hash": job.spec["defender_hash"]}
        if job.tag == "match":
            match_log.append(record)
            written += 1
        else:
            atomic_write_text(out / f"audit_{job.spec['defender']}.json",
                              json.dumps(to_jsonable(record), indent=2))
        if fail_after is not None and written >= fail_after:
            raise RuntimeError(f"test hook: stopping after {written} matches")

    def on_done(job: Job, result: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix_str(job.title[:40])
            bar.update(1)

    try:
        return run_jobs(jobs, num_cpus=cfg.num_cpus_per_match,
                        limit=workers or cfg.max_concurrency, on_result=on_result,
                        on_done=on_done, log=log, max_node_failures=max_node_failures)
    finally:
        if bar is not None:
            bar.close()


def _cost_estimate(spec: dict[str, Any]) -> float:
    """Relative cost of a match: forward/backward passes per attacked step (a scheduling
    heuristic only). Square: its query budget; PGD/APGD: steps x restarts (x EOT samples)."""
    if spec["kind"] == "clean":
        return 0.5
    if spec["kind"] == "learned":
        return 2.0
    settings = spec.get("settings") or {}
    name = str(spec.get("attack", "")).lower()
    defaults = {"square": ("n_queries", 5000), "apgd": ("steps", 100), "pgd": ("steps", 10)}
    cost = 1.0
    for key, (setting, default) in defaults.items():
        if key in name:
            cost = float(settings.get(setting, default))
    cost *= float(settings.get("restarts", 1)) * float(settings.get("samples", 1))
    return cost


def _match_title(spec: dict[str, Any]) -> str:
    if spec["attacker"] == CLEAN:
        return f"{spec['defender']} clean s{spec['seed']}"
    return f"{spec['defender']} vs {spec['attacker']} @{eps_label(spec['eps'])} s{spec['seed']}"


def _read_audits(cfg: TournamentConfig, out: Path, audit_specs: dict[str, dict[str, Any]],
                 warn: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The finished audits of the config's defenders whose fingerprint is the current one
    (``audit_specs``: :func:`_audit_spec` by defender); another audit is reported, not shown."""
    audits = {}
    for d in cfg.defenders:
        path = out / f"audit_{d.name}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            warn(f"cannot read {path.name}: {_first_line(exc)}")
            continue
        if not isinstance(data, dict) or data.get("status") != "ok":
            continue
        if data.get("fingerprint") != audit_specs[d.name]["fingerprint"]:
            warn(f"{path.name} audited other weights or settings than defender {d.name} has "
                 f"now; not shown (run the audit to replace it)")
            continue
        audits[d.name] = data
    return audits


# --------------------------------------------------------------------------- the leaderboard
def _pool(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the episodes of several seeds: mean and 95% CI of the team return, mean success."""
    from marl_fgmf.stats import summarize as mean_ci95
    returns = [r for rec in records for r in rec["team_returns"]]
    stats = mean_ci95(returns)
    steps = sum(int(rec.get("agent_steps", 0)) for rec in records)
    success = (sum(rec.get("success_rate", 0.0) * int(rec.get("agent_steps", 0)) for rec in records)
               / steps) if steps else 0.0
    linf = (sum(rec.get("mean_linf", 0.0) * int(rec.get("agent_steps", 0)) for rec in records)
            / steps) if steps else 0.0
    return {"mean": stats["mean"], "ci95": stats["ci95"], "n_episodes": stats["n"],
            "seeds": len(records), "success_rate": success, "mean_linf": linf,
            "wall_s": sum(float(rec.get("wall_s", 0.0)) for rec in records)}


def build_leaderboard(cfg: TournamentConfig, records: dict[str, dict[str, Any]],
                      audits: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The leaderboard from finished match records (and audits).

    Per defender: the clean return, every cell (attacker x eps, episodes pooled over seeds),
    and per eps the robust return = the minimum over attackers of the mean team return, with
    the attacker achieving it. Defenders are ranked by the robust return at the LARGEST eps
    (the hardest budget), ties broken by the mean robust return over all eps, then the clean
    return. A defender missing a match at some eps has no robust return there (``None``) and
    ranks last; ``complete`` says whether every match has finished.
    """
    audits = audits or {}
    eps_sorted = sorted(cfg.eps)
    rows = []
    total = found = 0
    for d in cfg.defenders:
        clean_recs = [records[m.key] for m in (Match(d.name, CLEAN, None, s) for s in cfg.seeds)
                      if m.key in records]
        total += len(cfg.seeds)
        found += len(clean_recs)
        clean = _pool(clean_recs) if clean_recs else None
        cells: dict[str, dict[str, Any]] = {}
        robust: dict[str, Any] = {}
        for e in eps_sorted:
            lab = eps_label(e)
            cells[lab] = {}
            complete = True
            for a in cfg.attackers:
                recs = [records[m.key] for m in (Match(d.name, a.name, e, s) for s in cfg.seeds)
                        if m.key in records]
                total += len(cfg.seeds)
                found += len(recs)
                if len(recs) < len(cfg.seeds):
                    complete = False
                cells[lab][a.name] = _pool(recs) if recs else None
            present = {k: v for k, v in cells[lab].items() if v is not None}
            if present and complete:
                worst = min(present, key=lambda k: present[k]["mean"])
                robust[lab] = {"mean": present[worst]["mean"], "ci95": present[worst]["ci95"],
                               "worst_attacker": worst,
                               "success_rate": present[worst]["success_rate"]}
            else:
                robust[lab] = None
        a = audits.get(d.name)
        failed = []
        if a is not None:
            for pid, rep in a.get("policies", {}).items():
                failed += [c["name"] + ("" if len(a["policies"]) == 1 else f"({pid})")
                           for c in rep.get("checks", []) if not c.get("passed", True)]
        rows.append({"defender": d.name, "clean": clean, "robust": robust, "cells": cells,
                     "audited": a is not None, "flagged": bool(a and a.get("flagged")),
                     "audit_failed": failed,
                     "checkpoint": str(d.checkpoint) if d.checkpoint else f"defenders/{d.name}"})

    def sort_key(row: dict[str, Any]) -> tuple:
        vals = [row["robust"][eps_label(e)] for e in eps_sorted]
        last = vals[-1]["mean"] if vals and vals[-1] is not None else -math.inf
        means = [v["mean"] for v in vals if v is not None]
        avg = sum(means) / len(means) if len(means) == len(vals) and means else -math.inf
        clean_mean = row["clean"]["mean"] if row["clean"] else -math.inf
        return (-last, -avg, -clean_mean, row["defender"])

    rows.sort(key=sort_key)
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
    return {"name": cfg.name, "eps": [eps_label(e) for e in eps_sorted],
            "eps_values": eps_sorted, "attackers": [a.name for a in cfg.attackers],
            "seeds": list(cfg.seeds), "episodes": cfg.episodes,
            "ranked_by": f"robust return at eps {eps_label(eps_sorted[-1])} (min over attackers "
                         f"of the mean team return), then mean robust return over eps, then clean",
            "complete": found == total, "matches_finished": found, "matches_total": total,
            "defenders": rows}


def _fmt(v: dict[str, Any] | None, ci: bool = True) -> str:
    if v is None or v.get("mean") is None or v["mean"] != v["mean"]:
        return "-"
    if ci:
        return f"{v['mean']:.2f}" + ("" if v.get("ci95") is None or v["ci95"] != v["ci95"] else f" ± {v['ci95']:.2f}")  # no CI from one episode
    return f"{v['mean']:.2f}"


def format_leaderboard(board: dict[str, Any], markdown: bool = False) -> str:
    """The leaderboard as a text table (or a Markdown table): rank, defender, clean return,
    robust return per eps (with the worst attacker), audit verdict."""
    head = ["rank", "defender", "clean"] + [f"robust@{e}" for e in board["eps"]] + \
           ["worst attacker", "audit"]
    rows = []
    for r in board["defenders"]:
        worst = ", ".join(f"{e}: {r['robust'][e]['worst_attacker']}" for e in board["eps"]
                          if r["robust"][e] is not None) or "-"
        verdict = ("FLAGGED (" + ", ".join(r["audit_failed"]) + ")") if r["flagged"] else \
            ("ok" if r["audited"] else "not audited")
        rows.append([str(r["rank"]), r["defender"], _fmt(r["clean"])] +
                    [_fmt(r["robust"][e]) for e in board["eps"]] + [worst, verdict])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    if not board["complete"]:
        lines.append(f"(incomplete: {board['matches_finished']} of {board['matches_total']} "
                     f"matches finished)")
    return "\n".join(lines)


def _heat_matrix(board: dict[str, Any], eps: str) -> tuple[list[list[float]], list[str], list[str]]:
    cols = [CLEAN] + board["attackers"]
    names, matrix = [], []
    for r in board["defenders"]:
        flag = " (FLAGGED)" if r["flagged"] else ""
        names.append(r["defender"] + flag)
        row = [r["clean"]["mean"] if r["clean"] else float("nan")]
        for a in board["attackers"]:
            c = r["cells"][eps].get(a)
            row.append(c["mean"] if c else float("nan"))
        matrix.append(row)
    return matrix, names, cols


def write_outputs(cfg: TournamentConfig, out: Path, board: dict[str, Any],
                  records: dict[str, dict[str, Any]], audits: dict[str, dict[str, Any]],
                  warn: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write ``leaderboard.json/.md``, the heat maps, the curves and ``report.md`` (atomically).
    A figure that fails is reported through ``warn`` and skipped; the tables are always written."""
    warn = warn or (lambda m: None)
    out = Path(out)
    files: dict[str, Path] = {}
    atomic_write_text(out / "leaderboard.json", json.dumps(to_jsonable(board), indent=2))
    files["leaderboard.json"] = out / "leaderboard.json"
    for e, lab in zip(board["eps_values"], board["eps"]):
        path = out / f"heatmap_{eps_slug(e)}.png"
        matrix, rows, cols = _heat_matrix(board, lab)
        try:
            _plot_heatmap(matrix, rows, cols, path,
                          f"mean team return, eps {lab} (clean column: no attack)")
            files[path.name] = path
        except Exception as exc:  # a figure must never lose the tables
            warn(f"heat map {path.name} not written: {type(exc).__name__}: {_first_line(exc)}")
    curves = {}
    for r in board["defenders"]:
        xs, ys, errs = [], [], []
        for e, lab in zip(board["eps_values"], board["eps"]):
            if r["robust"][lab] is not None:
                xs.append(e)
                ys.append(r["robust"][lab]["mean"])
                errs.append(r["robust"][lab]["ci95"])
        if xs:
            curves[r["defender"] + (" (FLAGGED)" if r["flagged"] else "")] = (xs, ys, errs)
    if curves:
        path = out / "robust_vs_eps.png"
        try:
            in_255 = all(eps_label(e).endswith("/255") for e in board["eps_values"])
            _plot_curves(curves, path, in_255)
            files[path.name] = path
        except Exception as exc:
            warn(f"curves {path.name} not written: {type(exc).__name__}: {_first_line(exc)}")
    md = _leaderboard_markdown(board)
    atomic_write_text(out / "leaderboard.md", md)
    files["leaderboard.md"] = out / "leaderboard.md"
    atomic_write_text(out / "report.md", _report_markdown(cfg, board, records, audits, files))
    files["report.md"] = out / "report.md"
    return files


def _leaderboard_markdown(board: dict[str, Any]) -> str:
    lines = [f"# Leaderboard: {board['name']}", "",
             f"Ranked by {board['ranked_by']}. Returns are mean team returns ± 95% CI over "
             f"{board['episodes']} episodes x {len(board['seeds'])} seed(s). FLAGGED defenders "
             f"failed the gradient-masking audit: their robust return is not trustworthy. Read "
             f"the robust return beside the clean one: a policy that scores little without an "
             f"attack has little for an attacker to take away.", "",
             format_leaderboard(board, markdown=True), ""]
    if not board["complete"]:
        lines += [f"**Incomplete**: {board['matches_finished']} of {board['matches_total']} "
                  f"matches finished.", ""]
    lines += _cell_tables(board)
    return "\n".join(lines)


def _cell_tables(board: dict[str, Any]) -> list[str]:
    """One Markdown table per eps: defenders x (clean + attackers), return and success."""
    lines: list[str] = []
    for lab in board["eps"]:
        lines += [f"## eps {lab}: team return per attacker", "",
                  "| defender | clean | " + " | ".join(board["attackers"]) + " |",
                  "|---|---|" + "---|" * len(board["attackers"])]
        for r in board["defenders"]:
            cells = [_fmt(r["cells"][lab].get(a)) + (
                f" ({100 * r['cells'][lab][a]['success_rate']:.0f}%)" if r["cells"][lab].get(a)
                else "") for a in board["attackers"]]
            lines.append(f"| {r['defender']} | {_fmt(r['clean'])} | " + " | ".join(cells) + " |")
        lines += ["", "(percent: attack success, the fraction of agent-steps whose greedy "
                      "action the attack changed)", ""]
    return lines


def _report_markdown(cfg: TournamentConfig, board: dict[str, Any],
                     records: dict[str, dict[str, Any]], audits: dict[str, dict[str, Any]],
                     files: dict[str, Path]) -> str:
    from marl_fgmf.audit import AuditReport
    lines = [f"# Tournament report: {cfg.name}", "",
             f"{len(cfg.defenders)} defenders x {len(cfg.attackers)} attackers x "
             f"{len(cfg.eps)} eps x {len(cfg.seeds)} seed(s), {cfg.episodes} episodes per match; "
             f"{board['matches_finished']} of {board['matches_total']} matches finished. "
             f"Attack success = fraction of agent-steps whose perturbed greedy action differs "
             f"from the clean one. Robust return = minimum over the attackers of the mean team "
             f"return (DESIGN.md section 3).", "",
             "## Leaderboard", "", format_leaderboard(board, markdown=True), ""]
    flagged = [r["defender"] for r in board["defenders"] if r["flagged"]]
    if flagged:
        lines += [f"**FLAGGED** by the gradient-masking audit: {', '.join(flagged)}. Their "
                  f"robust returns may come from hidden gradients, not robustness; see the audit "
                  f"below and evaluate them with adaptive attacks.", ""]
    if "robust_vs_eps.png" in files:
        lines += ["## Robust return against eps", "", "![robust return vs eps](robust_vs_eps.png)", ""]
    lines += ["## Heat maps (defenders x attackers)", ""]
    for e, lab in zip(board["eps_values"], board["eps"]):
        name = f"heatmap_{eps_slug(e)}.png"
        if name in files:
            lines += [f"eps {lab}:", "", f"![heat map eps {lab}]({name})", ""]
    lines += _cell_tables(board)
    lines += ["## Gradient-masking audit", ""]
    if not audits:
        lines += ["No audit was run.", ""]
    for d in cfg.defenders:
        a = audits.get(d.name)
        if a is None:
            lines += [f"### {d.name}", "", "not audited", ""]
            continue
        for pid, rep in a["policies"].items():
            title = d.name if len(a["policies"]) == 1 else f"{d.name} / {pid}"
            lines += [AuditReport.from_dict(rep).to_markdown(title=title)]
    lines += _nodes_markdown(board)
    lines += ["## Matches", "", "| defender | attacker | eps | seed | team return | success | "
              "mean Linf | wall s | node |", "|---|---|---|---|---|---|---|---|---|"]
    for m in cfg.matches():
        r = records.get(m.key)
        if r is None:
            lines.append(f"| {m.defender} | {m.attacker} | {eps_label(m.eps)} | {m.seed} | "
                         f"not finished | | | | |")
            continue
        lines.append(f"| {m.defender} | {m.attacker} | {eps_label(m.eps)} | {m.seed} | "
                     f"{_fmt(r['team_return'])} | {r.get('success_rate', 0):.3f} | "
                     f"{r.get('mean_linf', 0):.4f} | {r.get('wall_s', 0):.1f} | "
                     f"{(r.get('node_id') or '-')[:8]} |")
    lines += ["", "Files: `matches.jsonl` (one line per match), `leaderboard.json`, "
                  "`leaderboard.md`, `audit_<defender>.json`.", ""]
    return "\n".join(lines)


def _nodes_markdown(board: dict[str, Any]) -> list[str]:
    nodes = board.get("nodes") or []
    if not nodes:
        return []
    lines = ["## Ray nodes", "", f"{len(nodes)} node(s) ran this tournament's matches and "
             f"audits (the node id in `matches.jsonl` and `audit_<defender>.json`):", "",
             "| node id | address | CPUs | matches | audits |", "|---|---|---|---|---|"]
    for n in nodes:
        cpus = "-" if n.get("cpus") is None else f"{n['cpus']:g}"
        lines.append(f"| {n['node_id']} | {n.get('ip') or n.get('host') or '-'} | {cpus} | "
                     f"{n['matches']} | {n['audits']} |")
    return lines + [""]


def _plot_heatmap(matrix: list[list[float]], rows: list[str], cols: list[str], path: Path,
                  title: str) -> None:
    from marl_fgmf.viz import plot_heatmap
    plot_heatmap(matrix, rows, cols, path, title, cbar_label="mean team return",
                 xlabel="attacker", ylabel="defender")


def _plot_curves(curves: dict[str, tuple], path: Path, in_255: bool) -> None:
    from marl_fgmf.viz import plot_curves
    plot_curves(curves, path, xlabel="eps (Linf, [0, 1] units)",
                ylabel="robust return (min over attackers)",
                title="robust team return against the budget", eps_in_255=in_255)
