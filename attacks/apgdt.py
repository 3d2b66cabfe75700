"""APGD-T: APGD with the targeted DLR loss, run once per likely target action."""
from __future__ import annotations

import torch
from torch import nn

from attacks.apgd import APGD
from attacks.base import AttackContext, BestIterate, check_positive_int
from attacks.objectives import better, ranked_targets


class APGDT(APGD):
    r"""APGD-T: Auto-PGD on the targeted DLR loss, over the most likely other actions.

    Paper: Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020 (https://arxiv.org/abs/2003.01690), section 4
    (the targeted DLR loss) and section 5 (APGD-T in the AutoAttack ensemble).

    For each target ``t`` among the ``n_target_classes`` actions the clean policy ranks
    highest after the reference action ``a`` (most likely first, :func:`ranked_targets`),
    :class:`~attacks.APGD` maximizes the targeted DLR loss
    ``-(z_a - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (``z_pi1 >= z_pi2 >= ...`` the
    sorted logits; objective ``dlr_targeted`` of :mod:`attacks.objectives`), with the same
    step-size schedule, momentum and restarts. Each run attacks only the samples that no
    earlier target has flipped; per sample the first success is kept, else the point of the
    largest targeted DLR loss over the targets. Success is untargeted, as AutoAttack counts
    it: the greedy action leaves ``a`` (it need not reach ``t``).

    **Needs >= 4 actions** (the loss reads ``z_pi4``): with fewer the call REFUSES with a
    ValueError that names the fix (APGD with ``objective='ce'``, ``'margin'`` or ``'dlr'``).
    ``n_target_classes`` is capped at ``n_actions - 1``.

    Distance Measure: Linf (default) or L2.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units. (Default: 8/255)
        steps (int): APGD iterations per target and restart, >= 1. (Default: 100)
        restarts (int): APGD restarts per target, >= 1. (Default: 1)
        n_target_classes (int): how many target actions to try, >= 1 (capped at
            ``n_actions - 1``). (Default: 9, as in AutoAttack)
        rho (float): see :class:`~attacks.APGD`. (Default: 0.75)
        momentum (float): see :class:`~attacks.APGD`. (Default: 0.75)
        random_start (bool): start each run from a uniform random point of the ball.
            (Default: True)
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        seed (int | None): reproducible random starts. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the eps-ball and [0, 1].

    Example::

        >>> attack = APGDT(policy, eps=8/255, steps=100, n_target_classes=9, seed=0)
        >>> adv_obs = attack(obs)
    """

    name = "apgdt"
    objectives = ("dlr_targeted",)
    _extra_settings = ("steps", "restarts", "n_target_classes", "rho", "momentum",
                       "random_start")

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, steps: int = 100,
                 restarts: int = 1, n_target_classes: int = 9, rho: float = 0.75,
                 momentum: float = 0.75, random_start: bool = True, norm: str = "linf",
                 seed: int | None = None):
        super().__init__(policy, eps, steps=steps, restarts=restarts, rho=rho,
                         momentum=momentum, random_start=random_start, norm=norm,
                         objective="dlr_targeted", seed=seed)
        self.n_target_classes = check_positive_int(n_target_classes, "n_target_classes")

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        k = min(self.n_target_classes, ctx.n_actions - 1)
        targets = ranked_targets(ctx.clean_logits, ctx.actions, k)  # (B, k)
        total = BestIterate(ctx)
        for j in range(k):
            idx = (~total.success).nonzero().flatten()
            if idx.numel() == 0:
                break
            sub = AttackContext(obs=ctx.obs[idx], actions=ctx.actions[idx],
                                clean_logits=ctx.clean_logits[idx], target=targets[idx, j],
                                generator=ctx.generator)
            run = self._run(sub)
            improved = better(run.loss, run.success, total.loss[idx], total.success[idx])
            chosen = idx[improved]
            total.x[chosen] = run.x[improved]
            total.loss[chosen] = run.loss[improved].to(total.loss.dtype)
            total.success[chosen] = run.success[improved]
        ctx.success = total.success
        return total.x
