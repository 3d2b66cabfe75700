"""The policy protocol (DESIGN.md section 1), defined once for every package.

Every attack, regularizer and explainer works on a plain ``torch.nn.Module`` policy:
``policy(obs) -> logits`` with ``obs`` float in [0, 1], shape ``(B, H, W, C)`` (channels last,
as the environment emits it, uint8 frames divided by 255), and optionally
``policy.value(obs) -> (B,)``. Perturbation budgets ``eps`` are in the same [0, 1] units
(``8/255`` is a common one).

This module holds what every entry point shares:

* :func:`check_obs`: the one observation validator (type, layout, dtype, finiteness, range),
  whose one-line ``ValueError`` says what it got and what it expects;
* :func:`eval_mode`: eval (or train) mode for a block, restoring every submodule's own flag;
* :func:`policy_device`: the device and dtype a policy computes in (never hard-coded);
* :func:`parse_budget`, :func:`eps_label`, :func:`eps_slug`: budgets in, budgets out;
* :func:`obs_scale` and :func:`to_unit`: environment observations to the [0, 1] protocol;
* :func:`check_input_gradient` (and :func:`diagnose_input_gradient`,
  :func:`allow_masked_gradients`): the input-gradient guard of every gradient attack,
  explainer and SCOR-PIO, so that a policy without input gradients is refused with its cause
  instead of being reported robust;
* :func:`expected_obs_shape`: the ``(H, W, C)`` a policy declares, for :func:`check_obs`.

It imports torch and numpy only, so every package may depend on it.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["check_obs", "eval_mode", "policy_device", "parse_budget", "eps_label", "eps_slug",
           "obs_scale", "to_unit", "expected_obs_shape", "InputGradientError",
           "GradientDiagnosis", "diagnose_input_gradient", "check_input_gradient",
           "allow_masked_gradients", "GRADIENT_CAUSES"]

_CHANNEL_COUNTS = (1, 2, 3, 4)  # grey, grey+alpha, RGB, RGBA (and stacked pairs)


def _layout_hint(shape: Sequence[int]) -> str:
    """`` (this looks like (B, C, H, W): permute to channels last)`` when the shape suggests it."""
    if len(shape) == 4 and shape[1] in _CHANNEL_COUNTS and shape[3] not in _CHANNEL_COUNTS:
        return "; this looks like (B, C, H, W): permute(0, 2, 3, 1) to channels last"
    return ""


def check_obs(obs: Any, obs_shape: Sequence[int] | None = None, *, unit_range: bool = True,
              name: str = "obs") -> None:
    """Validate a batch against the policy protocol: a float ``(B, H, W, C)`` tensor, finite,
    in [0, 1].

    Args:
        obs: the batch to check.
        obs_shape: the ``(H, W, C)`` the policy was built for, if known; a mismatch is named
            (and a channels-first batch is recognized as such).
        unit_range: also check that every value lies in [0, 1] (off only for tensors that are
            not observations, e.g. a smoothed copy computed outside the range).
        name: the argument's name in the message.

    Raises:
        ValueError: one line naming the offending type, shape, dtype or values and what is
            expected.
    """
    if not torch.is_tensor(obs):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, H, W, C), got "
                         f"{type(obs).__name__}")
    shape = tuple(obs.shape)
    if obs.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, W, C), got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} must hold at least one observation, got batch size 0")
    if obs_shape is not None and shape[1:] != tuple(obs_shape):
        hint = ""
        if (shape[2], shape[3], shape[1]) == tuple(obs_shape):
            hint = "; this looks like (B, C, H, W): permute(0, 2, 3, 1) to channels last"
        raise ValueError(f"{name} shape {shape[1:]} does not match the policy's observation "
                         f"shape {tuple(obs_shape)} (H, W, C){hint}")
    if obs_shape is None and shape[3] not in _CHANNEL_COUNTS and _layout_hint(shape):
        raise ValueError(f"{name} must have shape (B, H, W, C), got {shape}{_layout_hint(shape)}")
    if not obs.is_floating_point():
        hint = " (divide uint8 frames by 255)" if obs.dtype == torch.uint8 else ""
        raise ValueError(f"{name} must be floating point in [0, 1]{hint}, got dtype {obs.dtype}")
    lo, hi = (float(v) for v in torch.aminmax(obs.detach()))  # NaN and inf propagate: one pass
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_bad = int((~torch.isfinite(obs)).sum())
        raise ValueError(f"{name} must be finite, got {n_bad} NaN/inf value(s)")
    if unit_range and (lo < 0.0 or hi > 1.0):
        hint = " (this looks like 0-255: divide by 255)" if hi > 1.0 and hi <= 255.0 and lo >= 0 else ""
        raise ValueError(f"{name} must lie in [0, 1]{hint}, got values in [{lo:g}, {hi:g}]")


@contextlib.contextmanager
def eval_mode(policy: Any, train: bool = False) -> Iterator[None]:
    """Put ``policy`` in eval (or train) mode for a block and restore every submodule's own
    flag on exit (a submodule a user froze in eval stays in eval). A policy that is not an
    ``nn.Module`` (a plain callable) is left alone."""
    if not isinstance(policy, nn.Module):
        yield
        return
    saved = [(m, m.training) for m in policy.modules()]
    policy.train(train)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def policy_device(policy: Any) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the policy's first floating parameter or buffer (CPU
    float32 for a policy that has none, or that is not an ``nn.Module``)."""
    if isinstance(policy, nn.Module):
        for p in policy.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
        for b in policy.buffers():
            if b.is_floating_point():
                return b.device, b.dtype
    return torch.device("cpu"), torch.float32


def parse_budget(eps: Any, name: str = "eps") -> float:
    """Return ``eps`` as a float in (0, 1]; accepts numbers and strings such as ``"8/255"``.

    Raises:
        ValueError: ``eps must be in (0, 1], got ...``.
    """
    if isinstance(eps, str):
        try:
            value = float(Fraction(eps.strip()))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name} must be a number or a fraction such as 8/255, got {eps!r}") from None
    elif isinstance(eps, bool) or not isinstance(eps, (int, float)):
        if torch.is_tensor(eps) and eps.numel() == 1:
            value = float(eps)
        else:
            raise ValueError(f"{name} must be a number in (0, 1], got {eps!r}")
    else:
        value = float(eps)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] (observations are in [0, 1] units, "
                         f"e.g. 8/255), got {eps!r}")
    return value


def eps_label(eps: float | None) -> str:
    """``8/255`` for multiples of 1/255, else the shortest exact form (``0.05``, ``1e-30``);
    ``-`` for None (the clean, unattacked case)."""
    if eps is None:
        return "-"
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) >= 1 and eps < 1:
        return f"{int(round(k))}/255"
    return f"{eps:g}" if float(f"{eps:g}") == eps else repr(float(eps))


def eps_slug(eps: float) -> str:
    """File-name form of a budget: ``eps8_255``, ``eps0.05``."""
    return "eps" + eps_label(eps).replace("/", "_")


def obs_scale(high: Any) -> float:
    """The factor that maps an observation space with upper bound ``high`` to [0, 1]:
    ``1 / max(high)`` for a bounded space above 1 (e.g. 255 for uint8 frames), else 1."""
    arr = np.asarray(high, dtype=np.float64)
    if arr.size and np.isfinite(arr).all() and float(arr.max()) > 1.0:
        return 1.0 / float(arr.max())
    return 1.0


def to_unit(frames: Any, scale: float | None = None, device: torch.device | str | None = None
            ) -> torch.Tensor:
    """Environment observations (an array, a tensor or a list of frames) as a float32 tensor
    in [0, 1] on ``device``: uint8 frames are divided by 255; other frames are multiplied by
    ``scale`` (see :func:`obs_scale`) when given, and clamped to [0, 1]."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames])
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames,
                        device=device)
    if x.dtype == torch.uint8 and scale is None:
        return x.float().div_(255.0)
    x = x.float()
    if scale is not None:
        x = (x * scale).clamp_(0.0, 1.0)
    return x


def expected_obs_shape(policy: Any) -> tuple[int, int, int] | None:
    """The ``(H, W, C)`` observation shape ``policy`` declares as ``policy.obs_shape`` (every
    ``agents.PolicyNetwork`` and policy adapter does), or None when it declares none."""
    shape = getattr(policy, "obs_shape", None)
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 3 and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape):
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    return None


# --------------------------------------------------------------------- the input-gradient guard
GRADIENT_CAUSES = {
    "no_grad": "the forward runs under torch.no_grad() or torch.inference_mode() (RLlib's "
               "forward_inference does: take logits from _forward / forward_train), or it "
               "returns a detached tensor",
    "detached": "the input is detached before it reaches the network (x.detach(), .numpy(), "
                "a no_grad block around the input layer), so the logits do not depend on obs "
                "through autograd",
    "zero": "a non-differentiable input layer (quantization or rounding such as torch.round, "
            "a step function) or logits that ignore obs; attack through attacks.BPDA or use a "
            "gradient-free method (Square, random noise, occlusion, RISE)",
}
"""The likely cause of each failure of :func:`diagnose_input_gradient`, by its ``cause``."""

_SUMMARY = {
    "no_grad": "the policy's logits have no grad_fn",
    "detached": "the policy's logits have no gradient path to obs",
    "zero": "the input gradient of the policy's logits is exactly zero on every observation",
}

_ALLOW_MASKED: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_masked_gradients",
                                                                     default=False)
_PASSED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()
_CHECK_ROWS = 8


class InputGradientError(ValueError):
    """A gradient method was given a policy without usable input gradients.

    Attributes:
        cause: ``"no_grad"``, ``"detached"`` or ``"zero"`` (see :data:`GRADIENT_CAUSES`).
    """

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class GradientDiagnosis:
    """The outcome of :func:`diagnose_input_gradient`.

    Attributes:
        ok: the input gradient exists and is nonzero somewhere.
        cause: None when ok, else ``"no_grad"`` (the logits have no ``grad_fn``: no graph at
            all), ``"detached"`` (a graph, but none to obs) or ``"zero"`` (a gradient that is
            exactly zero everywhere).
        summary: what was found, one clause (empty when ok).
        likely: the likely cause and what to do (:data:`GRADIENT_CAUSES`; empty when ok).
        checked: False when the policy's output was not a float tensor, so nothing could be
            checked (ok, and the caller's own validation of the output names the problem).
    """

    ok: bool
    cause: str | None = None
    summary: str = ""
    likely: str = ""
    checked: bool = True

    def message(self, name: str = "this gradient method") -> str:
        """One line: ``{name} needs input gradients, but ...: likely ...``."""
        return f"{name} needs input gradients, but {self.summary}: likely {self.likely}"


def _fingerprint(policy: Any) -> tuple:
    """What the guard's cached verdict depends on: the module tree (a swapped input filter, as
    BPDA does, is a new tree), a forward patched on the instance, and the train/eval flag."""
    if not isinstance(policy, nn.Module):
        return ()
    patched = policy.__dict__.get("forward")
    return (tuple(id(m) for m in policy.modules()), id(patched) if patched is not None else 0,
            policy.training)


def _failure(cause: str) -> GradientDiagnosis:
    return GradientDiagnosis(False, cause, _SUMMARY[cause], GRADIENT_CAUSES[cause])


def _gradient_of(policy: Any, rows: torch.Tensor) -> tuple[str | None, bool]:
    """One forward/backward on a fresh leaf: ``(cause or None, checkable)``; ``checkable`` is
    False when the output is not a tensor of logits (the caller's own validation names that)."""
    leaf = rows.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = policy(leaf)
        if not torch.is_tensor(logits) or logits.dim() < 1 or not logits.is_floating_point():
            return None, False
        if not logits.requires_grad:
            return "no_grad", True
        flat = logits.reshape(logits.shape[0], -1) if logits.dim() > 1 else logits[:, None]
        # distinct weights: centred logits or log-probabilities do not sum to a constant
        weights = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
        (grad,) = torch.autograd.grad((flat * weights).sum(), leaf, allow_unused=True)
    if grad is None:
        return "detached", True
    if not bool(torch.any(grad != 0)):
        return "zero", True
    return None, True


def diagnose_input_gradient(policy: Any, obs: torch.Tensor) -> GradientDiagnosis:
    """Whether ``policy``'s logits have an input gradient at ``obs`` that is not identically
    zero, and if not, the likely cause (no verdict is cached; see :func:`check_input_gradient`).

    One forward and one backward over the first few rows of ``obs`` (all rows before a
    ``"zero"`` verdict), in the policy's current train/eval mode. It has no side effects the
    caller can see: the global RNG is forked and every buffer (BatchNorm statistics) is
    restored, and parameter ``.grad`` fields are not touched.
    """
    device = obs.device
    devices = [device] if device.type == "cuda" else []
    saved = ([(b, b.detach().clone()) for b in policy.buffers()]
             if isinstance(policy, nn.Module) and policy.training else [])
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            cause, checkable = _gradient_of(policy, obs[:_CHECK_ROWS])
            if cause == "zero" and obs.shape[0] > _CHECK_ROWS:
                cause, checkable = _gradient_of(policy, obs)
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
    if cause is None:
        return GradientDiagnosis(True, checked=checkable)
    return _failure(cause)


def check_input_gradient(policy: Any, obs: torch.Tensor, *, name: str = "this gradient method"
                         ) -> None:
    """Refuse a policy whose logits have no usable input gradient at ``obs``.

    Called by every gradient attack, gradient explainer and SCOR-PIO on its first call: a
    policy whose gradient is missing or exactly zero would give a zero perturbation (0% attack
    success, reported as robustness) or an all-zero map without any warning. A verdict that
    passed is cached per policy object (and its module tree and train/eval mode), so the
    guard costs one forward/backward once, not every step. Inside
    :func:`allow_masked_gradients` the guard is off (the audit measures masking instead).

    Args:
        policy: ``policy(obs) -> logits`` (the policy protocol).
        obs: observations on the policy's device, already validated by :func:`check_obs`.
        name: the method, for the message (``"PGD"``, ``"integrated gradients"``).

    Raises:
        InputGradientError: (a ``ValueError``) one line naming what was found (no ``grad_fn``;
            no path to obs; a gradient exactly zero everywhere) and the likely cause.
    """
    if _ALLOW_MASKED.get():
        return
    key = _fingerprint(policy)
    try:
        passed = _PASSED.get(policy)
    except TypeError:  # not weak-referenceable: check every call
        passed = None
    if passed is not None and key in passed:
        return
    diagnosis = diagnose_input_gradient(policy, obs)
    if not diagnosis.ok:
        raise InputGradientError(diagnosis.message(name), diagnosis.cause or "")
    if not diagnosis.checked:
        return
    try:
        _PASSED.setdefault(policy, set()).add(key)
    except TypeError:
        pass


@contextlib.contextmanager
def allow_masked_gradients() -> Iterator[None]:
    """Turn :func:`check_input_gradient` off for a block: gradient attacks then run on a
    policy without usable input gradients (and find nothing). For the gradient-masking audit,
    which measures exactly that and names the cause (:func:`diagnose_input_gradient`) itself;
    never a way to report such a policy as robust."""
    token = _ALLOW_MASKED.set(True)
    try:
        yield
    finally:
        _ALLOW_MASKED.reset(token)
