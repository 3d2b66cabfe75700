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
* :func:`obs_scale` and :func:`to_unit`: environment observations to the [0, 1] protocol.

It imports torch and numpy only, so every package may depend on it.
"""
from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["check_obs", "eval_mode", "policy_device", "parse_budget", "eps_label", "eps_slug",
           "obs_scale", "to_unit"]

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
