"""What the driver decides before any task runs: every defender and learned adversary loaded
once and shipped, the content hashes of their weights, and the task spec of each match and
audit with its fingerprint (the hash of everything that decides its result)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from agents.checkpoint import (check_policy_fits_env, latest_checkpoint, load_agent_policies,
                               run_env)
from agents.ray_session import ship
from attacks import external_code_id
from envs import make_env
from marl_fgmf.io import to_jsonable
from marl_fgmf.tournament.adaptive import added_attackers, filters_input
from marl_fgmf.tournament.config import (CLEAN, AttackerSpec, DefenderSpec, Match,
                                         TournamentConfig)
from marl_fgmf.tournament.errors import ConfigError, first_line
from marl_fgmf.tournament.matchlog import RECORD_VERSION

__all__ = ["Shipped", "adversary_key", "audit_is_current", "audit_settings", "audit_spec", "defender_env",
           "fingerprint", "load_weights", "match_spec", "weights_hash"]


def defender_env(cfg: TournamentConfig, d: DefenderSpec, out: Path
                 ) -> tuple[str, dict[str, Any]]:
    """The defender's env and settings (on the driver): the config's override, else its run's."""
    try:
        return run_env(d.run_dir(out), cfg.env, cfg.env_kwargs)
    except ValueError:
        raise ConfigError([f"defender {d.name}: its checkpoint names no env (no run.json); "
                           f"set env in the config"]) from None




def fingerprint(fields: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``fields`` and :data:`RECORD_VERSION`."""
    data = to_jsonable({"version": RECORD_VERSION, **fields})
    return hashlib.sha256(json.dumps(data, sort_keys=True, allow_nan=False).encode()).hexdigest()


def weights_hash(modules: Any, extra: Any = None) -> str:
    """sha256 (hex) of what a policy computes with: one module or ``{name: module}``. Per name
    (sorted), each distinct module once: its class qualname and every ``state_dict`` entry
    (name, dtype, shape, bytes); a name sharing an earlier module records that instead.
    ``extra`` (plain data, e.g. an attack's settings) is hashed after the modules."""
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
class Shipped:
    """What the driver loaded and put in Ray's object store, by defender / attacker name, and
    the content hashes of those weights (:func:`weights_hash`)."""

    policies: dict[str, Any]
    adversaries: dict[str, Any]
    envs: dict[str, tuple[str, dict[str, Any]]]
    defender_hash: dict[str, str] = field(default_factory=dict)
    adversary_hash: dict[str, str] = field(default_factory=dict)
    filtered: dict[str, bool] = field(default_factory=dict)
    """whether each defender has an input filter (:func:`adaptive.filters_input`)"""
    added: dict[str, list[AttackerSpec]] = field(default_factory=dict)
    """the attackers added per defender (:func:`adaptive.added_attackers`)"""


def match_spec(cfg: TournamentConfig, m: Match, out: Path, shipped: Shipped
               ) -> dict[str, Any]:
    """The task spec of a match (see :func:`play_match`), with its ``defender_hash`` and its
    ``fingerprint``: the hash of everything that decides its result (see
    :mod:`marl_fgmf.tournament`)."""
    d = next(x for x in cfg.defenders if x.name == m.defender)
    env_name, env_kwargs = shipped.envs[d.name]
    spec: dict[str, Any] = {
        "key": m.key, "defender": m.defender, "attacker": m.attacker, "eps": m.eps,
        "seed": m.seed, "episodes": cfg.episodes, "checkpoint": str(d.run_dir(out)),
        "env": env_name, "env_kwargs": env_kwargs, "kind": "clean",
        "defender_hash": shipped.defender_hash[d.name],
    }
    if m.attacker != CLEAN:
        a = next(x for x in cfg.attackers_of(d.name, shipped.added) if x.name == m.attacker)
        spec.update(kind=a.kind, attack=a.attack, settings=dict(a.settings),
                    adversary=None if a.adversary is None else str(a.adversary),
                    adversary_key=adversary_key(
                        d.name if any(a is x for x in d.attackers) else None, a.name))
        if a.external is not None:
            spec.update(external=a.external, norm=a.norm)
        if a.added:
            spec["added"] = True
    spec["fingerprint"] = fingerprint({
        "defender_hash": spec["defender_hash"], "policy_id": d.policy_id, "env": env_name,
        "env_kwargs": env_kwargs, "episodes": cfg.episodes, "seed": m.seed, "eps": m.eps,
        "kind": spec["kind"], "attack": spec.get("attack"),
        "settings": spec.get("settings") if spec["kind"] in ("analytic", "external") else None,
        "adversary_hash": shipped.adversary_hash.get(spec.get("adversary_key", m.attacker))
        if spec["kind"] == "learned" else None,
        # only where true, so that the fingerprints of listed attackers stay as they were
        **({"added": True} if spec.get("added") else {}),
        # the import path and its module's source hash and package version
        **({"external": spec["external"], "norm": spec["norm"],
            "external_code": external_code_id(spec["external"])}
           if spec["kind"] == "external" else {})})
    return spec


def adversary_key(defender: str | None, attacker: str) -> str:
    """Where a learned adversary is kept in :class:`Shipped`: a config attacker by its name,
    a defender's own attacker by ``defender/name`` (the same name may serve several)."""
    return attacker if defender is None else f"{defender}/{attacker}"


def load_weights(cfg: TournamentConfig, out: Path, log: Callable[[str], None]) -> Shipped:
    """Load every defender and learned adversary ONCE on the driver, check it against its
    env, hash its weights (:func:`weights_hash`) and ship it through Ray's object store
    (workers never read these paths). Also decides the adaptive attackers added for the
    defenders with an input filter (:mod:`marl_fgmf.tournament.adaptive`)."""
    from agents.adversary import load_adversary  # lazy: imports RLlib (seconds)
    shipped = Shipped({}, {}, {})
    for d in cfg.defenders:
        env_name, env_kwargs = defender_env(cfg, d, out)
        env = make_env(env_name, **env_kwargs)
        try:
            agents = list(env.possible_agents)
            policy = load_agent_policies(str(d.run_dir(out)), agents, d.policy_id,
                                         device="cpu", single_if_shared=True)
            for agent in agents:
                check_policy_fits_env(policy[agent] if isinstance(policy, dict) else policy,
                                      env, agent)
        except ValueError as exc:
            raise ConfigError([f"defender {d.name}: {first_line(exc)}"]) from None
        finally:
            env.close()
        shipped.envs[d.name] = (env_name, env_kwargs)
        shipped.defender_hash[d.name] = weights_hash(policy)
        shipped.filtered[d.name] = filters_input(policy)
        shipped.policies[d.name] = ship(policy)
    owned = [(adversary_key(None, a.name), a) for a in cfg.attackers]
    owned += [(adversary_key(d.name, a.name), a) for d in cfg.defenders for a in d.attackers]
    for key, a in owned:
        if a.adversary is not None:
            adversary = load_adversary(str(a.adversary), device="cpu")
            log_std = None if adversary.log_std is None else adversary.log_std.tolist()
            shipped.adversary_hash[key] = weights_hash(
                {"adversary": adversary.adversary},
                extra={"settings": adversary.settings(), "log_std": log_std})
            shipped.adversaries[key] = ship(adversary)
    log(f"loaded {len(shipped.policies)} defender(s) and {len(shipped.adversaries)} learned "
        f"adversary(ies) on the driver; their weights travel through Ray's object store")
    shipped.added = added_attackers(cfg, shipped.filtered)
    for name, extra in shipped.added.items():
        log(f"defender {name} has an input filter: added the adaptive attacker(s) "
            f"{', '.join(a.name for a in extra)} (the config lists none)")
    return shipped


def audit_settings(cfg: TournamentConfig) -> dict[str, Any]:
    a = dataclasses.asdict(cfg.audit)
    a["eps"] = cfg.audit_eps()
    return a


def audit_spec(cfg: TournamentConfig, d: DefenderSpec, out: Path, shipped: Shipped
               ) -> dict[str, Any]:
    """The task spec of a defender's audit (see :func:`audit_defender`), with its
    ``defender_hash`` and its ``fingerprint`` (weights, env, env settings, ``policy_id``,
    audit settings). ``checkpoint`` (the latest checkpoint's path) is for humans only."""
    env_name, env_kwargs = shipped.envs[d.name]
    settings = audit_settings(cfg)
    decisive = {k: v for k, v in settings.items() if k != "enabled"}
    ckpt = latest_checkpoint(d.run_dir(out))
    spec = {"defender": d.name, "policy_id": d.policy_id, "env": env_name,
            "env_kwargs": env_kwargs, "audit": settings,
            "checkpoint": str(ckpt if ckpt is not None else Path(d.run_dir(out)).resolve()),
            "defender_hash": shipped.defender_hash[d.name]}
    spec["fingerprint"] = fingerprint({
        "audit": decisive, "defender_hash": spec["defender_hash"], "policy_id": d.policy_id,
        "env": env_name, "env_kwargs": env_kwargs})
    return spec


def audit_is_current(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` holds a finished audit with this fingerprint."""
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(data, dict) and data.get("status") == "ok"
            and data.get("fingerprint") == fingerprint)
