"""The :class:`Attack` base class: everything an observation attack needs except its maths.

Every attack works on the policy protocol (DESIGN.md section 1, :mod:`marl_fgmf.protocol`):
``policy(obs) -> logits``, ``obs`` float in [0, 1] shaped ``(B, H, W, C)`` (``B`` any batch:
every agent of a frame, several frames, or both), and optionally ``policy.value(obs) -> (B,)``.

The base class owns (in the spirit of torchattacks' ``Attack``, written for policies):

* the device (taken from the policy's parameters, never hard-coded) and the dtype;
* eval mode during the attack and the exact restoration of every submodule's previous
  train/eval flag afterwards (:func:`marl_fgmf.protocol.eval_mode`);
* input validation with one-line ``ValueError`` s that name the value and what is allowed
  (:func:`marl_fgmf.protocol.check_obs`, :func:`marl_fgmf.protocol.parse_budget`);
* the input-gradient guard (:func:`marl_fgmf.protocol.check_input_gradient`): a gradient
  attack refuses a policy with no or exactly zero input gradient, naming the cause; wrappers
  (BPDA, EOT) and ensembles leave it to the attacks they run; gradient-free ones never check;
* the per-sample best iterate (:class:`BestIterate`: success first, then the larger loss);
* seeding: ``seed=`` makes a :class:`torch.Generator` (same seed, same perturbations;
  ``set_seed`` rewinds it); the policy's own randomness (dropout, a randomized defence) is
  drawn in a forked global RNG seeded from it: reproducible, the caller's RNG untouched;
* the final projection onto the eps-ball (Linf or L2) intersected with [0, 1].

Objectives (``ce``, ``kl``, ``value``, ``targeted``, ``margin``, ``dlr``), targets and success:
:mod:`attacks.objectives`. Subclasses set their paper's defaults and write only ``_perturb``.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from attacks.objectives import (ACTION_OBJECTIVES, OBJECTIVES, SUCCESS_OBJECTIVES, TargetSpec,
                                TARGET_OBJECTIVES, better, check_action_count, check_actions,
                                is_success, loss_dtype, objective_loss, resolve_target)
from marl_fgmf.protocol import (check_input_gradient, check_obs, eval_mode, expected_obs_shape,
                                parse_budget, policy_device)

NORMS = ("linf", "l2")

__all__ = ["NORMS", "OBJECTIVES", "Attack", "AttackContext", "BestIterate", "TargetSpec",
           "check_fraction", "check_positive_int"]


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int >= 1, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_fraction(value: Any, name: str, low: float = 0.0, high: float = 1.0,
                   low_open: bool = True) -> float:
    """Return ``value`` as a float in ``(low, high]`` (``[low, high]`` if not ``low_open``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = (v > low if low_open else v >= low) and v <= high and math.isfinite(v)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return v


def _pick(t: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    """``t[index]`` (a sub-batch), or ``t`` itself when ``index`` or ``t`` is None."""
    return t if t is None or index is None else t[index]

class AttackContext:
    """What ``_perturb`` receives: the clean batch and everything derived from it once.

    Attributes:
        obs: clean observations (B, H, W, C) on the policy's device, detached.
        actions: (B,) long, the reference actions (success = the greedy action leaves them).
        clean_logits: (B, n_actions) detached logits of the clean batch. Computed on first use
            when the caller gave the reference actions and the objective does not need them
            (``ce``, ``margin``, ``dlr``, ``value``): one forward pass saved per call.
        target: (B,) long target actions for the ``targeted`` objective, else ``None``.
        generator: the attack's :class:`torch.Generator` on the policy's device.
        success: ``_perturb`` may store here the (B,) success flags of the observations it
            returns (already projected), sparing the base class one forward pass.
    """

    def __init__(self, obs: torch.Tensor, actions: torch.Tensor,
                 clean_logits: torch.Tensor | None = None, target: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, success: torch.Tensor | None = None,
                 clean_fn: Callable[[], torch.Tensor] | None = None):
        if clean_logits is None and clean_fn is None:
            raise ValueError("AttackContext needs clean_logits or clean_fn")
        self.obs = obs
        self.actions = actions
        self._clean_logits = clean_logits
        self._clean_fn = clean_fn
        self.target = target
        self.generator = generator
        self.success = success

    @property
    def clean_logits(self) -> torch.Tensor:
        """(B, n_actions) detached logits of the clean batch (computed once, on first use)."""
        if self._clean_logits is None:
            assert self._clean_fn is not None
            self._clean_logits = self._clean_fn()
        return self._clean_logits

    def __repr__(self) -> str:
        return f"AttackContext(batch={self.batch}, target={self.target is not None})"

    @property
    def batch(self) -> int:
        """Number of observations B."""
        return self.obs.shape[0]

    @property
    def n_actions(self) -> int:
        """Number of actions of the policy."""
        return self.clean_logits.shape[1]


class BestIterate:
    """Per-sample best point of an attack so far: a successful one first, then the largest loss.

    Example (inside ``_perturb``)::

        best = BestIterate(ctx)
        best.update(x, loss, success)    # as often as needed, all (B,) / (B, H, W, C)
        ctx.success = best.success
        return best.x
    """

    def __init__(self, ctx: AttackContext):
        self.x = ctx.obs.clone()
        self.loss = torch.full((ctx.batch,), float("-inf"), device=ctx.obs.device,
                               dtype=loss_dtype(ctx.obs.device))
        self.success = torch.zeros(ctx.batch, dtype=torch.bool, device=ctx.obs.device)

    def update(self, x: torch.Tensor, loss: torch.Tensor, success: torch.Tensor) -> None:
        """Keep ``x`` for the samples where it beats the best so far (see
        :func:`attacks.objectives.better`)."""
        improved = better(loss, success, self.loss, self.success)
        # in place: no new (B, H, W, C) tensor per step
        torch.where(improved.view(-1, 1, 1, 1), x, self.x, out=self.x)
        self.loss = torch.where(improved, loss.to(self.loss.dtype), self.loss)
        self.success = self.success | success

    def update_last(self, attack: "Attack", x: torch.Tensor, ctx: AttackContext) -> None:
        """Evaluate an attack's last iterate ``x`` (one forward pass, no gradient) and keep it
        where it wins.

        For the objectives whose goal is success (:data:`SUCCESS_OBJECTIVES`) only the samples
        that no earlier iterate has flipped are evaluated: the last iterate can still make them
        successful, while a sample already successful keeps its best successful iterate (the
        last one could only raise its loss, at the cost of a forward pass over the whole
        batch). ``kl`` and ``value`` evaluate every sample.
        """
        if attack.objective not in SUCCESS_OBJECTIVES:
            loss, success = attack.evaluate_loss(x, ctx)
            self.update(x, loss, success)
            return
        index = (~self.success).nonzero().flatten()
        if index.numel() == 0:
            return
        if index.numel() == ctx.batch:
            loss, success = attack.evaluate_loss(x, ctx)
            self.update(x, loss, success)
            return
        x_sub = x[index]
        loss, success = attack.evaluate_loss(x_sub, ctx, index)
        improved = better(loss, success, self.loss[index], self.success[index])
        chosen = index[improved]
        self.x[chosen] = x_sub[improved]
        self.loss[chosen] = loss[improved].to(self.loss.dtype)
        self.success[chosen] = success[improved]


class Attack:
    """Base class of every observation attack on the policy protocol.

    Call: ``adv_obs = attack(obs, actions=None)`` with ``obs`` float (B, H, W, C) in [0, 1]
    (any device; the result comes back on the same device and dtype) and ``actions`` an
    optional (B,) integer tensor of reference actions (default: the clean greedy actions).
    The result lies inside the eps-ball of ``obs`` (``norm``) and inside [0, 1].

    Args:
        policy: ``nn.Module`` with ``policy(obs) -> (B, n_actions)`` logits.
        eps: budget in [0, 1] observation units, in (0, 1]; a number or a string like "8/255".
        norm: ``"linf"`` or ``"l2"`` (attacks that support only one fix it).
        objective: one of :data:`OBJECTIVES` allowed by the attack (see the module docstring).
        target: the target for ``objective="targeted"`` (see the module docstring).
        seed: ``None`` (draw from torch's global RNG) or an int for reproducible perturbations.

    Attributes:
        name: short registry name of the attack.
        objectives: the objectives the attack accepts.
        norms: the norms the attack accepts.
        uses_gradients: False for gradient-free attacks.
        last_success: (B,) bool of the most recent call (perturbed greedy != reference), or None.
    """

    name: str = "attack"
    objectives: tuple[str, ...] = OBJECTIVES
    norms: tuple[str, ...] = NORMS
    uses_gradients: bool = True

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, norm: str = "linf",
                 objective: str = "ce", target: TargetSpec = None, seed: int | None = None):
        if not isinstance(policy, nn.Module):
            raise ValueError(f"policy must be a torch.nn.Module following the policy protocol, "
                             f"got {type(policy).__name__}")
        self.policy = policy
        self.eps = parse_budget(eps)
        if norm not in self.norms:
            raise ValueError(f"unknown norm {norm!r} for {type(self).__name__}; "
                             f"allowed: {', '.join(self.norms)}")
        self.norm = norm
        if objective not in self.objectives:
            raise ValueError(f"unknown objective {objective!r} for {type(self).__name__}; "
                             f"allowed: {', '.join(self.objectives)}")
        if objective == "value" and not callable(getattr(policy, "value", None)):
            raise ValueError(f"objective 'value' needs a critic policy.value(obs) -> (B,); "
                             f"{type(policy).__name__} has none (use 'ce', 'kl' or 'margin')")
        self.objective = objective
        if target is not None and objective not in TARGET_OBJECTIVES:
            raise ValueError(f"target is only used with objective='targeted' or 'dlr_targeted', "
                             f"got objective={objective!r}")
        self.target = target
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._eot_samples = 1          # set by EOT: average losses/gradients over this many passes
        self._eval_mode = True         # EOT(..., eval_mode=False) keeps dropout active
        self.last_success: torch.Tensor | None = None
        self._unchecked_actions: torch.Tensor | None = None  # see _context / _checked_logits

    # ------------------------------------------------------------------ public API
    def __call__(self, obs: torch.Tensor, actions: Any = None) -> torch.Tensor:
        """Perturb ``obs`` (B, H, W, C) in [0, 1]; return adversarial observations like ``obs``.

        Args:
            obs: float tensor (B, H, W, C) in [0, 1], finite.
            actions: optional (B,) integer reference actions; default the clean greedy actions.

        Raises:
            ValueError: bad obs, bad actions, or a policy output that is not (B, n_actions).
            InputGradientError: (a ValueError) no or exactly zero input gradient.
        """
        check_obs(obs, expected_obs_shape(self.policy))
        device, dtype = policy_device(self.policy)
        x = obs.detach().to(device=device, dtype=dtype)
        gen = self._get_generator(device)
        with eval_mode(self.policy, train=not self._eval_mode), self._forked_rng(device, gen):
            ctx = self._context(x, actions, gen)
            if self.uses_gradients and not self._children():
                check_input_gradient(self.policy, x, name=type(self).__name__)
            adv = self._perturb(ctx)
            adv = self._final_projection(x, adv.detach())
            success = ctx.success
            if success is None:
                with torch.no_grad():
                    success = self.success(self._logits(adv), ctx)
            self.last_success = success.cpu()
        return adv.to(device=obs.device, dtype=obs.dtype)

    def set_seed(self, seed: int | None) -> "Attack":
        """Rewind the attack's generator to ``seed`` (``None``: draw from torch's global RNG)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._generator = None
        return self

    def with_policy(self, policy: nn.Module) -> "Attack":
        """A copy of this attack, with the same settings, bound to another ``policy``."""
        new = copy.copy(self)
        new.policy = policy
        new._generator = None
        new.last_success = None
        if new.objective == "value" and not callable(getattr(policy, "value", None)):
            raise ValueError(f"objective 'value' needs a critic policy.value(obs); "
                             f"{type(policy).__name__} has none")
        return new

    def settings(self) -> dict[str, Any]:
        """The attack's settings as a plain dict (for result tables and JSON)."""
        out: dict[str, Any] = {"attack": self.name, "eps": self.eps, "norm": self.norm,
                               "objective": self.objective}
        for key in getattr(self, "_extra_settings", ()):
            out[key] = getattr(self, key)
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "attack")
        return f"{type(self).__name__}({inner})"

    # ------------------------------------------------------------------ subclass hook
    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        """Return adversarial observations (B, H, W, C); the base projects them afterwards."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._checked_logits(self.policy(x), x)

    def _checked_logits(self, logits: Any, x: torch.Tensor) -> torch.Tensor:
        """Validate the policy's output; the first one of a call also validates the caller's
        reference actions against the number of actions (deferred from :meth:`_context`)."""
        if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(f"policy output must be logits of shape (B, n_actions) = "
                             f"({x.shape[0]}, n), got {shape}")
        pending = getattr(self, "_unchecked_actions", None)
        if pending is not None:
            self._unchecked_actions = None
            check_action_count(self.objective, logits.shape[1])
            check_actions(pending, pending.shape[0], logits.shape[1], pending.device, "actions")
        return logits

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and values when the objective needs them (one pass via ``forward_both``)."""
        if self.objective != "value":
            return self._logits(x), None
        both = getattr(self.policy, "forward_both", None)
        if callable(both):
            logits, values = both(x)
            logits = self._checked_logits(logits, x)
        else:
            logits, values = self._logits(x), self.policy.value(x)
        values = values.reshape(x.shape[0], -1)
        if values.shape[1] != 1:
            raise ValueError(f"policy.value must return (B,) values, got {tuple(values.shape)}")
        return logits, values[:, 0]

    def objective_loss(self, logits: torch.Tensor, values: torch.Tensor | None,
                       ctx: AttackContext, index: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample float64 loss (B,) to maximize; ``index`` selects a sub-batch of ``ctx``."""
        clean = _pick(ctx.clean_logits, index) if self.objective == "kl" else None  # lazy
        return objective_loss(self.objective, logits, values, _pick(ctx.actions, index),
                              clean_logits=clean, target=_pick(ctx.target, index))

    def success(self, logits: torch.Tensor, ctx: AttackContext,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) bool: the greedy action left the reference action (reached the target)."""
        return is_success(self.objective, logits, _pick(ctx.actions, index),
                          _pick(ctx.target, index))

    def loss_and_grad(self, x: torch.Tensor, ctx: AttackContext
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss (B,), its gradient w.r.t. ``x`` (B, H, W, C) and the success flags (B,).

        Under :class:`EOT` the loss, gradient and logits are averages over ``samples``
        stochastic forward passes (success from the averaged logits).
        """
        n = self._eot_samples
        loss_sum = grad_sum = logit_sum = None
        for _ in range(n):
            xr = x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits, values = self._forward(xr)
                loss = self.objective_loss(logits, values, ctx)
                grad = None
                if loss.requires_grad:
                    (grad,) = torch.autograd.grad(loss.sum(), xr, allow_unused=True)
            if grad is None:  # the input's gradient is cut (detach, no_grad): it is zero
                grad = torch.zeros_like(xr)
            loss, logits = loss.detach(), logits.detach()
            if loss_sum is None:  # the first sample (the only one without EOT): no copies
                loss_sum, grad_sum, logit_sum = loss, grad, logits
            else:
                loss_sum, grad_sum, logit_sum = loss_sum + loss, grad_sum + grad, logit_sum + logits
        if n == 1:
            return loss_sum, grad_sum, self.success(logit_sum, ctx)
        return loss_sum / n, grad_sum / n, self.success(logit_sum / n, ctx)

    @torch.no_grad()
    def evaluate_loss(self, x: torch.Tensor, ctx: AttackContext,
                      index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (b,) and success (b,) of ``x`` without gradients (``index``: sub-batch of ctx)."""
        n = self._eot_samples
        loss_sum, logit_sum = None, None
        for _ in range(n):
            logits, values = self._forward(x)
            loss = self.objective_loss(logits, values, ctx, index)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            logit_sum = logits if logit_sum is None else logit_sum + logits
        return loss_sum / n, self.success(logit_sum / n, ctx, index)

    def project(self, obs: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """Project ``adv`` onto the ``norm`` eps-ball around ``obs``, then into [0, 1].

        Clamping into [0, 1] after the ball projection never leaves the ball: each coordinate
        of ``adv - obs`` only shrinks in magnitude because ``obs`` itself lies in [0, 1].
        """
        delta = adv - obs  # a fresh tensor: the rest works in place on it (no temporaries)
        if self.norm == "linf":
            delta.clamp_(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta.mul_((self.eps / norms).clamp(max=1.0).view(-1, 1, 1, 1))
        return delta.add_(obs).clamp_(0.0, 1.0)

    def random_delta(self, like: torch.Tensor, gen: torch.Generator,
                     distribution: str = "uniform") -> torch.Tensor:
        """A random perturbation in the eps-ball of ``norm``, shaped like ``like``.

        ``uniform``: uniform in the ball (Linf: each coordinate in [-eps, eps]; L2: uniform in
        volume, Gaussian direction times ``eps * u ** (1 / d)``). ``sign``: on the boundary
        (Linf: each coordinate ``+-eps``, a corner; L2: random signs scaled to norm eps).
        """
        shape, b = like.shape, like.shape[0]
        d = like[0].numel()
        if distribution == "sign":
            signs = torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype) * 2 - 1
            if self.norm == "linf":
                return signs * self.eps
            return signs * (self.eps / math.sqrt(d))
        if self.norm == "linf":
            return (torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype) * 2 - 1) * self.eps
        direction = torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        radius = torch.rand(b, generator=gen, device=like.device, dtype=like.dtype) ** (1.0 / d)
        return direction * (self.eps * radius).view(-1, 1, 1, 1)

    def steepest_step(self, grad: torch.Tensor, size: torch.Tensor | float) -> torch.Tensor:
        """The steepest-ascent step of ``size`` for ``norm``: ``sign(g)`` (Linf) or ``g/||g||`` (L2).

        ``size`` is a float or a (B,) tensor of per-sample step sizes.
        """
        if torch.is_tensor(size):
            size = size.view(-1, 1, 1, 1)
        if self.norm == "linf":
            return grad.sign().mul_(size)
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (grad / norms).mul_(size)

    better = staticmethod(better)  # (B,) bool: success first, then the larger loss

    # ------------------------------------------------------------------ internals
    def _children(self) -> list["Attack"]:
        """Attacks wrapped by this one (BPDA, EOT, Ensemble); none for a plain attack."""
        return []

    def _descendants(self) -> list["Attack"]:
        """Every attack wrapped by this one, at any depth (not including itself)."""
        out: list[Attack] = []
        stack = list(self._children())
        while stack:
            a = stack.pop()
            out.append(a)
            stack.extend(a._children())
        return out

    def _final_projection(self, obs: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        return self.project(obs, adv)

    def _get_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
            else:
                gen.manual_seed(self.seed)
            self._generator = gen
        return self._generator

    @contextlib.contextmanager
    def _forked_rng(self, device: torch.device, gen: torch.Generator) -> Iterator[None]:
        """Run the policy's own randomness from a global RNG seeded by ``gen``, then restore."""
        devices = [device] if device.type == "cuda" else []
        child_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=device))
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(child_seed)
            yield

    def _context(self, x: torch.Tensor, actions: Any, gen: torch.Generator) -> AttackContext:
        def clean() -> torch.Tensor:
            with torch.no_grad():
                return self._logits(x).detach()

        self._unchecked_actions = None
        if actions is not None and self.objective in ACTION_OBJECTIVES:
            # The caller's reference actions make the clean forward pass unnecessary: they are
            # checked against the number of actions at the first forward pass of the attack.
            ref = check_actions(actions, x.shape[0], None, x.device, "actions")
            self._unchecked_actions = ref
            return AttackContext(obs=x, actions=ref, target=None, generator=gen, clean_fn=clean)
        clean_logits = clean()
        b, n_actions = clean_logits.shape
        check_action_count(self.objective, n_actions)
        ref = check_actions(actions, b, n_actions, x.device, "actions")
        if ref is None:
            ref = clean_logits.argmax(dim=1)
        target = (resolve_target(self.target, self.policy, x, clean_logits, self.objective, ref)
                  if self.objective in TARGET_OBJECTIVES else None)
        return AttackContext(obs=x, actions=ref, clean_logits=clean_logits, target=target,
                             generator=gen)
