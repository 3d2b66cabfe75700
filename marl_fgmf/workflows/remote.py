"""Evaluation and audit jobs for a Ray cluster: ``marl-fgmf attack`` and ``audit --address``.

The driver loads the policies (and builds the attacks) once, ships them through Ray's object
store (:func:`agents.ray_session.ship`), and runs one job per attacked run or per audit on
whatever node Ray picks (:func:`agents.ray_session.run_jobs`); a job builds the env from its
name and settings and never opens a path of the driver's. Results come back to the driver,
which alone writes files.
"""
from __future__ import annotations

from typing import Any, Callable

from tqdm.auto import tqdm

from agents.ray_session import Job, run_jobs, ship
from attacks import evaluate
from envs import make_env
from marl_fgmf.audit import audit_policies

__all__ = ["audit_job", "evaluate_job", "run_remote"]


def evaluate_job(spec: dict[str, Any], policies: Any, attack: Any = None) -> dict[str, Any]:
    """:func:`attacks.evaluate` of ``policies`` under ``attack`` (None: clean) on the env
    ``spec["env"]`` with ``spec["env_kwargs"]``, ``episodes``, ``seed``."""
    env = make_env(spec["env"], **spec["env_kwargs"])
    try:
        return evaluate(policies, env, attack, episodes=spec["episodes"], seed=spec["seed"],
                        progress=False, compare_clean=False, max_steps=spec.get("max_steps"))
    finally:
        env.close()


def audit_job(spec: dict[str, Any], policy: Any) -> dict[str, Any]:
    """:func:`marl_fgmf.audit.audit_policies` of ``policy``; the reports as plain dicts."""
    settings = dict(spec["settings"])
    reports = audit_policies(policy, spec["env"], spec["env_kwargs"],
                             policy_id=spec.get("policy_id"), **settings)
    return {name: report.to_dict() for name, report in reports.items()}


def run_remote(fn: Callable[..., Any], specs: list[tuple[str, dict[str, Any], tuple]],
               log: Callable[[str], None], progress: bool = True) -> dict[str, Any]:
    """Run ``fn(spec, *objects)`` for each ``(title, spec, objects)`` as Ray tasks (objects
    are shipped once each, by identity); returns ``{title: value}`` or raises
    ``RuntimeError`` with every failure (one line each, the node and the root cause named)."""
    refs: dict[int, Any] = {}

    def shipped(obj: Any) -> Any:
        if id(obj) not in refs:
            refs[id(obj)] = ship(obj)
        return refs[id(obj)]

    jobs = [Job(fn, spec, tuple(shipped(o) for o in objs), title=title)
            for title, spec, objs in specs]
    values: dict[str, Any] = {}
    bar = None
    if progress:
        bar = tqdm(total=len(jobs), desc="on the cluster", unit="job")

    def on_result(job: Any, result: dict[str, Any]) -> None:
        values[job.title] = result["value"]
        node = result.get("node") or {}
        log(f"{job.title}: done on node {str(node.get('node_id'))[:8]} "
            f"({node.get('ip') or node.get('host')}) in {result['wall_s']:.1f}s")

    def on_done(job: Any, result: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(1)

    try:
        errors = run_jobs(jobs, on_result=on_result, on_done=on_done, log=log)
    finally:
        if bar is not None:
            bar.close()
    if errors:
        raise RuntimeError("; ".join(errors))
    return values
