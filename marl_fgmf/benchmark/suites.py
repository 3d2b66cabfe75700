"""The benchmark suites: which environments, defences, seeds, attacks and budgets a run of
``marl-fgmf benchmark --suite NAME`` covers.

A suite is plain data (:class:`Suite`), written to ``DIR/suite.json`` and hashed into every
record it decides. Three are built in:

* ``smoke``: minutes, for CI: beacon, every defence, one seed, one iteration, tiny attack
  budgets; it checks that the whole pipeline runs (its numbers mean nothing).
* ``small``: beacon only, every defence, 5 training seeds, the full attack ensemble at small
  budgets, 20-step evaluation episodes (target: under 2 hours on 2 CPU cores; measured: 1 h
  48 min on an idle 2-core machine).
* ``full``: beacon (5 seeds) and the real PettingZoo pixel envs that train to clearly better
  than random in their budget (pistonball, 3 seeds); cooperative_pong is listed with a note
  because it does not (README, "Real environments").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from marl_fgmf.protocol import eps_label

__all__ = ["DEFENCES", "EnvPlan", "SUITES", "Suite", "WALLCLOCK", "get_suite"]

DEFENCES = ("none", "adv", "scorpio", "sgam", "fgmf", "fgmf+adv")
"""Every defence at its documented defaults, trained for the same env steps."""
WALLCLOCK = ("fgmf", "adv")
"""Defences also trained for the wall-clock time the undefended PPO took (``<name>-wall``)."""


@dataclass(frozen=True)
class EnvPlan:
    """One environment of a suite and its budgets."""

    env: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    iterations: int = 40
    """training iterations of every equal-steps run"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """training seeds"""
    train: dict[str, Any] = field(default_factory=dict)
    """further :class:`agents.train.TrainConfig` fields (batch sizes, network)"""
    episodes: int = 3
    """evaluation episodes per match"""
    eval_kwargs: dict[str, Any] = field(default_factory=dict)
    """env settings changed for evaluation (attacks, audit, explanations, the random and
    optimal references), e.g. a shorter episode; training uses ``env_kwargs`` alone"""
    optimum: bool = False
    """normalize to the scripted optimum (beacon) instead of the clean undefended return"""
    note: str = ""


@dataclass(frozen=True)
class Suite:
    """A benchmark suite (see the module docstring)."""

    name: str
    description: str
    envs: tuple[EnvPlan, ...]
    defences: tuple[str, ...] = DEFENCES
    wallclock: tuple[str, ...] = WALLCLOCK
    eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255)
    eval_seeds: tuple[int, ...] = (0,)
    attackers: tuple[dict[str, Any], ...] = ()
    """the attack ensemble (tournament attacker entries) every run meets"""
    adaptive: tuple[dict[str, Any], ...] = ()
    """attackers of the runs whose defence has an input filter (SGAM): BPDA and EOT"""
    paad_iterations: int = 5
    """PA-AD adversary training iterations per defender (0: none)"""
    paad_batch: int = 2000
    external: dict[str, Any] | None = None
    """settings of torchattacks' own AutoAttack (reduced budgets) played on each env's seed-0
    runs when torchattacks is installed; None: not played"""
    audit: dict[str, Any] = field(default_factory=lambda: {
        "n_obs": 32, "steps": [1, 10, 50], "restarts": [1, 3], "n_queries": 300, "episodes": 2})
    faithfulness: dict[str, Any] = field(default_factory=lambda: {
        "n_obs": 24, "methods": ["ig", "occlusion", "gradcampp", "rise", "pgca", "random",
                                 "brightness"], "sanity": True, "tie_orders": 4})
    random_episodes: int = 20
    cpus_per_training: float = 1.0
    expected: str = ""
    """the measured time of the suite on 2 CPU cores, and how it splits over a cluster"""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """sha256 of the suite's settings (what decides its numbers)."""
        data = self.to_dict()
        data.pop("description", None)
        data.pop("expected", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def runs(self) -> list[dict[str, Any]]:
        """Every training run: ``{"name", "env", "defence", "kind", "seed", "wallclock"}``
        (equal-steps runs first, then the equal-wall-clock ones; seed by seed, every defence
        of a seed together, so that a machine's load weighs on every defence alike)."""
        out = []
        for wall in (False, True):
            for plan in self.envs:
                for seed in plan.seeds:
                    for defence in (self.wallclock if wall else self.defences):
                        label = f"{defence}-wall" if wall else defence
                        out.append({"name": f"{plan.env}.{label}.s{seed}", "env": plan.env,
                                    "defence": label, "kind": defence, "seed": seed,
                                    "wallclock": wall})
        return out

    def summary(self) -> str:
        envs = ", ".join(f"{p.env} ({p.iterations} it x {len(p.seeds)} seeds)" for p in self.envs)
        return (f"suite {self.name}: {envs}; defences {', '.join(self.defences)} + "
                f"{', '.join(w + '-wall' for w in self.wallclock)}; eps "
                f"{', '.join(eps_label(e) for e in self.eps)}; {len(self.runs())} trainings")


def ensemble(pgd: tuple[int, int], apgd: int, aa: tuple[int, int], square: int | None = None
             ) -> tuple[dict[str, Any], ...]:
    """The attack ensemble: FGSM, PGD-``steps`` with ``restarts``, APGD-CE and APGD-DLR, the
    ``autoattack`` preset (APGD-CE, APGD-T, FAB-T, Square at ``aa = (steps, queries)``) and,
    when ``square`` is given, Square on its own."""
    out: list[dict[str, Any]] = [
        {"name": "fgsm", "attack": "fgsm"},
        {"name": "pgd", "attack": "pgd", "settings": {"steps": pgd[0], "restarts": pgd[1]}},
        {"name": "apgd-ce", "attack": "apgd", "settings": {"steps": apgd}},
        {"name": "apgd-dlr", "attack": "apgd", "settings": {"steps": apgd, "objective": "dlr"}},
        {"name": "autoattack", "attack": "autoattack",
         "settings": {"steps": aa[0], "n_queries": aa[1]}}]
    if square is not None:
        out.append({"name": "square", "attack": "square", "settings": {"n_queries": square}})
    return tuple(out)


def adaptive(steps: int, eot_steps: int, samples: int) -> tuple[dict[str, Any], ...]:
    """BPDA(PGD-``steps``) and EOT(BPDA(PGD-``eot_steps``)) over ``samples`` passes."""
    return ({"name": "bpda", "attack": "bpda", "settings": {"steps": steps}},
            {"name": "eot", "attack": "eot",
             "settings": {"attack": "bpda", "steps": eot_steps, "samples": samples}})


_ENSEMBLE = ensemble((50, 2), 25, (10, 100))
_ADAPTIVE = adaptive(50, 20, 2)
_METHODS = ["ig", "occlusion", "gradcampp", "rise", "pgca", "random", "brightness"]
# small: under 2 hours on 2 cores (the same attack ensemble as full; a 20-step evaluation
# episode, 3 PA-AD iterations, 16 audited and 8 explained observations per policy)
_SMALL_AUDIT = {"n_obs": 16, "steps": [1, 10, 50], "restarts": [1, 2], "n_queries": 200,
                "episodes": 2}
_SMALL_FAITH = {"n_obs": 8, "methods": _METHODS, "sanity": True, "tie_orders": 4}
# full: 25-step evaluation episodes, 5 PA-AD iterations, 24 audited and 16 explained
_FULL_AUDIT = {**_SMALL_AUDIT, "n_obs": 24}
_FULL_FAITH = {**_SMALL_FAITH, "n_obs": 16}

SUITES: dict[str, Suite] = {
    "smoke": Suite(
        name="smoke",
        description="CI: the whole pipeline on beacon with tiny budgets (numbers mean nothing)",
        envs=(EnvPlan("beacon", {"max_steps": 12}, iterations=1, seeds=(0,),
                      train={"train_batch_size": 200, "minibatch_size": 100, "num_epochs": 1,
                             "num_envs_per_env_runner": 2},
                      episodes=1, optimum=True),),
        eps=(8 / 255,), attackers=ensemble((2, 1), 2, (2, 10), square=10),
        adaptive=adaptive(2, 2, 2), paad_iterations=1, paad_batch=200,
        external={"steps": 2, "n_queries": 10},
        audit={"n_obs": 8, "steps": [1, 2], "restarts": [1, 2], "n_queries": 10,
               "episodes": 1, "large_eps": 0.5},
        faithfulness={"n_obs": 4, "methods": ["ig", "occlusion", "gradcampp", "rise", "pgca",
                                              "random", "brightness"],
                      "sanity": True, "tie_orders": 2},
        random_episodes=2,
        expected="about 2 minutes on 2 CPU cores"),
    "small": Suite(
        name="small",
        description="beacon only: every defence, 5 training seeds, the attack ensemble, "
                    "a PA-AD adversary per run",
        envs=(EnvPlan("beacon", {}, iterations=20, seeds=(0, 1, 2, 3, 4), episodes=1,
                      eval_kwargs={"max_steps": 20}, optimum=True),),
        attackers=_ENSEMBLE, adaptive=_ADAPTIVE, paad_iterations=3,
        external={"steps": 10, "n_queries": 100}, audit=_SMALL_AUDIT,
        faithfulness=_SMALL_FAITH,
        expected="1 h 48 min on 2 idle CPU cores, measured (README)"),
    "full": Suite(
        name="full",
        description="beacon (5 seeds) and pistonball (3 seeds), every defence",
        envs=(EnvPlan("beacon", {}, iterations=20, seeds=(0, 1, 2, 3, 4), episodes=1,
                      eval_kwargs={"max_steps": 25}, optimum=True),
              EnvPlan("pistonball", {}, iterations=20, seeds=(0, 1, 2), episodes=1,
                      # sampling in the training job's own process (one CPU per job)
                      train={"num_env_runners": 0, "num_envs_per_env_runner": 1},
                      note="trains to clearly above random in ~5,000 env steps (README); "
                           "cooperative_pong does not, so it is not in the suite")),
        attackers=_ENSEMBLE, adaptive=_ADAPTIVE, paad_iterations=5,
        external={"steps": 10, "n_queries": 100}, audit=_FULL_AUDIT,
        faithfulness=_FULL_FAITH,
        expected="not run to the end on 2 CPU cores: see the README for what was run"),
}


def get_suite(name: str) -> Suite:
    """The built-in suite ``name``; ``ValueError`` naming the allowed ones otherwise."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; allowed: {', '.join(SUITES)}")
    return SUITES[name]
