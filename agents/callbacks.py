"""RLlib callbacks of marl-fgmf training (new API stack)."""
from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback

from agents.threads import apply_thread_budget


class ThreadBudgetCallback(RLlibCallback):
    """Every env runner sets torch's threads to its budget when its environment is created
    (:func:`agents.threads.apply_thread_budget`: the CPUs Ray gave the runner actor,
    ``num_cpus_per_env_runner``; the driver's budget for the local env runner)."""

    def on_environment_created(self, *, env_runner, metrics_logger=None, env=None,
                               env_context=None, **kwargs) -> None:
        apply_thread_budget()
