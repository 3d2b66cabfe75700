"""PGD: projected gradient ascent with random start and restarts, best iterate per sample."""
from __future__ import annotations

import torch
from torch import nn

from attacks.base import (Attack, AttackContext, BestIterate, check_fraction,
                          check_positive_int)
from attacks.objectives import TargetSpec


class PGD(Attack):
    r"""Projected Gradient Descent (ascent on the attacker's loss).

    Paper: Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning Models Resistant
    to Adversarial Attacks", ICLR 2018 (https://arxiv.org/abs/1706.06083).

    ``x_{k+1} = P(x_k + alpha * s(grad l(x_k)))`` with ``s = sign`` (Linf) or ``g / ||g||_2``
    (L2) and ``P`` the projection onto the eps-ball intersected with [0, 1]. ``x_0`` is a
    uniform random point of the ball (``random_start``) or ``x``. The whole run is repeated
    ``restarts`` times from fresh random starts; per sample the best iterate over all steps and
    restarts is returned (a successful one first, then the largest loss), so more steps or
    restarts never return a weaker perturbation. (The last iterate of a run needs no gradient;
    when the objective's goal is success it is evaluated only for the samples that no earlier
    iterate has flipped: see :meth:`attacks.base.BestIterate.update_last`.)

    Distance Measure: Linf (default) or L2.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units. (Default: 8/255)
        alpha (float | None): step size; ``None`` = ``2.5 * eps / steps`` (Madry et al.'s rule,
            so the iterate can cross the ball). (Default: None)
        steps (int): iterations per restart, >= 1. (Default: 10)
        random_start (bool): start from a uniform point in the ball. (Default: True)
        restarts (int): independent runs, >= 1. (Default: 1)
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        objective (str): ``ce``, ``kl``, ``value``, ``targeted``, ``margin`` or ``dlr``.
            (Default: ``"ce"``)
        target: target for ``objective="targeted"``. (Default: None = the worst action)
        seed (int | None): reproducible random starts. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the eps-ball and [0, 1].

    Example::

        >>> attack = PGD(policy, eps=8/255, alpha=2/255, steps=10, random_start=True)
        >>> adv_obs = attack(obs)
    """

    name = "pgd"
    _extra_settings = ("alpha", "steps", "random_start", "restarts")

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, alpha: float | None = None,
                 steps: int = 10, random_start: bool = True, restarts: int = 1,
                 norm: str = "linf", objective: str = "ce", target: TargetSpec = None,
                 seed: int | None = None):
        super().__init__(policy, eps, norm=norm, objective=objective, target=target, seed=seed)
        self.steps = check_positive_int(steps, "steps")
        self.restarts = check_positive_int(restarts, "restarts")
        self.alpha = (2.5 * self.eps / self.steps if alpha is None
                      else check_fraction(alpha, "alpha", 0.0, 1.0))
        self.random_start = bool(random_start)

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        x0 = ctx.obs
        best = BestIterate(ctx)
        for _ in range(self.restarts):
            x = x0
            if self.random_start:
                x = self.project(x0, x0 + self.random_delta(x0, ctx.generator))
            for _ in range(self.steps):
                loss, grad, success = self.loss_and_grad(x, ctx)
                best.update(x, loss, success)
                x = self.project(x0, x + self.steepest_step(grad, self.alpha))
            best.update_last(self, x, ctx)
        ctx.success = best.success
        return best.x
