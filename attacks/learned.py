"""Learned adversaries replayed as observation attacks, and the maths they share with training.

A learned adversary is an RL agent trained (:func:`agents.adversary.train_adversary`, in the
game :class:`agents.adversary_env.AdversaryEnv`) to perturb the observations of frozen victim
policies. :class:`LearnedAdversary` replays a trained one as an ordinary
:class:`attacks.base.Attack`, usable by :func:`attacks.evaluate` and tournaments. The functions
below turn an adversary's action into a perturbation, identically in the game and in the replay.

Papers:

* ``perturb`` mode follows ATLA: Zhang, Chen, Boning and Hsieh, "Robust Reinforcement Learning
  on State Observations with Learned Optimal Adversary", ICLR 2021
  (https://arxiv.org/abs/2101.08452): the adversary is an RL agent whose action IS the
  perturbation and whose reward is minus the victim's reward.
* ``pa-ad`` mode follows PA-AD: Sun, Zhang, Xie, Ma, Zheng, Chen and Huang, "Who Is the
  Strongest Enemy? Towards Optimal and Efficient Evasion Attacks in Deep RL", ICLR 2022
  (https://arxiv.org/abs/2106.05087): a "director" RL agent chooses the policy-space
  direction to push the victim in, and a gradient-based "actor" realizes it in observation
  space. For discrete victims we use the paper's simplest director: a target action
  (``Discrete(n_actions)``), realized by a targeted Linf PGD step sequence that increases
  ``log pi(target | x + delta)`` (:func:`realize_target`).

Perturbation (``perturb``, :func:`perturbation_from_action`): the flat action ``a`` is read as
a low-resolution image ``(gh, gw, C)`` (row-major, channels last; for a team adversary
``(gh, gw, N*C)`` whose channel group ``i`` belongs to the ``i``-th attacked victim,
:func:`stack_team`), squashed into the Linf ball by ``eps * tanh(a)``, upsampled to ``(H, W)``
(``nearest`` by default, or ``bilinear``; both are convex combinations, so the ball is kept),
added to the clean observation and clipped to [0, 1]. Any real vector is accepted: the squash,
not a clip at +-1 (``tanh(1) = 0.76``), sets the reachable range.

Perturbation (``pa-ad``): the victim's observation is moved by :func:`realize_target`
(``steps`` signed-gradient steps of size ``2.5 * eps / steps`` from the clean observation,
projected onto the Linf eps-ball and [0, 1]; the iterate with the largest ``log pi(target)``
is kept): :func:`marl_fgmf.perturbation.linf_pgd` with that objective.

In both modes every perturbed observation lies in ``[x - eps, x + eps] ∩ [0, 1]``.

This module imports torch, :mod:`marl_fgmf.perturbation` and :mod:`attacks.base` only.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackContext, check_positive_int
from marl_fgmf.perturbation import linf_pgd

MODES = ("perturb", "pa-ad")
UPSAMPLING = ("nearest", "bilinear")

__all__ = ["LearnedAdversary", "MODES", "UPSAMPLING", "check_grid", "check_mode",
           "check_upsample", "perturbation_from_action", "realize_target", "split_team",
           "stack_team"]


def check_mode(mode: Any) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise a one-line ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"unknown adversary mode {mode!r}; allowed: {', '.join(MODES)}")
    return mode


def check_grid(grid: Any, height: int, width: int) -> tuple[int, int]:
    """``grid`` (an int or ``(gh, gw)``) as a pair with ``1 <= gh <= H`` and ``1 <= gw <= W``."""
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        pair = (int(grid), int(grid))
    elif isinstance(grid, Sequence) and len(grid) == 2 and all(
            isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in grid):
        pair = (int(grid[0]), int(grid[1]))
    else:
        raise ValueError(f"grid must be an int or a pair (gh, gw) of ints, got {grid!r}")
    if not (1 <= pair[0] <= height and 1 <= pair[1] <= width):
        raise ValueError(f"grid must be between 1 and the observation size ({height}, {width}), "
                         f"got {grid!r}")
    return pair


def check_upsample(upsample: Any) -> str:
    """Return ``upsample`` if it is one of :data:`UPSAMPLING`, else raise a ``ValueError``."""
    if upsample not in UPSAMPLING:
        raise ValueError(f"unknown upsample {upsample!r}; allowed: {', '.join(UPSAMPLING)}")
    return upsample


# --------------------------------------------------------------------------- the maths
def perturbation_from_action(action: torch.Tensor, obs_shape: Sequence[int],
                             grid: tuple[int, int], eps: float,
                             upsample: str = "nearest") -> torch.Tensor:
    """ATLA-style perturbation: ``upsample(eps * tanh(a))``.

    Args:
        action: (F, gh * gw * C) real actions (any value; tanh squashes them).
        obs_shape: ``(H, W, C)`` of the observation to perturb.
        grid: ``(gh, gw)``.
        eps: Linf budget in [0, 1] units.
        upsample: ``nearest`` or ``bilinear``.
    Returns:
        (F, H, W, C) perturbation with every entry in ``[-eps, eps]``.
    """
    h, w, c = (int(s) for s in obs_shape)
    gh, gw = grid
    if action.dim() != 2 or action.shape[1] != gh * gw * c:
        raise ValueError(f"perturbation actions must have shape (F, {gh * gw * c}) = "
                         f"(F, gh*gw*C) for grid {grid} and {c} channels, got {tuple(action.shape)}")
    low = eps * torch.tanh(action).reshape(-1, gh, gw, c).permute(0, 3, 1, 2)  # (F, C, gh, gw)
    if (gh, gw) != (h, w):
        if check_upsample(upsample) == "nearest":
            low = F.interpolate(low, size=(h, w), mode="nearest")
        else:
            low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return low.permute(0, 2, 3, 1)  # (F, H, W, C)


def realize_target(policy: nn.Module, obs: torch.Tensor, target: torch.Tensor, eps: float,
                   steps: int = 3, alpha: float | None = None) -> torch.Tensor:
    """PA-AD's actor for a discrete victim: targeted Linf PGD toward ``target``.

    Maximizes ``log pi(target | x')`` over ``x'`` in the Linf eps-ball of ``obs`` intersected
    with [0, 1] by ``steps`` signed-gradient steps of size ``alpha`` (default
    ``2.5 * eps / steps``, Madry et al.'s rule) from ``obs``, keeping per sample the iterate with
    the largest target log-probability. Gradients are taken with respect to the observation
    only (the policy's parameters are not touched).

    Args:
        policy: the victim, ``policy(obs) -> logits``.
        obs: (B, H, W, C) float in [0, 1].
        target: (B,) long target actions.
        eps: Linf budget.
        steps: number of PGD steps, >= 1.
        alpha: step size.
    Returns:
        (B, H, W, C) perturbed observations (detached).
    """
    def target_logp(x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(policy(x), dim=1).gather(1, target[:, None])[:, 0]

    return linf_pgd(target_logp, obs, eps, steps, alpha=alpha, keep_best=True)


def stack_team(obs: torch.Tensor, n: int) -> torch.Tensor:
    """(F*N, H, W, C) victim observations -> (F, H, W, N*C) team observations (channel group
    ``i`` is victim ``i`` of each consecutive group of ``N``)."""
    b, h, w, c = obs.shape
    return obs.reshape(b // n, n, h, w, c).permute(0, 2, 3, 1, 4).reshape(b // n, h, w, n * c)


def split_team(team: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`stack_team`: (F, H, W, N*C) -> (F*N, H, W, C)."""
    f, h, w, nc = team.shape
    return team.reshape(f, h, w, n, nc // n).permute(0, 3, 1, 2, 4).reshape(f * n, h, w, nc // n)


# --------------------------------------------------------------------------- the attack
class LearnedAdversary(Attack):
    r"""A trained adversary agent replayed as an observation attack.

    Paper: ATLA (Zhang et al., ICLR 2021) for ``mode="perturb"``; PA-AD (Sun et al., ICLR 2022)
    for ``mode="pa-ad"`` (see the module docstring). Load a trained one with
    :func:`agents.adversary.load_adversary`.

    The adversary network acts on the clean observations exactly as in
    :class:`agents.adversary_env.AdversaryEnv`: ``perturb`` applies ``upsample(eps * tanh(mean))`` (its Gaussian
    mean, or a sample with ``stochastic=True``); ``pa-ad`` takes the adversary's greedy (or
    sampled) target action and realizes it on the bound victim ``policy`` with
    :func:`realize_target`. The base class projects onto the Linf eps-ball and [0, 1].

    Distance Measure: Linf.

    Arguments:
        policy (nn.Module): the victim on the policy protocol (``pa-ad`` differentiates it;
            ``perturb`` only reports ``last_success`` with it).
        adversary (nn.Module): the adversary network on the policy protocol: float
            (F, H, W, C') in [0, 1] -> (F, gh*gw*C') Gaussian means (``perturb``) or
            (F, N*n_actions) logits (``pa-ad``).
        eps (float): budget; the one the adversary was trained at is the natural choice.
            (Default: 8/255)
        mode (str): ``perturb`` or ``pa-ad``. (Default: ``perturb``)
        grid (int | (int, int)): ``perturb`` resolution. (Default: 7)
        upsample (str): ``nearest`` or ``bilinear``. (Default: ``nearest``)
        team_size (int): N for a team adversary; each call's batch must then be consecutive
            groups of N victims' observations in the trained order (as
            :func:`attacks.evaluate` batches all agents of a shared policy). (Default: 1)
        pa_ad_steps (int): PGD steps of the ``pa-ad`` realization. (Default: 3)
        log_std (Tensor | None): the Gaussian's log standard deviation (``stochastic``).
        stochastic (bool): sample the adversary's action instead of its mode. (Default: False)
        seed (int | None): reproducible samples. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1]; B a multiple of ``team_size``.
        - actions: (B,) integer or None (only used to report ``last_success``).
        - output: (B, H, W, C) within the Linf eps-ball and [0, 1].

    Example::

        >>> attack = load_adversary("runs/adv-perturb")      # agents.adversary
        >>> evaluate(victim, make_env("beacon"), attack, episodes=10)
    """

    name = "learned"
    norms = ("linf",)
    objectives = ("ce",)
    _extra_settings = ("mode", "grid", "upsample", "team_size", "pa_ad_steps", "stochastic")

    def __init__(self, policy: nn.Module, adversary: nn.Module, eps: float | str = 8 / 255, *,
                 mode: str = "perturb", grid: int | Sequence[int] = 7, upsample: str = "nearest",
                 team_size: int = 1, pa_ad_steps: int = 3, log_std: torch.Tensor | None = None,
                 stochastic: bool = False, seed: int | None = None):
        super().__init__(policy, eps, norm="linf", objective="ce", seed=seed)
        if not isinstance(adversary, nn.Module):
            raise ValueError(f"adversary must be an nn.Module, got {type(adversary).__name__}")
        self.adversary = adversary.eval()
        self.mode = check_mode(mode)
        self.uses_gradients = self.mode == "pa-ad"
        self.grid = grid if isinstance(grid, int) else tuple(grid)
        self.upsample = check_upsample(upsample)
        self.team_size = check_positive_int(team_size, "team_size")
        self.pa_ad_steps = check_positive_int(pa_ad_steps, "pa_ad_steps")
        self.log_std = None if log_std is None else torch.as_tensor(log_std).detach()
        if stochastic and self.mode == "perturb" and self.log_std is None:
            raise ValueError("stochastic perturb-mode replay needs the adversary's log_std")
        self.stochastic = bool(stochastic)

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        x = ctx.obs
        n = self.team_size
        if x.shape[0] % n:
            raise ValueError(f"a team adversary of {n} victims needs batches of whole teams "
                             f"(a multiple of {n} observations), got {x.shape[0]}")
        adv_device = next((p.device for p in self.adversary.parameters()), x.device)
        adv_in = (stack_team(x, n) if n > 1 else x).to(adv_device)
        with torch.no_grad():
            out = self.adversary(adv_in).to(x.device)
        gen = ctx.generator
        if self.mode == "perturb":
            if self.stochastic:
                noise = torch.randn(out.shape, generator=gen, device=x.device, dtype=x.dtype)
                out = out + self.log_std.to(x.device, x.dtype).exp() * noise
            grid = check_grid(self.grid, adv_in.shape[1], adv_in.shape[2])
            delta = perturbation_from_action(out, adv_in.shape[1:], grid, self.eps, self.upsample)
            if n > 1:
                delta = split_team(delta, n)
            return x + delta
        logits = out.reshape(out.shape[0] * n, -1)  # (B, n_actions)
        if logits.shape[1] != ctx.n_actions:
            raise ValueError(f"the adversary chooses among {logits.shape[1]} target actions, "
                             f"the victim has {ctx.n_actions}")
        if self.stochastic:
            target = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen)[:, 0]
        else:
            target = logits.argmax(dim=1)
        return realize_target(self.policy, x, target, self.eps, self.pa_ad_steps)

