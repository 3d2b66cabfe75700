"""Third-party attacks on the policy protocol: :class:`ExternalAttack`.

Two kinds of attack written outside this toolkit run wherever an :class:`~attacks.base.Attack`
does (``attack(obs)``, :func:`attacks.evaluate`, :class:`~attacks.ensemble.Ensemble`,
tournaments):

* a **torchattacks** ``Attack`` (``torchattacks.PGD(model, eps=8/255)``). torchattacks
  classifies NCHW images with ``model(images) -> logits``. Bound to a policy, a deep copy of
  the object attacks :class:`NCHWPolicy` (``images (N, C, H, W) -> policy(images.permute(0, 2,
  3, 1))``) with the clean greedy actions (or the caller's reference actions) as labels. The
  model it was built with is never called (any module will do) and the user's object is never
  mutated. Its own randomness (the global RNG; APGD's ``seed``), its device handling
  (``set_device``, set to the policy's device) and its model-mode settings apply as they would
  in torchattacks.
* any **callable** ``fn(obs) -> adversarial obs``, or ``fn(obs, policy)``: ``obs`` is float
  ``(B, H, W, C)`` in [0, 1] on the policy's device (a copy: it may be modified in place).
  Which call is made is read from the signature: one required positional parameter ->
  ``fn(obs)``, two -> ``fn(obs, policy)``; anything else needs ``pass_policy=`` (no guess).

Whatever comes back is checked, never repaired: a tensor shaped like ``obs`` with its dtype and
device, finite, in [0, 1] and, where a budget is known, inside the ``eps``-ball of its ``norm``
(tolerance :data:`BALL_TOLERANCE`); otherwise one-line ``ValueError``. The budget is the
declared ``eps``/``norm``; for torchattacks it is read from the object when not declared
(its ``eps``, and its ``norm`` or the "Distance Measure" of its class docstring) and a
declaration that contradicts the object is refused. Without a budget only the ball check is
skipped, and ``settings()["budget_checked"]`` says so.

Seeding: ``seed=None`` (default) draws from torch's global RNG as torchattacks does (so
``torch.manual_seed(s)`` before a call reproduces it); ``seed=s`` runs the attack in a private
RNG stream that starts as ``torch.manual_seed(s)`` and continues across calls, leaving the
caller's RNG untouched (``set_seed`` rewinds it; :func:`attacks.evaluate` seeds each copy).

:func:`attacks.external_paths.build_external` builds one from an import path
(``"torchattacks:PGD"``, ``"mypkg.attacks:make_attack"``): what tournament configs name with
``external:``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import sys
from typing import Any, Callable, Iterator

import torch
from torch import nn

from attacks.base import NORMS, Attack
from attacks.objectives import check_actions
from attacks.torchattacks_bridge import (GRADIENT_FREE_TORCHATTACKS, NCHWPolicy,
                                         check_torchattacks_mode, is_torchattacks,
                                         torchattacks_budget, torchattacks_params, unbound_model)
from marl_fgmf.protocol import (check_input_gradient, check_obs, eval_mode, expected_obs_shape,
                                parse_budget, policy_device)

__all__ = ["BALL_TOLERANCE", "ExternalAttack", "NCHWPolicy", "is_torchattacks", "unbound_model"]

BALL_TOLERANCE = 1e-6
"""Slack of the eps-ball check, in [0, 1] observation units (float32 rounding of a clamp)."""

_PLAIN = (bool, int, float, str, type(None))


class ExternalAttack(Attack):
    """A torchattacks attack or a function ``obs -> adversarial obs``, as an :class:`Attack`.

    See the module docstring for how each kind is called, seeded and checked.

    Args:
        attack: a torchattacks ``Attack`` instance, or a callable ``fn(obs)`` /
            ``fn(obs, policy)`` returning adversarial observations like ``obs``.
        policy: the policy to attack; None leaves it unbound until :meth:`with_policy`
            (what :func:`attacks.evaluate` calls for each policy).
        eps: the budget in [0, 1] units the output must respect (number or "8/255"); for
            torchattacks, default its ``eps``. None: no ball check.
        norm: ``"linf"`` or ``"l2"`` (needs a budget); default the torchattacks object's
            norm, else ``"linf"``.
        seed: None (torch's global RNG) or an int (a private, reproducible RNG stream).
        pass_policy: call ``fn(obs, policy)`` (True) or ``fn(obs)`` (False); None reads it
            from ``fn``'s signature. Callables only.
        uses_gradients: run the input-gradient guard before the attack (a gradient attack on a
            policy without input gradients is refused, not reported as robust). Default: True
            for torchattacks except its gradient-free classes, False for callables.

    Raises:
        ValueError: one line, for a toolkit Attack or a class instead of an instance, a bad
            budget, a declaration that contradicts the torchattacks object, or (at call time)
            an output of the wrong type, shape, dtype, device, values or budget.

    Example::

        >>> import torchattacks
        >>> attack = ExternalAttack(torchattacks.PGD(unbound_model(), eps=4/255, steps=10))
        >>> result = evaluate(policy, make_env("beacon"), attack, episodes=5)
        >>> sign = ExternalAttack(lambda obs: (obs + 2/255).clamp(0, 1), eps=2/255)
        >>> adv_obs = sign.with_policy(policy)(obs)
    """

    name = "external"

    def __init__(self, attack: Any, policy: nn.Module | None = None, *,
                 eps: float | str | None = None, norm: str | None = None,
                 seed: int | None = None, pass_policy: bool | None = None,
                 uses_gradients: bool | None = None):
        if isinstance(attack, ExternalAttack):
            raise ValueError("attack is already an ExternalAttack: use it directly")
        if isinstance(attack, Attack):
            raise ValueError(f"{type(attack).__name__} is an attacks.Attack: use it directly "
                             f"(ExternalAttack wraps torchattacks attacks and functions obs -> "
                             f"adversarial obs)")
        if isinstance(attack, type):
            raise ValueError(f"got the class {attack.__name__}, not an attack: build it first, "
                             f"e.g. {attack.__name__}(unbound_model(), eps=...) for torchattacks")
        if policy is not None and not isinstance(policy, nn.Module):
            raise ValueError(f"policy must be a torch.nn.Module following the policy protocol, "
                             f"got {type(policy).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.kind = "torchattacks" if is_torchattacks(attack) else "callable"
        if self.kind == "callable" and not callable(attack):
            raise ValueError(f"attack must be a torchattacks Attack or a callable obs -> "
                             f"adversarial obs, got {type(attack).__name__}")
        self.label = f"ExternalAttack({_short_name(attack)})"
        if norm is not None and norm not in NORMS:
            raise ValueError(f"{self.label}: unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
        declared = None if eps is None else parse_budget(eps)
        if self.kind == "torchattacks":
            check_torchattacks_mode(attack, self.label)
            # a snapshot of the user's object (later changes to it do not leak in); its model
            # is not copied: the snapshot holds a stand-in, replaced at each binding
            self._template = copy.deepcopy(attack, {id(attack.model): unbound_model()})
            self.eps, self.norm = torchattacks_budget(attack, declared, norm, self.label)
            self.pass_policy = None
            default_grad = type(attack).__name__ not in GRADIENT_FREE_TORCHATTACKS
        else:
            if norm is not None and declared is None:
                raise ValueError(f"{self.label}: norm={norm!r} needs eps (the budget to check)")
            self._template = attack  # called as is, shared by every binding
            self.eps = declared
            self.norm = None if declared is None else (norm or "linf")
            self.pass_policy = (_wants_policy(attack, self.label) if pass_policy is None
                                else bool(pass_policy))
            default_grad = False
        if pass_policy is not None and self.kind == "torchattacks":
            raise ValueError(f"{self.label}: pass_policy applies to callables only")
        self.uses_gradients = default_grad if uses_gradients is None else bool(uses_gradients)
        self.objective = None  # the wrapped attack's own loss: see settings()
        self.target = None
        self.seed = seed
        self._generator = None
        self._rng_state: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._bound: Any = None
        self.last_success: torch.Tensor | None = None
        self.policy = None  # type: ignore[assignment]
        if policy is not None:
            self._bind(policy)

    # ------------------------------------------------------------------ Attack API
    def __call__(self, obs: torch.Tensor, actions: Any = None) -> torch.Tensor:
        """Run the wrapped attack on ``obs`` (B, H, W, C) in [0, 1] and check its output.

        Args:
            obs: float tensor (B, H, W, C) in [0, 1], finite.
            actions: optional (B,) integer reference actions (torchattacks' labels); default
                the clean greedy actions.

        Raises:
            ValueError: unbound, bad obs or actions, or a wrong output (one line naming it).
        """
        policy = self.policy
        if policy is None:
            raise ValueError(f"{self.label} is not bound to a policy: pass policy= or call "
                             f".with_policy(policy) (attacks.evaluate does)")
        check_obs(obs, expected_obs_shape(policy))
        device, dtype = policy_device(policy)
        x = obs.detach().to(device=device, dtype=dtype)
        batch = x.shape[0]
        ref = check_actions(actions, batch, None, device, "actions")
        with self._private_rng(device):
            with eval_mode(policy):
                if ref is None:
                    with torch.no_grad():
                        ref = policy(x).argmax(dim=1)
                if self.uses_gradients:
                    check_input_gradient(policy, x, name=self.label)
                adv = self._check_output(x, self._run(x, ref, device))
            # a fresh eval_mode: torchattacks' set_model_training_mode may have left it training
            with eval_mode(policy), torch.no_grad():
                logits = policy(adv)
        check_actions(ref, batch, logits.shape[1], device, "actions")
        self.last_success = (logits.argmax(dim=1) != ref).cpu()
        return adv.to(device=obs.device, dtype=obs.dtype)

    def with_policy(self, policy: nn.Module) -> "ExternalAttack":
        """A copy bound to ``policy`` (torchattacks: a fresh deep copy of the snapshot)."""
        if not isinstance(policy, nn.Module):
            raise ValueError(f"policy must be a torch.nn.Module following the policy protocol, "
                             f"got {type(policy).__name__}")
        new = copy.copy(self)
        new.last_success = None
        new._rng_state = None
        new._bind(policy)
        return new

    def set_seed(self, seed: int | None) -> "ExternalAttack":
        """Rewind the private RNG stream to ``seed`` (None: torch's global RNG from now on)."""
        super().set_seed(seed)
        self._rng_state = None
        return self

    def settings(self) -> dict[str, Any]:
        """What ran, as plain data: ``attack`` ("external"), ``external`` (the wrapped class
        or function, qualified), ``kind``, ``eps``, ``norm``, ``budget_checked``, ``params``
        (its public hyper-parameters of plain types) and ``version`` (of its package, when it
        says); ``pass_policy`` for callables."""
        obj = self._template
        out: dict[str, Any] = {"attack": self.name, "external": _qualified_name(obj),
                               "kind": self.kind, "eps": self.eps, "norm": self.norm,
                               "budget_checked": self.eps is not None and self.norm is not None,
                               "params": (torchattacks_params(obj) if self.kind == "torchattacks"
                                          else _callable_params(obj))}
        if self.kind == "callable":
            out["pass_policy"] = self.pass_policy
        version = _package_version(obj)
        if version is not None:
            out["version"] = version
        return out

    def __repr__(self) -> str:
        return f"{self.label}(eps={self.eps!r}, norm={self.norm!r}, kind={self.kind!r})"

    # ------------------------------------------------------------------ internals
    def _bind(self, policy: nn.Module) -> None:
        self.policy = policy
        if self.kind == "torchattacks":
            bound = copy.deepcopy(self._template)
            bound.set_model(NCHWPolicy(policy))  # torchattacks passes it to its sub-attacks
            bound.set_device(policy_device(policy)[0])
            self._bound = bound

    def _run(self, x: torch.Tensor, ref: torch.Tensor, device: torch.device) -> Any:
        if self.kind == "torchattacks":
            if self._bound.device != device:  # the policy moved since it was bound
                self._bound.set_device(device)
            self._bound.model.training = False  # its own flag only (see NCHWPolicy)
            # (B, C, H, W), contiguous like a DataLoader's (torchattacks uses .view on it)
            images = x.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
            out = self._bound(images, ref)
            if not torch.is_tensor(out):
                return out
            if out.shape != images.shape:
                raise ValueError(f"{self.label} returned shape {tuple(out.shape)}, expected "
                                 f"{tuple(images.shape)} (B, C, H, W) like its input images")
            return out.permute(0, 2, 3, 1)  # back to (B, H, W, C)
        fn = self._template
        return fn(x.clone(), self.policy) if self.pass_policy else fn(x.clone())

    def _check_output(self, x: torch.Tensor, out: Any) -> torch.Tensor:
        """``out`` detached, if it is a valid adversarial batch for ``x``; else ValueError."""
        where = f"{self.label} returned"
        if not torch.is_tensor(out):
            raise ValueError(f"{where} a {type(out).__name__}, expected a torch.Tensor shaped "
                             f"like obs {tuple(x.shape)}")
        if out.shape != x.shape:
            raise ValueError(f"{where} shape {tuple(out.shape)}, expected {tuple(x.shape)} "
                             f"(B, H, W, C) like obs")
        if out.dtype != x.dtype:
            raise ValueError(f"{where} dtype {out.dtype}, expected {x.dtype} (the policy's)")
        if out.device != x.device:
            raise ValueError(f"{where} a tensor on {out.device}, expected {x.device} "
                             f"(the policy's device)")
        out = out.detach()
        lo, hi = (float(v) for v in torch.aminmax(out))  # NaN and inf propagate
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(f"{where} {bad} NaN/inf value(s); adversarial obs must be finite")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where} values in [{lo:g}, {hi:g}], outside [0, 1] (the adapter "
                             f"never clips: the attack must keep obs in [0, 1])")
        if self.eps is not None and self.norm is not None:
            delta = (out - x).flatten(1).double()
            size = delta.abs().amax(dim=1) if self.norm == "linf" else delta.norm(dim=1)
            worst = int(size.argmax())
            if float(size[worst]) > self.eps + BALL_TOLERANCE:
                what = "max |adv - obs|" if self.norm == "linf" else "||adv - obs||_2"
                raise ValueError(f"{where} a perturbation outside the {self.norm} ball: {what} = "
                                 f"{float(size[worst]):.6g} > eps = {self.eps:.6g} (+"
                                 f"{BALL_TOLERANCE:g}) on sample {worst}; budget violations "
                                 f"are never clipped")
        return out

    @contextlib.contextmanager
    def _private_rng(self, device: torch.device) -> Iterator[None]:
        """With a seed, run in a private RNG stream (started by ``torch.manual_seed(seed)``,
        continued across calls) and restore the caller's; without one, do nothing."""
        if self.seed is None:
            yield
            return
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            if self._rng_state is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self._rng_state[0])
                if cuda and self._rng_state[1] is not None:
                    torch.cuda.set_rng_state(self._rng_state[1], device)
            try:
                yield
            finally:
                self._rng_state = (torch.get_rng_state(),
                                   torch.cuda.get_rng_state(device) if cuda else None)


# --------------------------------------------------------------------------- callables
def _wants_policy(fn: Callable[..., Any], label: str) -> bool:
    """``fn(obs, policy)`` (True) or ``fn(obs)`` (False), by its required positional
    parameters; ValueError when the signature does not say."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = None
    if params is not None:
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p for p in params if p.kind in positional and p.default is p.empty]
        if len(required) in (1, 2):
            return len(required) == 2
    raise ValueError(f"{label}: cannot tell from its signature whether to call fn(obs) or "
                     f"fn(obs, policy); pass pass_policy=False or True")


def _callable_params(fn: Any) -> dict[str, Any]:
    """Plain-typed hyper-parameters of a callable: a partial's keywords, a function's keyword
    defaults and closure values, an object's public attributes."""
    out: dict[str, Any] = {}
    if isinstance(fn, functools.partial):
        out.update({k: v for k, v in fn.keywords.items() if _is_plain(v)})
        fn = fn.func
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        for k, p in inspect.signature(fn).parameters.items():
            if p.default is not p.empty and _is_plain(p.default):
                out.setdefault(k, p.default)
        try:
            closure = inspect.getclosurevars(fn).nonlocals
        except (TypeError, ValueError):
            closure = {}
        out.update({k: v for k, v in closure.items() if _is_plain(v) and k not in out})
    elif not inspect.isbuiltin(fn):
        out.update({k: v for k, v in vars(fn).items() if not k.startswith("_")
                    and k != "training" and _is_plain(v)} if hasattr(fn, "__dict__") else {})
    return out


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN) and not (isinstance(value, float) and not math.isfinite(value))


def _short_name(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        return f"partial({_short_name(obj.func)})"
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
        return obj.__qualname__
    return type(obj).__name__


def _qualified_name(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        return f"functools.partial({_qualified_name(obj.func)})"
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj) \
        else type(obj)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


def _package_version(obj: Any) -> str | None:
    target = obj.func if isinstance(obj, functools.partial) else obj
    module = getattr(target, "__module__", None) or type(target).__module__
    top = sys.modules.get(str(module).split(".")[0])
    version = getattr(top, "__version__", None)
    return version if isinstance(version, str) else None
