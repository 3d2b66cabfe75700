"""The :class:`Wrapper` base: an attack that runs another attack under a context (BPDA, EOT)."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from attacks.base import Attack, AttackContext

__all__ = ["Wrapper"]


class Wrapper(Attack):
    """An attack that delegates to the wrapped attack ``self.attack``.

    The wrapper takes the wrapped attack's policy, budget, norm, objective, target and seed;
    each call runs ``self.attack`` inside :meth:`_around` (the subclass's change to the policy
    or to the wrapped attacks, undone on exit), takes its success flags, and projects onto the
    wrapped attack's ball(s). ``set_seed`` reseeds both. Subclasses write ``_around`` (and
    ``with_policy``, ``settings``).

    Raises:
        ValueError: ``attack`` is not an :class:`~attacks.base.Attack`.
    """

    def __init__(self, attack: Attack):
        if not isinstance(attack, Attack):
            raise ValueError(f"{type(self).__name__} wraps an Attack instance, "
                             f"got {type(attack).__name__}")
        super().__init__(attack.policy, attack.eps, norm=attack.norm, objective=attack.objective,
                         target=attack.target, seed=attack.seed)
        self.uses_gradients = attack.uses_gradients
        self.attack = attack

    def _around(self) -> ContextManager[None]:
        """The context the wrapped attack runs in (none by default)."""
        return contextlib.nullcontext()

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        with self._around():
            adv = self.attack(ctx.obs, ctx.actions)
            ctx.success = self.attack.last_success.to(ctx.obs.device)
            return adv

    def set_seed(self, seed: int | None) -> "Wrapper":
        super().set_seed(seed)
        self.attack.set_seed(seed)
        return self

    def _children(self) -> list[Attack]:
        return [self.attack]

    def _final_projection(self, obs: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        return self.attack._final_projection(obs, adv)  # the wrapped attack's ball(s)
