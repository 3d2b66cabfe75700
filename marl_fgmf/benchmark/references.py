"""The references a benchmark normalizes by, per env: a uniform random policy's team return
and, where the env has one, the scripted optimum (beacon); and the env settings every
evaluation uses."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from envs import make_env
from envs.beacon import scripted_return
from marl_fgmf.benchmark.suites import EnvPlan, Suite
from marl_fgmf.io import atomic_write_text, to_jsonable
from marl_fgmf.stats import summarize
from marl_fgmf.tournament.specs import fingerprint

__all__ = ["eval_kwargs", "random_team_return", "references"]


def eval_kwargs(plan: EnvPlan) -> dict[str, Any]:
    """The env settings every evaluation uses: training's, with ``eval_kwargs`` over them."""
    return {**plan.env_kwargs, **plan.eval_kwargs}


def random_team_return(env_name: str, env_kwargs: dict[str, Any], episodes: int, seed: int
                       ) -> list[float]:
    """Team returns (sum over agents) of uniform random actions, episode ``e`` reset with
    ``seed + e`` and the action spaces seeded alike."""
    env = make_env(env_name, **env_kwargs)
    returns = []
    try:
        for e in range(episodes):
            env.reset(seed=seed + e)
            for i, a in enumerate(env.possible_agents):
                env.action_space(a).seed(seed + 1000 * e + i)
            total = 0.0
            while env.agents:
                _, rew, _, _, _ = env.step({a: env.action_space(a).sample() for a in env.agents})
                total += float(sum(rew.values()))
            returns.append(total)
    finally:
        env.close()
    return returns


def references(suite: Suite, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Per env: the random policy's team returns and the optimum (beacon's scripted policy,
    team return), cached in ``DIR/references.json`` by the env's settings."""
    path = out / "references.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    refs = {}
    for plan in suite.envs:
        kwargs = eval_kwargs(plan)
        key = fingerprint({"env": plan.env, "env_kwargs": kwargs,
                           "episodes": suite.random_episodes, "optimum": plan.optimum})
        if cached.get(plan.env, {}).get("key") == key:
            refs[plan.env] = cached[plan.env]
            continue
        rand = random_team_return(plan.env, kwargs, suite.random_episodes, 10_000)
        entry: dict[str, Any] = {"key": key, "random": summarize(rand), "random_returns": rand,
                                 "optimum": None}
        if plan.optimum:
            n = len(make_env(plan.env, **kwargs).possible_agents)
            entry["optimum"] = n * scripted_return(episodes=suite.random_episodes, seed=10_000,
                                                   **kwargs)
        refs[plan.env] = entry
        log(f"{plan.env}: random policy team return {entry['random']['mean']:.2f}"
            + (f", scripted optimum {entry['optimum']:.2f}" if entry["optimum"] else ""))
    atomic_write_text(path, json.dumps(to_jsonable(refs), indent=2))
    return refs
