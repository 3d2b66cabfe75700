"""The thread budget: every process the toolkit starts uses the CPUs it was given, never more.

Torch's default intra-op pool has a thread per core of the machine. Two torch processes on one
machine then each run that many threads and slow each other far more than 2x (measured on 2
cores, NOTES-rllib.md pitfall 17: one CNN training loop 3.2 s alone; two at once 9.6-10.5 s
with the default 2 threads each, 4.5-5.0 s with 1 thread each). So each process sets its
threads to its budget:

* :func:`cpu_budget`: ``MARL_FGMF_CPUS`` when set (to share a machine by hand); else, inside a
  Ray task or actor, the CPUs Ray assigned to it (at least 1); else the CPUs the operating
  system lets this process run on (a command run by hand owns the machine).
* :func:`apply_thread_budget`: torch's intra-op threads and ``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS`` (for what a process starts later) to that budget (a lower count the
  process already chose is kept).

Where it is applied: the FGMF learner when it is built (the driver's budget for a local
learner, ``num_cpus_per_learner`` for a remote one), every env runner when its environment is
created (:class:`agents.callbacks.ThreadBudgetCallback`: ``num_cpus_per_env_runner``), every
tournament match and Ray job (:func:`agents.jobs.set_threads`), and the commands that attack
or explain a policy. ``scripts/bench_overhead.py`` measures the effect with two jobs on one
machine.
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["ENV_VAR", "cpu_budget", "machine_cpus", "apply_thread_budget"]

ENV_VAR = "MARL_FGMF_CPUS"
"""Environment variable: the CPUs each marl-fgmf process may use (a whole number >= 1), or
``all``: every process uses all the machine's CPUs whatever it was given (torch's own default;
only to measure what the budget saves, as ``scripts/bench_overhead.py`` does)."""


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _ray_assigned_cpus() -> float | None:
    """CPUs Ray assigned to this process when it is a Ray task or actor, else None."""
    try:
        import ray  # lazy: only when Ray is already up in this process
        if not ray.is_initialized():
            return None
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray._private.worker.WORKER_MODE:
            return None  # the driver: not a task with a CPU reservation
        return float(ctx.get_assigned_resources().get("CPU", 0.0))
    except Exception:  # an older Ray without these calls: no budget known
        return None


def _unbudgeted() -> bool:
    """``MARL_FGMF_CPUS=all``: no budget (the benchmarks' comparison arm)."""
    return os.environ.get(ENV_VAR, "").strip().lower() == "all"


def cpu_budget() -> int:
    """The CPUs this process may use: ``MARL_FGMF_CPUS``, else Ray's assignment (a task or
    actor with ``num_cpus`` < 1 gets 1), else :func:`machine_cpus`; never more than the
    machine has.

    Raises:
        ValueError: ``MARL_FGMF_CPUS`` is not a whole number >= 1 (one line).
    """
    limit = machine_cpus()
    raw = os.environ.get(ENV_VAR)
    if _unbudgeted():
        return limit
    if raw is not None and raw.strip():
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{ENV_VAR} must be a whole number of CPUs >= 1 or 'all', got {raw!r}")
        return min(n, limit)
    assigned = _ray_assigned_cpus()
    if assigned is not None:
        return max(1, min(int(math.floor(assigned)), limit))
    return limit


def apply_thread_budget(num_cpus: float | None = None) -> int:
    """Set torch's intra-op threads (and ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) to a budget;
    returns the count.

    ``num_cpus`` given (a Ray job's reservation): exactly that many, at least 1 and at most
    :func:`machine_cpus`. None: at most :func:`cpu_budget`, keeping a lower count the process
    already set (a user's or a test's ``torch.set_num_threads(1)`` stays). With
    ``MARL_FGMF_CPUS=all``: all the machine's CPUs either way.

    Raises:
        ValueError: a bad ``MARL_FGMF_CPUS`` (:func:`cpu_budget`).
    """
    if _unbudgeted():
        n = machine_cpus()  # no budget: the comparison arm of the benchmarks
    elif num_cpus is None:
        n = min(cpu_budget(), torch.get_num_threads())
    else:
        n = int(math.floor(num_cpus))
    n = max(1, min(n, machine_cpus()))
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
