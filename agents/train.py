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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from agents.defenses import build_defense_settings
from agents.networks import ARCHS
from agents.ray_session import ensure_ray  # noqa: F401  (re-exported: agents.train.ensure_ray)
from agents.run_files import (  # noqa: F401  (re-exported for callers of agents.train)
    RUN_LOCK, append_metrics, check_run_dir, read_metrics, restore_metrics,
    resume_checkpoint, run_lock, save_checkpoint, warn, write_metric_views)
from agents.settings import (  # noqa: F401  (re-exported for callers of agents.train)
    SettingError, check_env_settings, check_int_setting, check_number_setting, is_int)
from agents.train_log import (  # noqa: F401  (re-exported for callers of agents.train)
    as_float, flatten_result, tb_writer, write_learning_curve)
from agents.train_loop import run_training_loop
from envs import episode_limit, is_import_path, list_envs, make_env, training_defaults
from envs.beacon import scripted_return
from envs.rllib import register_rllib_env
from marl_fgmf.io import atomic_write_text

DEFENSES = ("none", "adv", "scorpio", "sgam", "fgmf", "fgmf+adv")
SAMPLING_DEFAULTS = {"num_env_runners": 0, "num_envs_per_env_runner": 8}
"""Sampling of an env that declares none (beacon, a user's env): in the driver, 8 env copies
(``training_defaults`` of the env otherwise)."""
DEFAULT_BATCH = 2000
"""The smallest automatic ``train_batch_size`` (agent steps)."""
MAX_AUTO_BATCH = 16000
"""The largest automatic ``train_batch_size``: beyond it an iteration may end no episode and
its row reports NaN returns (set ``--train-batch-size`` to go further)."""
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
    policies: str | None = None
    """one shared policy for all agents, or one per agent; None: the env's choice (per-agent
    for cooperative_pong, whose agents see the same screen), else shared"""
    defense: str = "none"
    """none | adv | scorpio | sgam | fgmf | fgmf+adv"""
    defense_settings: dict[str, Any] = field(default_factory=dict)
    """component settings: {"scorpio": {...}, "sgam": {...}, "adv": {...}}"""
    iterations: int = 60
    """training iterations (one sampling round + SGD epochs each)"""
    train_batch_size: int | None = None
    """agent steps per iteration; None: at least 2000 and a full-length episode per env copy
    (:meth:`resolved`)"""
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
    num_env_runners: int | None = None
    """remote sampling workers (0 samples in the driver); None: the env's choice
    (``envs.training_defaults``: 2 for the PettingZoo envs), else 0"""
    num_envs_per_env_runner: int | None = None
    """vectorised environment copies per runner; None: the env's choice (1 for the PettingZoo
    envs), else 8"""
    num_learners: int = 0
    """remote learners (0 trains in the driver)"""
    num_gpus_per_learner: float = 0.0
    """GPUs per learner (RLlib's setting; use 1 on a GPU machine)"""
    seed: int = 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 2

    def resolved(self) -> "TrainConfig":
        """A copy with the env-dependent defaults filled in; what a run saves in ``run.json``
        and trains with.

        * ``num_env_runners`` / ``num_envs_per_env_runner`` when None: the env's declared
          :func:`envs.training_defaults`, else :data:`SAMPLING_DEFAULTS` (0 runners, 8 envs:
          beacon steps thousands of times a second, so sampling in the driver is fastest).
        * ``train_batch_size`` when None: ``max(2000, K)`` with ``K`` the agent steps of one
          full-length episode in every env copy (``max(1, runners) * envs per runner * agents
          * episode limit``, :func:`envs.episode_limit`), rounded up to a multiple of 1000
          and capped at :data:`MAX_AUTO_BATCH`: every iteration then ends at least one
          episode per env copy, so RLlib's episode statistics are not NaN (NOTES-rllib.md,
          pitfall 15).
        * ``policies`` when None: the env's declared choice (``per-agent`` for an env whose
          agents all see the same frame, where one shared policy could not tell them apart),
          else ``shared``.
        * ``net["channels"]`` of the ``cnn`` arch when ``net`` sets none: the env's declared
          ``cnn_channels`` (16-32-32 for the PettingZoo envs' 32 x 32 frames).
        Bad values stay as they are for :meth:`validate` to name.
        """
        declared = self.training_defaults()
        policies = self.policies if self.policies is not None else declared.get("policies",
                                                                                  "shared")
        runners = self.num_env_runners
        if runners is None:
            runners = declared.get("num_env_runners", SAMPLING_DEFAULTS["num_env_runners"])
        per_runner = self.num_envs_per_env_runner
        if per_runner is None:
            per_runner = declared.get("num_envs_per_env_runner",
                                      SAMPLING_DEFAULTS["num_envs_per_env_runner"])
        batch = self.train_batch_size
        if batch is None:
            batch = self.auto_batch_size(runners, per_runner)
        net = self.net
        if (self.arch == "cnn" and isinstance(net, dict) and "channels" not in net
                and "cnn_channels" in declared):
            net = {**net, "channels": list(declared["cnn_channels"])}
        return dataclasses.replace(self, policies=policies, train_batch_size=batch,
                                   num_env_runners=runners, num_envs_per_env_runner=per_runner,
                                   net=net)

    def training_defaults(self) -> dict[str, Any]:
        """The env's declared training defaults (``{}`` when the env cannot be looked up:
        :meth:`validate` names that)."""
        try:
            return training_defaults(self.env)
        except (ValueError, TypeError):
            return {}

    def auto_batch_size(self, runners: Any, per_runner: Any) -> int:
        """``train_batch_size`` when it is None (:meth:`resolved`)."""
        try:
            limit = episode_limit(self.env, **dict(self.env_kwargs or {}))
            n_agents = len(env_spaces(self)[0]) if limit is not None else 0
        except (ValueError, TypeError):
            limit = None
        if limit is None or not all(is_int(v) and v >= 0 for v in (runners, per_runner)):
            return DEFAULT_BATCH
        need = max(1, runners) * max(1, per_runner) * n_agents * limit
        return min(MAX_AUTO_BATCH, max(DEFAULT_BATCH, -(-need // 1000) * 1000))

    def validate(self) -> None:
        """Raise :class:`SettingError` (a ``ValueError``) naming the first bad setting, its
        value and what is allowed. Checks every setting (``None`` ones as :meth:`resolved`
        fills them in), builds the environment once with ``env_kwargs`` (cached per
        settings), and writes nothing."""
        if None in (self.policies, self.train_batch_size, self.num_env_runners,
                    self.num_envs_per_env_runner):
            self.resolved().validate()
            return
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

    from agents.callbacks import ThreadBudgetCallback  # lazy: imports RLlib
    from agents.learner import FGMFPPOTorchLearner  # lazy: imports RLlib
    from agents.rl_module import FGMFTorchRLModule  # lazy: imports RLlib

    cfg.validate()
    cfg = cfg.resolved()
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
        .callbacks(ThreadBudgetCallback)  # env runners: torch threads = their CPUs
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
    cfg = load_run_settings(cfg, out, resume, TrainConfig.from_json).resolved()
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


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run as a Ray job (:func:`agents.jobs.run_jobs`, which sets this task's
    torch threads to its ``num_cpus``; the learner keeps that budget).

    Args:
        spec: ``{"config": TrainConfig fields, "out": run directory}``.
    Returns:
        ``{"wall_s", "threads", "last"}``: the training's wall time, the torch threads it ran
        with and its last metrics row.
    """
    cfg = TrainConfig.from_json(dict(spec["config"]))
    t0 = time.perf_counter()
    result = train(cfg, spec["out"], progress=False)
    return {"wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
            "last": result["last"]}
