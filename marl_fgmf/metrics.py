"""Faithfulness and robustness metrics of attributions (DESIGN.md section 3).

Every metric takes (B, ...) batches and returns one value per sample, (B,), so that a benchmark
averages them with :func:`marl_fgmf.stats.mean_ci95`. :data:`HIGHER_IS_BETTER` states each metric's direction.

* :func:`deletion_auc` / :func:`insertion_auc` (Petsiuk, Das and Saenko, BMVC 2018, "RISE"):
  pixels are removed from (inserted into) the observation in decreasing order of attribution in
  ``K`` steps; the metric is the area under ``pi(a* | x_k)`` against the removed fraction.
  A faithful map makes the probability collapse early (low deletion AUC) and recover early
  (high insertion AUC).
* :func:`ghr`, ground-truth hit rate: the fraction of the ``|R|`` most attributed pixels inside
  the ground-truth relevance mask ``R`` (beacon's ``info[agent]["relevance"]``).
* :func:`pointing_game` (Zhang et al., ECCV 2016): 1 if the most attributed pixel is in ``R``
  (optionally within a tolerance of it).
* :func:`asr_m`, attribution stability under attack: top-``k`` intersection between the
  attribution of ``x`` and of ``x + delta``, ``delta`` from an L-infinity PGD at ``eps``
  (Ghorbani, Abid and Zou, AAAI 2019 measure the fragility of interpretations this way).
* :func:`attack_success`: per step, whether the perturbed greedy action differs.

Attribution maps are (B, H, W); a (B, H, W, C) pixel attribution is reduced to the
channel-summed magnitude ``sum_c |A_c|`` first. Maps are ranked by value (descending, ties in
row-major order), so pass magnitudes when negative evidence counts as evidence.

This module depends on torch and the torch-only modules alone (no ``attacks`` package): ASR-M
runs the shared Linf PGD loop (:func:`marl_fgmf.perturbation.linf_pgd`), or takes any
perturbation callable (e.g. ``attacks.PGD(policy, eps=...)``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from marl_fgmf.attribution import (DEFAULT_CHUNK, action_score, check_chunk, make_substrate,
                                   resolve_actions, spatial_map)
from marl_fgmf.perturbation import linf_pgd
from marl_fgmf.protocol import check_obs, eval_mode

__all__ = ["HIGHER_IS_BETTER", "deletion_auc", "insertion_auc", "removal_curve", "ghr",
           "pointing_game", "asr_m", "pgd_perturbation", "attack_success", "top_k_intersection"]

HIGHER_IS_BETTER: dict[str, bool] = {
    "deletion_auc": False,      # probability should collapse as the top pixels go
    "insertion_auc": True,      # probability should recover as the top pixels return
    "ghr": True,                # fraction of the top-|R| pixels inside the relevance mask
    "pointing_game": True,      # the peak lies in the relevance mask
    "asr_m": True,              # attribution unchanged by the attack
    "attack_success": False,    # for the defender: the attack did not change the action
    "return": True,             # mean episodic return
    "robust_return": True,      # minimum mean return over the attack ensemble
}
"""Direction of every metric: ``True`` when a higher value is better."""

Policy = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _as_map(attribution: torch.Tensor, obs_shape: Sequence[int] | None = None) -> torch.Tensor:
    """(B, H, W) attribution, checked against ``obs_shape`` (B, H, W, C) when given."""
    if not torch.is_tensor(attribution):
        raise ValueError(f"attribution must be a torch.Tensor, got {type(attribution).__name__}")
    shape = tuple(attribution.shape)
    if obs_shape is not None:
        obs_shape = tuple(obs_shape)
        if shape not in (obs_shape, obs_shape[:3]):
            raise ValueError(f"attribution shape {shape} does not match obs {obs_shape}: "
                             f"expected {obs_shape[:3]} or {obs_shape}")
    if attribution.dim() == 4:
        attribution = spatial_map(attribution)
    elif attribution.dim() != 3:
        raise ValueError(f"attribution must be (B, H, W) or (B, H, W, C), got {shape}")
    if not torch.isfinite(attribution).all():
        raise ValueError(f"attribution contains {int((~torch.isfinite(attribution)).sum())} "
                         "non-finite values (NaN or inf)")
    return attribution.detach()


def _as_relevance(relevance, map_shape: tuple[int, ...]) -> torch.Tensor:
    """(B, H, W) bool relevance; an (H, W) mask is broadcast over the batch."""
    rel = torch.as_tensor(relevance)
    shape = tuple(rel.shape)
    if shape == tuple(map_shape[1:]):
        rel = rel.expand(map_shape)
    elif shape != tuple(map_shape):
        raise ValueError(f"relevance shape {shape} does not match attribution {tuple(map_shape)}: "
                         f"expected {tuple(map_shape)} or {tuple(map_shape[1:])}")
    rel = rel.bool()
    sizes = rel.flatten(1).sum(1)
    if (sizes == 0).any():
        empty = (sizes == 0).nonzero().flatten().tolist()
        raise ValueError(f"relevance mask of shape {shape} is empty for sample(s) {empty}")
    return rel


def _rank(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H*W) position of each pixel in the descending order (0 = most
    attributed), ties in row-major order (stable)."""
    flat = maps.flatten(1)
    order = torch.argsort(-flat, dim=1, stable=True)
    pos = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, pos)


# ---------------------------------------------------------------------------------------------
# deletion / insertion
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def removal_curve(policy: Policy, obs: torch.Tensor, attribution: torch.Tensor,
                  actions: torch.Tensor | None = None, mode: str = "deletion", steps: int = 20,
                  substrate: str | float | torch.Tensor = "zero", blur_sigma: float = 2.0,
                  internal_batch_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """``pi(a* | x_k)`` for ``k = 0..K``, (B, K + 1): the curve whose area the AUCs measure.

    Step ``k`` changes the ``n_k = round(k * N / K)`` most attributed pixels (``N = H * W``, all
    channels of a pixel together): ``deletion`` replaces them in ``x`` by the substrate,
    ``insertion`` starts from the substrate and puts them back. All ``B * (K + 1)`` observations
    are evaluated in chunks of ``internal_batch_size`` rows.
    """
    check_obs(obs)
    check_chunk(internal_batch_size)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    maps = _as_map(attribution, obs.shape)
    obs = obs.detach()
    b, h, w, _ = obs.shape
    n_pix, k_steps = h * w, int(steps)
    fill = make_substrate(obs, substrate, blur_sigma)
    rank = _rank(maps)  # (B, N)
    counts = torch.round(torch.arange(k_steps + 1, dtype=torch.float64) * n_pix / k_steps)
    counts = counts.long().to(obs.device)  # (K+1,) pixels changed at each step
    with eval_mode(policy):
        actions = resolve_actions(policy, obs, actions)
        total = b * (k_steps + 1)
        step = total if internal_batch_size is None else int(internal_batch_size)
        out = torch.empty(total, dtype=obs.dtype, device=obs.device)
        for start in range(0, total, step):
            idx = torch.arange(start, min(start + step, total), device=obs.device)
            bi, ki = idx // (k_steps + 1), idx % (k_steps + 1)
            changed = (rank[bi] < counts[ki][:, None]).view(-1, h, w, 1).to(obs.dtype)
            if mode == "deletion":
                x = obs[bi] * (1 - changed) + fill[bi] * changed
            else:
                x = fill[bi] * (1 - changed) + obs[bi] * changed
            out[start:start + len(idx)] = action_score(policy(x), actions[bi], "prob").to(obs.dtype)
    return out.view(b, k_steps + 1)


def _trapezoid(curve: torch.Tensor) -> torch.Tensor:
    """Area under a (B, K+1) curve sampled at ``0, 1/K, ..., 1``."""
    k = curve.shape[1] - 1
    return (curve.sum(1) - 0.5 * (curve[:, 0] + curve[:, -1])) / k


def deletion_auc(policy: Policy, obs: torch.Tensor, attribution: torch.Tensor,
                 actions: torch.Tensor | None = None, steps: int = 20,
                 substrate: str | float | torch.Tensor = "zero", blur_sigma: float = 2.0,
                 internal_batch_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """Deletion AUC (Petsiuk et al. 2018), (B,), in [0, 1]; **lower is better**.

    ``AUC = (1/K) sum_{k=1..K} (p_{k-1} + p_k) / 2`` with ``p_k = pi(a* | x with the n_k most
    attributed pixels replaced by the substrate)`` (trapezoid rule over the removed fraction).

    Args:
        policy: ``policy(obs) -> logits``.
        obs: (B, H, W, C) float in [0, 1].
        attribution: (B, H, W) map (or (B, H, W, C), reduced to ``sum_c |A_c|``).
        actions: (B,) explained actions; default the clean greedy actions ``a*``.
        steps: ``K``.
        substrate: removed pixels become ``"zero"`` (black, the paper's deletion substrate and
            beacon's background; default), ``"blur"``, a number or a tensor like ``obs``.
        internal_batch_size: observations per forward chunk.
    Raises:
        ValueError: attribution shape not matching ``obs``, non-finite values.
    """
    return _trapezoid(removal_curve(policy, obs, attribution, actions, "deletion", steps,
                                    substrate, blur_sigma, internal_batch_size))


def insertion_auc(policy: Policy, obs: torch.Tensor, attribution: torch.Tensor,
                  actions: torch.Tensor | None = None, steps: int = 20,
                  substrate: str | float | torch.Tensor = "blur", blur_sigma: float = 2.0,
                  internal_batch_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """Insertion AUC (Petsiuk et al. 2018), (B,), in [0, 1]; **higher is better**.

    Starts from the substrate (default a blurred copy, as in the paper) and inserts the ``n_k``
    most attributed pixels of ``x``; area under ``pi(a*)`` by the trapezoid rule. Arguments as
    :func:`deletion_auc`.
    """
    return _trapezoid(removal_curve(policy, obs, attribution, actions, "insertion", steps,
                                    substrate, blur_sigma, internal_batch_size))


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------

def ghr(attribution: torch.Tensor, relevance) -> torch.Tensor:
    """Ground-truth hit rate, (B,), in [0, 1]; **higher is better**.

    ``GHR = |top_{|R|}(A) & R| / |R|``: of the ``|R|`` most attributed pixels (ties broken in
    row-major order), the fraction inside the relevance mask ``R``. A random map scores
    ``|R| / (H W)`` on average.

    Args:
        attribution: (B, H, W) (or (B, H, W, C), reduced to ``sum_c |A_c|``).
        relevance: (B, H, W) or (H, W) boolean mask, non-empty for every sample.
    Raises:
        ValueError: the relevance mask has another size, or is empty.
    """
    maps = _as_map(attribution)
    rel = _as_relevance(relevance, tuple(maps.shape)).to(maps.device)
    k = rel.flatten(1).sum(1)  # (B,) |R|
    top = _rank(maps) < k[:, None]
    return (top & rel.flatten(1)).sum(1).to(maps.dtype) / k.to(maps.dtype)


def pointing_game(attribution: torch.Tensor, relevance, tolerance: int = 0) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016), (B,) of 0/1; **higher is better**.

    A hit when the most attributed pixel (the first in row-major order among ties) lies in
    ``R`` dilated by ``tolerance`` pixels (Chebyshev distance; the paper uses 15 px on
    224-px images, 0 suits beacon's 3-px cells).
    """
    maps = _as_map(attribution)
    rel = _as_relevance(relevance, tuple(maps.shape)).to(maps.device)
    if int(tolerance) < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if tolerance:
        t = int(tolerance)
        rel = torch.nn.functional.max_pool2d(rel[:, None].float(), 2 * t + 1, 1, t)[:, 0] > 0
    peak = (_rank(maps) == 0).view_as(rel)
    return (peak & rel).flatten(1).any(1).to(maps.dtype)


# ---------------------------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------------------------

def pgd_perturbation(policy: Policy, obs: torch.Tensor, actions: torch.Tensor, eps: float,
                     steps: int = 10, alpha: float | None = None, random_start: bool = True,
                     seed: int = 0) -> torch.Tensor:
    """L-infinity PGD (Madry et al. 2018) on ``l(x) = -log pi(a|x)``: ``x + delta``, detached.

    ``x_{t+1} = clip_{[0,1]}(Pi_{|x'-x|_inf <= eps}(x_t + alpha sign(grad l(x_t))))`` from a
    uniform random start (drawn from a generator seeded with ``seed``), ``alpha = 2.5 eps /
    steps`` by default, the last iterate: :func:`marl_fgmf.perturbation.linf_pgd`, so that the
    metrics do not depend on the ``attacks`` package.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    obs = obs.detach()
    gen = torch.Generator(device=obs.device).manual_seed(int(seed)) if random_start else None

    def objective(x: torch.Tensor) -> torch.Tensor:  # l(x) = -log pi(a|x), to maximize
        return -torch.log_softmax(policy(x), -1).gather(1, actions[:, None]).squeeze(1)

    with torch.enable_grad():
        return linf_pgd(objective, obs, eps, int(steps), alpha=alpha, random_start=random_start,
                        generator=gen)


def top_k_intersection(a: torch.Tensor, b: torch.Tensor, k) -> torch.Tensor:
    """``|top_k(a) & top_k(b)| / k`` per sample for (B, H, W) maps; ``k`` an int or (B,)."""
    k = torch.as_tensor(k, device=a.device).expand(a.shape[0])
    top_a, top_b = _rank(a) < k[:, None], _rank(b) < k[:, None]
    return (top_a & top_b).sum(1).to(a.dtype) / k.to(a.dtype)


def asr_m(policy: Policy, obs: torch.Tensor,
          attribution_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], eps: float,
          relevance=None, actions: torch.Tensor | None = None, k_fraction: float = 0.05,
          perturbation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          pgd_steps: int = 10, seed: int = 0) -> torch.Tensor:
    """ASR-M, attribution stability under attack, (B,), in [0, 1]; **higher is better**.

    ``ASR-M = |top_k(A(x)) & top_k(A(x + delta))| / k`` with ``delta`` from
    :func:`pgd_perturbation` at ``eps`` against the clean greedy action (or from
    ``perturbation(obs, actions) -> adversarial obs`` when given, e.g. an ``attacks.PGD``
    instance's ``attack`` method) and ``k = |R|`` per sample when ``relevance`` is given, else
    ``round(k_fraction * H * W)``. Both attributions explain the same clean action ``a*``, so
    the score measures how the explanation moves with the input, not with the action.

    Args:
        attribution_fn: ``(obs, actions) -> (B, H, W)`` (or (B, H, W, C)) attribution, e.g.
            ``lambda x, a: PGCA(policy).attribute(x, a)``.
        eps: L-infinity budget in [0, 1] units (e.g. 4/255).
    """
    check_obs(obs)
    obs = obs.detach()
    with eval_mode(policy):
        actions = resolve_actions(policy, obs, actions)
    adv = (pgd_perturbation(policy, obs, actions, eps, pgd_steps, seed=seed)
           if perturbation is None else perturbation(obs, actions).detach())
    if tuple(adv.shape) != tuple(obs.shape):
        raise ValueError(f"perturbed obs shape {tuple(adv.shape)} does not match obs "
                         f"{tuple(obs.shape)}")
    clean_map = _as_map(attribution_fn(obs, actions), obs.shape)
    adv_map = _as_map(attribution_fn(adv, actions), obs.shape)
    if relevance is not None:
        k = _as_relevance(relevance, tuple(clean_map.shape)).flatten(1).sum(1)
    else:
        k = max(1, int(round(float(k_fraction) * obs.shape[1] * obs.shape[2])))
    return top_k_intersection(clean_map, adv_map, k)


@torch.no_grad()
def attack_success(policy: Policy, obs: torch.Tensor, adv_obs: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 where the greedy action on ``adv_obs`` differs from the one on ``obs``;
    **lower is better** for the defender."""
    if tuple(adv_obs.shape) != tuple(obs.shape):
        raise ValueError(f"adv_obs shape {tuple(adv_obs.shape)} does not match obs "
                         f"{tuple(obs.shape)}")
    return (policy(obs).argmax(-1) != policy(adv_obs).argmax(-1)).to(obs.dtype)
