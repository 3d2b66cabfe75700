"""The audit of trained policies on observations from their own environment: the parts that
touch checkpoints and envs."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.checkpoint import check_policy_fits_env, load_agent_policies, run_env
from envs import make_env
from marl_fgmf.audit.report import AuditReport
from marl_fgmf.audit.run import audit
from marl_fgmf.protocol import eval_mode, policy_device

__all__ = ["collect_observations", "audit_checkpoint", "load_audit_target", "audit_policies"]


def collect_observations(policy: Any, env: Any, n_obs: int = 64, episodes: int = 4,
                         seed: int = 10_000) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Frames seen by the greedy ``policy`` playing ``env`` clean, grouped per policy module.

    Args:
        policy: one module for every agent, or a mapping agent id -> module.
        env: a PettingZoo ``ParallelEnv`` with image observations (uint8 frames are / 255).
        n_obs: at most this many frames per module, spread evenly over the rollout.
        episodes: episodes played (episode ``i`` resets with ``seed + i``).
        seed: base seed.

    Returns:
        ``{name: (module, frames)}``, ``frames`` float (B, H, W, C) in [0, 1]; ``name`` is the
        first agent using the module (``"shared"`` for a single module).
    """
    shared = isinstance(policy, nn.Module)
    frames: dict[int, list[torch.Tensor]] = {}
    modules: dict[int, tuple[str, nn.Module]] = {}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        while env.agents:
            actions = {}
            for agent in env.agents:
                if agent not in obs:
                    continue
                p = policy if shared else policy[agent]
                device, dtype = policy_device(p)
                frame = np.asarray(obs[agent])
                x = torch.as_tensor(frame).float()
                if frame.dtype == np.uint8:
                    x = x / 255.0
                with torch.no_grad(), eval_mode(p, train=False):
                    actions[agent] = int(p(x[None].to(device=device, dtype=dtype)).argmax(dim=1))
                frames.setdefault(id(p), []).append(x)
                modules.setdefault(id(p), ("shared" if shared else agent, p))
            obs, *_ = env.step(actions)
    out: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for key, fs in frames.items():
        idx = sorted(set(np.linspace(0, len(fs) - 1, num=min(n_obs, len(fs))).round()
                         .astype(int).tolist()))
        name, module = modules[key]
        out[name] = (module, torch.stack([fs[i] for i in idx]).clamp(0.0, 1.0))
    return out


def audit_checkpoint(checkpoint: Any, env: str | None = None,
                     env_kwargs: dict[str, Any] | None = None, policy_id: str | None = None,
                     eps: float | str = 8 / 255, n_obs: int = 64, episodes: int = 4,
                     seed: int = 0, progress: bool = False, **settings: Any
                     ) -> dict[str, AuditReport]:
    """Audit a trained checkpoint on observations from its own environment.

    Loads every policy module of the checkpoint (or ``policy_id``), plays ``episodes`` clean
    greedy episodes of the env (``env`` or the run's ``run.json`` env), keeps ``n_obs`` frames
    per module and runs :func:`audit` on each.

    Args:
        checkpoint: a run directory or checkpoint (``agents.load_policy``).
        env, env_kwargs: environment override (default: the run's).
        policy_id: audit only this module.
        eps, seed, progress, **settings: passed to :func:`audit`.
        n_obs, episodes: how many observations, from how many episodes.

    Returns:
        ``{module name: AuditReport}`` (``shared``, or per agent).

    Raises:
        agents.checkpoint.CheckpointError: missing or unreadable checkpoint.
        ValueError: unknown env, env setting or policy id.
    """
    policy, env_name, env_kwargs = load_audit_target(checkpoint, env, env_kwargs, policy_id)
    return audit_policies(policy, env_name, env_kwargs, policy_id=policy_id, eps=eps,
                          n_obs=n_obs, episodes=episodes, seed=seed, progress=progress,
                          **settings)


def load_audit_target(checkpoint: Any, env: str | None = None,
                      env_kwargs: dict[str, Any] | None = None, policy_id: str | None = None
                      ) -> tuple[Any, str, dict[str, Any]]:
    """``(policy, env name, env settings)`` of a checkpoint on CPU, checked against its env
    (:func:`agents.checkpoint.run_env` picks the env): what :func:`audit_checkpoint` audits,
    and what ``marl-fgmf audit --address`` ships to the cluster."""
    checkpoint = os.path.abspath(checkpoint)  # RLlib's loader rejects relative paths
    env_name, env_kwargs = run_env(checkpoint, env, env_kwargs)
    environment = make_env(env_name, **env_kwargs)
    try:
        agents = list(environment.possible_agents)
        policy = load_agent_policies(checkpoint, agents, policy_id, device="cpu",
                                     single_if_shared=True)
        for agent in agents:
            check_policy_fits_env(policy if not isinstance(policy, dict) else policy[agent],
                                  environment, agent)
    finally:
        environment.close()
    return policy, env_name, env_kwargs


def audit_policies(policy: Any, env: str, env_kwargs: dict[str, Any] | None = None,
                   policy_id: str | None = None, eps: float | str = 8 / 255, n_obs: int = 64,
                   episodes: int = 4, seed: int = 0, progress: bool = False, **settings: Any
                   ) -> dict[str, AuditReport]:
    """Audit loaded policies on observations from the env ``env`` (no checkpoint is read).

    ``policy`` is one module for every agent, or ``{agent: module}`` (modules shared by
    several agents are audited once); ``policy_id`` names the single module's report.
    The rest as in :func:`audit_checkpoint`. This is what a tournament's audit task runs on
    the weights the driver shipped.
    """
    environment = make_env(env, **dict(env_kwargs or {}))
    try:
        groups = collect_observations(policy, environment, n_obs, episodes, 10_000 + seed)
    finally:
        environment.close()
    if policy_id is not None:
        groups = {policy_id: g for g in groups.values()}
    return {name: audit(module, obs, eps, seed=seed, progress=progress, **settings)
            for name, (module, obs) in groups.items()}
