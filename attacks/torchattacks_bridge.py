"""torchattacks on the policy protocol: the pieces :class:`attacks.external.ExternalAttack`
uses to bind a torchattacks ``Attack`` to a policy and to read what it is.

torchattacks (https://github.com/Harry24k/adversarial-attacks-pytorch) classifies NCHW images
with ``model(images) -> logits``; :class:`NCHWPolicy` is that model for a policy. Nothing here
imports torchattacks: its objects are recognized by their base class's name and package.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from marl_fgmf.protocol import parse_budget

__all__ = ["GRADIENT_FREE_TORCHATTACKS", "NCHWPolicy", "check_torchattacks_mode",
           "is_torchattacks", "is_torchattacks_class", "torchattacks_budget",
           "torchattacks_norm", "torchattacks_params", "unbound_model"]

GRADIENT_FREE_TORCHATTACKS = frozenset({"Square", "OnePixel", "Pixle", "SPSA", "GN", "VANILA"})
"""torchattacks classes that never ask for input gradients (no input-gradient guard)."""

_PLAIN = (bool, int, float, str, type(None))
_TA_PRIVATE = {"model", "model_name", "attack", "supported_mode", "device"}


def is_torchattacks(obj: Any) -> bool:
    """Whether ``obj`` is a torchattacks ``Attack`` instance (found without importing it)."""
    return is_torchattacks_class(type(obj))


def is_torchattacks_class(cls: Any) -> bool:
    """Whether ``cls`` is a torchattacks ``Attack`` class."""
    return any(c.__name__ == "Attack" and c.__module__.split(".")[0] == "torchattacks"
               for c in getattr(cls, "__mro__", ()))


class NCHWPolicy(nn.Module):
    """A policy on the protocol seen as a torchattacks classifier.

    ``forward(images)``: ``images`` (N, C, H, W) in [0, 1] -> ``policy(images.permute(0, 2, 3,
    1))``, the (N, n_actions) logits. Only this wrapper's own ``training`` flag starts False
    (``.eval()`` would also switch the wrapped policy, which binding must not do).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.training = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.policy(images.permute(0, 2, 3, 1))  # (N, C, H, W) -> (N, H, W, C)


class _Unbound(nn.Module):
    """The model of a torchattacks attack built before any policy (see :func:`unbound_model`)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # torchattacks reads the device from it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise ValueError("this torchattacks attack is not bound to a policy: wrap it in "
                         "ExternalAttack and bind it (with_policy, or attacks.evaluate)")


def unbound_model() -> nn.Module:
    """A stand-in model for building a torchattacks attack before any policy exists
    (``torchattacks.PGD(unbound_model(), eps=4/255)``); :class:`ExternalAttack` replaces it."""
    return _Unbound()


def check_torchattacks_mode(obj: Any, label: str) -> None:
    """Refuse the torchattacks modes that cannot work on [0, 1] observations and clean actions."""
    if getattr(obj, "normalization_used", None) is not None:
        raise ValueError(f"{label}: set_normalization_used is not supported: observations are "
                         f"in [0, 1] and any normalization belongs inside the policy")
    if getattr(obj, "attack_mode", "default") == "targeted(label)":
        raise ValueError(f"{label}: targeted(label) mode would read the clean actions as targets; "
                         f"use set_mode_targeted_by_function or the default mode")


def torchattacks_budget(obj: Any, declared: float | None, norm: str | None, label: str
                        ) -> tuple[float | None, str | None]:
    """The budget to check: the declaration, else the object's ``eps`` and its norm."""
    raw = getattr(obj, "eps", None)
    own = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        own = parse_budget(raw, f"{label}: eps")
    if declared is not None and own is not None and abs(declared - own) > 1e-12:
        raise ValueError(f"{label}: declared eps={declared:.6g} but the torchattacks object has "
                         f"eps={own:.6g}; they must agree")
    eps = declared if declared is not None else own
    own_norm = torchattacks_norm(obj)
    if norm is not None and own_norm is not None and norm != own_norm:
        raise ValueError(f"{label}: declared norm={norm!r} but the torchattacks object uses "
                         f"{own_norm!r}; they must agree")
    if eps is None:
        if norm is not None:
            raise ValueError(f"{label}: norm={norm!r} needs eps (the budget to check)")
        return None, None
    norm = norm or own_norm
    if norm is None:
        raise ValueError(f"{label}: cannot tell the norm of its eps={eps:.6g}; declare "
                         f"norm='linf' or 'l2' (the ball its output is checked against)")
    return eps, norm


def torchattacks_norm(obj: Any) -> str | None:
    """``"linf"``/``"l2"`` from the object's ``norm`` attribute or, failing that, the single
    "Distance Measure" of its class's docstring (or its nearest base's); None when neither
    says."""
    own = getattr(obj, "norm", None)
    if isinstance(own, str):
        return {"linf": "linf", "l2": "l2"}.get(own.lower())
    for cls in type(obj).__mro__:  # a subclass without a docstring: its base's
        match = re.search(r"Distance Measure\s*:\s*([^\n]+)", cls.__doc__ or "")
        if match is not None:
            return {"linf": "linf", "l2": "l2"}.get(match.group(1).strip().lower())
    return None


def torchattacks_params(obj: Any) -> dict[str, Any]:
    """The public plain-typed attributes of a torchattacks attack (its hyper-parameters)."""
    return {k: v for k, v in vars(obj).items()
            if not k.startswith("_") and k not in _TA_PRIVATE and _is_plain(v)}


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN) and not (isinstance(value, float) and not math.isfinite(value))
