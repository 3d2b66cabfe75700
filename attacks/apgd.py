"""APGD: step-size-free PGD with momentum and a checkpointed step-size schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from attacks.base import (Attack, AttackContext, BestIterate, check_fraction,
                          check_positive_int)
from attacks.objectives import TargetSpec


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * steps)`` at which APGD may halve its step size.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``
    (Croce & Hein 2020, section 3.2): checkpoints start dense and become sparser, down to a
    spacing of 6% of the budget. Returns the distinct ``w_j`` in ``1..steps-1``.

    Example::

        >>> apgd_checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
    """
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ws = sorted({math.ceil(pj * steps - 1e-9) for pj in p[1:]})
    return [w for w in ws if 0 < w < steps]


class APGD(Attack):
    r"""Auto-PGD: PGD with momentum and an adaptive step size, no step size to tune.

    Paper: Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020 (https://arxiv.org/abs/2003.01690), Algorithm 1.

    Starting from ``eta = 2 * eps``:
    ``z_{k+1} = P(x_k + eta * s(grad l(x_k)))`` and
    ``x_{k+1} = P(x_k + momentum * (z_{k+1} - x_k) + (1 - momentum) * (x_k - x_{k-1}))``
    (``s = sign`` for Linf, ``g / ||g||_2`` for L2). At each checkpoint ``w_j``
    (:func:`apgd_checkpoints`) the step size of a sample is halved and its iterate reset to its
    best point so far when (1) fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last
    checkpoint increased the loss, or (2) its step size was not reduced at the last checkpoint
    and its best loss has not improved since. All of this is per sample. The best iterate over
    all steps and restarts is returned (success first, then loss; the last iterate of a run is
    evaluated as in :class:`~attacks.PGD`).

    Losses: ``objective="ce"`` (APGD-CE) or ``"dlr"`` (APGD-DLR, the difference-of-logits
    ratio, invariant to the logits' scale). **DLR needs >= 3 actions**: with fewer, the call
    REFUSES with a ValueError (``objective 'dlr' needs >= 3 actions ... use 'ce' or 'margin'``)
    rather than silently falling back; ``margin`` is the scale-dependent 2-action analogue.
    ``kl``, ``value`` and ``targeted`` work as everywhere (:mod:`attacks.base`).

    Distance Measure: Linf (default) or L2.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units. (Default: 8/255)
        steps (int): iterations per restart, >= 1. (Default: 100, as in the paper)
        restarts (int): independent runs from random starts, >= 1. (Default: 1)
        rho (float): the fraction of loss-increasing steps required between checkpoints.
            (Default: 0.75)
        momentum (float): weight of the new gradient step against the previous step (the
            paper's alpha). (Default: 0.75)
        random_start (bool): start from a uniform random point of the ball. (Default: True)
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        objective (str): ``ce``, ``dlr``, ``margin``, ``kl``, ``value`` or ``targeted``.
            (Default: ``"ce"``)
        target: target for ``objective="targeted"``. (Default: None = the worst action)
        seed (int | None): reproducible random starts. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the eps-ball and [0, 1].

    Example::

        >>> attack = APGD(policy, eps=8/255, steps=100, objective="dlr")
        >>> adv_obs = attack(obs)
    """

    name = "apgd"
    _extra_settings = ("steps", "restarts", "rho", "momentum", "random_start")

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, steps: int = 100,
                 restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
                 random_start: bool = True, norm: str = "linf", objective: str = "ce",
                 target: TargetSpec = None, seed: int | None = None):
        super().__init__(policy, eps, norm=norm, objective=objective, target=target, seed=seed)
        self.steps = check_positive_int(steps, "steps")
        self.restarts = check_positive_int(restarts, "restarts")
        self.rho = check_fraction(rho, "rho")
        self.momentum = check_fraction(momentum, "momentum")
        self.random_start = bool(random_start)
        self.checkpoints = apgd_checkpoints(self.steps)

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        best = self._run(ctx)
        ctx.success = best.success
        return best.x

    def _run(self, ctx: AttackContext) -> BestIterate:
        """All restarts on ``ctx``; the per-sample best iterate (point, loss, success)."""
        x0 = ctx.obs
        b = ctx.batch
        best = BestIterate(ctx)

        def bcast(mask: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 1, 1, 1)
            return mask.view(-1, 1, 1, 1)

        checkpoints = set(self.checkpoints)
        for _ in range(self.restarts):
            start = x0
            if self.random_start:
                start = self.project(x0, x0 + self.random_delta(x0, ctx.generator))
            eta = torch.full((b,), 2.0 * self.eps, device=x0.device, dtype=x0.dtype)

            loss, grad, success = self.loss_and_grad(start, ctx)
            best.update(start, loss, success)
            x_max, f_max, grad_max = start.clone(), loss.clone(), grad.clone()
            # state at the previous checkpoint (w_0 = 0)
            last_w, eta_at_last, f_max_at_last = 0, eta.clone(), f_max.clone()
            increases = torch.zeros(b, device=x0.device, dtype=x0.dtype)
            f_prev = loss

            x_prev, x = start, self.project(x0, start + self.steepest_step(grad, eta))
            for k in range(1, self.steps):
                loss, grad, success = self.loss_and_grad(x, ctx)
                best.update(x, loss, success)
                increases += (loss > f_prev).to(x0.dtype)
                f_prev = loss
                up = loss > f_max
                x_max = torch.where(bcast(up), x, x_max)
                grad_max = torch.where(bcast(up), grad, grad_max)
                f_max = torch.where(up, loss, f_max)
                if k in checkpoints:
                    too_few_increases = increases < self.rho * (k - last_w)
                    stalled = (eta_at_last == eta) & (f_max_at_last == f_max)
                    reduce = too_few_increases | stalled
                    eta_at_last, f_max_at_last, last_w = eta.clone(), f_max.clone(), k
                    eta = torch.where(reduce, eta / 2, eta)
                    x = torch.where(bcast(reduce), x_max, x)
                    x_prev = torch.where(bcast(reduce), x_max, x_prev)
                    grad = torch.where(bcast(reduce), grad_max, grad)
                    increases.zero_()
                z = self.project(x0, x + self.steepest_step(grad, eta))
                x_next = self.project(x0, x + self.momentum * (z - x) + (1 - self.momentum) * (x - x_prev))
                x_prev, x = x, x_next
            best.update_last(self, x, ctx)
        return best
