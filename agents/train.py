"""Multi-agent PPO training with RLlib (new API stack), resumable, with progress and logs.

How to run::

    marl-fgmf train --env beacon --arch cnn --iterations 60 --out runs/beacon-ppo
    marl-fgmf train --env beacon --defense fgmf --out runs/beacon-fgmf   # FGMF-defended
    marl-fgmf train --out runs/beacon-ppo --resume                        # continue a run

What a run directory holds::

    run.json                settings (env, arch, policies, defense, PPO settings)
    checkpoints/latest      name of the newest complete checkpoint (written atomically)
    checkpoints/iter_NNNNN  RLlib checkpoints (Algorithm.save_to_path); the last `keep` kept
    metrics.csv, metrics.json   one row per iteration (env steps, returns, losses, FGMF terms)
    tb/                     TensorBoard event files
    learning_curve.png      mean agent return vs env steps (with the reference return if known)

A checkpoint is written to a temporary folder and renamed into place, and ``latest`` is only
updated after that: an interrupted run (Ctrl-C, a crash) always leaves the last complete
checkpoint loadable, and ``--resume`` continues from it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agents.networks import ARCHS
from agents.ray_session import ensure_ray  # noqa: F401  (re-exported: agents.train.ensure_ray)
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
        """Raise ``ValueError`` naming the first bad setting and its allowed values."""
        from envs import list_envs
        if self.env not in list_envs():
            raise ValueError(f"unknown env {self.env!r}; allowed: {', '.join(list_envs())}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; allowed: {', '.join(ARCHS)}")
        if self.policies not in POLICY_MODES:
            raise ValueError(f"unknown policies mode {self.policies!r}; allowed: {', '.join(POLICY_MODES)}")
        if self.defense not in DEFENSES:
            raise ValueError(f"unknown defense {self.defense!r}; allowed: {', '.join(DEFENSES)}")
        for name in ("iterations", "train_batch_size", "minibatch_size", "num_epochs",
                     "num_envs_per_env_runner", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_env_runners", "num_learners", "num_gpus_per_learner"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must not exceed "
                             f"train_batch_size ({self.train_batch_size})")
        defense_learner_settings(self)  # validates component settings

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- helpers
def defense_learner_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The learner_config_dict and model settings a defense needs (validated)."""
    from agents.defenses import build_defense_settings
    return build_defense_settings(cfg.defense, cfg.defense_settings, cfg.arch)


def env_spaces(cfg: TrainConfig):
    """(agent ids, observation space, action space) of the configured environment."""
    from envs import make_env
    env = make_env(cfg.env, **cfg.env_kwargs)
    agents = list(env.possible_agents)
    obs_space, act_space = env.observation_space(agents[0]), env.action_space(agents[0])
    env.close()
    return agents, obs_space, act_space


def build_algo_config(cfg: TrainConfig):
    """The RLlib ``PPOConfig`` of a run (multi-agent, our RLModule, FGMF learner)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from agents.learner import FGMFPPOTorchLearner
    from agents.rl_module import FGMFTorchRLModule
    from envs.rllib import register_rllib_env

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
    from envs.beacon import scripted_return
    return scripted_return(episodes=20, seed=10_000, **cfg.env_kwargs)


def _flatten_result(result: dict[str, Any], n_agents: int) -> dict[str, Any]:
    """The numbers of one RLlib result that we log, flat."""
    er = result.get("env_runners", {})
    row: dict[str, Any] = {
        "iteration": int(result.get("training_iteration", 0)),
        "env_steps": _count(er.get("num_env_steps_sampled_lifetime")),
        "agent_steps": _count(sum((er.get("num_agent_steps_sampled_lifetime") or {}).values())),
        "episode_return_mean": _f(er.get("episode_return_mean")),
        "agent_return_mean": _f(er.get("episode_return_mean")) / max(1, n_agents),
        "episode_len_mean": _f(er.get("episode_len_mean")),
        "num_episodes": _count(er.get("num_episodes")),
    }
    for mid, stats in (result.get("learners") or {}).items():
        if mid == "__all_modules__" or not isinstance(stats, dict):
            continue
        for key, value in stats.items():
            if isinstance(value, (int, float)) and (key in _LEARNER_KEYS or key.startswith("fgmf_")):
                row[f"{mid}/{key}"] = _f(value)
    return row


_LEARNER_KEYS = {"policy_loss", "vf_loss", "entropy", "mean_kl_loss", "total_loss",
                 "vf_explained_var"}


def _count(x) -> int:
    """An RLlib counter as an int; NaN/None (an iteration in which no episode ended) is 0."""
    value = _f(x)
    return int(value) if math.isfinite(value) else 0


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _load_records(out: Path) -> list[dict[str, Any]]:
    f = out / "metrics.json"
    if not f.is_file():
        return []
    try:
        return list(json.loads(f.read_text()))
    except json.JSONDecodeError:
        return []


def _write_metrics(out: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(records, indent=1))
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    tmp = out / f".metrics.csv.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(records)
    os.replace(tmp, out / "metrics.csv")


def _save_checkpoint(algo, out: Path, iteration: int, keep: int) -> Path:
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:05d}"
    for stale in ckpt_root.glob(".tmp_*"):  # left by a hard kill mid-save (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp_{name}"
    try:
        algo.save_to_path(str(tmp.resolve()))
    except BaseException:  # Ctrl-C or an error mid-save: leave no partial checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", name)
    done = sorted(p for p in ckpt_root.glob("iter_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _plot(out: Path, records: list[dict[str, Any]], ref: float | None) -> None:
    try:
        from marl_fgmf.viz import plot_learning_curve
    except ImportError:  # viz not available: the CSV still holds everything
        return
    try:
        plot_learning_curve(records, out / "learning_curve.png", reference=ref)
    except Exception as exc:  # a plot must never kill a training run
        print(f"warning: learning curve not written: {exc}")


# --------------------------------------------------------------------------- main loop
def check_run_dir(out: Path, resume: bool) -> None:
    """The checks of :func:`prepare_run` that need no settings: a run to resume exists, or
    ``out`` holds none (before Ray starts or anything is written)."""
    if resume and not (out / "run.json").is_file():
        raise ValueError(f"--resume: no run to resume in {out} (run.json missing)")
    if not resume and ((out / "run.json").exists() or (out / "checkpoints").exists()):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or "
                         "choose another --out")


def prepare_run(cfg, out: Path, resume: bool, load: Callable[[dict[str, Any]], Any],
                kind: str | None = None):
    """Check ``out`` for ``train``/``resume`` and write ``run.json``; returns the settings.

    With ``resume`` the saved settings win (``load(saved_json)``) and only ``iterations`` is
    taken from ``cfg``. Without it, ``out`` must not hold a run: nothing there is touched.
    """
    run_file = out / "run.json"
    if resume:
        if not run_file.is_file():
            raise ValueError(f"--resume: no run to resume in {out} (run.json missing)")
        saved = json.loads(run_file.read_text())
        if saved.get("kind") != kind:
            raise ValueError(f"{out} holds a run of kind {saved.get('kind') or 'train'!r}, "
                             f"not {kind or 'train'!r}")
        iterations = cfg.iterations
        cfg = load(saved)
        cfg.iterations = int(iterations)
    elif run_file.exists() or (out / "checkpoints").exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or "
                         "choose another --out")
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    payload = cfg.to_json() if kind is None else {"kind": kind, **cfg.to_json()}
    atomic_write_text(run_file, json.dumps(payload, indent=2))
    return cfg


def run_training_loop(algo_config, cfg, out: Path, *, resume: bool, address: str | None,
                      progress: bool, desc: str, n_agents: int,
                      reference: float | None = None,
                      on_row: Callable[[dict[str, Any]], None] | None = None,
                      postfix_key: tuple[str, str] = ("ret", "agent_return_mean"),
                      time_budget_s: float | None = None,
                      runtime_env: dict[str, Any] | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The resumable RLlib loop shared by every trainer of this package.

    Builds the algorithm from ``algo_config`` (restoring ``out/checkpoints/latest`` with
    ``resume``), runs ``cfg.iterations`` iterations with a progress bar, logs one metrics row
    per iteration (``on_row`` may add fields) to ``metrics.csv/json`` and TensorBoard, writes
    atomic checkpoints every ``cfg.checkpoint_every`` iterations, and on any exit (Ctrl-C
    included) leaves the metrics consistent with the last complete checkpoint.

    Returns:
        ``{"last": last row, "out", "records", "reference_return"}``.
    """
    from tqdm.auto import tqdm

    started_ray = ensure_ray(address, runtime_env=runtime_env, log=log)
    algo = None
    records: list[dict[str, Any]] = []
    writer = bar = None
    last: dict[str, Any] = {}
    try:
        algo = algo_config.build_algo()
        start_iter = 0
        if resume:
            from agents.checkpoint import latest_checkpoint
            ckpt = latest_checkpoint(out)
            if ckpt is not None:
                algo.restore_from_path(str(ckpt.resolve()))
                start_iter = int(ckpt.name.split("_")[-1])
            records = [r for r in _load_records(out) if r.get("iteration", 0) <= start_iter]
        writer = _tb_writer(out)
        t0 = time.time()
        elapsed_before = records[-1].get("wall_time_s", 0.0) if records else 0.0
        last = records[-1] if records else {}
        bar = tqdm(total=cfg.iterations, initial=start_iter, disable=not progress, desc=desc,
                   unit="it")
        for it in range(start_iter + 1, cfg.iterations + 1):
            t_iter = time.time()
            result = algo.train()
            _check_env_runners(algo, cfg)
            row = _flatten_result(result, n_agents)
            row["iteration"] = it
            row["iter_time_s"] = time.time() - t_iter
            row["wall_time_s"] = elapsed_before + time.time() - t0
            if reference is not None:
                row["reference_return"] = reference
            if on_row is not None:
                on_row(row)
            records.append(row)
            last = row
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(key, value, row["env_steps"])
            writer.flush()
            out_of_time = time_budget_s is not None and time.time() - t0 >= time_budget_s
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations or out_of_time:
                _save_checkpoint(algo, out, it, cfg.keep_checkpoints)
                _write_metrics(out, records)
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
        if records:
            _write_metrics(out, [r for r in records if r["iteration"] <= _last_ckpt_iter(out)])
            _plot(out, records, reference)
        if algo is not None:
            algo.stop()
        if started_ray:
            import ray
            ray.shutdown()
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

    Args:
        cfg: settings; with ``resume`` the saved ``run.json`` settings win, and only
            ``iterations`` is taken from ``cfg`` (the new total).
        out: run directory.
        resume: continue from ``out/checkpoints/latest``.
        address: Ray cluster address (default: a local Ray).
        progress: show a progress bar.
        time_budget_s: stop after the iteration that crosses this wall time (benchmarks).
        runtime_env: Ray ``runtime_env`` for the session this call starts (code for the nodes).
        log: receives the line naming the Ray cluster when this call starts Ray.
    Raises:
        ValueError: bad settings, an existing run without ``resume``, or ``resume`` with no run.
    """
    out = Path(out)
    check_run_dir(out, resume)
    # Ray first (an unreachable cluster writes nothing), then run.json
    started = ensure_ray(address, runtime_env=runtime_env, log=log)
    try:
        cfg = prepare_run(cfg, out, resume, TrainConfig.from_json)
        return run_training_loop(
            build_algo_config(cfg), cfg, out, resume=resume, address=None,  # Ray runs already
            progress=progress, desc=f"train {cfg.env}/{cfg.arch}/{cfg.defense}",
            n_agents=len(env_spaces(cfg)[0]), reference=reference_return(cfg),
            time_budget_s=time_budget_s)
    finally:
        if started:
            import ray
            ray.shutdown()


def _last_ckpt_iter(out: Path) -> int:
    from agents.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(out)
    return int(ckpt.name.split("_")[-1]) if ckpt is not None else 0


class _NullWriter:
    def add_scalar(self, *a, **k): pass
    def flush(self): pass
    def close(self): pass


def _tb_writer(out: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return _NullWriter()
    return SummaryWriter(str(out / "tb"))
