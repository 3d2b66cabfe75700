"""Training learned adversary agents against a frozen victim with RLlib multi-agent PPO.

How to run::

    marl-fgmf train --env beacon --iterations 40 --out runs/victim
    marl-fgmf train-adversary --victim runs/victim --eps 8/255 --mode perturb \\
        --iterations 20 --out runs/adv-perturb
    marl-fgmf train-adversary --victim runs/victim --mode pa-ad --team --out runs/adv-paad
    marl-fgmf train-adversary --out runs/adv-perturb --iterations 40 --resume

The game is :class:`agents.adversary_env.AdversaryEnv` (ATLA, Zhang et al. ICLR 2021; PA-AD, Sun et
al. ICLR 2022): the victims of the checkpoint are frozen inside the environment and the only
RLlib agents are the adversaries (``adv_<victim>``, or ``adv_team``), rewarded with minus the
victims' reward. By default every adversary agent maps to ONE shared module ``adversary``
(``policies="per-agent"``: one module per adversary agent); ``policies_to_train`` names exactly
the adversary modules. Box actions (``perturb``) use :class:`AdversaryTorchRLModule`'s
diagonal Gaussian head, discrete ones (``pa-ad``) a categorical head (multi-categorical for a
team).

A run directory has the layout of :mod:`agents.train` (``run.json``, ``checkpoints/latest``,
``metrics.jsonl`` with one row per iteration and its ``metrics.csv``/``metrics.json`` views,
``tb/``, ``learning_curve.png``, the ``.run.lock``) and is written by the same helpers,
atomically, with the same resume and locking rules; ``run.json`` has ``"kind": "adversary"`` and
freezes the victim's checkpoint path (``victim_modules``), so continuing the victim's training
later does not change what the adversary was trained against. Metrics rows add
``victim_return_mean``, the victims' mean per-agent return under attack during training
(minus the adversaries' mean return).

:func:`load_adversary` turns a run directory back into an :class:`attacks.learned.LearnedAdversary`,
an ordinary attack for :func:`attacks.evaluate` and tournaments;
:func:`evaluate_adversary` reports the victims' return with and without it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from gymnasium import spaces
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import (
    TorchCategorical,
    TorchDiagGaussian,
    TorchMultiCategorical,
)
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv
from ray.tune.registry import register_env
from torch import nn

from agents.adversary_env import TEAM_AGENT, AdversaryEnv

from agents.checkpoint import (
    CheckpointError,
    agent_policy_map,
    load_policies,
    load_rl_module,
    read_run_config,
    resolve_module_root,
)
from agents.rl_module import FGMFTorchRLModule, build_network
from agents.ray_session import ensure_ray
from agents.train import (SettingError, TrainConfig, build_algo_config, check_cluster_gpus,
                          check_int_setting, check_number_setting, check_run_dir, env_spaces,
                          load_run_settings, prepare_run, run_lock, run_training_loop)
from attacks.evaluate import evaluate
from attacks.learned import UPSAMPLING, LearnedAdversary, check_mode
from envs import make_env
from envs.rllib import rllib_env_name
from marl_fgmf.protocol import obs_scale, parse_budget

SHARED_MODULE = "adversary"
RUN_KIND = "adversary"


# --------------------------------------------------------------------------- RLModule
class AdversaryTorchRLModule(FGMFTorchRLModule):
    """:class:`agents.rl_module.FGMFTorchRLModule` with a head for any adversary action space.

    * ``Box`` (``perturb``): a diagonal Gaussian. The network's policy head gives the mean
      (dim = the action size); ``log_std`` is a learned, state-independent parameter (the
      usual PPO choice for continuous control, initialised to ``model_config["log_std_init"]``,
      default 0). ``ACTION_DIST_INPUTS`` is ``[mean, log_std]`` (2 * dim), read by RLlib's
      :class:`TorchDiagGaussian`.
    * ``Discrete`` (``pa-ad``): logits, :class:`TorchCategorical`.
    * ``MultiDiscrete`` (``pa-ad`` team): concatenated logits, :class:`TorchMultiCategorical`.

    ``net`` stays a policy-protocol module (float [0, 1] observations in, head outputs out),
    which is what :class:`attacks.learned.LearnedAdversary` replays.
    """

    def setup(self):
        self.obs_scale = obs_scale(self.observation_space.high)
        space = self.action_space
        config = dict(self.model_config or {})
        self.log_std = None
        if isinstance(space, spaces.Box):
            n_out = int(np.prod(space.shape))
            self._dist_cls = TorchDiagGaussian
            self.log_std = nn.Parameter(torch.full((n_out,), float(config.get("log_std_init", 0.0))))
        elif isinstance(space, spaces.Discrete):
            n_out = int(space.n)
            self._dist_cls = TorchCategorical
        elif isinstance(space, spaces.MultiDiscrete):
            lens = [int(n) for n in np.asarray(space.nvec).reshape(-1)]
            n_out = sum(lens)
            self._dist_cls = TorchMultiCategorical.get_partial_dist_cls(input_lens=lens)
        else:
            raise ValueError(f"adversary action space must be Box, Discrete or MultiDiscrete, "
                             f"got {space}")
        config.pop("log_std_init", None)
        self.net = build_network(self.observation_space.shape, n_out, config)

    def _dist_inputs(self, head: torch.Tensor) -> torch.Tensor:
        if self.log_std is None:
            return head
        return torch.cat([head, self.log_std.expand_as(head)], dim=-1)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self._dist_inputs(self.net(self.scale_obs(batch[Columns.OBS])))}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        emb = self.net.embed(self.scale_obs(batch[Columns.OBS]))
        return {Columns.ACTION_DIST_INPUTS: self._dist_inputs(self.net.pi(emb)),
                Columns.EMBEDDINGS: emb}

    def get_inference_action_dist_cls(self):
        return self._dist_cls

    def get_exploration_action_dist_cls(self):
        return self._dist_cls

    def get_train_action_dist_cls(self):
        return self._dist_cls


# --------------------------------------------------------------------------- settings
@dataclass
class AdversaryConfig(TrainConfig):
    """Settings of one adversary run: every :class:`agents.train.TrainConfig` field (PPO, the
    adversary's network ``arch``/``net``, ``policies`` = shared | per-agent adversary modules)
    plus the attack game's. ``defense`` must stay ``none``."""

    env: str = ""
    """victim environment; empty: the one in the victim's run.json"""
    iterations: int = 20
    policies: str | None = "shared"
    train_batch_size: int | None = 2000
    num_env_runners: int | None = 0
    num_envs_per_env_runner: int | None = 8
    victim: str = ""
    """the victim's run directory or checkpoint"""
    victim_modules: str = ""
    """the victim's frozen rl_module directory (filled in at the start of a run)"""
    eps: float = 8 / 255
    """Linf budget in [0, 1] units"""
    mode: str = "perturb"
    """perturb (ATLA) | pa-ad (PA-AD)"""
    team: bool = False
    """one adversary for all attacked victims"""
    grid: int = 7
    """perturb: low-resolution grid side, upsampled to the observation"""
    upsample: str = "nearest"
    """perturb: nearest | bilinear"""
    pa_ad_steps: int = 3
    """pa-ad: PGD steps realizing the target action"""
    victim_greedy: bool = True
    """victims play argmax (else they sample their softmax)"""
    attacked: list[str] | None = None
    """victims that get adversaries (default all)"""
    log_std_init: float = 0.0
    """perturb: initial log standard deviation of the Gaussian (pre-tanh units)"""

    def training_defaults(self) -> dict[str, Any]:
        """None: an adversary plays in :class:`agents.adversary_env.AdversaryEnv`, not the
        victim's env, so the victim env's training defaults do not apply."""
        return {}

    def validate(self) -> None:
        """Raise :class:`agents.train.SettingError` (a ``ValueError``) naming the first bad
        setting; writes nothing."""
        try:
            check_mode(self.mode)
        except ValueError as exc:
            raise SettingError("mode", str(exc)) from None
        try:
            self.eps = parse_budget(self.eps)
        except (ValueError, TypeError) as exc:
            raise SettingError("eps", str(exc)) from None
        if not isinstance(self.upsample, str) or self.upsample not in UPSAMPLING:
            raise SettingError("upsample", f"unknown upsample {self.upsample!r}; allowed: "
                               f"{', '.join(UPSAMPLING)}")
        for name in ("grid", "pa_ad_steps"):
            check_int_setting(name, getattr(self, name), 1)
        check_number_setting("log_std_init", self.log_std_init)
        for name in ("team", "victim_greedy"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(name, f"{name} must be true or false, got "
                                   f"{getattr(self, name)!r}")
        if self.attacked is not None and (not isinstance(self.attacked, (list, tuple)) or not all(
                isinstance(a, str) for a in self.attacked)):
            raise SettingError("attacked", f"attacked must be a list of agent ids, got "
                               f"{self.attacked!r}")
        if self.defense != "none":
            raise SettingError("defense", f"adversaries train without defenses; defense must "
                               f"be 'none', got {self.defense!r}")
        if not self.victim:
            raise SettingError("victim", "no victim given: pass the victim's run directory")
        if not self.env:
            raise SettingError("env", "the victim's env is unknown (no run.json); pass env")
        super().validate()

    def game_settings(self) -> dict[str, Any]:
        """Keyword settings of :class:`agents.adversary_env.AdversaryEnv`."""
        return {"eps": self.eps, "mode": self.mode, "team": self.team, "grid": self.grid,
                "upsample": self.upsample, "attacked": self.attacked,
                "victim_greedy": self.victim_greedy, "pa_ad_steps": self.pa_ad_steps}


def resolve_victim(cfg: AdversaryConfig) -> AdversaryConfig:
    """Fill ``victim_modules`` (frozen) and, when empty, ``env``/``env_kwargs`` from the
    victim's ``run.json``. Raises ``CheckpointError`` for a missing victim checkpoint."""
    if not cfg.victim:
        raise ValueError("no victim given: pass the victim's run directory")
    if not cfg.victim_modules:
        cfg.victim_modules = str(resolve_module_root(cfg.victim).resolve())
    if not cfg.env:
        run = read_run_config(cfg.victim)
        if not run.get("env"):
            raise ValueError(f"cannot tell the victim's env: no run.json for {cfg.victim}; "
                             f"pass env (--env)")
        cfg.env = run["env"]
        if not cfg.env_kwargs:
            cfg.env_kwargs = dict(run.get("env_kwargs") or {})
    return cfg


# --------------------------------------------------------------------------- the game
_VICTIMS: dict[tuple[str, str], dict[str, nn.Module]] = {}


def load_victims(victim: str | Path, agents: list[str], device: str = "cpu"
                 ) -> dict[str, nn.Module]:
    """Frozen victim policies by agent id (agents sharing a module share the object), cached
    per process: the vectorised env copies of one runner share one set of modules."""
    key = (str(Path(victim).resolve()), str(device))
    if key not in _VICTIMS:
        modules = load_policies(victim, device=device)
        for m in modules.values():
            m.eval().requires_grad_(False)
        _VICTIMS[key] = modules
    modules = _VICTIMS[key]
    mapping = agent_policy_map(victim, agents)
    return {a: modules[mapping[a]] for a in agents}


def make_adversary_env(victim: str | Path, env: str | None = None,
                       env_kwargs: dict[str, Any] | None = None, device: str = "cpu",
                       **settings: Any) -> AdversaryEnv:
    """:class:`agents.adversary_env.AdversaryEnv` around ``envs.make_env(env)`` with the victims of
    checkpoint ``victim`` (a run directory, checkpoint or rl_module directory).

    ``env`` defaults to the victim's ``run.json`` env (and its settings). ``settings`` are
    AdversaryEnv's (``eps``, ``mode``, ``team``, ``grid``, ...).
    """
    if env is None:
        run = read_run_config(victim)
        if not run.get("env"):
            raise ValueError(f"cannot tell the victim's env: no run.json for {victim}; pass env")
        env, env_kwargs = run["env"], dict(run.get("env_kwargs") or {})
    victim_env = make_env(env, **dict(env_kwargs or {}))
    victims = load_victims(victim, list(victim_env.possible_agents), device)
    return AdversaryEnv(victim_env, victims, device=device, **settings)


def register_adversary_env(cfg: AdversaryConfig) -> str:
    """Register the attack game of ``cfg`` with Ray Tune; returns its (deterministic) name.

    The victims are loaded HERE, on the driver, and travel inside the env creator (Ray ships
    it to every env runner by value): env runners on other nodes never open the victim's
    checkpoint path (DESIGN.md section 2: weights travel, paths do not)."""
    victim, env, env_kwargs = cfg.victim_modules, cfg.env, dict(cfg.env_kwargs)
    game = cfg.game_settings()
    probe = make_env(env, **env_kwargs)
    agents = list(probe.possible_agents)
    probe.close()
    victims = load_victims(victim, agents, "cpu")

    def creator(env_config: Any = None) -> ParallelPettingZooEnv:
        return ParallelPettingZooEnv(AdversaryEnv(make_env(env, **env_kwargs), victims,
                                                  device="cpu", **game))

    name = rllib_env_name(f"adversary-{env}", victim=victim, env_kwargs=env_kwargs, **game)
    register_env(name, creator)
    return name


def _shared_adversary(agent_id, episode, **kwargs):
    return SHARED_MODULE


def _own_adversary(agent_id, episode, **kwargs):
    return agent_id


def build_adversary_algo_config(cfg: AdversaryConfig):
    """The RLlib ``PPOConfig`` of an adversary run.

    PPO settings come from :func:`agents.train.build_algo_config` (same mapping of the shared
    fields); the environment, the agents-to-modules mapping, ``policies_to_train`` and the
    RLModules are then replaced by the attack game's.
    """
    resolve_victim(cfg)
    cfg.validate()
    config = build_algo_config(cfg)
    env_name = register_adversary_env(cfg)
    probe = make_adversary_env(cfg.victim_modules, cfg.env, cfg.env_kwargs, **cfg.game_settings())
    agents = list(probe.possible_agents)
    probe.close()
    if cfg.policies == "shared":
        module_ids, mapping = [SHARED_MODULE], _shared_adversary
    else:
        module_ids, mapping = agents, _own_adversary
    model_config = {"arch": cfg.arch, "net": dict(cfg.net), "sgam": None,
                    "log_std_init": float(cfg.log_std_init)}
    specs = {mid: RLModuleSpec(module_class=AdversaryTorchRLModule, model_config=model_config)
             for mid in module_ids}
    return (config
            .environment(env_name, normalize_actions=False, clip_actions=False)
            .multi_agent(policies=set(module_ids), policy_mapping_fn=mapping,
                         policies_to_train=list(module_ids), count_steps_by="agent_steps")
            .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=specs)))


def _n_adversaries(cfg: AdversaryConfig) -> int:
    if cfg.team:
        return 1
    if cfg.attacked:
        return len(cfg.attacked)
    return len(env_spaces(cfg)[0])


# --------------------------------------------------------------------------- training loop
def train_adversary(victim: str | Path | None, out: str | Path, env: str | None = None,
                    eps: float | str = 8 / 255, mode: str = "perturb", team: bool = False,
                    iterations: int = 20, resume: bool = False, address: str | None = None,
                    progress: bool = True, runtime_env: dict[str, Any] | None = None,
                    log: Any = None, **settings: Any) -> dict[str, Any]:
    """Train (or resume) adversary agents against the frozen victim ``victim`` into ``out``.

    Args:
        victim: the victim's run directory (or checkpoint); ignored with ``resume``.
        out: the adversary's run directory.
        env: victim env name (default: from the victim's ``run.json``, with its settings).
        eps: Linf budget in [0, 1] units (number or ``"8/255"``).
        mode: ``perturb`` (ATLA) or ``pa-ad`` (PA-AD).
        team: one adversary for all victims.
        iterations: total training iterations (with ``resume``: the new total).
        resume: continue from ``out/checkpoints/latest`` with the saved settings.
        address: Ray cluster address (default: a local Ray).
        progress: show a progress bar.
        runtime_env: Ray ``runtime_env`` for the session this call starts.
        log: receives the line naming the Ray cluster when this call starts Ray.
        **settings: any other :class:`AdversaryConfig` field (``grid``, ``pa_ad_steps``,
            ``policies``, ``train_batch_size``, ``lr``, ``arch``, ``net``, ``seed``, ...).
    Returns:
        ``{"last": last metrics row, "out", "records", "config"}``.
    Raises:
        ValueError: bad settings, an existing run without ``resume``, ``resume`` with no run.
        CheckpointError: the victim checkpoint is missing or unreadable.
    """
    out = Path(out)
    if not resume:
        names = {f.name for f in dataclasses.fields(AdversaryConfig)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(names))}")
    cfg = AdversaryConfig(victim=str(victim or ""), env=env or "", eps=eps, mode=mode,
                          team=team, iterations=iterations, **settings)
    if not resume:
        resolve_victim(cfg)
    # every check before anything is written: the folder, the settings (the saved run.json
    # with resume), then Ray, then the run lock (held to the end) and run.json
    check_run_dir(out, resume)
    cfg = load_run_settings(cfg, out, resume, AdversaryConfig.from_json, kind=RUN_KIND)
    started = ensure_ray(address, runtime_env=runtime_env, log=log)
    try:
        check_cluster_gpus(cfg)
        with run_lock(out):
            cfg = prepare_run(cfg, out, resume, AdversaryConfig.from_json, kind=RUN_KIND)

            def victim_return(row: dict[str, Any]) -> None:
                row["victim_return_mean"] = -row["agent_return_mean"]

            result = run_training_loop(
                build_adversary_algo_config(cfg), cfg, out, resume=resume, address=None,
                progress=progress, n_agents=_n_adversaries(cfg), on_row=victim_return,
                postfix_key=("victim", "victim_return_mean"),
                desc=f"adversary {cfg.mode}{'/team' if cfg.team else ''} eps={cfg.eps:.4f}")
    finally:
        if started:
            ray.shutdown()
    return {"last": result["last"], "out": str(out), "records": result["records"],
            "config": cfg.to_json()}


# --------------------------------------------------------------------------- back to an attack
def read_adversary_config(run_dir: str | Path) -> AdversaryConfig:
    """The :class:`AdversaryConfig` of an adversary run (``CheckpointError`` if it is not one)."""
    run = read_run_config(run_dir)
    if run.get("kind") != RUN_KIND:
        raise CheckpointError(f"not an adversary run (no adversary run.json): {run_dir}")
    return AdversaryConfig.from_json(run)


def load_adversary(run_dir: str | Path, policy: nn.Module | None = None,
                   eps: float | str | None = None, module_id: str | None = None,
                   device: str | torch.device | None = None, stochastic: bool = False,
                   seed: int | None = None) -> LearnedAdversary:
    """Load a trained adversary as an attack (``attack(obs, actions=None) -> adv_obs``).

    Args:
        run_dir: the adversary's run directory (or one of its checkpoints).
        policy: the victim to bind (default: the frozen victim of the run, its first module;
            :func:`attacks.evaluate` rebinds the attack to each victim policy anyway).
        eps: budget (default: the one it was trained at).
        module_id: which adversary module (needed only for per-agent adversary modules).
        device: where to run (default: CPU).
        stochastic: sample the adversary's actions instead of playing their mode.
        seed: seed of those samples.
    Returns:
        A :class:`attacks.learned.LearnedAdversary`; its output stays within the Linf eps-ball
        and [0, 1].
    Raises:
        CheckpointError: missing, corrupt or non-adversary checkpoint.
        ValueError: unknown ``module_id``.
    """
    cfg = read_adversary_config(run_dir)
    module = load_rl_module(run_dir, module_id, what="adversary", arg="module_id")
    if not isinstance(module, AdversaryTorchRLModule):
        raise CheckpointError(f"{run_dir} holds a {type(module).__name__}, "
                              "not an adversary module")
    device = torch.device(device or "cpu")
    if policy is None:
        victims = load_policies(cfg.victim_modules, device=device)
        policy = next(iter(victims.values()))
    n_team = 1
    if cfg.team:
        n_team = len(cfg.attacked) if cfg.attacked else len(_victim_agents(cfg))
    log_std = None if module.log_std is None else module.log_std.detach().to(device)
    return LearnedAdversary(policy, module.net.to(device).eval(),
                            eps=cfg.eps if eps is None else eps, mode=cfg.mode, grid=cfg.grid,
                            upsample=cfg.upsample, team_size=n_team, pa_ad_steps=cfg.pa_ad_steps,
                            log_std=log_std, stochastic=stochastic, seed=seed)


def _victim_agents(cfg: AdversaryConfig) -> list[str]:
    env = make_env(cfg.env, **cfg.env_kwargs)
    agents = list(env.possible_agents)
    env.close()
    return agents


def evaluate_adversary(run_dir: str | Path, episodes: int = 10, seed: int = 0,
                       eps: float | str | None = None, progress: bool = True) -> dict[str, Any]:
    """Victims' returns with and without the trained adversary (:func:`attacks.evaluate`).

    The victims play greedily on observations perturbed by :func:`load_adversary`'s attack
    (deterministic adversary), on the env of the run; the clean run uses the same seeds.

    Returns:
        :func:`attacks.evaluate`'s dict plus ``agent_return_mean`` and
        ``clean_agent_return_mean`` (victims' mean per-agent episodic return).
    """
    cfg = read_adversary_config(run_dir)
    env = make_env(cfg.env, **cfg.env_kwargs)
    victims = load_victims(cfg.victim_modules, list(env.possible_agents), "cpu")
    attack = load_adversary(run_dir, policy=next(iter(victims.values())), eps=eps)
    result = evaluate(victims, env, attack, episodes=episodes, seed=seed, progress=progress)
    n = max(1, len(env.possible_agents))
    result["agent_return_mean"] = result["team_return"]["mean"] / n
    result["clean_agent_return_mean"] = result["clean"]["team_return"]["mean"] / n
    env.close()
    return result


__all__ = ["AdversaryConfig", "AdversaryTorchRLModule", "SHARED_MODULE", "TEAM_AGENT",
           "build_adversary_algo_config", "evaluate_adversary", "load_adversary",
           "load_victims", "make_adversary_env", "read_adversary_config",
           "register_adversary_env", "resolve_victim", "train_adversary"]
