"""The work done on Ray workers: one match, one defender's audit.

Weights travel, paths do not (DESIGN.md section 2): the driver loads every defender and
learned adversary once (:func:`marl_fgmf.tournament.specs.load_weights`) and ships them
through Ray's object store; these functions receive the objects and never open a path of the
driver's. There is no policy cache on the workers: Ray's object store holds the weights.
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import Any

from attacks import build_external, evaluate, make_attack
from envs import make_env
from marl_fgmf.audit import audit_policies
from marl_fgmf.protocol import eps_label, parse_budget
from marl_fgmf.tournament.matchlog import RECORD_VERSION

__all__ = ["audit_defender", "play_match"]


def play_match(spec: dict[str, Any], policy: Any, adversary: Any = None) -> dict[str, Any]:
    """Play one match (the body of a Ray task; also callable directly).

    Args:
        spec: ``key, defender, attacker, kind (clean|analytic|learned|external), attack,
            settings, eps, seed, episodes, env, env_kwargs, checkpoint`` (and ``external``,
            ``norm`` for an external attack) (:func:`match_spec`; its
            ``fingerprint`` and ``defender_hash`` are added to the record by the driver).
        policy: the defender (one module, or ``{agent: module}``), shipped by the driver.
        adversary: for ``kind == "learned"``, the adversary attack shipped by the driver
            (rebound here to the defender, ``eps`` and ``seed``).
    Returns:
        The match record (``status`` "ok"); exceptions propagate (the task wrapper reports
        them with the node).
    """
    env = make_env(spec["env"], **spec["env_kwargs"])
    try:
        first = policy if not isinstance(policy, dict) else next(iter(policy.values()))
        attack = None
        if spec["kind"] == "analytic":
            attack = make_attack(spec["attack"], first, eps=spec["eps"], seed=spec["seed"],
                                 **spec.get("settings", {}))
        elif spec["kind"] == "external":
            attack = build_external(spec["external"], spec["eps"], spec.get("settings", {}),
                                    norm=spec.get("norm"), seed=spec["seed"], policy=first)
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
        "attack": spec.get("attack"), "added": bool(spec.get("added")),
        **({"external": spec["external"]} if spec["kind"] == "external" else {}),
        "eps": spec["eps"], "eps_label": eps_label(spec["eps"]),
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
