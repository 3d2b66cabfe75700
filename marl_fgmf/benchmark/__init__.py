"""The multi-seed, multi-environment robustness benchmark (``marl-fgmf benchmark``).

A **suite** (:mod:`~marl_fgmf.benchmark.suites`: ``smoke``, ``small``, ``full``) names the
environments, the defences (none, adv, scorpio, sgam, fgmf, fgmf+adv at equal env steps, and
fgmf and adv at the undefended run's wall-clock time), the training seeds, the attack
ensemble and the budgets. :func:`run_benchmark` (:mod:`~marl_fgmf.benchmark.runner`) trains
the grid as Ray jobs, a PA-AD adversary per defender, plays one tournament per env (the
tournament's match log, fingerprints and audit: resumable, reruns replay only what changed),
scores the faithfulness of every policy's explanations
(:mod:`~marl_fgmf.benchmark.faithfulness`), and writes the analysis
(:mod:`~marl_fgmf.benchmark.analysis`: normalized robust return, IQM with stratified
bootstrap CIs, probability of improvement, performance profiles, the claims with a verdict)
and the report (:mod:`~marl_fgmf.benchmark.report`).

Example::

    >>> from marl_fgmf.benchmark import get_suite, run_benchmark
    >>> result = run_benchmark(get_suite("smoke"), "results/bench-smoke")
    >>> [c["verdict"] for c in result.summary["claims"]]
"""
from __future__ import annotations

from typing import Any

from marl_fgmf.benchmark.suites import SUITES, EnvPlan, Suite, get_suite

_RUNNER = ("BenchmarkError", "BenchmarkResult", "run_benchmark")


def __getattr__(name: str) -> Any:
    if name in _RUNNER:
        # lazy: the runner imports Ray, RLlib and the tournament; the suites are plain data
        from marl_fgmf.benchmark import runner
        return getattr(runner, name)
    raise AttributeError(f"module 'marl_fgmf.benchmark' has no attribute {name!r}")

__all__ = ["BenchmarkError", "BenchmarkResult", "EnvPlan", "SUITES", "Suite", "get_suite",
           "run_benchmark"]
