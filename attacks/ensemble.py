"""Ensemble: per sample, the strongest of several attacks."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from attacks.base import Attack, AttackContext
from attacks.objectives import TARGET_OBJECTIVES, TargetSpec


class Ensemble(Attack):
    r"""Run several attacks and keep, per sample, the strongest perturbation.

    Paper: the worst-case-over-attacks evaluation of Croce and Hein, ICML 2020 (AutoAttack)
    and DESIGN.md section 3 ("a defender's robust return is the minimum over the attack
    ensemble").

    Every member attacks the same policy. Per sample the ensemble returns the member result
    that changes the greedy action away from the reference action (reaches the target for
    ``targeted``); if several do, or none does, the one with the largest loss under the
    ensemble's own ``objective`` (one common yardstick for members that optimize different
    losses). With ``skip_successful`` (AutoAttack's convention, the default) a member only
    attacks the samples that no earlier member has already flipped, which saves most of the
    cost of the later, stronger attacks. Each member keeps its own budget and norm; the output
    lies inside the ball of the member that produced it (``eps`` reports the largest member
    budget). ``last_choice`` holds the index of the chosen member per sample (-1: clean).

    Distance Measure: those of the members.

    Arguments:
        attacks (sequence of Attack): two or more attacks on the same policy.
        objective (str): the yardstick loss used to compare members. (Default: ``"ce"``)
        target: target for ``objective="targeted"``. (Default: None = the worst action)
        skip_successful (bool): later members skip samples already flipped. (Default: True)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C), each sample inside its chosen member's ball and [0, 1].

    Example::

        >>> attack = Ensemble([FGSM(policy, eps=4/255), PGD(policy, eps=4/255),
        ...                    Square(policy, eps=4/255, n_queries=500)])
        >>> adv_obs = attack(obs)
    """

    name = "ensemble"

    def __init__(self, attacks: Sequence[Attack], *, objective: str = "ce",
                 target: TargetSpec = None, skip_successful: bool = True):
        attacks = list(attacks)
        if not attacks or not all(isinstance(a, Attack) for a in attacks):
            raise ValueError("Ensemble needs a non-empty sequence of Attack instances")
        policy = attacks[0].policy
        if any(a.policy is not policy for a in attacks):
            raise ValueError("all attacks of an Ensemble must attack the same policy object")
        if any(a.eps is None for a in attacks):  # an ExternalAttack without a declared budget
            raise ValueError("every Ensemble member needs a budget: declare eps on "
                             "ExternalAttack(..., eps=...)")
        super().__init__(policy, max(a.eps for a in attacks), norm=attacks[0].norm,
                         objective=objective, target=target)
        self.attacks = attacks
        self.skip_successful = bool(skip_successful)
        self.uses_gradients = any(a.uses_gradients for a in attacks)
        self.last_choice: torch.Tensor | None = None

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        best = ctx.obs.clone()
        best_loss, best_success = self.evaluate_loss(best, ctx)
        choice = torch.full((ctx.batch,), -1, dtype=torch.long, device=ctx.obs.device)
        for i, attack in enumerate(self.attacks):
            idx = torch.arange(ctx.batch, device=ctx.obs.device)
            if self.skip_successful and not _has_per_sample_target(attack):
                idx = (~best_success).nonzero().flatten()
                if idx.numel() == 0:
                    break
            adv = attack(ctx.obs[idx], ctx.actions[idx])
            loss, success = self.evaluate_loss(adv, ctx, idx)
            improved = self.better(loss, success, best_loss[idx], best_success[idx])
            upd = idx[improved]
            best[upd] = adv[improved]
            best_loss[upd] = loss[improved]
            best_success[upd] = success[improved]
            choice[upd] = i
        self.last_choice = choice.cpu()
        ctx.success = best_success
        return best

    def _final_projection(self, obs: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        return adv  # each member already projected onto its own ball

    def _children(self) -> list[Attack]:
        return list(self.attacks)

    def set_seed(self, seed: int | None) -> "Ensemble":
        super().set_seed(seed)
        for i, attack in enumerate(self.attacks):
            attack.set_seed(None if seed is None else seed + i)
        return self

    def with_policy(self, policy: nn.Module) -> "Ensemble":
        return Ensemble([a.with_policy(policy) for a in self.attacks], objective=self.objective,
                        target=self.target, skip_successful=self.skip_successful)

    def settings(self) -> dict[str, Any]:
        return {"attack": self.name, "objective": self.objective, "eps": self.eps,
                "skip_successful": self.skip_successful,
                "members": [a.settings() for a in self.attacks]}


def _has_per_sample_target(attack: Attack) -> bool:
    spec = attack.target
    return attack.objective in TARGET_OBJECTIVES and spec is not None and not (
        isinstance(spec, int) or callable(spec) and not torch.is_tensor(spec))
