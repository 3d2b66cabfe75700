"""Environment registry: PettingZoo ``ParallelEnv`` s with uint8 (H, W, C) pixel observations.

``make_env(name, **kwargs)`` builds one; ``list_envs()`` names them. ``beacon`` is this
project's measurement environment (ground-truth relevance in ``info[agent]["relevance"]``);
the others are real PettingZoo environments preprocessed with SuperSuit: ``pistonball``,
``pursuit``, ``cooperative_pong`` (each module's docstring documents agents, spaces, rewards,
preprocessing and speed). Unknown settings raise ``ValueError`` naming the env and the
setting. :func:`envs.rllib.register_rllib_env` registers any of them with RLlib.
"""
from __future__ import annotations

import importlib
import inspect
import math
import numbers
from typing import Any, Callable

from pettingzoo import ParallelEnv

_REGISTRY: dict[str, Callable[..., ParallelEnv]] = {}


def register_env(name: str, factory: Callable[..., ParallelEnv]) -> None:
    """Register ``factory(**kwargs) -> ParallelEnv`` under ``name``."""
    _REGISTRY[name] = factory


def list_envs() -> list[str]:
    """Names accepted by :func:`make_env`."""
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs) -> ParallelEnv:
    """Build the environment ``name`` (see :func:`list_envs`) with its keyword settings.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a bad setting.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown env {name!r}; allowed: {', '.join(list_envs())}")
    factory = _REGISTRY[name]
    check_settings(name, factory, kwargs)
    return factory(**kwargs)


def check_settings(name: str, constructor: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming env ``name`` and the setting when ``kwargs`` do not fit
    ``constructor``'s keyword parameters: unknown or positional-only names, or a value whose
    type is not its default's (an integer setting refuses ``7.9`` and ``"abc"`` instead of
    truncating them; a boolean one takes only true/false). A constructor taking ``**kwargs``
    accepts any name here and checks its settings itself."""
    params = inspect.signature(constructor).parameters
    for key, value in kwargs.items():
        p = params.get(key)
        if p is not None and p.default is not inspect.Parameter.empty:
            _check_type(name, key, p.default, value)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
             and k != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"env {name!r} has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings: {', '.join(valid)}")


def _check_type(env: str, key: str, default: Any, value: Any) -> None:
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = is_int, "an integer"
    elif isinstance(default, float):
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and math.isfinite(value))
        want = "a finite number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ValueError(f"env {env!r}: setting {key} must be {want} (default {default!r}), "
                         f"got {value!r}")


def _lazy(name: str, module: str, attr: str) -> Callable[..., ParallelEnv]:
    """A factory importing ``module.attr`` on first use (keeps ``import envs`` light) and
    checking the settings against its signature."""

    def factory(**kwargs: Any) -> ParallelEnv:
        constructor = getattr(importlib.import_module(module), attr)
        check_settings(name, constructor, kwargs)
        return constructor(**kwargs)

    factory.__name__ = f"make_{name}"
    factory.__doc__ = f"Build env {name!r} with ``{module}.{attr}(**kwargs)``."
    return factory


register_env("beacon", _lazy("beacon", "envs.beacon", "BeaconEnv"))
register_env("pistonball", _lazy("pistonball", "envs.pistonball", "make_pistonball"))
register_env("pursuit", _lazy("pursuit", "envs.pursuit", "make_pursuit"))
register_env("cooperative_pong",
             _lazy("cooperative_pong", "envs.cooperative_pong", "make_cooperative_pong"))
