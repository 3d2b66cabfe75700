"""Faithfulness and robustness metrics of attributions (DESIGN.md section 3).

Every metric takes (B, ...) batches and returns one value per sample, (B,), so that a benchmark
averages them with :func:`marl_fgmf.stats.mean_ci95`. :data:`HIGHER_IS_BETTER` states each metric's direction.

* :func:`deletion_auc` / :func:`insertion_auc` (Petsiuk, Das and Saenko, BMVC 2018, "RISE"):
  pixels are removed from (inserted into) the observation in decreasing order of attribution in
  ``K`` steps; the metric is the area under ``pi(a* | x_k)`` against the removed fraction.
  A faithful map makes the probability collapse early (low deletion AUC) and recover early
  (high insertion AUC).
* :func:`ghr`, ground-truth hit rate: the fraction of the ``|R|`` most attributed pixels inside
  the ground-truth relevance mask ``R`` (beacon's ``info[agent]["relevance"]``). Its chance
  level over all pixels, ``|R| / (H W)`` (0.041 on beacon), is not the bar: the model-free
  ``random`` (non-background) and ``brightness`` maps reach about 0.34-0.42 on beacon.
* :func:`pointing_game` (Zhang et al., ECCV 2016): 1 if the most attributed pixel is in ``R``
  (optionally within a tolerance of it).
* :func:`asr_m`, attribution stability under attack: top-``k`` intersection between the
  attribution of ``x`` and of ``x + delta``, ``delta`` from an L-infinity PGD at ``eps``
  (Ghorbani, Abid and Zou, AAAI 2019 measure the fragility of interpretations this way).
* :func:`attack_success`: per step, whether the perturbed greedy action differs.

Attribution maps are (B, H, W); a (B, H, W, C) pixel attribution is reduced to the
channel-summed magnitude ``sum_c |A_c|`` first. Maps are ranked by value (descending), so pass
magnitudes when negative evidence counts as evidence. Ties never decide a score by pixel
position: the top-k metrics (GHR, pointing game, ASR-M) take their exact expectation over a
uniformly random tie order, deletion/insertion average the curves of ``tie_orders`` seeded
random orders when a step cuts through a tie.

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


def _rank(maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, H, W) -> (B, H*W) position of each pixel in the descending order (0 = most
    attributed); ties in row-major order, or in a random order drawn from ``generator``."""
    flat = maps.flatten(1)
    if generator is None:
        order = torch.argsort(-flat, dim=1, stable=True)
    else:  # a random permutation first, then a stable sort: ties land in random order
        perm = torch.argsort(torch.rand(flat.shape, generator=generator).to(flat.device), dim=1)
        order = perm.gather(1, torch.argsort(-flat.gather(1, perm), dim=1, stable=True))
    pos = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, pos)


def _inclusion(maps: torch.Tensor, k) -> torch.Tensor:
    """(B, H*W): the probability that each pixel is among the ``k`` most attributed when ties
    are broken uniformly at random: 1 above the ``k``-th largest value ``t``, 0 below, and
    ``(k - #above) / #tied`` for the pixels equal to ``t``. ``k``: an int or (B,)."""
    flat = maps.flatten(1)
    k = torch.as_tensor(k, device=flat.device).expand(flat.shape[0]).clamp(0, flat.shape[1])
    values = flat.sort(dim=1, descending=True).values
    t = values.gather(1, (k - 1).clamp_min(0)[:, None])  # (B, 1)
    above, tied = flat > t, flat == t
    share = (k[:, None] - above.sum(1, keepdim=True)).clamp_min(0) / tied.sum(1, keepdim=True)
    p = above.to(flat.dtype) + tied.to(flat.dtype) * share.to(flat.dtype)
    return torch.where(k[:, None] > 0, p, torch.zeros_like(p))


def _splits_ties(maps: torch.Tensor, counts: torch.Tensor) -> bool:
    """Whether some step's cut (the ``n`` most attributed pixels, ``n`` in ``counts``) falls
    inside a group of equal values, so that the tie order decides which pixels change."""
    values = maps.flatten(1).sort(dim=1, descending=True).values
    inner = counts[(counts > 0) & (counts < values.shape[1])]
    if inner.numel() == 0:
        return False
    return bool((values[:, inner - 1] == values[:, inner]).any())


# ---------------------------------------------------------------------------------------------
# deletion / insertion
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def removal_curve(policy: Policy, obs: torch.Tensor, attribution: torch.Tensor,
                  actions: torch.Tensor | None = None, mode: str = "deletion", steps: int = 20,
                  substrate: str | float | torch.Tensor = "zero", blur_sigma: float = 2.0,
                  internal_batch_size: int | None = DEFAULT_CHUNK, tie_orders: int = 8,
                  seed: int = 0) -> torch.Tensor:
    """``pi(a* | x_k)`` for ``k = 0..K``, (B, K + 1): the curve whose area the AUCs measure.

    Step ``k`` changes the ``n_k = round(k * N / K)`` most attributed pixels (``N = H * W``, all
    channels of a pixel together): ``deletion`` replaces them in ``x`` by the substrate,
    ``insertion`` starts from the substrate and puts them back. All observations are evaluated
    in chunks of ``internal_batch_size`` rows.

    **Ties**: when some step's cut falls inside a group of equal attributions (a map that is
    exactly zero on most pixels, as PGCA's consensus is), which of the tied pixels change is
    not decided by the map; the curve is then the mean over ``tie_orders`` random tie orders
    (drawn from a generator seeded with ``seed``, so a rerun gives the same numbers), instead
    of one arbitrary (row-major) order. Maps without such ties take one pass, as before.
    """
    check_obs(obs)
    check_chunk(internal_batch_size)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(tie_orders, bool) or not isinstance(tie_orders, int) or tie_orders < 1:
        raise ValueError(f"tie_orders must be an integer >= 1, got {tie_orders!r}")
    maps = _as_map(attribution, obs.shape)
    obs = obs.detach()
    b, h, w, _ = obs.shape
    n_pix, k_steps = h * w, int(steps)
    fill = make_substrate(obs, substrate, blur_sigma)
    counts = torch.round(torch.arange(k_steps + 1, dtype=torch.float64) * n_pix / k_steps)
    counts = counts.long().to(obs.device)  # (K+1,) pixels changed at each step
    if _splits_ties(maps, counts) and tie_orders > 1:
        gen = torch.Generator().manual_seed(int(seed))
        ranks = [_rank(maps, gen) for _ in range(tie_orders)]
    else:
        ranks = [_rank(maps)]
    with eval_mode(policy):
        actions = resolve_actions(policy, obs, actions)
        curves = [_curve(policy, obs, fill, actions, rank, counts, mode, internal_batch_size)
                  for rank in ranks]
    return torch.stack(curves).mean(0)


def _curve(policy: Policy, obs: torch.Tensor, fill: torch.Tensor, actions: torch.Tensor,
           rank: torch.Tensor, counts: torch.Tensor, mode: str,
           internal_batch_size: int | None) -> torch.Tensor:
    """One removal curve (B, K + 1) for one ranking ``rank`` (B, N) of the pixels."""
    b, h, w, _ = obs.shape
    k1 = counts.shape[0]
    total = b * k1
    step = total if internal_batch_size is None else int(internal_batch_size)
    out = torch.empty(total, dtype=obs.dtype, device=obs.device)
    for start in range(0, total, step):
        idx = torch.arange(start, min(start + step, total), device=obs.device)
        bi, ki = idx // k1, idx % k1
        changed = (rank[bi] < counts[ki][:, None]).view(-1, h, w, 1).to(obs.dtype)
        if mode == "deletion":
            x = obs[bi] * (1 - changed) + fill[bi] * changed
        else:
            x = fill[bi] * (1 - changed) + obs[bi] * changed
        out[start:start + len(idx)] = action_score(policy(x), actions[bi], "prob").to(obs.dtype)
    return out.view(b, k1)


def _trapezoid(curve: torch.Tensor) -> torch.Tensor:
    """Area under a (B, K+1) curve sampled at ``0, 1/K, ..., 1``."""
    k = curve.shape[1] - 1
    return (curve.sum(1) - 0.5 * (curve[:, 0] + curve[:, -1])) / k


def deletion_auc(policy: Policy, obs: torch.Tensor, attribution: torch.Tensor,
                 actions: torch.Tensor | None = None, steps: int = 20,
                 substrate: str | float | torch.Tensor = "zero", blur_sigma: float = 2.0,
                 internal_batch_size: int | None = DEFAULT_CHUNK, tie_orders: int = 8,
                 seed: int = 0) -> torch.Tensor:
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
        tie_orders, seed: random tie orders averaged when a step cuts through equal
            attributions, and their seed (:func:`removal_curve`).
    Raises:
        ValueError: attribution shape not matching ``obs``, non-finite values.
    """
    return _trapezoid(removal_curve(policy, obs, attribution, actions, "deletion", steps,
                                    substrate, blur_sigma, internal_batch_size, tie_orders,
                                    seed))


def insertion_auc(policy: Policy, obs: torch.Tensor, attribution: torch.Tensor,
                  actions: torch.Tensor | None = None, steps: int = 20,
                  substrate: str | float | torch.Tensor = "blur", blur_sigma: float = 2.0,
                  internal_batch_size: int | None = DEFAULT_CHUNK, tie_orders: int = 8,
                  seed: int = 0) -> torch.Tensor:
    """Insertion AUC (Petsiuk et al. 2018), (B,), in [0, 1]; **higher is better**.

    Starts from the substrate (default a blurred copy, as in the paper) and inserts the ``n_k``
    most attributed pixels of ``x``; area under ``pi(a*)`` by the trapezoid rule. Arguments as
    :func:`deletion_auc`.
    """
    return _trapezoid(removal_curve(policy, obs, attribution, actions, "insertion", steps,
                                    substrate, blur_sigma, internal_batch_size, tie_orders,
                                    seed))


# ---------------------------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------------------------

def ghr(attribution: torch.Tensor, relevance) -> torch.Tensor:
    """Ground-truth hit rate, (B,), in [0, 1]; **higher is better**.

    ``GHR = |top_{|R|}(A) & R| / |R|``: of the ``|R|`` most attributed pixels, the fraction
    inside the relevance mask ``R``; when the ``|R|``-th largest value is shared by several
    pixels, its expectation over a uniformly random tie order (exact, :func:`_inclusion`), so a
    constant map scores ``|R| / (H W)`` instead of whatever row-major order puts first.

    **What a score means.** ``|R| / (H W)`` is the chance level of a map that is uniform over
    ALL pixels (18 / 441 = 0.041 on default beacon frames). It is not the bar to beat: on a
    frame with a plain background, a map that merely marks where the objects are scores far
    higher without looking at the policy. A map uniform over the non-background pixels ``F``
    (the ``"random"`` explainer, :class:`marl_fgmf.attribution.RandomBaseline`) scores
    ``|R & F| / |F|`` in expectation, and the pixel brightness (``"brightness"``) about as
    much or more. Measured on beacon frames (``python scripts/bench_baselines.py --n-obs N``,
    2 agents, 2 distractors, mostly scripted rollouts, seeds 0..; mean +- 95 % half-width):

    ============  =================  =================  =================
    N             random (non-bg)    brightness         uniform, all px
    ============  =================  =================  =================
    400           0.342 +- 0.009     0.360 +- 0.033     0.041 +- 0.005
    2000          0.348 +- 0.004     0.397 +- 0.015     0.041 +- 0.002
    4000          0.348 +- 0.003     0.416 +- 0.011     0.040 +- 0.001
    ============  =================  =================  =================

    (brightness scores about 1, 1/2 or 0 per frame as 0, 1 or 2 distractors outshine the
    agent, hence its spread; ``tests/test_baselines.py`` checks the 400-observation row). Compare
    a method's GHR with these baselines on the same frames, not with 0.04.

    Args:
        attribution: (B, H, W) (or (B, H, W, C), reduced to ``sum_c |A_c|``).
        relevance: (B, H, W) or (H, W) boolean mask, non-empty for every sample.
    Raises:
        ValueError: the relevance mask has another size, or is empty.
    """
    maps = _as_map(attribution)
    rel = _as_relevance(relevance, tuple(maps.shape)).to(maps.device)
    k = rel.flatten(1).sum(1)  # (B,) |R|
    hits = (_inclusion(maps, k) * rel.flatten(1).to(maps.dtype)).sum(1)
    return hits / k.to(maps.dtype)


def pointing_game(attribution: torch.Tensor, relevance, tolerance: int = 0) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016), (B,) in [0, 1]; **higher is better**.

    A hit (1) when the most attributed pixel lies in ``R`` dilated by ``tolerance`` pixels
    (Chebyshev distance; the paper uses 15 px on 224-px images, 0 suits beacon's 3-px cells);
    when several pixels share the maximum, the expected hit over a random choice among them
    (the fraction of them inside), so 0/1 for a map with a unique peak.
    """
    maps = _as_map(attribution)
    rel = _as_relevance(relevance, tuple(maps.shape)).to(maps.device)
    if int(tolerance) < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if tolerance:
        t = int(tolerance)
        rel = torch.nn.functional.max_pool2d(rel[:, None].float(), 2 * t + 1, 1, t)[:, 0] > 0
    return (_inclusion(maps, 1) * rel.flatten(1).to(maps.dtype)).sum(1)


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
    """``|top_k(a) & top_k(b)| / k`` per sample for (B, H, W) maps; ``k`` an int or (B,).
    With ties at a map's ``k``-th value, the expectation over independent random tie orders
    of the two maps (exact: ``sum_i P(i in top_k(a)) P(i in top_k(b)) / k``)."""
    k = torch.as_tensor(k, device=a.device).expand(a.shape[0])
    return (_inclusion(a, k) * _inclusion(b, k)).sum(1) / k.to(a.dtype)


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
