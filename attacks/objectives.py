"""The attack objectives, their targets and the success criterion, defined once for every attack.

Objectives (``objective=``), each a per-sample loss that the attack MAXIMIZES, with
``z = policy(x + delta)``, ``pi = softmax(z)``, ``a`` the reference actions (the ``actions``
argument, by default the clean greedy actions ``argmax pi(x)``):

============  ==================================================  =====================================
name          loss (maximized)                                    needs
============  ==================================================  =====================================
ce            ``-log pi(a | x + delta)``                          >= 2 actions
kl            ``KL(pi(x) || pi(x + delta))`` (MAD, Zhang 2020)    >= 2 actions; ignores ``actions``
value         ``-V(x + delta)`` (minimize the critic)             ``policy.value``; ignores ``actions``
targeted      ``log pi(t | x + delta)``, ``t`` the target below   >= 2 actions
margin        ``max_{i != a} z_i - z_a`` (Carlini-Wagner margin)  >= 2 actions
dlr           ``-(z_a - max_{i != a} z_i) / (z_1 - z_3)``         >= 3 actions (refused otherwise)
dlr_targeted  ``-(z_a - z_t) / (z_1 - (z_3 + z_4) / 2)``          >= 4 actions (refused otherwise)
============  ==================================================  =====================================

(``z_1 >= z_2 >= z_3`` are the sorted logits; DLR is Croce & Hein 2020's "difference of logits
ratio". With fewer than 3 actions its denominator does not exist, and with ``z_2`` instead it is
the constant -1 whenever ``a`` is the top action, so it has no gradient; we REFUSE with a
ValueError telling the user to pick ``ce`` or ``margin`` instead of silently falling back.)
``dlr_targeted`` is the targeted DLR loss of APGD-T (same paper, section 4): it pushes ``z_t``
above ``z_a`` for a target ``t`` and needs ``z_4``, so it is refused below 4 actions; its
default target is the most likely action other than ``a`` (:func:`ranked_targets`), and its
success is the untargeted one (the greedy action leaves ``a``), as AutoAttack counts it.

**Targeted objective.** The target ``t`` is, per sample (:func:`resolve_target`):

* ``target=None`` (default): the WORST action by value. If the policy exposes action values
  ``policy.action_values(obs) -> (B, n_actions)`` (a Q-head), ``t = argmin_a Q(x, a)``;
  otherwise ``t = argmin_a pi(a | x)``, the action the clean policy ranks worst. (A
  state-value critic ``V(s)`` cannot rank actions without a model; for a policy-gradient
  policy the logits are ordered like its advantage estimates, so the least likely action is
  its own estimate of the worst action.)
* ``target=int``: that action for every sample;
* ``target=`` a length-``B`` sequence/tensor: one action per sample;
* ``target=callable``: ``target(obs) -> (B,)`` integer actions (for example an oracle from the
  environment, such as the action that moves an agent away from its beacon).

**Success** (DESIGN.md section 3, :func:`is_success`): per sample, the perturbed greedy action
differs from the reference action; for ``targeted`` it equals the target. Attacks that keep the
best iterate prefer a successful sample, then a larger loss (:func:`better`).

This module imports torch only; :class:`attacks.base.Attack` calls it with its own settings.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F

OBJECTIVES = ("ce", "kl", "value", "targeted", "margin", "dlr", "dlr_targeted")
SUCCESS_OBJECTIVES = ("ce", "targeted", "margin", "dlr", "dlr_targeted")  # flip the action
TARGET_OBJECTIVES = ("targeted", "dlr_targeted")  # the objectives that read a target
# the objectives whose loss reads the reference actions (a caller's actions spare the clean pass)
ACTION_OBJECTIVES = ("ce", "margin", "dlr", "value")

TargetSpec = Union[None, int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]

__all__ = ["ACTION_OBJECTIVES", "OBJECTIVES", "SUCCESS_OBJECTIVES", "TARGET_OBJECTIVES",
           "TargetSpec", "better", "check_action_count", "check_actions", "is_success",
           "loss_dtype", "objective_loss", "ranked_targets", "resolve_target"]


def loss_dtype(device: torch.device) -> torch.dtype:
    """The dtype of attack losses: float64 (float32 on Apple MPS, which has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def objective_loss(objective: str, logits: torch.Tensor, values: torch.Tensor | None,
                   actions: torch.Tensor, clean_logits: torch.Tensor | None = None,
                   target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (B,) of ``objective`` to MAXIMIZE (see the module docstring).

    Args:
        objective: one of :data:`OBJECTIVES`.
        logits: (B, n_actions) logits of the perturbed batch.
        values: (B,) critic values of the perturbed batch (``value`` only).
        actions: (B,) long reference actions.
        clean_logits: (B, n_actions) logits of the clean batch (``kl`` only).
        target: (B,) long target actions (``targeted`` and ``dlr_targeted`` only).
    Returns:
        (B,) float64 losses (float32 on MPS).
    """
    # float64 on the (B, n_actions) logits: costs nothing, and keeps the CE gradient alive
    # when the clean action is so confident that 1 - pi(a) rounds to 0 in float32.
    dt = loss_dtype(logits.device)
    logits = logits.to(dt)
    values = None if values is None else values.to(dt)

    if objective == "ce":
        return F.cross_entropy(logits, actions, reduction="none")
    if objective == "kl":
        assert clean_logits is not None
        clean_logp = F.log_softmax(clean_logits, dim=1)
        logp = F.log_softmax(logits, dim=1)
        return (clean_logp.exp() * (clean_logp - logp)).sum(dim=1)
    if objective == "value":
        assert values is not None
        return -values
    if objective == "targeted":
        assert target is not None
        return -F.cross_entropy(logits, target, reduction="none")
    onehot = F.one_hot(actions, logits.shape[1]).bool()
    z_a = logits.gather(1, actions[:, None])[:, 0]
    z_other = logits.masked_fill(onehot, float("-inf")).amax(dim=1)
    if objective == "margin":
        return z_other - z_a
    if objective == "dlr":
        top = logits.sort(dim=1, descending=True).values
        return -(z_a - z_other) / (top[:, 0] - top[:, 2] + 1e-12)
    if objective == "dlr_targeted":
        assert target is not None
        top = logits.sort(dim=1, descending=True).values
        z_t = logits.gather(1, target[:, None])[:, 0]
        return -(z_a - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)
    raise AssertionError(objective)


def is_success(objective: str, logits: torch.Tensor, actions: torch.Tensor,
               target: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the greedy action of ``logits`` left the reference ``actions`` (for
    ``targeted``: reached ``target``)."""
    greedy = logits.argmax(dim=1)
    if objective == "targeted":
        return greedy == target
    return greedy != actions


def better(loss_new: torch.Tensor, success_new: torch.Tensor,
           loss_best: torch.Tensor, success_best: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the new candidate beats the best so far (success first, then loss)."""
    return (success_new & ~success_best) | ((success_new == success_best) & (loss_new > loss_best))


def check_action_count(objective: str, n_actions: int) -> None:
    """Refuse an objective that the policy's number of actions cannot support."""
    if objective in ("ce", "kl", "targeted", "margin") and n_actions < 2:
        raise ValueError(f"objective {objective!r} needs a policy with >= 2 actions, "
                         f"got {n_actions}")
    if objective == "dlr" and n_actions < 3:
        raise ValueError(f"objective 'dlr' needs >= 3 actions (it divides by z_1 - z_3, "
                         f"Croce & Hein 2020); this policy has {n_actions}: "
                         f"use objective='ce' or 'margin'")
    if objective == "dlr_targeted" and n_actions < 4:
        raise ValueError(f"objective 'dlr_targeted' (APGD-T) needs >= 4 actions (it divides by "
                         f"z_1 - (z_3 + z_4) / 2, Croce & Hein 2020); this policy has "
                         f"{n_actions}: use APGD with objective='ce' or 'margin'"
                         + (" or 'dlr'" if n_actions == 3 else ""))


def check_actions(actions: Any, batch: int, n_actions: int | None, device: torch.device,
                  name: str) -> torch.Tensor | None:
    """``actions`` (None, an int, a sequence or a tensor) as a (``batch``,) long tensor on
    ``device``; with ``n_actions`` also checked to lie in ``0..n_actions - 1``.

    Raises:
        ValueError: one line naming ``name``, the bad type, dtype, shape or values.
    """
    if actions is None:
        return None
    if not torch.is_tensor(actions):
        try:
            actions = torch.as_tensor(actions)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a (B,) integer tensor, "
                             f"got {type(actions).__name__}") from None
    if actions.is_floating_point() or actions.is_complex() or actions.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer action indices, got dtype {actions.dtype}")
    if actions.dim() == 0:
        actions = actions.expand(batch)
    if tuple(actions.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match obs, "
                         f"got {tuple(actions.shape)}")
    if n_actions is None:  # range checked later, once the number of actions is known
        return actions.to(device=device, dtype=torch.long)
    lo, hi = (int(v) for v in torch.aminmax(actions))
    if lo < 0 or hi >= n_actions:
        raise ValueError(f"{name} must be in 0..{n_actions - 1} (the policy has {n_actions} "
                         f"actions), got values in [{lo}, {hi}]")
    return actions.to(device=device, dtype=torch.long)


def ranked_targets(clean_logits: torch.Tensor, actions: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) long: per sample the ``k`` most likely actions other than ``actions``, most
    likely first (the targets of APGD-T and FAB-T); ``k`` is at most ``n_actions - 1``."""
    others = clean_logits.scatter(1, actions[:, None], float("-inf"))
    return others.topk(k, dim=1).indices


def resolve_target(spec: TargetSpec, policy: Any, x: torch.Tensor, clean_logits: torch.Tensor,
                   objective: str = "targeted", actions: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The (B,) long targets of the ``targeted`` (or ``dlr_targeted``) objective for ``x``.

    Args:
        spec: the attack's ``target`` (see the module docstring).
        policy: the attacked policy (its ``action_values`` rank the actions when it has them).
        x: (B, H, W, C) clean observations.
        clean_logits: (B, n_actions) their logits.
        objective: ``dlr_targeted`` makes the default (``spec=None``) target the most likely
            action other than ``actions`` (:func:`ranked_targets`) instead of the worst one.
        actions: (B,) reference actions (``dlr_targeted`` with ``spec=None`` only).
    Raises:
        ValueError: a target of the wrong shape or range, or bad ``action_values``.
    """
    b, n_actions = clean_logits.shape
    if spec is None and objective == "dlr_targeted":
        assert actions is not None
        return ranked_targets(clean_logits, actions, 1)[:, 0]
    if spec is None:
        q_fn = getattr(policy, "action_values", None)
        with torch.no_grad():
            scores = q_fn(x) if callable(q_fn) else clean_logits
        if tuple(scores.shape) != (b, n_actions):
            raise ValueError(f"policy.action_values must return ({b}, {n_actions}), "
                             f"got {tuple(scores.shape)}")
        return scores.argmin(dim=1)
    if callable(spec) and not torch.is_tensor(spec):
        spec = spec(x)
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = torch.full((b,), spec, dtype=torch.long)
    return check_actions(spec, b, n_actions, x.device, "target")
