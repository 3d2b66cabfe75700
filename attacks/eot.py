"""EOT: expectation over transformation / over a stochastic policy's randomness."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from attacks.base import Attack, check_positive_int
from attacks.wrappers import Wrapper


class EOT(Wrapper):
    r"""Expectation Over Transformation: average the wrapped attack's losses and gradients
    over ``samples`` stochastic forward passes.

    Papers: Athalye, Engstrom, Ilyas and Kwok, "Synthesizing Robust Adversarial Examples",
    ICML 2018 (https://arxiv.org/abs/1707.07397); applied to randomized defences in Athalye,
    Carlini and Wagner, ICML 2018, section 4.3.

    For a policy whose output is random (a randomized input filter, noise injection, dropout
    kept on with ``eval_mode=False``), a single-sample gradient is a noisy estimate and an
    attack on it under-reports what an adaptive attacker can do. Inside the wrapped attack
    every loss and gradient becomes the mean over ``samples`` passes
    ``E_t[grad l(t(x + delta))]``, and the success flag is taken from the mean logits. The
    randomness comes from torch's global RNG, forked and seeded from the attack's generator, so
    a seeded attack stays reproducible. Combine with BPDA for a stochastic AND
    non-differentiable step: ``EOT(BPDA(PGD(policy)), samples=16)``.

    Distance Measure: that of the wrapped attack.

    Arguments:
        attack (Attack): the attack whose gradients to average (any, including wrappers).
        samples (int): forward/backward passes per gradient, >= 1. (Default: 10)
        eval_mode (bool): keep the policy in eval mode (True), or put it in train mode so that
            dropout is the randomness (False; note BatchNorm statistics would then update).
            The previous modes are restored afterwards either way. (Default: True)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the wrapped attack's eps-ball and [0, 1].

    Example::

        >>> attack = EOT(PGD(noisy_policy, eps=8/255, steps=20), samples=16)
        >>> adv_obs = attack(obs)
    """

    name = "eot"

    def __init__(self, attack: Attack, samples: int = 10, eval_mode: bool = True):
        super().__init__(attack)
        self.samples = check_positive_int(samples, "samples")
        self.eval_mode = bool(eval_mode)
        self._eval_mode = self.eval_mode

    @contextlib.contextmanager
    def _around(self) -> Iterator[None]:
        """Every wrapped attack averages over ``samples`` passes, restored on exit."""
        leaves = self._descendants()
        saved = [(a, a._eot_samples, a._eval_mode) for a in leaves]
        for a in leaves:
            a._eot_samples, a._eval_mode = self.samples, self.eval_mode
        try:
            yield
        finally:
            for a, n, mode in saved:
                a._eot_samples, a._eval_mode = n, mode

    def with_policy(self, policy: nn.Module) -> "EOT":
        return EOT(self.attack.with_policy(policy), samples=self.samples, eval_mode=self.eval_mode)

    def settings(self) -> dict[str, Any]:
        return {"attack": self.name, "samples": self.samples, "eval_mode": self.eval_mode,
                "inner": self.attack.settings()}
