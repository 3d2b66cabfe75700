"""The attribution methods by name: the registry the commands, benchmarks and metrics use.

It sits above both :mod:`marl_fgmf.attribution` (the single methods) and
:mod:`marl_fgmf.pgca` (which builds on them), so neither imports the other's registry and
there is no import cycle.

Example:
    >>> maps = make_explainer("occlusion", policy).attribute(obs, patch=3)
    >>> relevance = attribution_map("pgca", policy, obs, steps=16)   # (B, H, W), >= 0
"""
from __future__ import annotations

from typing import Callable

import torch

from marl_fgmf.attribution import (RISE, BrightnessBaseline, GradCAMPlusPlus, IntegratedGradients,
                                   Occlusion, RandomBaseline, SmoothGrad, spatial_map)
from marl_fgmf.pgca import PGCA

__all__ = ["METHODS", "make_explainer", "spatial_map", "attribution_map"]

METHODS: dict[str, Callable] = {
    "ig": IntegratedGradients,
    "smoothgrad": SmoothGrad,
    "occlusion": Occlusion,
    "gradcampp": GradCAMPlusPlus,
    "rise": RISE,
    "pgca": PGCA,
    "random": RandomBaseline,
    "brightness": BrightnessBaseline,
}
"""Explainer factories by name: ``METHODS[name](policy)`` has ``attribute(obs, actions=None,
...)``. Pixel methods (``ig``, ``smoothgrad``) return (B, H, W, C); spatial methods
(``occlusion``, ``gradcampp``, ``rise``, ``pgca``) return (B, H, W); :func:`spatial_map`
turns either into a (B, H, W) magnitude map (re-exported here from
:mod:`marl_fgmf.attribution.base`). ``random`` and ``brightness`` are the model-free baselines
(:mod:`marl_fgmf.attribution.baselines`, (B, H, W), no policy call: ``policy`` may be
``None``), the reference every score of the others is read against."""


def make_explainer(name: str, policy):
    """The explainer ``name`` (one of :data:`METHODS`) for ``policy``.

    Example:
        >>> maps = make_explainer("occlusion", policy).attribute(obs, patch=3)
    """
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name](policy)


def attribution_map(name: str, policy, obs: torch.Tensor, actions: torch.Tensor | None = None,
                    **settings) -> torch.Tensor:
    """``spatial_map(make_explainer(name, policy).attribute(obs, actions, **settings))``:
    any method's explanation as a (B, H, W) non-negative map (what the metrics take)."""
    return spatial_map(make_explainer(name, policy).attribute(obs, actions, **settings))
