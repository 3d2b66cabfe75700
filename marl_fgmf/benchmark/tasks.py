"""What the benchmark's Ray jobs run (:func:`agents.jobs.run_jobs`): a training run, a PA-AD
adversary, the faithfulness scores of one policy; and the reduced-budget torchattacks
AutoAttack that the benchmark plays as an independent check of the toolkit's attacks.

Trainings write their run directory under the benchmark's ``DIR`` (a filesystem every node
that trains sees; the driver pins them to its own node on a cluster). Faithfulness jobs
receive the policy's weights from the driver (weights travel, paths do not) and return plain
data that the driver writes.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from attacks import unbound_model
from envs import make_env
from marl_fgmf.benchmark.faithfulness import collect_frames, faithfulness_scores

__all__ = ["faithfulness_job", "torchattacks_autoattack", "train_adversary_job", "train_run_job"]


def train_run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run: ``spec = {"config": TrainConfig fields, "out", "resume",
    "time_budget_s"}``. Returns ``{"wall_s", "threads", "last"}`` (``last``: the last metrics
    row, whose ``wall_time_s`` is the training loop's time over every resumed piece),
    ``cpu_s`` (this process's CPU time: the whole training when it samples in-process, and it
    does not grow when other work shares the machine) and ``load`` (the machine's 1-minute
    load average at the start and the end; ``cpus`` its CPUs)."""
    from agents.train import TrainConfig, train  # lazy: RLlib (seconds), on the worker only
    cfg = TrainConfig.from_json(dict(spec["config"]))
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(cfg, spec["out"], resume=bool(spec.get("resume")), progress=False,
                   time_budget_s=spec.get("time_budget_s"))
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "threads": torch.get_num_threads(), "last": result["last"],
            "load": [load0, os.getloadavg()[0]], "cpus": os.cpu_count()}


def train_adversary_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One PA-AD adversary against a trained defender: ``spec = {"victim", "out", "eps",
    "iterations", "resume", "settings"}``."""
    from agents.adversary import train_adversary  # lazy: RLlib, on the worker only
    t0 = time.perf_counter()
    result = train_adversary(spec["victim"], spec["out"], eps=spec["eps"], mode="pa-ad",
                             iterations=int(spec["iterations"]),
                             resume=bool(spec.get("resume")), progress=False,
                             **dict(spec.get("settings") or {}))
    return {"wall_s": time.perf_counter() - t0, "last": result["last"]}


def faithfulness_job(spec: dict[str, Any], policy: Any) -> dict[str, Any]:
    """Faithfulness of one defender (:mod:`marl_fgmf.benchmark.faithfulness`): frames from
    greedy rollouts in its env, every method's per-observation scores."""
    f = dict(spec["faithfulness"])
    env = make_env(spec["env"], **spec["env_kwargs"])
    try:
        frames = collect_frames(policy, env, n_obs=int(f["n_obs"]), seed=int(spec["seed"]))
    finally:
        env.close()
    t0 = time.perf_counter()
    scores = faithfulness_scores(frames, list(f["methods"]), eps=float(spec["eps"]),
                                 seed=int(spec["seed"]), tie_orders=int(f["tie_orders"]),
                                 sanity=bool(f["sanity"]))
    return {"status": "ok", "run": spec["run"], "scores": scores,
            "seconds": time.perf_counter() - t0}


def torchattacks_autoattack(eps: float, n_classes: int, steps: int = 100,
                            n_queries: int = 5000, seed: int = 0) -> Any:
    """torchattacks' own ``AutoAttack`` (standard version: APGD-CE, APGD-T, FAB-T, Square)
    with the iterations of its gradient attacks set to ``steps`` and Square's queries to
    ``n_queries`` (the benchmark's budgets; AutoAttack's are 100 and 5,000). A factory for an
    ``external`` tournament attacker (:func:`attacks.build_external`)."""
    import torchattacks  # lazy: an optional dependency, the independent check only
    aa = torchattacks.AutoAttack(unbound_model(), norm="Linf", eps=eps, version="standard",
                                 n_classes=int(n_classes), seed=int(seed))
    for member in aa._autoattack.attacks:  # torchattacks keeps its members there
        if hasattr(member, "steps"):
            member.steps = int(steps)
        if hasattr(member, "n_queries"):
            member.n_queries = int(n_queries)
    return aa
