"""The one signed-gradient projected ascent loop (Linf PGD) for the torch-only modules.

PGD (Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018) maximizes a per-sample objective ``J(x')`` over the Linf
eps-ball of ``x`` intersected with [0, 1]:

    x_0     = x, or clip_[0,1](x + u), u ~ U[-eps, eps]^d     (random start)
    x_{k+1} = clip_[0,1](x + clip_[-eps,eps](x_k + alpha * sign(grad J(x_k)) - x))

with ``alpha = 2.5 * eps / steps`` by default (Madry et al.'s rule: the iterate can cross the
ball). With ``keep_best`` the iterate with the largest ``J`` per sample is returned (the last
iterate is scored too), else the last iterate.

Callers: ASR-M's perturbation (:func:`marl_fgmf.metrics.pgd_perturbation`), SA-PPO's inner
maximization (:func:`marl_fgmf.adv_training.kl_pgd`) and PA-AD's target realization
(:func:`attacks.learned.realize_target`). The full attack with restarts, L2 steps, objectives
and success-first best iterates is :class:`attacks.PGD`.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["linf_pgd"]


def linf_pgd(objective: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor, eps: float,
             steps: int, alpha: float | None = None, random_start: bool = False,
             generator: torch.Generator | None = None, keep_best: bool = False) -> torch.Tensor:
    """Maximize ``objective(x') -> (B,)`` over the Linf ``eps``-ball of ``obs`` and [0, 1].

    Args:
        objective: per-sample objective to MAXIMIZE, differentiable in its input.
        obs: (B, H, W, C) float in [0, 1] (the centre of the ball).
        eps: Linf budget >= 0 in [0, 1] units; 0 (or ``steps`` 0) returns ``obs``.
        steps: signed-gradient steps.
        alpha: step size; None = ``2.5 * eps / steps``.
        random_start: start from a uniform point of the ball (drawn with ``generator``).
        generator: the random start's generator (reproducible starts).
        keep_best: return each sample's best iterate instead of the last one.

    Returns:
        (B, H, W, C) perturbed observations, detached, inside the ball and [0, 1].
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x0 = obs.detach()
    steps = int(steps)
    if eps == 0 or steps < 1:
        return x0.clone()
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    x = x0
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = (x0 + (2 * noise - 1) * eps).clamp(0.0, 1.0)
    best = x0.clone() if keep_best else None
    best_score = (torch.full((x0.shape[0],), float("-inf"), device=x0.device, dtype=x0.dtype)
                  if keep_best else None)
    for k in range(steps + (1 if keep_best else 0)):
        last = k == steps  # only reached with keep_best: score the final iterate, no gradient
        xr = x.detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            score = objective(xr)
        if keep_best and (k > 0 or random_start):
            better = score.detach() > best_score
            best[better] = x[better]
            best_score = torch.where(better, score.detach(), best_score)
        if last:
            break
        (grad,) = torch.autograd.grad(score.sum(), xr)
        x = (x0 + (x.detach() + alpha * grad.sign() - x0).clamp(-eps, eps)).clamp(0.0, 1.0)
    return (best if keep_best else x).detach()
