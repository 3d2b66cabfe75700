"""Model-free baseline "explainers": what a faithfulness score is worth without the policy.

Neither baseline looks at the policy (no forward pass, no gradient); both take the same call as
every other method, ``Method(policy).attribute(obs, actions=None, ...)`` (``policy`` and
``actions`` are accepted and ignored, ``policy`` may be ``None``), and return a (B, H, W) map.
A score that a method reaches no better than these is a property of the frames, not of the
explanation:

* :class:`RandomBaseline` (``"random"``): i.i.d. uniform values on the frame's non-background
  pixels (:func:`background_mask`), 0 on the background. Its expected GHR is the fraction of
  the foreground inside the relevance mask, ``|R & F| / |F|`` (``F`` the foreground, when
  ``|R| <= |F|``), far above the all-pixel chance level ``|R| / (H W)``.
* :class:`BrightnessBaseline` (``"brightness"``): ``A(i) = sum_c x_{i,c}``, the pixel's summed
  channel intensity. It lights up every drawn object, distractors included.

On beacon frames (2 agents, 21 x 21, 2 distractors, 2000 observations of mostly scripted
rollouts, ``python scripts/bench_baselines.py``) the all-pixel chance is
``|R| / (H W) = 18 / 441 = 0.041`` while ``random`` scores GHR 0.348 and ``brightness`` 0.397:
a method has to beat those, not 0.04 (see :func:`marl_fgmf.metrics.ghr` for more numbers).
"""
from __future__ import annotations

import torch

from marl_fgmf.attribution.base import Attribution
from marl_fgmf.protocol import check_obs

__all__ = ["BACKGROUND_RULES", "background_mask", "RandomBaseline", "BrightnessBaseline"]

BACKGROUND_RULES = ("mode", "zero")
"""How :func:`background_mask` decides the background: ``"mode"`` (the frame's most common
colour, default) or ``"zero"`` (black pixels)."""


def _check_actions(obs: torch.Tensor, actions) -> None:
    """The baselines ignore ``actions`` but, like every explainer, reject a wrong-sized one."""
    if actions is not None:
        n = torch.as_tensor(actions).reshape(-1).shape[0]
        if n != obs.shape[0]:
            raise ValueError(f"actions has {n} entries for a batch of {obs.shape[0]}")


def background_mask(obs: torch.Tensor, background: str = "mode") -> torch.Tensor:
    """(B, H, W) bool: the background pixels of each frame.

    A pixel is background when **all** its channels equal the background colour:

    * ``"mode"`` (default): the frame's most common colour (exact equality of the whole
      channel vector; when two colours are equally common, the lexicographically smallest).
      On beacon this is black; the rule also covers frames whose background is not black.
      A frame in which one object covers more pixels than the floor gets that object as its
      "background": use ``"zero"`` for such frames when their floor is black.
    * ``"zero"``: black, ``x_{i,c} = 0`` for every channel.

    Args:
        obs: (B, H, W, C) float in [0, 1].
        background: one of :data:`BACKGROUND_RULES`.
    """
    check_obs(obs)
    if background not in BACKGROUND_RULES:
        raise ValueError(f"background must be one of {', '.join(BACKGROUND_RULES)}, "
                         f"got {background!r}")
    obs = obs.detach()
    if background == "zero":
        return (obs == 0).all(-1)
    b, h, w, c = obs.shape
    masks = []
    for frame in obs.reshape(b, h * w, c):  # (H*W, C): colours of one frame
        colours, counts = torch.unique(frame, dim=0, return_counts=True)  # sorted colours
        mode = colours[int(torch.argmax(counts))]  # argmax: the first (smallest) of equal counts
        masks.append((frame == mode).all(-1))
    return torch.stack(masks).view(b, h, w)


class RandomBaseline(Attribution):
    """A random map, uniform over the frame's non-background pixels (model-free).

    ``A(i) ~ U(0, 1]`` i.i.d. for every non-background pixel ``i`` (:func:`background_mask`),
    ``A(i) = 0`` on the background, so the top-``k`` pixels of the map are a uniformly random
    ``k``-subset of the foreground ``F`` (when ``k <= |F|``; the background fills in after).
    A frame with no foreground pixel gets ``U(0, 1]`` everywhere (uniform over all pixels).
    The values are drawn from a generator seeded with ``seed``, one ``(B, H, W)`` draw per call:
    the same batch and seed give the same map.

    Expected ground-truth hit rate (:func:`marl_fgmf.metrics.ghr`) for ``|R| <= |F|``:
    ``E[GHR] = |R & F| / |F|``; the same for the pointing game.

    Example:
        >>> maps = RandomBaseline(None).attribute(obs, seed=0)   # (B, H, W), >= 0
    """

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  background: str = "mode", seed: int = 0) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: ignored (the map does not depend on the action); its length is checked.
            background: ``"mode"`` or ``"zero"`` (:func:`background_mask`).
            seed: seed of the generator of the values.
        Returns:
            (B, H, W) map in [0, 1], 0 exactly on the background.
        """
        _check_actions(obs, actions)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        fg = ~background_mask(obs, background)  # (B, H, W)
        fg = fg | ~fg.flatten(1).any(1).view(-1, 1, 1)  # all-background frame: every pixel
        gen = torch.Generator().manual_seed(seed)
        values = 1.0 - torch.rand(tuple(fg.shape), generator=gen, dtype=torch.float64)  # (0, 1]
        return (values.to(device=obs.device, dtype=obs.dtype) * fg.to(obs.dtype))


class BrightnessBaseline(Attribution):
    """The pixel's brightness as its attribution (model-free): ``A(i) = sum_c x_{i,c}``.

    On a black background this ranks every drawn object above the floor, brightest first: a
    map that "explains" by showing where things are, not what the policy uses.

    Example:
        >>> maps = BrightnessBaseline(None).attribute(obs)   # (B, H, W), in [0, C]
    """

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: ignored; its length is checked.
        Returns:
            (B, H, W) per-pixel channel sum, detached.
        """
        check_obs(obs)
        _check_actions(obs, actions)
        return obs.detach().sum(-1)
