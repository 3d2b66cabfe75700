"""The tournament configuration: the schema (defenders, attackers, eps, seeds, audit), its
parsing from YAML/JSON with every structural problem kept, and the list of matches.

The checks that read checkpoints, envs and attacks are in :mod:`marl_fgmf.tournament.checks`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from marl_fgmf.io import to_jsonable
from marl_fgmf.protocol import eps_label, eps_slug, parse_budget
from marl_fgmf.tournament.checks import check_attackers, check_defenders, check_env, duplicates
from marl_fgmf.tournament.errors import ConfigError

__all__ = ["CLEAN", "NAME_RE", "AttackerSpec", "AuditSpec", "DefenderSpec", "Match",
           "TournamentConfig", "eps_label", "eps_slug"]


CLEAN = "clean"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
TOP_KEYS = {"name", "env", "env_kwargs", "episodes", "seeds", "eps", "defenders", "attackers",
            "audit", "num_cpus_per_match", "max_concurrency", "address"}
ATTACKER_KEYS = {"name", "attack", "settings", "adversary", "external", "norm"}
AUDIT_KEYS = {"enabled", "eps", "n_obs", "steps", "restarts", "large_eps", "n_queries",
              "objective", "margin", "alpha", "seed", "episodes"}


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
    attackers: list["AttackerSpec"] = field(default_factory=list)
    """attackers of this defender only (e.g. a learned adversary trained against it), played
    after the config's; a name may repeat across defenders (one column of the leaderboard)"""

    def run_dir(self, out: Path) -> Path:
        """Where the defender's checkpoint lives (for a training spec, inside ``out``)."""
        return Path(self.checkpoint) if self.checkpoint is not None else Path(out) / "defenders" / self.name


@dataclass
class AttackerSpec:
    """An attacker: an analytic attack of :mod:`attacks`, a learned adversary run, or an
    external attack named by import path (:func:`attacks.build_external`)."""

    name: str
    attack: str | None = None
    """registry name (``attacks.list_attacks()``)"""
    settings: dict[str, Any] = field(default_factory=dict)
    """constructor settings of the attack (not ``eps`` or ``seed``: the tournament sets them)"""
    adversary: Path | None = None
    """run directory of a learned adversary (``agents.adversary.load_adversary``)"""
    added: bool = False
    """added by the tournament, not listed in the config: an adaptive attack through a
    defender's input filter (:mod:`marl_fgmf.tournament.adaptive`)"""
    external: str | None = None
    """import path ``package.module:attr`` of a torchattacks Attack class or a factory
    ``(eps=..., **settings) -> torchattacks Attack | function obs -> adversarial obs``"""
    norm: str | None = None
    """external attackers only: the norm of the eps-ball their output is checked against
    (default: the torchattacks attack's own, else linf)"""

    @property
    def kind(self) -> str:
        if self.external is not None:
            return "external"
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
    """A tournament: defenders x attackers x eps x seeds (see :mod:`marl_fgmf.tournament`).

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
        unknown = sorted(set(data) - TOP_KEYS)
        if unknown:
            errors.append(f"unknown config key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(sorted(TOP_KEYS))}")

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
            extra = sorted(set(d) - {"name", "checkpoint", "train", "policy_id", "attackers"})
            name = str(d.get("name", f"#{i + 1}"))
            if extra:
                errors.append(f"defender {name}: unknown key(s) {', '.join(extra)}; allowed: "
                              f"name, checkpoint, train, policy_id, attackers")
            own_raw = d.get("attackers") or []
            if not isinstance(own_raw, list):
                errors.append(f"defender {name}: attackers must be a list")
                own_raw = []
            own = [x for x in (parse_attacker(a, j, errors, path_of)
                               for j, a in enumerate(own_raw)) if x is not None]
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
                policy_id=None if d.get("policy_id") is None else str(d["policy_id"]),
                attackers=own))

        attackers: list[AttackerSpec] = []
        raw_att = data.get("attackers")
        if not isinstance(raw_att, list) or not raw_att:
            errors.append("attackers must be a non-empty list")
            raw_att = []
        for i, a in enumerate(raw_att):
            spec = parse_attacker(a, i, errors, path_of)
            if spec is not None:
                attackers.append(spec)

        eps: list[float] = []
        raw_eps = data.get("eps")
        if not isinstance(raw_eps, list) or not raw_eps:
            raw_eps = [raw_eps] if isinstance(raw_eps, (int, float, str)) else []
            if not raw_eps:
                errors.append("eps must be a non-empty list of budgets in (0, 1] such as 8/255")
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
            extra = sorted(set(raw_audit) - AUDIT_KEYS)
            if extra:
                errors.append(f"audit: unknown key(s) {', '.join(extra)}; allowed: "
                              f"{', '.join(sorted(AUDIT_KEYS))}")
            for key in AUDIT_KEYS & set(raw_audit):
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

        Checks: unknown attack or attack setting, an external attack that does not import or
        build, missing or unreadable defender checkpoint, bad training spec, unknown env or
        env setting, duplicate defender/attacker/match names, invalid or duplicate eps and
        seeds, learned adversaries that cannot be read.
        Nothing is trained or loaded beyond reading run settings.
        """
        errors = list(self.parse_errors)
        repeated = (duplicates("defender name", [d.name for d in self.defenders])
                    + duplicates("attacker name", [a.name for a in self.attackers])
                    + duplicates("eps", [eps_label(e) for e in self.eps])
                    + duplicates("seed", [str(s) for s in self.seeds]))
        errors += repeated
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
            if count > 1 and not repeated:  # otherwise already explained by the names
                errors.append(f"duplicate match {key!r} ({count} times)")
        errors += check_env(self.env, self.env_kwargs)
        errors += check_defenders(self.defenders, self.env, out)
        errors += check_attackers(self.attackers, self.eps)
        listed = {a.name for a in self.attackers}
        for d in self.defenders:
            errors += [f"defender {d.name}: {e}" for e in
                       duplicates("attacker name", [a.name for a in d.attackers])]
            errors += [f"defender {d.name}: its attacker {a.name!r} has the name of a config "
                       f"attacker; give it another" for a in d.attackers if a.name in listed]
            errors += [f"defender {d.name}: attacker name {a.name!r} must start with a letter "
                       f"or digit and use only letters, digits and _ . + -"
                       for a in d.attackers if not NAME_RE.match(a.name) or a.name == CLEAN]
            errors += [f"defender {d.name}: {e}" for e in check_attackers(d.attackers, self.eps)]
        return errors

    def check(self, out: str | os.PathLike | None = None) -> None:
        """Raise :class:`ConfigError` listing every problem, if there is any."""
        errors = self.validate(out)
        if errors:
            raise ConfigError(errors)

    # ------------------------------------------------------------------ matches
    def attackers_of(self, defender: str,
                     added: dict[str, list[AttackerSpec]] | None = None) -> list[AttackerSpec]:
        """The attackers that play ``defender``: the config's, its own
        (:attr:`DefenderSpec.attackers`), then those the tournament ``added`` for it (by
        defender name; see :mod:`marl_fgmf.tournament.adaptive`)."""
        own = next((d.attackers for d in self.defenders if d.name == defender), [])
        return list(self.attackers) + list(own) + list((added or {}).get(defender, []))

    def own_attacker_names(self) -> list[str]:
        """The names of the defenders' own attackers, each once, in order of appearance."""
        return list(dict.fromkeys(a.name for d in self.defenders for a in d.attackers))

    def matches(self, added: dict[str, list[AttackerSpec]] | None = None) -> list["Match"]:
        """Every match, clean ones first: per defender and seed one clean match, then
        defender x attacker x eps x seed (the attackers of :meth:`attackers_of`: the config's,
        then the ``added`` ones)."""
        out: list[Match] = []
        for d in self.defenders:
            for s in self.seeds:
                out.append(Match(d.name, CLEAN, None, s))
        for d in self.defenders:
            for a in self.attackers_of(d.name, added):
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


def parse_attacker(a: Any, i: int, errors: list[str], path_of: Callable[[Any], Path]
                   ) -> "AttackerSpec | None":
    """One attacker entry of a config (a registry name or a mapping); problems go to
    ``errors`` (None when the entry cannot be read at all)."""
    if isinstance(a, str):  # a bare registry name: the attack with default settings
        return AttackerSpec(name=a, attack=a)
    if not isinstance(a, dict):
        errors.append(f"attacker #{i + 1} must be an attack name or a mapping, got {a!r}")
        return None
    extra = sorted(set(a) - ATTACKER_KEYS)
    name = str(a.get("name", a.get("attack", f"#{i + 1}")))
    if extra:
        errors.append(f"attacker {name}: unknown key(s) {', '.join(extra)}; allowed: "
                      f"{', '.join(sorted(ATTACKER_KEYS))}")
    has_attack, has_adv = a.get("attack") is not None, a.get("adversary") is not None
    has_ext = a.get("external") is not None
    if has_attack + has_adv + has_ext > 1:
        errors.append(f"attacker {name}: give one of attack, adversary or external")
    if not has_attack and not has_adv and not has_ext and "name" not in a:
        errors.append(f"attacker #{i + 1}: give a name and an attack or an adversary")
    if has_ext and "name" not in a:
        errors.append(f"attacker #{i + 1}: an external attacker needs a name")
    norm = a.get("norm")
    if norm is not None and not has_ext:
        errors.append(f"attacker {name}: norm applies to external attackers only "
                      f"(analytic attacks take it in settings)")
    elif norm is not None and norm not in ("linf", "l2"):
        errors.append(f"attacker {name}: norm must be 'linf' or 'l2', got {norm!r}")
        norm = None  # reported once, here
    settings = a.get("settings") or {}
    if not isinstance(settings, dict):
        errors.append(f"attacker {name}: settings must be a mapping")
        settings = {}
    if has_adv and settings:
        errors.append(f"attacker {name}: settings apply to analytic attacks only")
    attack = str(a["attack"]) if has_attack else (None if has_adv or has_ext else name)
    return AttackerSpec(name=name, attack=attack, settings=dict(settings),
                        adversary=path_of(a["adversary"]) if has_adv else None,
                        external=str(a["external"]) if has_ext else None,
                        norm=None if norm is None else str(norm))


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
