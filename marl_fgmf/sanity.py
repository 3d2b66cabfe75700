"""Sanity checks of explanations: the model-parameter randomization test.

Adebayo, Gilmer, Muelly, Goodfellow, Hardt and Kim, "Sanity Checks for Saliency Maps",
NeurIPS 2018, section 3: an explanation that describes the *model* must change when the
model's weights are destroyed. :func:`randomization_check` copies the policy (the caller's is
never touched), re-initializes its layers' weights and recomputes the explanation:

* ``cascading``: the layers on the logits' path are re-initialized one after the other from the
  top (the logits layer) down, cumulatively; step ``k`` has the top ``k + 1`` layers random;
* ``independent``: each layer alone is re-initialized, the others keep their trained weights.

At every step it compares the map of the randomized copy with the original map, per sample, by
the Spearman rank correlation of the magnitude maps (the paper's main measure, "with absolute
value"), of the signed maps ("without absolute value") and, as a cheap extra, the Pearson
correlation of the magnitude maps (the paper's SSIM and HOG similarities are left out):

``rho_s(A, A') = corr(rank(A), rank(A'))`` over the ``H W`` pixels, ties at their mean rank.

A map that stays highly correlated after the weights are randomized does not explain the
policy: it shows the input (Adebayo et al. found Guided Backprop and Guided Grad-CAM nearly
invariant to the top layers, and Gradient x Input maps dominated by the input's structure), or
nothing at all. The model-free ``brightness`` and
``random`` baselines (:mod:`marl_fgmf.attribution.baselines`) are the extreme case:
correlation 1 at every step, and :meth:`RandomizationResult.flagged` says so.

**Plain backgrounds.** A map that is 0 on black pixels whatever the weights (any
input-multiplied map: Integrated Gradients from a black baseline; PGCA's consensus, which
also zeroes everything below its quantile) shares one huge tie group with every randomized
copy, so on beacon's mostly black frames its rank correlation over all pixels stays near 1
from the background alone. ``pixels="foreground"`` correlates over the non-background pixels
only. Measured on 32 beacon frames (``scripts/bench_baselines.py``'s ``collect(32, seed=7)``)
with the behaviour-cloned beacon CNN of ``tests/conftest.py`` (``_clone_beacon_policy()``),
cascading, mean Spearman of the magnitude maps after the top layer / after all 5 layers:

==========================  ==============  ==============
explainer                   all pixels      foreground
==========================  ==============  ==============
gradient (SmoothGrad n=1)   0.48 / 0.06     0.61 / 0.02
ig (16 steps)               1.00 / 1.00     0.65 / 0.05
occlusion                   0.82 / 0.63     0.84 / 0.08
gradcampp                   0.95 / 0.08     0.95 / -0.12
pgca (16 steps)             0.89 / 0.90     0.79 / 0.07
brightness, random          1.00 / 1.00     1.00 / 1.00
==========================  ==============  ==============

Over all pixels IG, occlusion and PGCA are flagged (at the default threshold 0.5; their
ranking is mostly the frame's), over the foreground only the model-free baselines are.

Example:
    >>> res = randomization_check("ig", policy, obs, mode="cascading", settings={"steps": 16})
    >>> res.layers, res.spearman.mean(1)    # per step: the layer randomized, mean rho_s
    >>> res.flagged()                        # True: rho_s >= 0.5 with every layer random
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from marl_fgmf.attribution import background_mask, resolve_actions, spatial_map
from marl_fgmf.explainers import METHODS
from marl_fgmf.pgca import average_ranks
from marl_fgmf.protocol import check_obs, eval_mode

__all__ = ["MODES", "PIXELS", "RandomizationResult", "randomization_check", "randomizable_layers",
           "spearman", "pearson"]

MODES = ("cascading", "independent")
"""The two randomization orders of Adebayo et al. (2018)."""

PIXELS = ("all", "foreground")
"""The pixels the correlations run over: all of them (the paper), or the frame's non-background
pixels (:func:`marl_fgmf.attribution.background_mask`, the most common colour)."""


# ---------------------------------------------------------------------------------------------
# correlations
# ---------------------------------------------------------------------------------------------

def _pearson_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of two (B, N) tensors, (B,) float64, NaN for a constant row."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    den = x.norm(dim=1) * y.norm(dim=1)
    r = (x * y).sum(1) / den
    return torch.where(den > 0, r.clamp(-1.0, 1.0), torch.full_like(r, math.nan))


def _correlate(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, ranks: bool,
               name: str) -> torch.Tensor:
    """Per-sample (rank) correlation of two (B, ...) tensors, over ``mask``'s entries if given."""
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"{name} needs two (B, ...) tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.detach().flatten(1), b.detach().flatten(1)
    prepare = (lambda t: average_ranks(t.double())) if ranks else (lambda t: t)
    if mask is None:
        return _pearson_rows(prepare(x), prepare(y))
    if tuple(mask.shape) != tuple(a.shape):
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match {tuple(a.shape)}")
    keep = mask.flatten(1).bool()
    out = [_pearson_rows(prepare(x[i][keep[i]][None]), prepare(y[i][keep[i]][None]))
           for i in range(x.shape[0])]  # a different number of entries per sample
    return torch.cat(out)


def pearson(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Pearson correlation of two (B, ...) tensors over their non-batch entries (or
    over the entries where the boolean ``mask``, shaped like them, is true), (B,) float64; NaN
    where either sample is constant there (the correlation is undefined)."""
    return _correlate(a, b, mask, ranks=False, name="pearson")


def spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Spearman rank correlation of two (B, ...) tensors (e.g. (B, H, W) maps), over
    all entries or those where ``mask`` is true, (B,) float64: the Pearson correlation of their
    ranks, tied values at their mean rank (as ``scipy.stats.spearmanr``); NaN where either
    sample is constant."""
    return _correlate(a, b, mask, ranks=True, name="spearman")


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------

def randomizable_layers(policy: nn.Module, obs: torch.Tensor) -> list[str]:
    """Names (as in ``policy.named_modules()``) of the modules that own parameters and run in
    ``policy(obs)``, in the order of their first call: the input layer first, the logits layer
    last. Modules off the logits' path (e.g. a value head) are left out."""
    owners = {m: name for name, m in policy.named_modules()
              if any(True for _ in m.parameters(recurse=False))}
    order: list[str] = []

    def hook(module, inputs, output):
        name = owners[module]
        if name not in order:
            order.append(name)

    handles = [m.register_forward_hook(hook) for m in owners]
    try:
        with torch.no_grad(), eval_mode(policy):
            policy(obs[:1])
    finally:
        for h in handles:
            h.remove()
    return order


def _layer_seed(seed: int, index: int) -> int:
    """The seed of layer ``index``'s re-initialization: not ``seed + index``, which would
    re-draw the very weights of a network built right after ``torch.manual_seed(seed)``."""
    return (0x9E3779B1 * (int(seed) + 1) + 7919 * int(index)) % (2**63 - 1)


@torch.no_grad()
def _reinitialize(module: nn.Module, seed: int) -> None:
    """Re-draw ``module``'s own parameters with its ``reset_parameters`` (PyTorch's default
    initialization) under the seed ``seed``, or, for a module without one, from a truncated
    normal with the parameter's own standard deviation (0.02 for a constant one). The global
    random state of the caller is restored afterwards."""
    params = list(module.parameters(recurse=False))
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            return
        for p in params:
            if p.is_floating_point():
                std = float(p.std()) if p.numel() > 1 else 0.0
                nn.init.trunc_normal_(p, std=std if std > 0 and math.isfinite(std) else 0.02)


# ---------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------

@dataclass
class RandomizationResult:
    """The outcome of :func:`randomization_check`; ``S`` steps, ``B`` samples.

    Attributes:
        mode: ``"cascading"`` or ``"independent"``.
        pixels: ``"all"`` or ``"foreground"``: the pixels the correlations run over.
        layers: (S,) the layer re-initialized at each step (cascading: it and every layer
            before it in this tuple are random; independent: it alone).
        spearman: (S, B) Spearman correlation of the magnitude maps ``spatial_map(A)``.
        spearman_signed: (S, B) Spearman correlation of the signed maps (channel sums of a
            pixel map, the map itself for a spatial method).
        pearson: (S, B) Pearson correlation of the magnitude maps.
        original: (B, H, W) magnitude map of the original policy.
        randomized: (S, B, H, W) magnitude maps of the randomized copies.
        actions: (B,) the explained actions (the same at every step).

    A correlation is NaN where the original map is constant (over the compared pixels: it
    ranks nothing), and 0 where only the randomized map is (it kept none of the ranking).
    """

    mode: str
    pixels: str
    layers: tuple[str, ...]
    spearman: torch.Tensor
    spearman_signed: torch.Tensor
    pearson: torch.Tensor
    original: torch.Tensor
    randomized: torch.Tensor
    actions: torch.Tensor

    def final_spearman(self) -> float:
        """Mean Spearman correlation (over the samples where it is defined) where the weights
        are most destroyed: the last cascading step (every layer random), or, independent, the
        layer whose re-initialization moves the map most (the lowest mean)."""
        per_step = torch.nanmean(self.spearman, dim=1)  # (S,)
        return float(per_step[-1] if self.mode == "cascading" else per_step.min())

    def flagged(self, threshold: float = 0.5) -> bool:
        """True when the map fails the check: :meth:`final_spearman` ``>= threshold``, i.e. the
        explanation stays rank-correlated with itself after the weights are randomized (the
        threshold is this package's convention; Adebayo et al. read the curves by eye). An
        undefined correlation (NaN: the original map is constant, it explains nothing) counts
        as failing."""
        value = self.final_spearman()
        return not value < float(threshold)


def _make_explainer(explainer: str | Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    if isinstance(explainer, str):
        if explainer not in METHODS:
            raise ValueError(f"unknown attribution method {explainer!r}; allowed: "
                             f"{', '.join(METHODS)}")
        return METHODS[explainer]
    if not callable(explainer):
        raise ValueError("explainer must be a method name or a factory policy -> explainer "
                         f"(e.g. IntegratedGradients), got {type(explainer).__name__}")
    return explainer


def _signed(raw: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> channel sum; (B, H, W) unchanged."""
    return raw.sum(-1) if raw.dim() == 4 else raw


def _constant(maps: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) whether each (B, H, W) map is constant over its compared pixels."""
    flat = maps.flatten(1)
    keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten(1)
    hi = torch.where(keep, flat, torch.full_like(flat, -math.inf)).amax(1)
    lo = torch.where(keep, flat, torch.full_like(flat, math.inf)).amin(1)
    return hi == lo


def _compare(original: torch.Tensor, randomized: torch.Tensor, mask: torch.Tensor | None,
             fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``fn(original, randomized, mask)`` with 0 where only the randomized map is constant (it
    lost the whole ranking) and NaN where the original is (nothing to keep)."""
    r = fn(original, randomized, mask)
    lost = _constant(randomized, mask) & ~_constant(original, mask)
    return torch.where(lost.to(r.device), torch.zeros_like(r), r)


def randomization_check(explainer: str | Callable[[nn.Module], Any], policy: nn.Module,
                        obs: torch.Tensor, mode: str = "cascading",
                        actions: torch.Tensor | None = None,
                        settings: dict[str, Any] | None = None,
                        layers: Sequence[str] | None = None, seed: int = 0,
                        pixels: str = "all") -> RandomizationResult:
    """Model-parameter randomization test (Adebayo et al., NeurIPS 2018) of one explainer.

    The policy is deep-copied and put in eval mode; the original map ``A`` is computed on the
    copy, then for every step the copy's weights are re-initialized (cascading: top layer
    first, cumulatively; independent: one layer at a time, from a fresh copy) and the map
    ``A'`` is recomputed for the **same** actions (the original greedy ``a*`` unless given), so
    that the comparison measures the dependence on the weights, not a change of action. Layer
    ``l`` (its index in :func:`randomizable_layers`) is re-drawn under a seed made of ``seed``
    and ``l`` with its ``reset_parameters`` (PyTorch's default initialization; a norm layer is
    reset to its identity affine parameters), so both modes give a layer the same random
    weights and a rerun gives the same numbers. The caller's policy (parameters, mode) and the
    global random state are unchanged afterwards.

    Args:
        explainer: a name of :data:`marl_fgmf.explainers.METHODS` (``"ig"``, ``"brightness"``,
            ...) or a factory ``policy -> explainer`` whose ``attribute(obs, actions,
            **settings)`` returns a (B, H, W) or (B, H, W, C) map (e.g. ``SmoothGrad``).
        policy: an ``nn.Module``, ``policy(obs) -> logits`` (the policy protocol).
        obs: (B, H, W, C) float in [0, 1].
        mode: ``"cascading"`` or ``"independent"``.
        actions: (B,) explained actions; default the original policy's greedy actions.
        settings: keyword settings of ``attribute`` (e.g. ``{"steps": 16}``), the same at every
            step (a seeded explainer keeps its seed).
        layers: names of the modules to re-initialize, in the order a cascade randomizes them;
            default every parameterized module on the logits' path, top (logits) first.
        seed: base seed of the re-initializations.
        pixels: ``"all"`` (the paper) or ``"foreground"``: correlate over the frame's
            non-background pixels only (all pixels of a frame that has none). On frames that
            are mostly a plain background, a map that is 0 there whatever the weights (any
            input-multiplied map, e.g. IG from a black baseline) keeps a rank correlation near 1
            over all pixels from the tied background alone; over the foreground it does not.
    Returns:
        :class:`RandomizationResult` with (S, B) correlations, ``S = len(layers)``.
    Raises:
        ValueError (one line): unknown mode or explainer, bad observations, a policy that is
        not an ``nn.Module`` or cannot be copied, an unknown or parameter-free layer name, a map
        whose shape does not match ``obs``.

    Example:
        >>> res = randomization_check("smoothgrad", policy, obs,
        ...                           settings=dict(n_samples=1, noise_level=0.0))
        >>> res.spearman.mean(1), res.flagged()
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
    make = _make_explainer(explainer)
    if not isinstance(policy, nn.Module):
        raise ValueError("policy must be a torch.nn.Module (its layers are re-initialized), got "
                         f"{type(policy).__name__}")
    check_obs(obs)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"settings must be a dict of explainer settings, got "
                         f"{type(settings).__name__}")
    settings = dict(settings or {})
    try:
        base = copy.deepcopy(policy).eval()
    except Exception as err:  # a module holding a lock, a file handle, a Ray actor...
        raise ValueError(f"policy cannot be copied ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no message'}); "
                         "randomization_check never modifies the caller's policy") from None
    obs = obs.detach()
    on_path = randomizable_layers(base, obs)
    if layers is None:
        order = list(reversed(on_path))
    else:
        modules = dict(base.named_modules())
        order = [str(n) for n in layers]
        if not order or len(set(order)) != len(order):
            raise ValueError(f"layers must name distinct modules, at least one, got {order}")
        for name in order:
            owns = name in modules and any(True for _ in modules[name].parameters(recurse=False))
            if not owns:
                raise ValueError(f"layer {name!r} is not a module with parameters of the policy; "
                                 f"layers on the logits' path: {', '.join(on_path) or 'none'}")
    if not order:
        raise ValueError("the policy has no module with parameters on the logits' path: "
                         "nothing to randomize")
    index = {name: i for i, name in enumerate(on_path)}
    extra = {name: len(on_path) + i for i, name in enumerate(order) if name not in index}
    index.update(extra)

    with torch.no_grad():
        actions = resolve_actions(base, obs, actions)

    def explain(model: nn.Module) -> torch.Tensor:
        raw = make(model).attribute(obs, actions, **settings)
        if not torch.is_tensor(raw) or tuple(raw.shape[:3]) != tuple(obs.shape[:3]) \
                or raw.dim() not in (3, 4):
            shape = tuple(raw.shape) if torch.is_tensor(raw) else type(raw).__name__
            raise ValueError(f"the explainer returned {shape}, expected a (B, H, W) or "
                             f"(B, H, W, C) map for obs {tuple(obs.shape)}")
        return raw.detach()

    mask = None
    if pixels == "foreground":
        mask = ~background_mask(obs)  # (B, H, W)
        mask = mask | ~mask.flatten(1).any(1).view(-1, 1, 1)  # no foreground: every pixel
    original = explain(base)
    magnitude, signed = spatial_map(original), _signed(original)
    maps, rho, rho_signed, r = [], [], [], []
    work = copy.deepcopy(base)
    for name in order:
        if mode == "independent":
            work = copy.deepcopy(base)
        _reinitialize(work.get_submodule(name), _layer_seed(seed, index[name]))
        raw = explain(work)
        maps.append(spatial_map(raw))
        rho.append(_compare(magnitude, maps[-1], mask, spearman))
        rho_signed.append(_compare(signed, _signed(raw), mask, spearman))
        r.append(_compare(magnitude, maps[-1], mask, pearson))
    return RandomizationResult(mode=mode, pixels=pixels, layers=tuple(order),
                               spearman=torch.stack(rho),
                               spearman_signed=torch.stack(rho_signed), pearson=torch.stack(r),
                               original=magnitude, randomized=torch.stack(maps), actions=actions)
