"""Multi-agent PPO training with RLlib (new API stack), resumable, with progress and logs.

How to run::

    marl-fgmf train --env beacon --arch cnn --iterations 60 --out runs/beacon-ppo
    marl-fgmf train --env beacon --defense fgmf --out runs/beacon-fgmf   # FGMF-defended
    marl-fgmf train --out runs/beacon-ppo --resume                        # continue a run

What a run directory holds::

    run.json                settings (env, arch, policies, defense, PPO settings)
    checkpoints/latest      name of the newest complete checkpoint (written atomically)
    checkpoints/iter_NNNNN  RLlib checkpoints (Algorithm.save_to_path); the last `keep` kept
    metrics.jsonl           one JSON line per iteration: the source of truth, append-only
    metrics.csv, metrics.json   the same rows, regenerated (atomically) from metrics.jsonl
    metrics.corrupt.txt     damaged metrics.jsonl lines set aside on --resume (if any)
    tb/                     TensorBoard event files
    learning_curve.png      mean agent return vs env steps (with the reference return if known)
    .run.lock               flock held by the process training the run (one writer per run)

A checkpoint is written to a temporary folder (with the metrics rows it completes) and renamed
into place, and ``latest`` is only updated after that; the rows are then appended to
``metrics.jsonl`` (one write + fsync). An interrupted run (Ctrl-C, a crash, SIGKILL) always
leaves the last complete checkpoint loadable, and ``--resume`` continues from it with every
metrics row up to it: from the newest complete checkpoint when ``latest`` is missing or
dangling (with a warning), refusing when the run logged iterations but has no complete
checkpoint left. Settings are checked (:meth:`TrainConfig.validate`, the saved ``run.json``
on ``--resume``) before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from agents.defenses import build_defense_settings
from agents.networks import ARCHS
from agents.ray_session import ensure_ray  # noqa: F401  (re-exported: agents.train.ensure_ray)
from agents.run_files import (  # noqa: F401  (re-exported for callers of agents.train)
    RUN_LOCK, append_metrics, check_run_dir, read_metrics, restore_metrics,
    resume_checkpoint, run_lock, save_checkpoint, warn, write_metric_views)
from agents.settings import (  # noqa: F401  (re-exported for callers of agents.train)
    SettingError, check_env_settings, check_int_setting, check_number_setting)
from agents.train_log import (  # noqa: F401  (re-exported for callers of agents.train)
    as_float, flatten_result, tb_writer, write_learning_curve)
from envs import is_import_path, list_envs, make_env
from envs.beacon import scripted_return
from envs.rllib import register_rllib_env
from marl_fgmf.io import atomic_write_text

DEFENSES = ("none", "adv", "scorpio", "sgam", "fgmf", "fgmf+adv")
POLICY_MODES = ("shared", "per-agent")


@dataclass
class TrainConfig:
    """Settings of one training run (each field is a ``marl-fgmf train`` flag)."""

    env: str = "beacon"
    """environment name (see ``envs.list_envs()``)"""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """keyword settings of the environment"""
    arch: str = "cnn"
    """policy encoder: cnn | vit | hybrid"""
    net: dict[str, Any] = field(default_factory=dict)
    """encoder settings (hidden, channels, ...)"""
    policies: str = "shared"
    """one shared policy for all agents, or one per agent"""
    defense: str = "none"
    """none | adv | scorpio | sgam | fgmf | fgmf+adv"""
    defense_settings: dict[str, Any] = field(default_factory=dict)
    """component settings: {"scorpio": {...}, "sgam": {...}, "adv": {...}}"""
    iterations: int = 60
    """training iterations (one sampling round + SGD epochs each)"""
    train_batch_size: int = 2000
    """agent steps per iteration"""
    minibatch_size: int = 250
    """SGD minibatch (agent steps)"""
    num_epochs: int = 4
    """SGD passes over each batch"""
    lr: float = 5e-4
    gamma: float = 0.95
    lambda_: float = 0.95
    entropy_coeff: float = 0.01
    clip_param: float = 0.2
    vf_loss_coeff: float = 0.5
    grad_clip: float = 0.5
    num_env_runners: int = 0
    """remote sampling workers (0 samples in the driver)"""
    num_envs_per_env_runner: int = 8
    """vectorised environment copies per runner"""
    num_learners: int = 0
    """remote learners (0 trains in the driver)"""
    num_gpus_per_learner: float = 0.0
    """GPUs per learner (RLlib's setting; use 1 on a GPU machine)"""
    seed: int = 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 2

    def validate(self) -> None:
        """Raise :class:`SettingError` (a ``ValueError``) naming the first bad setting, its
        value and what is allowed. Checks every setting, builds the environment once with
        ``env_kwargs`` (cached per settings), and writes nothing."""
        user_env = [self.env] if is_import_path(self.env) else []  # envs.make_env checks it
        for name, allowed in (("env", list_envs() + user_env), ("arch", list(ARCHS)),
                              ("policies", list(POLICY_MODES)), ("defense", list(DEFENSES))):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                what = "policies mode" if name == "policies" else name
                raise SettingError(name, f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
        for name, minimum in (("iterations", 1), ("train_batch_size", 1), ("minibatch_size", 1),
                              ("num_epochs", 1), ("num_envs_per_env_runner", 1),
                              ("checkpoint_every", 1), ("keep_checkpoints", 1),
                              ("num_env_runners", 0), ("num_learners", 0), ("seed", 0)):
            check_int_setting(name, getattr(self, name), minimum)
        if self.minibatch_size > self.train_batch_size:
            raise SettingError("minibatch_size", f"minibatch_size ({self.minibatch_size}) must "
                               f"not exceed train_batch_size ({self.train_batch_size})")
        check_number_setting("lr", self.lr, 0, 1, low_open=True, high_open=True)
        check_number_setting("gamma", self.gamma, 0, 1)
        check_number_setting("lambda_", self.lambda_, 0, 1)
        for name in ("entropy_coeff", "vf_loss_coeff"):
            check_number_setting(name, getattr(self, name), 0)
        check_number_setting("clip_param", self.clip_param, 0, low_open=True)
        if self.grad_clip is not None:  # None: no gradient clipping (RLlib's setting)
            check_number_setting("grad_clip", self.grad_clip, 0)
        check_number_setting("num_gpus_per_learner", self.num_gpus_per_learner, 0)
        if self.num_gpus_per_learner > 0 and self.num_learners == 0:
            if not torch.cuda.is_available():
                raise SettingError("num_gpus_per_learner", f"num_gpus_per_learner is "
                                   f"{self.num_gpus_per_learner:g} but no GPU is visible here "
                                   f"(torch.cuda.is_available() is False); use 0")
        for name in ("net", "defense_settings"):
            if not isinstance(getattr(self, name), dict):
                raise SettingError(name, f"{name} must be a JSON object of settings, got "
                                   f"{getattr(self, name)!r}")
        for f in dataclasses.fields(self):  # run.json must hold them exactly
            try:
                json.dumps(getattr(self, f.name), allow_nan=False)
            except (TypeError, ValueError):
                raise SettingError(f.name, f"{f.name} must be plain JSON data (numbers, "
                                   f"strings, lists, objects; no NaN), got "
                                   f"{getattr(self, f.name)!r}") from None
        check_env_settings(self.env, self.env_kwargs)
        try:
            defense_learner_settings(self)  # validates component settings
        except SettingError:
            raise
        except ValueError as exc:
            raise SettingError("defense_settings", str(exc)) from None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- helpers
def defense_learner_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The learner_config_dict and model settings a defense needs (validated)."""
    return build_defense_settings(cfg.defense, cfg.defense_settings, cfg.arch)


def env_spaces(cfg: TrainConfig):
    """(agent ids, observation space, action space) of the configured environment."""
    env = make_env(cfg.env, **cfg.env_kwargs)
    agents = list(env.possible_agents)
    obs_space, act_space = env.observation_space(agents[0]), env.action_space(agents[0])
    env.close()
    return agents, obs_space, act_space


def build_algo_config(cfg: TrainConfig):
    """The RLlib ``PPOConfig`` of a run (multi-agent, our RLModule, FGMF learner)."""
    # lazy: RLlib (seconds) stays out of `marl-fgmf train --help`; learner and rl_module
    # import it at their top
    from ray.rllib.algorithms.ppo import PPOConfig  # lazy: RLlib
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec  # lazy: RLlib
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec  # lazy: RLlib

    from agents.learner import FGMFPPOTorchLearner  # lazy: imports RLlib
    from agents.rl_module import FGMFTorchRLModule  # lazy: imports RLlib

    cfg.validate()
    env_name = register_rllib_env(cfg.env, **cfg.env_kwargs)
    agents, _, _ = env_spaces(cfg)
    defense = defense_learner_settings(cfg)
    model_config = {"arch": cfg.arch, "net": dict(cfg.net), "sgam": defense["sgam"]}
    if cfg.policies == "shared":
        module_ids = ["shared"]
        mapping: Callable = _shared_mapping
    else:
        module_ids = list(agents)
        mapping = _own_mapping
    specs = {mid: RLModuleSpec(module_class=FGMFTorchRLModule, model_config=model_config)
             for mid in module_ids}
    return (
        PPOConfig()
        .environment(env_name)
        .env_runners(num_env_runners=cfg.num_env_runners,
                     num_envs_per_env_runner=cfg.num_envs_per_env_runner)
        .multi_agent(policies=set(module_ids), policy_mapping_fn=mapping,
                     count_steps_by="agent_steps")
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=specs))
        .training(train_batch_size_per_learner=cfg.train_batch_size,
                  minibatch_size=cfg.minibatch_size, num_epochs=cfg.num_epochs, lr=cfg.lr,
                  gamma=cfg.gamma, lambda_=cfg.lambda_, entropy_coeff=cfg.entropy_coeff,
                  clip_param=cfg.clip_param, vf_loss_coeff=cfg.vf_loss_coeff,
                  grad_clip=cfg.grad_clip)
        .learners(num_learners=cfg.num_learners, num_gpus_per_learner=cfg.num_gpus_per_learner,
                  learner_class=FGMFPPOTorchLearner,
                  learner_config_dict=defense["learner_config"])
        .debugging(seed=cfg.seed, log_level="ERROR")
        # a lost env runner (a node without the package, a crash) stops training with its
        # cause instead of being restarted or dropped silently (fewer samples, exit 0)
        .fault_tolerance(restart_failed_env_runners=False, ignore_env_runner_failures=False)
    )


def _shared_mapping(agent_id, episode, **kwargs):
    return "shared"


def _own_mapping(agent_id, episode, **kwargs):
    return agent_id


def reference_return(cfg: TrainConfig) -> float | None:
    """Mean per-agent return of the environment's scripted optimal policy, if it has one."""
    if cfg.env != "beacon":
        return None
    return scripted_return(episodes=20, seed=10_000, **cfg.env_kwargs)


def load_run_settings(cfg, out: Path, resume: bool, load: Callable[[dict[str, Any]], Any],
                      kind: str | None = None):
    """The validated settings of a run, writing nothing: ``cfg`` for a new run; with
    ``resume`` the saved ``run.json`` (``load(saved)``) with only ``iterations`` from ``cfg``,
    re-validated: a bad saved setting names itself and ``run.json``."""
    if not resume:
        cfg.validate()
        return cfg
    run_file = Path(out) / "run.json"
    iterations = check_int_setting("iterations", cfg.iterations, 1)
    fix = f"edit {run_file} to fix it, or start a new run with another --out"
    try:
        saved = json.loads(run_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume: no run to resume in {out} (run.json missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{run_file} is damaged (not JSON: {str(exc).splitlines()[0]}); "
                         f"{fix}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{run_file} does not hold a settings object; {fix}")
    if saved.get("kind") != kind:
        raise ValueError(f"{out} holds a run of kind {saved.get('kind') or 'train'!r}, "
                         f"not {kind or 'train'!r}")
    try:
        cfg = load(saved)
        cfg.iterations = iterations
        cfg.validate()
    except (ValueError, TypeError) as exc:
        setting = getattr(exc, "setting", None)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = f"setting {setting!r}" if setting else "setting"
        raise ValueError(f"{run_file} holds a bad {what} ({msg}); {fix}") from None
    return cfg


def prepare_run(cfg, out: Path, resume: bool, load: Callable[[dict[str, Any]], Any],
                kind: str | None = None):
    """Check ``out`` and the settings for ``train``/``resume``, then (holding the run lock)
    write ``run.json``; returns the settings.

    With ``resume`` the saved settings win (``load(saved_json)``, re-validated) and only
    ``iterations`` is taken from ``cfg``. Without it, ``out`` must be new or empty. Nothing
    is written (no folder created) unless every check passes.
    """
    out = Path(out)
    check_run_dir(out, resume)
    cfg = load_run_settings(cfg, out, resume, load, kind)
    with run_lock(out):
        check_run_dir(out, resume)  # again under the lock: another process may have been first
        cfg = load_run_settings(cfg, out, resume, load, kind)
        payload = cfg.to_json() if kind is None else {"kind": kind, **cfg.to_json()}
        atomic_write_text(out / "run.json", json.dumps(payload, indent=2))
    return cfg


def check_cluster_gpus(cfg) -> None:
    """Remote learners asking for GPUs the Ray cluster does not have would wait forever:
    refuse (one line) once Ray runs, before anything is written."""
    need = int(cfg.num_learners) * float(cfg.num_gpus_per_learner)
    if cfg.num_learners > 0 and need > 0:
        import ray  # lazy: Ray (0.4 s) stays out of `marl-fgmf train --help`
        have = float(ray.cluster_resources().get("GPU", 0.0))
        if have < need:
            raise SettingError("num_gpus_per_learner", f"num_learners={cfg.num_learners} x "
                               f"num_gpus_per_learner={cfg.num_gpus_per_learner:g} need "
                               f"{need:g} GPUs but the Ray cluster has {have:g}; use 0")


# --------------------------------------------------------------------------- main loop
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
            bar.set_postfix({"steps": row["env_steps"], label: f"{row[key]:.2f}",
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


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, address: str | None = None,
          progress: bool = True, time_budget_s: float | None = None,
          runtime_env: dict[str, Any] | None = None,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) a run into ``out``; returns the last metrics row and paths.

    Every check comes before anything is written: ``out`` (a new or empty folder, or with
    ``resume`` a run with a checkpoint to continue from), the settings (``cfg.validate()``,
    or the saved ``run.json`` re-validated), the Ray cluster; then the run lock is taken and
    held to the end, and ``run.json`` written.

    Args:
        cfg: settings; with ``resume`` the saved ``run.json`` settings win, and only
            ``iterations`` is taken from ``cfg`` (the new total).
        out: run directory.
        resume: continue from ``out/checkpoints/latest`` (or the newest complete checkpoint).
        address: Ray cluster address (default: a local Ray).
        progress: show a progress bar.
        time_budget_s: stop after the iteration that crosses this wall time (benchmarks).
        runtime_env: Ray ``runtime_env`` for the session this call starts (code for the nodes).
        log: receives the line naming the Ray cluster when this call starts Ray.
    Raises:
        ValueError: bad settings, ``out`` not empty or holding a run without ``resume``,
            ``resume`` with no run or nothing to continue from, another process training it.
    """
    out = Path(out)
    check_run_dir(out, resume)
    cfg = load_run_settings(cfg, out, resume, TrainConfig.from_json)
    # Ray first (an unreachable cluster writes nothing), then the lock and run.json
    started = ensure_ray(address, runtime_env=runtime_env, log=log)
    try:
        check_cluster_gpus(cfg)
        with run_lock(out):
            cfg = prepare_run(cfg, out, resume, TrainConfig.from_json)
            return run_training_loop(
                build_algo_config(cfg), cfg, out, resume=resume, address=None,  # Ray runs
                progress=progress, desc=f"train {cfg.env}/{cfg.arch}/{cfg.defense}",
                n_agents=len(env_spaces(cfg)[0]), reference=reference_return(cfg),
                time_budget_s=time_budget_s)
    finally:
        if started:
            import ray  # lazy: Ray (0.4 s) stays out of `marl-fgmf train --help`
            ray.shutdown()
