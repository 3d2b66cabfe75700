"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das and Saenko, BMVC 2018)."""
from __future__ import annotations

import math

import torch
from torch import nn

from marl_fgmf.attribution.base import (DEFAULT_CHUNK, PerturbationAttribution, check_chunk,
                                        make_substrate)
from marl_fgmf.protocol import check_obs, eval_mode

__all__ = ["RISE", "rise_masks"]


def rise_masks(n_masks: int, height: int, width: int, grid: int = 7, p_keep: float = 0.5,
               seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RISE's random smooth masks, (N, H, W) in [0, 1].

    Each mask: a ``grid x grid`` binary grid with ``P(1) = p_keep``, bilinearly upsampled to
    ``(grid + 1) * ceil(H / grid)`` x ``(grid + 1) * ceil(W / grid)`` pixels, then cropped to
    ``H x W`` at a random offset in ``[0, cell)`` (so the mask edges do not align with a fixed
    lattice). Deterministic given ``seed``.
    """
    if int(n_masks) < 1 or int(grid) < 1 or not 0 < p_keep <= 1:
        raise ValueError(f"need n_masks >= 1, grid >= 1 and 0 < p_keep <= 1, got n_masks="
                         f"{n_masks}, grid={grid}, p_keep={p_keep}")
    gen = torch.Generator().manual_seed(int(seed))
    n, s = int(n_masks), int(grid)
    ch, cw = math.ceil(height / s), math.ceil(width / s)
    cells = (torch.rand((n, 1, s, s), generator=gen) < p_keep).to(torch.float64)
    up = nn.functional.interpolate(cells, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear",
                                   align_corners=False)[:, 0]  # (N, (s+1)ch, (s+1)cw)
    dy = torch.randint(0, ch, (n,), generator=gen)
    dx = torch.randint(0, cw, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(height)[None])[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(width)[None])[:, None, :]  # (N, 1, W)
    masks = up[torch.arange(n)[:, None, None], rows, cols]  # (N, H, W)
    return masks.to(device=device, dtype=dtype)


class RISE(PerturbationAttribution):
    """RISE saliency: the expected action probability under random masks that keep a pixel.

    ``S(i) = 1 / (N * p_keep) * sum_{j=1..N} pi(a | x (.) M_j + (1 - M_j) (.) b) * M_j(i)``

    with the random smooth masks of :func:`rise_masks` (shared by all samples) and substrate
    ``b`` (zero in the paper; ``"blur"`` or a number possible). The score is the action
    probability, as in the paper. Black-box: only forward passes, ``B * N`` of them in chunks
    of ``internal_batch_size`` rows, under ``no_grad``.

    Example:
        >>> sal = RISE(policy).attribute(obs, n_masks=1000, grid=7, seed=0)  # (B, H, W)
    """

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  n_masks: int = 1000, grid: int = 7, p_keep: float = 0.5, seed: int = 0,
                  substrate: str | float | torch.Tensor = "zero", blur_sigma: float = 2.0,
                  internal_batch_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: (B,) actions; default the clean greedy actions.
            n_masks: ``N``; grid: low-resolution grid side ``s``; p_keep: ``P(cell kept)``.
            seed: mask seed (the same masks for every sample and every chunking).
            substrate: what a masked pixel becomes (default ``"zero"``, as in the paper).
            internal_batch_size: masked observations per forward (``None``: all ``B * N``).
        Returns:
            (B, H, W) saliency, detached.
        """
        check_obs(obs)
        check_chunk(internal_batch_size)
        obs = obs.detach()
        masks = rise_masks(n_masks, obs.shape[1], obs.shape[2], grid, p_keep, seed,
                           obs.device, obs.dtype)
        fill = make_substrate(obs, substrate, blur_sigma)
        with eval_mode(self.policy), torch.no_grad():
            actions = self.resolve_actions(obs, actions)
            # masked_scores replaces M with fill; RISE keeps M, so pass the complement.
            probs = self.masked_scores(obs, fill, 1 - masks, actions, "prob",
                                       internal_batch_size)  # (B, N)
        probs = probs.to(obs.dtype)
        return torch.einsum("bn,nhw->bhw", probs, masks) / (masks.shape[0] * float(p_keep))
