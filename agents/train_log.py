"""What a training iteration logs: RLlib's result as one flat metrics row, TensorBoard
scalars (``out/tb``, when tensorboardX is installed) and the learning curve
(``out/learning_curve.png``), for :func:`agents.train.run_training_loop`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["LEARNER_KEYS", "NullWriter", "as_count", "as_float", "flatten_result", "tb_writer",
           "write_learning_curve"]

LEARNER_KEYS = {"policy_loss", "vf_loss", "entropy", "mean_kl_loss", "total_loss",
                "vf_explained_var"}
"""The learner statistics logged per module (besides every ``fgmf_*`` one)."""


def flatten_result(result: dict[str, Any], n_agents: int) -> dict[str, Any]:
    """The numbers of one RLlib result that we log, flat."""
    er = result.get("env_runners", {})
    row: dict[str, Any] = {
        "iteration": int(result.get("training_iteration", 0)),
        "env_steps": as_count(er.get("num_env_steps_sampled_lifetime")),
        "agent_steps": as_count(sum((er.get("num_agent_steps_sampled_lifetime") or {}).values())),
        "episode_return_mean": as_float(er.get("episode_return_mean")),
        "agent_return_mean": as_float(er.get("episode_return_mean")) / max(1, n_agents),
        "episode_len_mean": as_float(er.get("episode_len_mean")),
        "num_episodes": as_count(er.get("num_episodes")),
    }
    for mid, stats in (result.get("learners") or {}).items():
        if mid == "__all_modules__" or not isinstance(stats, dict):
            continue
        for key, value in stats.items():
            if isinstance(value, (int, float)) and (key in LEARNER_KEYS or key.startswith("fgmf_")):
                row[f"{mid}/{key}"] = as_float(value)
    return row


def as_count(x) -> int:
    """An RLlib counter as an int; NaN/None (an iteration in which no episode ended) is 0."""
    value = as_float(x)
    return int(value) if math.isfinite(value) else 0


def as_float(x) -> float:
    """``float(x)``, NaN for ``None`` or anything that is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def write_learning_curve(out: Path, records: list[dict[str, Any]], ref: float | None) -> None:
    """``out/learning_curve.png`` from the metrics rows; a failure is a warning, never fatal."""
    try:
        # lazy: matplotlib (0.4 s) only once a run ends; `marl-fgmf train --help` stays light
        from marl_fgmf.viz import plot_learning_curve
    except ImportError:  # viz not available: the CSV still holds everything
        return
    try:
        plot_learning_curve(records, out / "learning_curve.png", reference=ref)
    except Exception as exc:  # a plot must never kill a training run
        print(f"warning: learning curve not written: {exc}")


class NullWriter:
    """Stands in for TensorBoard's writer when tensorboardX is not installed."""

    def add_scalar(self, *a, **k): pass
    def flush(self): pass
    def close(self): pass


def tb_writer(out: Path):
    """A TensorBoard ``SummaryWriter`` on ``out/tb``, or a :class:`NullWriter`."""
    try:
        # lazy: optional dependency (not in the requirements), needed only when a run starts
        from tensorboardX import SummaryWriter
    except ImportError:
        return NullWriter()
    return SummaryWriter(str(out / "tb"))
