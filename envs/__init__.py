"""Environment registry: PettingZoo ``ParallelEnv`` s with uint8 (H, W, C) pixel observations.

``make_env(name, **kwargs)`` builds one; ``list_envs()`` names them. ``beacon`` is this
project's measurement environment (ground-truth relevance in ``info[agent]["relevance"]``);
the others are real PettingZoo environments preprocessed with SuperSuit.
"""
from __future__ import annotations

from typing import Callable

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
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:  # unknown keyword
        raise ValueError(f"bad settings for env {name!r}: {exc}") from None


def _beacon(**kwargs) -> ParallelEnv:
    from envs.beacon import BeaconEnv
    return BeaconEnv(**kwargs)


register_env("beacon", _beacon)
