"""The resumable RLlib training loop shared by every trainer of this package
(:func:`agents.train.train`, :func:`agents.adversary.train_adversary`): the run lock, the
algorithm built or restored, one metrics row per iteration, atomic checkpoints with their
rows, TensorBoard and the learning curve (see :mod:`agents.train` for the run layout)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from agents.ray_session import ensure_ray
from agents.run_files import (append_metrics, restore_metrics, resume_checkpoint, run_lock,
                              save_checkpoint, warn, write_metric_views)
from agents.train_log import as_float, flatten_result, tb_writer, write_learning_curve

__all__ = ["run_training_loop"]


def run_training_loop(algo_config, cfg, out: Path, *, resume: bool, address: str | None,
                      progress: bool, desc: str, n_agents: int,
                      reference: float | None = None,
                      on_row: Callable[[dict[str, Any]], None] | None = None,
                      postfix_key: tuple[str, str] = ("ret", "agent_return_mean"),
                      time_budget_s: float | None = None,
                      runtime_env: dict[str, Any] | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The resumable RLlib loop shared by every trainer of this package.

    Holds the run lock (``out/.run.lock``) throughout. Builds the algorithm from
    ``algo_config`` (restoring the checkpoint :func:`resume_checkpoint` picks with ``resume``,
    with the metrics rows up to it: :func:`restore_metrics`), runs ``cfg.iterations``
    iterations with a progress bar, logs one metrics row per iteration (``on_row`` may add
    fields) to TensorBoard and, with each atomic checkpoint (every ``cfg.checkpoint_every``
    iterations), to ``metrics.jsonl`` (appended) and ``metrics.csv/json`` (regenerated). On
    any exit (Ctrl-C, SIGKILL included) the metrics files hold exactly the rows up to the last
    complete checkpoint.

    Returns:
        ``{"last": last row, "out", "records", "reference_return"}``.
    """
    out = Path(out)
    started_ray = ensure_ray(address, runtime_env=runtime_env, log=log)
    try:
        with run_lock(out):
            return _run_locked(algo_config, cfg, out, resume=resume, progress=progress,
                               desc=desc, n_agents=n_agents, reference=reference, on_row=on_row,
                               postfix_key=postfix_key, time_budget_s=time_budget_s)
    finally:
        if started_ray:
            import ray  # lazy: Ray (0.4 s) stays out of `marl-fgmf train --help`
            ray.shutdown()


def _run_locked(algo_config, cfg, out: Path, *, resume: bool, progress: bool, desc: str,
                n_agents: int, reference: float | None,
                on_row: Callable[[dict[str, Any]], None] | None,
                postfix_key: tuple[str, str], time_budget_s: float | None) -> dict[str, Any]:
    ckpt, start_iter = resume_checkpoint(out, say=warn) if resume else (None, 0)
    records: list[dict[str, Any]] = restore_metrics(out, start_iter) if resume else []
    committed = start_iter  # records up to here are in a checkpoint and in metrics.jsonl
    pending: list[dict[str, Any]] = []  # rows since the last checkpoint
    algo = writer = bar = None
    last: dict[str, Any] = records[-1] if records else {}
    try:
        algo = algo_config.build_algo()
        if ckpt is not None:
            algo.restore_from_path(str(ckpt.resolve()))
        writer = tb_writer(out)
        t0 = time.time()
        elapsed_before = as_float(records[-1].get("wall_time_s", 0.0)) if records else 0.0
        elapsed_before = elapsed_before if math.isfinite(elapsed_before) else 0.0
        bar = tqdm(total=cfg.iterations, initial=start_iter, disable=not progress, desc=desc,
                   unit="it")
        for it in range(start_iter + 1, cfg.iterations + 1):
            t_iter = time.time()
            result = algo.train()
            _check_env_runners(algo, cfg)
            row = flatten_result(result, n_agents)
            row["iteration"] = it
            row["iter_time_s"] = time.time() - t_iter
            row["wall_time_s"] = elapsed_before + time.time() - t0
            if reference is not None:
                row["reference_return"] = reference
            if on_row is not None:
                on_row(row)
            records.append(row)
            pending.append(row)
            last = row
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(key, value, row["env_steps"])
            writer.flush()
            out_of_time = time_budget_s is not None and time.time() - t0 >= time_budget_s
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations or out_of_time:
                save_checkpoint(algo, out, it, cfg.keep_checkpoints, rows=pending)
                append_metrics(out, pending)
                committed, pending = it, []
                write_metric_views(out, records)
            label, key = postfix_key
            # an iteration in which no episode ended shows the last return seen (marked *)
            shown = next((r[key] for r in reversed(records)
                          if math.isfinite(as_float(r.get(key)))), float("nan"))
            stale = "" if math.isfinite(as_float(row.get(key))) else "*"
            bar.set_postfix({"steps": row["env_steps"], label: f"{shown:.2f}{stale}",
                             "t": f"{row['wall_time_s']:.0f}s"})
            bar.update(1)
            if out_of_time:
                break
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if pending:  # not in a checkpoint: trained again on --resume
            records = [r for r in records if r["iteration"] <= committed]
        if records:
            write_learning_curve(out, records, reference)
        if algo is not None:
            algo.stop()
    return {"last": last, "out": str(out), "records": records, "reference_return": reference}


def _check_env_runners(algo, cfg) -> None:
    """Raise if an env runner was lost during the iteration (RLlib would go on without it)."""
    group = getattr(algo, "env_runner_group", None)
    wanted = int(getattr(cfg, "num_env_runners", 0) or 0)
    if group is None or wanted <= 0:
        return
    healthy = int(group.num_healthy_remote_workers())
    if healthy < wanted:
        raise RuntimeError(f"{wanted - healthy} of {wanted} env runners were lost (a node "
                           f"without the package, or a crash); see the Ray logs of the node")


