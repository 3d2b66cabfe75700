"""Evaluate a trained policy under observation attacks: ``marl-fgmf attack``'s work.

Every agent plays its own policy module (``shared``, or one per agent as in the checkpoint;
``policy_id`` makes one module play for all agents) greedily on observations perturbed at
every step by the attack (:func:`attacks.evaluate`). The clean run is played once on the same
seeds; each attack at each budget is then one attacked run, here or, with an ``address`` or a
``runtime_env``, as Ray tasks (:mod:`marl_fgmf.workflows.remote`). Several attacks may be named
at once: :func:`route_settings` gives each the settings it accepts.

:func:`evaluate_attacks` returns the result record (the JSON ``marl-fgmf attack --out``
writes), :func:`format_table` the Markdown tables the command prints.
"""
from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

from agents.checkpoint import (agent_policy_map, check_policy_fits_env, load_agent_policies,
                               resolve_module_root, run_env)
from agents.ray_session import ensure_ray
from attacks import ALIASES, ATTACKS, OBJECTIVES, WRAPPERS, evaluate, make_attack
from envs import is_import_path, list_envs, make_env
from marl_fgmf.io import atomic_write_text, to_jsonable
from marl_fgmf.protocol import eps_label
from marl_fgmf.workflows.common import UsageError, check_output, run_failure
from marl_fgmf.workflows.remote import evaluate_job, run_remote

__all__ = ["DEFAULT_EPS", "LEARNED", "accepted_settings", "attack_keys", "build_attack",
           "check_objective", "evaluate_attacks", "format_table", "load_policies",
           "route_settings", "write_result"]

LEARNED = "learned"
"""The name of a learned adversary (``--attack learned --adversary DIR``)."""
DEFAULT_EPS = 8 / 255


# --------------------------------------------------------------------------- the attacks asked for
def attack_keys(text: str) -> list[str]:
    """The registry keys of ``NAME[,NAME...]`` (aliases resolved, duplicates dropped)."""
    allowed = [*ATTACKS, LEARNED]
    keys: list[str] = []
    for raw in str(text).split(","):
        name = raw.strip().lower().replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in allowed:
            raise UsageError(f"unknown attack {raw.strip()!r}; allowed: {', '.join(allowed)}")
        if name not in keys:
            keys.append(name)
    return keys


def check_objective(objective: str | None) -> None:
    """:class:`UsageError` unless ``objective`` is None or one of :data:`attacks.OBJECTIVES`."""
    if objective is not None and objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")


def accepted_settings(key: str) -> set[str] | None:
    """Setting names the attack ``key`` takes (None: it routes them itself)."""
    if key in WRAPPERS or key == "ensemble":
        return None
    if key == LEARNED:
        return set()
    sig = inspect.signature(ATTACKS[key].__init__)
    return {n for n, p in sig.parameters.items() if n not in ("self", "policy")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def route_settings(keys: list[str], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per attack, the settings it takes. One attack gets them all (an unknown one is its own
    one-line error); with several, each gets those it accepts, and a setting no listed attack
    takes is an error."""
    if keys == [LEARNED]:
        if settings:
            flags = [f"--{k}" if k in ("steps", "norm", "objective") else f"--settings {k}"
                     for k in settings]
            raise UsageError(f"{', '.join(flags)} cannot apply to a learned adversary "
                             f"(its policy is trained)")
        return {LEARNED: {}}
    if len(keys) == 1:
        return {keys[0]: dict(settings)}
    routed: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for key in keys:
        accepted = accepted_settings(key)
        mine = {k: v for k, v in settings.items() if accepted is None or k in accepted}
        routed[key] = mine
        used |= set(mine)
    unused = sorted(set(settings) - used)
    if unused:
        raise UsageError(f"setting(s) {', '.join(unused)} apply to none of the attacks "
                         f"{', '.join(keys)}")
    return routed


def load_policies(checkpoint: str | Path, agents: list[str], policy_id: str | None = None,
                  device: str | None = None) -> tuple[dict, dict[str, str]]:
    """``({agent: module}, {agent: module id})``."""
    policies = load_agent_policies(checkpoint, agents, policy_id, device)
    mapping = ({a: policy_id for a in agents} if policy_id is not None
               else agent_policy_map(checkpoint, agents))
    return policies, mapping


def build_attack(key: str, settings: dict[str, Any], policy: Any, eps: float | None,
                 adversary: str | Path | None = None, device: str | None = None) -> Any:
    """The attack ``key`` on ``policy`` at budget ``eps`` (a learned one: loaded from the
    ``adversary`` run, at its own budget when ``eps`` is None)."""
    if key == LEARNED:
        try:
            # lazy: agents.adversary imports Ray and RLlib (3 s); only a learned attack needs it
            from agents.adversary import load_adversary
        except ImportError as exc:
            raise UsageError(f"learned adversaries are not available in this installation "
                             f"(agents.adversary.load_adversary: {exc})") from None
        return load_adversary(adversary, policy=policy, eps=eps, device=device)
    return make_attack(key, policy, eps=eps, **settings)


# --------------------------------------------------------------------------- evaluation
def _stats(run: dict[str, Any]) -> dict[str, Any]:
    keep = ("team_return", "agent_return", "team_returns", "success_rate", "mean_linf",
            "mean_l2", "agent_steps", "time_s")
    return {k: run[k] for k in keep}


def _evaluate_on_cluster(policies: Any, runs: list[tuple[str, Any]], spec: dict[str, Any],
                         address: str | None, runtime_env: dict[str, Any] | None,
                         progress: bool, log) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The clean run and every attacked run as Ray tasks (weights shipped by the driver)."""
    started = ensure_ray(address, runtime_env=runtime_env, log=log)
    try:
        jobs = [("clean", spec, (policies,))]
        jobs += [(f"{name} {eps_label(float(attack.eps))}", spec, (policies, attack))
                 for name, attack in runs]
        try:
            values = run_remote(evaluate_job, jobs, log=log, progress=progress)
        except RuntimeError as exc:
            raise run_failure(exc) from exc
    finally:
        if started:
            import ray  # lazy: Ray (0.4 s) stays out of CLI start-up; only to shut it down
            ray.shutdown()
    return values["clean"], [values[title] for title, _, _ in jobs[1:]]


def evaluate_attacks(checkpoint: str | Path, keys: list[str],
                     settings: dict[str, dict[str, Any]], *, env: str | None = None,
                     env_kwargs: dict[str, Any] | None = None, eps: list[float] | None = None,
                     episodes: int = 10, seed: int = 0, max_steps: int | None = None,
                     policy_id: str | None = None,
                     device: str | None = None, adversary: str | Path | None = None,
                     address: str | None = None, runtime_env: dict[str, Any] | None = None,
                     progress: bool = True, command: str | None = None, log=print
                     ) -> dict[str, Any]:
    """The clean run and every attack of ``keys`` (settings per attack, :func:`route_settings`)
    at every budget of ``eps`` (default 8/255; a learned attack: its own), on the same seeds,
    each episode cut after ``max_steps`` steps when given (:func:`attacks.evaluate`).

    On Ray when ``address`` or ``runtime_env`` is given, here otherwise. Returns the result
    record: ``command``, checkpoint, env, ``policies`` (agent -> module id), the attacks and
    settings, ``clean`` and ``results`` (per attack and budget: team and per-agent returns with
    95 % CIs, success rate, mean Linf / L2) and ``wall_time_s``.
    """
    on_ray = address is not None or runtime_env is not None
    resolve_module_root(checkpoint)  # CheckpointError (one line) if missing or partial
    env_name, env_kwargs = run_env(checkpoint, env, env_kwargs)
    if env_name not in list_envs() and not is_import_path(env_name):
        raise UsageError(f"unknown env {env_name!r}; allowed: {', '.join(list_envs())}")
    environment = make_env(env_name, **env_kwargs)
    t0 = time.perf_counter()
    try:
        agents = list(environment.possible_agents)
        policies, mapping = load_policies(checkpoint, agents, policy_id, device)
        for agent in agents:
            check_policy_fits_env(policies[agent], environment, agent, mapping[agent])
        first = policies[agents[0]]
        runs = []  # (name, attack): every attack is built before any episode is played
        for key in keys:
            budgets = list(eps) if eps else [None if key == LEARNED else DEFAULT_EPS]
            runs += [(key, build_attack(key, settings[key], first, e, adversary, device))
                     for e in budgets]

        if on_ray:
            spec = {"env": env_name, "env_kwargs": env_kwargs, "episodes": episodes,
                    "seed": seed, "max_steps": max_steps}
            clean, remote = _evaluate_on_cluster(policies, runs, spec, address, runtime_env,
                                                 progress, log)
        else:
            clean = evaluate(policies, environment, None, episodes=episodes, seed=seed,
                             progress=progress, max_steps=max_steps)
            remote = None
        results = []
        for i, (name, attack) in enumerate(runs):
            run_result = remote[i] if remote is not None else evaluate(
                policies, environment, attack, episodes=episodes, seed=seed,
                progress=progress, compare_clean=False, max_steps=max_steps)
            budget = float(attack.eps)
            results.append({"name": name, "eps": budget, "eps_label": eps_label(budget),
                            "attack": run_result["attack"], **_stats(run_result)})
    finally:
        environment.close()
    return {
        "command": command,
        "checkpoint": str(checkpoint), "env": env_name, "env_kwargs": env_kwargs,
        "policies": mapping, "attacks": keys,
        "adversary": str(adversary) if LEARNED in keys else None,
        "settings": settings, "episodes": episodes, "seed": seed, "max_steps": max_steps,
        "clean": _stats(clean), "results": results,
        "wall_time_s": time.perf_counter() - t0,
    }


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    """``result`` as JSON at ``path`` (checked again: the run may have changed), atomically."""
    out = check_output(path, "--out", "file")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(to_jsonable(result), indent=2))
    return out


# --------------------------------------------------------------------------- tables
def _pm(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.2f}" + ("" if stats["ci95"] != stats["ci95"] else f" ± {stats['ci95']:.2f}")  # no CI from one episode


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (team return and attack statistics per attack and
    budget), then the per-agent returns."""
    clean = result["clean"]
    rows = [("attack", "eps", "team return clean", "team return attacked", "change", "success",
             "mean Linf", "mean L2")]
    for r in result["results"]:
        change = r["team_return"]["mean"] - clean["team_return"]["mean"]
        rows.append((r["name"], r["eps_label"], _pm(clean["team_return"]), _pm(r["team_return"]),
                     f"{change:+.2f}", f"{100 * r['success_rate']:.1f}%",
                     f"{r['mean_linf']:.4f}", f"{r['mean_l2']:.4f}"))
    agents = list(clean["agent_return"])
    per_agent = [("run", *agents), ("clean", *(_pm(clean["agent_return"][a]) for a in agents))]
    for r in result["results"]:
        per_agent.append((f"{r['name']} {r['eps_label']}",
                          *(_pm(r["agent_return"][a]) for a in agents)))
    return _markdown(rows) + "\n\nper-agent return (mean ± 95% CI):\n\n" + _markdown(per_agent)


def _markdown(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]

    def line(row: tuple) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])
