"""AutoAttack (standard version) as an ensemble preset: APGD-CE, APGD-T, FAB-T, Square."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attacks.apgd import APGD
from attacks.apgdt import APGDT
from attacks.base import AttackContext
from attacks.ensemble import Ensemble
from attacks.fab import FAB
from attacks.square import Square

VERSIONS = ("standard",)


class AutoAttack(Ensemble):
    r"""AutoAttack, standard version: APGD-CE, APGD-T, FAB-T and Square, per sample the first
    success.

    Paper: Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020 (https://arxiv.org/abs/2003.01690), section 5.

    An :class:`~attacks.Ensemble` with ``skip_successful=True`` of, in AutoAttack's order:

    1. :class:`~attacks.APGD` with ``objective="ce"``, ``steps`` iterations, 1 restart;
    2. :class:`~attacks.APGDT`, ``steps`` iterations, ``n_target_classes`` targets;
    3. :class:`~attacks.FAB` (FAB-T), ``steps`` iterations, ``n_target_classes`` targets;
    4. :class:`~attacks.Square`, ``n_queries`` queries, margin loss, ``p_init = 0.8``.

    Each member attacks only the samples that no earlier member has flipped (the greedy action
    left the reference action); a sample no member flips gets the member result with the
    largest cross-entropy loss (the ensemble's yardstick). Member ``i`` is seeded with
    ``seed + i``. APGD-T needs >= 4 actions: on a policy with fewer the call refuses with a
    ValueError (build an :class:`~attacks.Ensemble` of the other members instead).
    Only ``version="standard"`` and the Linf norm are implemented (the L2 version needs an L2
    Square attack, which :class:`~attacks.Square` is not).

    Distance Measure: Linf.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units, shared by every member. (Default: 8/255)
        version (str): ``"standard"``. (Default: ``"standard"``)
        norm (str): ``"linf"``. (Default: ``"linf"``)
        steps (int): iterations of APGD-CE, APGD-T (per target) and FAB-T (per target).
            (Default: 100)
        n_queries (int): Square's query budget. (Default: 5000)
        n_target_classes (int): targets of APGD-T and FAB-T (capped at ``n_actions - 1``).
            (Default: 9)
        seed (int | None): member ``i`` gets ``seed + i``. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the eps-ball and [0, 1].

    Example::

        >>> attack = AutoAttack(policy, eps=8/255, seed=0)   # or make_attack("autoattack", ...)
        >>> adv_obs = attack(obs)
        >>> attack.last_choice   # per sample: 0 APGD-CE, 1 APGD-T, 2 FAB-T, 3 Square, -1 none
    """

    name = "autoattack"
    norms = ("linf",)

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *,
                 version: str = "standard", norm: str = "linf", steps: int = 100,
                 n_queries: int = 5000, n_target_classes: int = 9, seed: int | None = None):
        if version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}; allowed: "
                             f"{', '.join(VERSIONS)}")
        if norm not in self.norms:
            raise ValueError(f"unknown norm {norm!r} for AutoAttack; allowed: linf (the L2 "
                             f"version needs an L2 Square attack, which attacks.Square is not)")
        members = [APGD(policy, eps, steps=steps, restarts=1, norm=norm, objective="ce"),
                   APGDT(policy, eps, steps=steps, restarts=1, n_target_classes=n_target_classes,
                         norm=norm),
                   FAB(policy, eps, steps=steps, restarts=1, n_target_classes=n_target_classes,
                       norm=norm),
                   Square(policy, eps, n_queries=n_queries, objective="margin")]
        super().__init__(members, objective="ce", skip_successful=True)
        self.version = version
        self.steps = steps
        self.n_queries = n_queries
        self.n_target_classes = n_target_classes
        self.set_seed(seed)

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        if ctx.n_actions < 4:
            raise ValueError(f"AutoAttack's APGD-T member needs >= 4 actions (targeted DLR "
                             f"loss); this policy has {ctx.n_actions}: use "
                             f"make_attack('ensemble', policy, attacks=['apgd', 'fab', "
                             f"'square']) instead")
        return super()._perturb(ctx)

    def with_policy(self, policy: nn.Module) -> "AutoAttack":
        return AutoAttack(policy, self.eps, version=self.version, norm=self.norm,
                          steps=self.steps, n_queries=self.n_queries,
                          n_target_classes=self.n_target_classes, seed=self.seed)

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out.update(attack=self.name, version=self.version, norm=self.norm, steps=self.steps,
                   n_queries=self.n_queries, n_target_classes=self.n_target_classes)
        return out
