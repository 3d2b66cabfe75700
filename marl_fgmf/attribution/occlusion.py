"""Occlusion (Zeiler and Fergus, ECCV 2014) with a blurred (or constant) substrate."""
from __future__ import annotations

import torch

from marl_fgmf.attribution.base import (DEFAULT_CHUNK, Policy, PerturbationAttribution,
                                        action_score, check_chunk, make_substrate, masked_scores,
                                        patch_masks)
from marl_fgmf.protocol import check_obs, eval_mode

__all__ = ["Occlusion", "occlusion_patch_deltas", "patch_deltas_to_map"]


def occlusion_patch_deltas(policy: Policy, obs: torch.Tensor, actions: torch.Tensor,
                           clean_score: torch.Tensor, substrate: torch.Tensor,
                           masks: torch.Tensor, score: str = "log_prob",
                           internal_batch_size: int | None = None) -> torch.Tensor:
    """Per-patch score drops ``d_bp = s(x_b) - s(x_b with patch p replaced by substrate)``, (B, P).

    The building block shared by :class:`Occlusion` and PGCA: the clean scores are passed in
    (PGCA computes them once, in the same forward that picks the greedy actions).
    """
    drops = clean_score[:, None] - masked_scores(policy, obs, substrate, masks, actions, score,
                                                 internal_batch_size, clean_score)
    return drops.to(obs.dtype)  # differences taken in float64, then back to the obs dtype


def patch_deltas_to_map(deltas: torch.Tensor, masks: torch.Tensor,
                        magnitude: bool = False) -> torch.Tensor:
    """Average per-patch values over the patches covering each pixel.

    ``O_b(i) = sum_p [i in p] d_bp / sum_p [i in p]`` (or ``|d_bp|`` when ``magnitude``):
    (B, P) and (P, H, W) -> (B, H, W).
    """
    values = deltas.abs() if magnitude else deltas
    counts = masks.sum(0)  # (H, W), >= 1 everywhere by construction of patch_masks
    return torch.einsum("bp,phw->bhw", values, masks) / counts


class Occlusion(PerturbationAttribution):
    """Occlusion, sliding a patch over every channel.

    For each window ``p`` (``patch`` x ``patch`` pixels, all channels, moved by ``stride``) the
    score drop ``d_p = s(x) - s(x with window p replaced by the substrate)`` is spread over the
    window's pixels and averaged over the windows covering each pixel:

    ``O(i) = sum_{p : i in p} d_p / #{p : i in p}``  (signed), or with ``|d_p|`` (magnitude).

    The default score is ``log pi(a | x)`` and the default substrate a blurred copy of ``x``
    (:func:`~marl_fgmf.attribution.base.gaussian_blur`); ``substrate="zero"`` or a number gives
    the classic constant patch. A positive signed value means the region supports the action;
    the magnitude counts evidence for and against alike (what PGCA uses). Windows follow
    Captum's convention (starts at multiples of the stride, last one clipped), so with Captum's
    ``baselines`` set to the same substrate the signed map equals ``captum.attr.Occlusion``
    with window ``(patch, patch, C)`` and strides ``(stride, stride, C)``.

    Batched: all windows of all samples are evaluated as ``B * P`` perturbed observations in
    chunks of ``internal_batch_size`` rows, under ``no_grad``.

    Example:
        >>> occ = Occlusion(policy).attribute(obs, patch=3, stride=1, magnitude=True)  # (B,H,W)
    """

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  patch: int | tuple[int, int] = 3, stride: int | tuple[int, int] = 1,
                  substrate: str | float | torch.Tensor = "blur", blur_sigma: float = 2.0,
                  magnitude: bool = False, score: str = "log_prob",
                  internal_batch_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: (B,) actions; default the clean greedy actions.
            patch, stride: window size and step (an int or a (rows, cols) pair).
            substrate: ``"blur"``, ``"zero"``, a number or a tensor like ``obs``.
            blur_sigma: Gaussian sigma of the blurred substrate, in pixels.
            magnitude: average ``|d_p|`` instead of ``d_p``.
            score: ``log_prob`` (default), ``prob`` or ``logit``.
            internal_batch_size: perturbed observations per forward (``None``: all ``B * P``
                at once; windows that change nothing are never evaluated).
        Returns:
            (B, H, W) map, detached.
        """
        check_obs(obs)
        check_chunk(internal_batch_size)
        obs = obs.detach()
        masks = patch_masks(obs.shape[1], obs.shape[2], patch, stride, obs.device, obs.dtype)
        fill = make_substrate(obs, substrate, blur_sigma)
        with eval_mode(self.policy), torch.no_grad():
            logits = self.policy(obs)
            actions = logits.argmax(-1) if actions is None else self.resolve_actions(obs, actions)
            clean = action_score(logits, actions, score)
            deltas = occlusion_patch_deltas(self.policy, obs, actions, clean, fill, masks, score,
                                            internal_batch_size)
        return patch_deltas_to_map(deltas, masks, magnitude)
