"""FGSM: one step of steepest ascent on the attacker's loss."""
from __future__ import annotations

import torch
from torch import nn

from attacks.base import Attack, AttackContext
from attacks.objectives import TargetSpec


class FGSM(Attack):
    r"""Fast Gradient Sign Method.

    Paper: Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015 (https://arxiv.org/abs/1412.6572). ``x' = x + eps * sign(grad_x l(x))``; with
    ``norm="l2"`` the fast gradient method ``x' = x + eps * g / ||g||_2``.

    Distance Measure: Linf (default) or L2.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units. (Default: 8/255)
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        objective (str): ``ce``, ``kl``, ``value``, ``targeted``, ``margin`` or ``dlr``
            (see :mod:`attacks.base`). (Default: ``"ce"``)
        target: target for ``objective="targeted"``. (Default: None = the worst action)
        seed (int | None): only used by the ``kl`` objective (below). (Default: None)

    The KL objective ``KL(pi(x) || pi(x + delta))`` has a zero gradient at ``delta = 0`` (its
    minimum), so for ``kl`` the gradient is taken at ``x + xi``, ``xi`` uniform noise of size
    ``eps / 100`` (as the MAD attack of Zhang et al. 2020 starts from a random point); the step
    itself is still taken from ``x``.

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the eps-ball and [0, 1].

    Example::

        >>> attack = FGSM(policy, eps=8/255)
        >>> adv_obs = attack(obs)
    """

    name = "fgsm"

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, norm: str = "linf",
                 objective: str = "ce", target: TargetSpec = None, seed: int | None = None):
        super().__init__(policy, eps, norm=norm, objective=objective, target=target, seed=seed)

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        x = ctx.obs
        if self.objective == "kl":
            noise = torch.rand(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
            x = (x + (noise * 2 - 1) * (self.eps / 100)).clamp(0, 1)
        _, grad, _ = self.loss_and_grad(x, ctx)
        return ctx.obs + self.steepest_step(grad, self.eps)
