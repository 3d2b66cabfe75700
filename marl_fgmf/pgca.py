"""PGCA: perturbation-gradient consensus attribution (DESIGN.md section 3).

Two paradigms of attribution fail in different ways: gradients are fine-grained but local and
noisy (and can be masked by a defence), perturbations are faithful to the model's behaviour but
coarse. PGCA keeps only what both identify. For each agent's observation ``x`` and explained
action ``a`` (default the clean greedy action ``a* = argmax pi(x)``, detached):

* gradient map     ``G(i) = sum_c |IG_{i,c}(x)|``, Integrated Gradients (Sundararajan et al.
  2017) of ``log pi(a|x)``, right Riemann sum with ``steps`` points, baseline 0 by default;
* perturbation map ``P(i) = mean_{p : i in p} |log pi(a|x) - log pi(a|x~_p)|``, occlusion
  (Zeiler and Fergus 2014) where ``x~_p`` replaces the ``patch x patch`` window ``p`` (moved by
  ``stride``) with a blurred copy of ``x`` (Fong and Vedaldi 2017), averaged over the windows
  covering pixel ``i``;
* normalization    ``G^ = G / max G``, ``P^ = P / max P`` (per sample);
* consensus        ``C = sqrt(G^ * P^) * [G^ >= Q_q(G^)] * [P^ >= Q_q(P^)]`` with ``Q_q`` the
  per-sample ``q`` quantile: the geometric mean is high only where both maps are, and pixels
  below either quantile are zeroed;
* agreement        Spearman's rank correlation of ``G`` and ``P`` over the pixels (average
  ranks for ties; NaN when either map is constant).

Both maps are magnitudes: removing a pixel that raises ``pi(a)`` is as informative as removing
one that lowers it. The signed maps (channel-summed IG, signed occlusion) are kept for display.
Lineage: Integrated Gradients (Sundararajan, Taly and Yan 2017) and occlusion (Zeiler and
Fergus 2014) with a blur substrate (Fong and Vedaldi 2017); the fine-times-coarse product is
Guided Grad-CAM's idea (Selvaraju et al. 2017: guided backprop multiplied pixel-wise by
Grad-CAM), here with a perturbation map instead of a class-activation map, a geometric mean
so that C stays in the units of its inputs' ranks, and quantile gating so that one paradigm
alone cannot light a pixel up.

Cost (all agents of a frame and several frames in one call): one clean forward of ``B`` rows
(actions, clean scores, SGAM mask), ``steps * B`` forward+backward rows for IG and ``B * P``
no-grad forward rows for occlusion, each in chunks of ``internal_batch_size``; the clean forward
is shared, and no Python loop runs over pixels or patches.

Example:
    >>> res = explain(policy, obs)        # obs (B, H, W, C): all agents of a frame
    >>> res.consensus.shape, res.agreement.shape
    (torch.Size([B, H, W]), torch.Size([B]))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from marl_fgmf.attribution import (DEFAULT_CHUNK, action_score, check_chunk, integrated_gradients,
                                   make_substrate, occlusion_patch_deltas, patch_deltas_to_map,
                                   patch_masks, resolve_actions)
from marl_fgmf.protocol import check_input_gradient, check_obs, eval_mode, expected_obs_shape

__all__ = ["PGCAResult", "PGCA", "explain", "consensus_map", "spearman", "average_ranks",
           "normalize_map", "sgam_mask", "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "steps": 32,            # IG interpolation points m
    "baseline": None,       # IG baseline (None: black frame)
    "patch": 3,             # occlusion window side (pixels)
    "stride": 1,            # occlusion window step
    "substrate": "blur",    # what an occluded window becomes
    "blur_sigma": 2.0,      # Gaussian sigma of the blurred substrate (pixels)
    "q": 0.5,               # consensus quantile threshold
    "internal_batch_size": DEFAULT_CHUNK,  # rows per forward chunk (None: all at once)
}


@dataclass
class PGCAResult:
    """PGCA explanation of a batch of observations (all agents of one or more frames).

    Attributes:
        consensus: (B, H, W) ``C`` in [0, 1].
        gradient: (B, H, W) ``G``, channel-summed |IG| (log-probability units).
        perturbation: (B, H, W) ``P``, mean |occlusion drop| (log-probability units).
        agreement: (B,) Spearman rank correlation of ``G`` and ``P``.
        actions: (B,) explained actions.
        action_prob: (B,) ``pi(a | x)`` of the explained actions.
        probs: (B, A) the full action distributions ``pi(. | x)``.
        gradient_signed: (B, H, W) channel-summed signed IG.
        perturbation_signed: (B, H, W) signed occlusion (positive: the region supports ``a``).
        sgam_mask: (B, H, W) the SGAM mask of the clean forward when the policy's
            ``input_filter`` records one as ``last_mask``, else ``None``.
        settings: the settings used.
    """

    consensus: torch.Tensor
    gradient: torch.Tensor
    perturbation: torch.Tensor
    agreement: torch.Tensor
    actions: torch.Tensor
    action_prob: torch.Tensor
    probs: torch.Tensor
    gradient_signed: torch.Tensor
    perturbation_signed: torch.Tensor
    sgam_mask: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def gradient_hat(self) -> torch.Tensor:
        """``G / max G`` per sample, in [0, 1]."""
        return normalize_map(self.gradient)

    @property
    def perturbation_hat(self) -> torch.Tensor:
        """``P / max P`` per sample, in [0, 1]."""
        return normalize_map(self.perturbation)

    def __len__(self) -> int:
        return int(self.consensus.shape[0])

    def select(self, index) -> "PGCAResult":
        """The result for a subset of the batch (an int keeps a batch dimension of one)."""
        idx = [index] if isinstance(index, int) else index
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return PGCAResult(*(pick(getattr(self, name)) for name in (
            "consensus", "gradient", "perturbation", "agreement", "actions", "action_prob",
            "probs", "gradient_signed", "perturbation_signed", "sgam_mask")),
            settings=dict(self.settings))


def normalize_map(maps: torch.Tensor) -> torch.Tensor:
    """Divide each (H, W) map of a (B, H, W) batch by its max (all-zero maps stay zero)."""
    peak = maps.flatten(1).amax(1).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps / peak.view(-1, 1, 1)


def consensus_map(gradient: torch.Tensor, perturbation: torch.Tensor, q: float = 0.5) -> torch.Tensor:
    """``C = sqrt(G^ P^) * [G^ >= Q_q(G^)] * [P^ >= Q_q(P^)]`` for (B, H, W) magnitude maps."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    g, p = normalize_map(gradient), normalize_map(perturbation)
    qg = torch.quantile(g.flatten(1), q, dim=1).view(-1, 1, 1)
    qp = torch.quantile(p.flatten(1), q, dim=1).view(-1, 1, 1)
    keep = (g >= qg) & (p >= qp)
    return torch.sqrt(g * p) * keep


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks 1..N with ties sharing their average rank, (B, N) -> (B, N)."""
    b, n = values.shape
    order = values.argsort(dim=1, stable=True)
    sorted_vals = values.gather(1, order)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = new_group.long().cumsum(1) - 1 + torch.arange(b, device=values.device)[:, None] * n
    position = torch.arange(1, n + 1, dtype=values.dtype, device=values.device).expand(b, n)
    total = torch.zeros(b * n, dtype=values.dtype, device=values.device)
    count = torch.zeros(b * n, dtype=values.dtype, device=values.device)
    total.scatter_add_(0, group.flatten(), position.flatten())
    count.scatter_add_(0, group.flatten(), torch.ones_like(position).flatten())
    mean_rank = (total / count.clamp_min(1))[group]  # (B, N), in sorted order
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation per sample of two (B, ...) tensors, (B,).

    ``rho = corr(rank(a), rank(b))`` (Pearson correlation of average ranks, so ties are handled
    as in ``scipy.stats.spearmanr``); NaN where either sample is constant.
    """
    ra = average_ranks(a.flatten(1).double())
    rb = average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denom = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / denom
    return torch.where(denom > 0, rho, torch.full_like(rho, float("nan"))).to(a.dtype)


def sgam_mask(policy) -> torch.Tensor | None:
    """A copy of the SGAM mask of the policy's last forward (its ``input_filter``'s
    ``last_mask``), or None when the policy records none."""
    mask = getattr(getattr(policy, "input_filter", None), "last_mask", None)
    return mask.detach().clone() if torch.is_tensor(mask) else None


def explain(policy: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
            actions: torch.Tensor | None = None, *, steps: int = DEFAULTS["steps"],
            baseline: torch.Tensor | float | None = DEFAULTS["baseline"],
            patch: int | tuple[int, int] = DEFAULTS["patch"],
            stride: int | tuple[int, int] = DEFAULTS["stride"],
            substrate: str | float | torch.Tensor = DEFAULTS["substrate"],
            blur_sigma: float = DEFAULTS["blur_sigma"], q: float = DEFAULTS["q"],
            internal_batch_size: int | None = DEFAULTS["internal_batch_size"]) -> PGCAResult:
    """Explain every observation of ``obs`` (e.g. all agents of a frame) with PGCA.

    Args:
        policy: ``policy(obs) -> logits`` (the policy protocol).
        obs: (B, H, W, C) float in [0, 1]; B = agents x frames, stacked.
        actions: (B,) actions to explain; default the clean greedy actions.
        steps: IG interpolation points (right Riemann sum).
        baseline: IG baseline (tensor broadcastable to ``obs`` or number; default 0).
        patch, stride: occlusion window side and step (int or (rows, cols)).
        substrate: occluded windows become ``"blur"`` (default), ``"zero"``, a number or a tensor.
        blur_sigma: Gaussian sigma of the blurred substrate, in pixels.
        q: quantile below which either normalized map zeroes the consensus.
        internal_batch_size: rows per forward chunk, for IG and occlusion alike.
    Returns:
        :class:`PGCAResult`.
    Raises:
        ValueError: non-finite, out-of-range or badly shaped ``obs`` (channels-first, 0-255, or
            not the policy's declared ``obs_shape``), a patch larger than the observation, a
            bad setting; :class:`~marl_fgmf.protocol.InputGradientError` (a ``ValueError``)
            for a policy without usable input gradients (``torch.no_grad`` forward, a detached
            or rounding input layer), whose gradient map would be all zero.
    """
    check_obs(obs, expected_obs_shape(policy))
    check_chunk(internal_batch_size)
    if not 0.0 <= float(q) <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    obs = obs.detach()
    # Validates patch/stride against H x W before any model call.
    masks = patch_masks(obs.shape[1], obs.shape[2], patch, stride, obs.device, obs.dtype)
    fill = make_substrate(obs, substrate, blur_sigma)
    with eval_mode(policy):
        check_input_gradient(policy, obs, name="PGCA")  # its fine map is IG: refuse masking
        with torch.no_grad():  # the one clean forward: actions, scores, probabilities, mask
            logits = policy(obs)
            sgam = sgam_mask(policy)
            actions = logits.argmax(-1) if actions is None else resolve_actions(policy, obs, actions)
            probs = torch.softmax(logits.double(), -1).to(obs.dtype)
            clean = action_score(logits, actions, "log_prob")
            deltas = occlusion_patch_deltas(policy, obs, actions, clean, fill, masks, "log_prob",
                                            internal_batch_size)  # (B, P)
        ig = integrated_gradients(policy, obs, actions, baseline, steps, internal_batch_size)
    gradient = ig.abs().sum(-1)
    perturbation = patch_deltas_to_map(deltas, masks, magnitude=True)
    settings = dict(steps=int(steps), baseline=None if torch.is_tensor(baseline) else baseline,
                    patch=patch, stride=stride,
                    substrate=substrate if not torch.is_tensor(substrate) else "tensor",
                    blur_sigma=blur_sigma, q=float(q), internal_batch_size=internal_batch_size)
    return PGCAResult(
        consensus=consensus_map(gradient, perturbation, q),
        gradient=gradient,
        perturbation=perturbation,
        agreement=spearman(gradient, perturbation),
        actions=actions,
        action_prob=probs.gather(1, actions[:, None]).squeeze(1),
        probs=probs,
        gradient_signed=ig.sum(-1),
        perturbation_signed=patch_deltas_to_map(deltas, masks, magnitude=False),
        sgam_mask=sgam,
        settings=settings,
    )


class PGCA:
    """PGCA behind the Captum-like call shared by every explainer of :mod:`marl_fgmf.attribution`
    (and registered as ``"pgca"`` in :data:`marl_fgmf.explainers.METHODS`).

    ``PGCA(policy).attribute(obs, actions=None, **settings)`` returns the (B, H, W) consensus
    map; :meth:`explain` returns the whole :class:`PGCAResult`. Settings as :func:`explain`.

    Example:
        >>> consensus = PGCA(policy).attribute(obs, patch=3, stride=1, q=0.5)
    """

    def __init__(self, policy: Callable[[torch.Tensor], torch.Tensor]):
        self.policy = policy

    def explain(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                **settings) -> PGCAResult:
        """:func:`explain` on this policy."""
        return explain(self.policy, obs, actions, **settings)

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  **settings) -> torch.Tensor:
        """(B, H, W) consensus map ``C``."""
        return explain(self.policy, obs, actions, **settings).consensus
