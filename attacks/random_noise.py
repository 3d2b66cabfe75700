"""Random noise of the attack budget: the baseline every white-box attack must beat.

Audit check 2 (DESIGN.md section 4) compares it with FGSM: random noise that succeeds more
often than a gradient attack of the same budget is a symptom of gradient masking.
"""
from __future__ import annotations

import torch
from torch import nn

from attacks.base import Attack, AttackContext

DISTRIBUTIONS = ("sign", "uniform")


class RandomNoise(Attack):
    r"""Random perturbation inside the eps-ball (no gradient, no objective).

    Paper: the random-noise baseline of Goodfellow et al. 2015 and the gradient-masking
    checklist of Carlini et al. 2019 ("On Evaluating Adversarial Robustness").

    Distance Measure: Linf or L2.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units. (Default: 8/255)
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        distribution (str): ``"sign"`` puts every draw on the ball's boundary (Linf: each
            coordinate ``+-eps``, the strongest random corner; L2: random signs scaled to norm
            ``eps``); ``"uniform"`` draws uniformly in the ball. (Default: ``"sign"``)
        seed (int | None): reproducible draws. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (only used to report ``last_success``).
        - output: (B, H, W, C), ``|out - obs| <= eps`` and in [0, 1].

    Example::

        >>> attack = RandomNoise(policy, eps=8/255, distribution="sign", seed=0)
        >>> adv_obs = attack(obs)
    """

    name = "random"
    uses_gradients = False
    _extra_settings = ("distribution",)

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, norm: str = "linf",
                 distribution: str = "sign", objective: str = "ce", seed: int | None = None):
        super().__init__(policy, eps, norm=norm, objective=objective, seed=seed)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        self.distribution = distribution

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        return ctx.obs + self.random_delta(ctx.obs, ctx.generator, self.distribution)
