"""Faithfulness of every attribution method on a policy's own frames: the benchmark's part.

Two steps, each a function a benchmark suite calls once per (env, defence, seed):

1. :func:`collect_frames`: greedy rollouts of the policies in a PettingZoo ``ParallelEnv``
   (episode ``e`` reset with ``seed + e``; every ``frame_stride``-th step; all agents) until
   ``n_obs`` agent observations are kept, each with the policy module that acts on it and the
   environment's ground-truth relevance mask ``info[agent]["relevance"]`` when it has one
   (beacon does, DESIGN.md section 5): a :class:`FrameSet`.
2. :func:`faithfulness_scores`: every method of :data:`METHOD_NAMES` (the registry
   :data:`marl_fgmf.explainers.METHODS`: IG, SmoothGrad, occlusion, Grad-CAM++, RISE, PGCA and
   the model-free ``random`` and ``brightness`` baselines) explains the greedy action ``a*`` of
   every observation, as a (H, W) magnitude map; per observation it scores (DESIGN.md
   section 3, :mod:`marl_fgmf.metrics`):

   * GHR (only with relevance masks; higher is better);
   * deletion AUC (black substrate; lower) and insertion AUC (blurred start; higher) in ``K``
     steps, ties between equal attributions broken by ``tie_orders`` seeded random orders and
     averaged (:func:`marl_fgmf.metrics.removal_curve`);
   * ASR-M at ``eps``: top-``k`` overlap of the maps of ``x`` and of a 10-step PGD ``x + delta``
     (``k = |R|``, or 5 % of the pixels without relevance; higher);

   and, with ``sanity``, the model-parameter randomization test (Adebayo et al., NeurIPS
   2018; :func:`marl_fgmf.sanity.randomization_check`, cascading down to every layer random):
   the mean Spearman correlation between the map of the trained and of the fully randomized
   policy, over all pixels and over the foreground (non-background) pixels, on the first
   :data:`SANITY_OBS` observations. A map that keeps its ranking without the weights (the
   baselines: 1.0) does not explain the policy.

   :func:`summarize_faithfulness` turns the per-observation lists into means and 95 % CIs.

**Deletion steps** (:func:`default_deletion_steps`): with relevance masks, ``K = max(20,
ceil(H W / min |R|))`` (capped at ``H W``), so that the first step removes at most as many
pixels as the smallest relevance mask holds (``round(H W / K) <= min |R|``; beacon 21 x 21 with
``|R| = 18``: ``K = 25``, 18 pixels per step); a coarser first step would delete a whole
relevant region at once and every map that ranks it anywhere near the top would score alike.
Without relevance, 2 % of the pixels per step: ``K = max(20, ceil(1 / 0.02)) = 50`` (capped at
``H W``).

**Determinism.** Every random draw is seeded from ``seed``: RISE's masks, SmoothGrad's noise
and the random baseline's values (``seed + i`` for the chunk that starts at observation ``i``,
so that chunks do not share draws), the tie orders of the deletion and insertion curves, PGD's
random start and the layer re-initializations of the sanity check. The same frames and
arguments give the same numbers.

**Policies without input gradients are refused.** ASR-M attacks every method's explanation
with a white-box PGD, and the gradient explainers need the input gradient too: a policy whose
forward runs under ``no_grad``, detaches or rounds its input would give a zero perturbation
(ASR-M 1.0, "perfectly stable") and all-zero gradient maps. :func:`faithfulness_scores` runs
the input-gradient guard (:func:`marl_fgmf.protocol.check_input_gradient`) on every policy
before any method and raises its :class:`~marl_fgmf.protocol.InputGradientError`.

Cost, measured on one thread of a shared 2-core CPU (beacon 21 x 21 x 3, an untrained default
``cnn`` policy, 32 observations, all 8 methods, ``K = 25``): 16-22 s without the sanity
check and 32-48 s with it, as the machine's load varied (RISE's 1000 masks: 6-8 s, 14-20 s).

Example:
    >>> frames = collect_frames(policy, make_env("beacon"), n_obs=32, seed=0)
    >>> result = faithfulness_scores(frames, ["ig", "pgca", "random", "brightness"])
    >>> summarize_faithfulness(result)["pgca"]["ghr"]     # {"mean", "ci95", "n"}
"""
from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from marl_fgmf import metrics
from marl_fgmf.explainers import METHODS, make_explainer, spatial_map
from marl_fgmf.protocol import (check_input_gradient, check_obs, eval_mode, expected_obs_shape,
                                obs_scale, parse_budget, policy_device, to_unit)
from marl_fgmf.sanity import randomization_check, spearman
from marl_fgmf.stats import mean_ci95

__all__ = ["METHOD_NAMES", "METHOD_SETTINGS", "PER_OBS_METRICS", "SANITY_OBS", "MIN_STEPS",
           "STEP_FRACTION", "FrameGroup", "FrameSet", "collect_frames", "default_deletion_steps",
           "faithfulness_scores", "summarize_faithfulness"]

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
"""The methods :func:`faithfulness_scores` accepts: the keys of
:data:`marl_fgmf.explainers.METHODS` (``pgca`` and the ``random`` / ``brightness`` baselines
included)."""

METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "ig": dict(steps=32),
    "smoothgrad": dict(n_samples=16, noise_level=0.15),
    "occlusion": dict(patch=3, stride=1, substrate="blur", blur_sigma=2.0, magnitude=True),
    "gradcampp": dict(),
    "rise": dict(n_masks=1000, grid=7, p_keep=0.5),
    "pgca": dict(steps=32, patch=3, stride=1, substrate="blur", blur_sigma=2.0, q=0.5),
    "random": dict(),
    "brightness": dict(),
}
"""Each method's ``attribute`` settings: the library defaults (those of
``scripts/bench_explain.py``), occlusion as magnitudes ``mean |drop|`` like PGCA's map. The
seeded methods (RISE, SmoothGrad, random) get ``seed`` added per call. Recorded in every
result under ``"settings"``."""

PER_OBS_METRICS = ("ghr", "deletion_auc", "insertion_auc", "asr_m")
"""The per-observation metrics of a result (``ghr`` is ``None`` without relevance masks)."""

SANITY_OBS = 16
"""At most this many observations (the first ones) enter the randomization check."""

MIN_STEPS = 20
"""The fewest deletion / insertion steps :func:`default_deletion_steps` chooses."""

STEP_FRACTION = 0.02
"""Without relevance masks, the fraction of the pixels one deletion step removes."""

DEFAULT_KEY = "default_policy"
"""The module key of a single policy passed to :func:`collect_frames` as a bare module."""


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------

@dataclass
class FrameGroup:
    """The observations one policy module acts on.

    Attributes:
        policy: ``policy(obs) -> logits`` (the policy protocol).
        obs: (N, H, W, C) float in [0, 1].
        relevance: (N, H, W) bool ground-truth relevance masks (each non-empty), or ``None``.
    """

    policy: nn.Module
    obs: torch.Tensor
    relevance: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_obs(self.obs, expected_obs_shape(self.policy))
        if self.relevance is not None:
            rel = torch.as_tensor(self.relevance)
            if tuple(rel.shape) != tuple(self.obs.shape[:3]):
                raise ValueError(f"relevance shape {tuple(rel.shape)} does not match obs "
                                 f"{tuple(self.obs.shape)}: expected {tuple(self.obs.shape[:3])}")
            rel = rel.bool()
            empty = (rel.flatten(1).sum(1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"relevance mask is empty for observation(s) {empty[:10]}")
            self.relevance = rel


@dataclass
class FrameSet:
    """Observations grouped by policy module key (:func:`collect_frames`'s result).

    Attributes:
        groups: module key -> :class:`FrameGroup`.
        info: how the frames were collected (episodes, seeds, stride), JSON-able.
    """

    groups: dict[str, FrameGroup]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a FrameSet needs at least one group of observations")
        shapes = {tuple(g.obs.shape[1:]) for g in self.groups.values()}
        if len(shapes) != 1:
            raise ValueError("all groups must hold observations of one shape, got "
                             f"{sorted(shapes)}")

    @property
    def n_obs(self) -> int:
        """Observations over all groups."""
        return sum(int(g.obs.shape[0]) for g in self.groups.values())

    @property
    def has_relevance(self) -> bool:
        """Whether every group has relevance masks (GHR is computed only then)."""
        return all(g.relevance is not None for g in self.groups.values())

    @property
    def obs_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the observations."""
        return tuple(next(iter(self.groups.values())).obs.shape[1:])  # type: ignore[return-value]


def _agent_modules(policies, agents: Sequence[str], agent_policy: dict[str, str] | None
                   ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``(modules by key, agent -> key)`` for every agent of the env."""
    modules = {DEFAULT_KEY: policies} if isinstance(policies, nn.Module) else dict(policies or {})
    if not modules or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise ValueError("policies must be an nn.Module or a non-empty dict of them by module key")
    if agent_policy is None:
        if len(modules) == 1:
            agent_policy = {a: next(iter(modules)) for a in agents}
        elif all(a in modules for a in agents):
            agent_policy = {a: a for a in agents}
        else:
            raise ValueError(f"{len(modules)} policies ({', '.join(modules)}) and no agent_policy: "
                             f"say which module acts for each of {', '.join(agents)}")
    missing = [a for a in agents if a not in agent_policy]
    unknown = sorted({k for k in agent_policy.values() if k not in modules})
    if missing or unknown:
        raise ValueError(f"agent_policy must map every agent to a policy key; missing agents "
                         f"{missing}, unknown keys {unknown} (keys: {', '.join(modules)})")
    return modules, dict(agent_policy)


def collect_frames(policies: dict[str, nn.Module] | nn.Module, env, n_obs: int, seed: int,
                   frame_stride: int = 2, agent_policy: dict[str, str] | None = None) -> FrameSet:
    """Greedy rollouts in ``env`` until ``n_obs`` agent observations are kept.

    Episode ``e`` is reset with ``seed + e``; at every ``frame_stride``-th step (0, stride,
    ...) every live agent's observation is kept, in the env's agent order, with its module key
    and ``info[agent]["relevance"]``. Each step's actions are the greedy ``argmax`` of each
    agent's policy on ``obs / 255`` (one batched forward per module, eval mode, no gradient).

    Args:
        policies: one policy module (every agent uses it) or modules by key.
        env: a PettingZoo ``ParallelEnv`` object (e.g. ``envs.make_env("beacon")``) whose
            observations are (H, W, C) frames (uint8 frames are divided by 255, others scaled
            by their space's bound, :func:`marl_fgmf.protocol.obs_scale`).
        n_obs: observations to keep (>= 1).
        seed: episode ``e`` is reset with ``seed + e``.
        frame_stride: keep every ``frame_stride``-th step.
        agent_policy: agent -> module key; default: the single module, or the module named
            like the agent.
    Returns:
        :class:`FrameSet`; a group's relevance is ``None`` unless every kept observation of it
        came with an ``info[agent]["relevance"]`` mask.
    """
    for name, value in (("n_obs", n_obs), ("frame_stride", frame_stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    modules, mapping = _agent_modules(policies, list(env.possible_agents), agent_policy)
    kept: dict[str, tuple[list, list]] = {k: ([], []) for k in modules}
    total, episode = 0, 0
    while total < n_obs:
        obs, infos = env.reset(seed=int(seed) + episode)
        before, t = total, 0
        while env.agents and total < n_obs:
            live = [a for a in env.agents if a in obs]
            if not live:
                break
            frames = {a: to_unit(obs[a][None], None if np.asarray(obs[a]).dtype == np.uint8 else
                                 obs_scale(env.observation_space(a).high),
                                 device=policy_device(modules[mapping[a]])[0]) for a in live}
            actions: dict[str, int] = {}
            for key in {mapping[a] for a in live}:
                group = [a for a in live if mapping[a] == key]
                with eval_mode(modules[key]), torch.no_grad():
                    greedy = modules[key](torch.cat([frames[a] for a in group])).argmax(-1)
                actions.update({a: int(g) for a, g in zip(group, greedy)})
            if t % frame_stride == 0:
                for a in live:
                    if total >= n_obs:
                        break
                    rel = (infos.get(a) or {}).get("relevance") if isinstance(infos, dict) else None
                    kept[mapping[a]][0].append(frames[a][0])
                    kept[mapping[a]][1].append(None if rel is None else
                                               torch.as_tensor(np.asarray(rel)).bool())
                    total += 1
            obs, _, _, _, infos = env.step(actions)
            t += 1
        episode += 1
        if total == before:
            raise ValueError(f"episode {episode - 1} (seed {int(seed) + episode - 1}) gave no "
                             "observation: the env has no live agents after reset")
    groups = {}
    for key, (frames_, rels) in kept.items():
        if frames_:
            rel = None if any(r is None for r in rels) else torch.stack(rels)
            groups[key] = FrameGroup(modules[key], torch.stack(frames_), rel)
    info = {"episodes": episode, "episode_seeds": [int(seed), int(seed) + episode - 1],
            "frame_stride": int(frame_stride), "n_obs": total,
            "obs_per_module": {k: int(g.obs.shape[0]) for k, g in groups.items()}}
    return FrameSet(groups, info)


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------

def default_deletion_steps(frames: FrameSet) -> int:
    """``K`` of the deletion and insertion curves (see the module docstring): with relevance
    masks ``max(20, ceil(H W / min |R|))``, so that the first step removes at most ``min |R|``
    pixels; without, ``max(20, ceil(1 / 0.02)) = 50``; capped at ``H W`` either way."""
    h, w, _ = frames.obs_shape
    n_pix = h * w
    if frames.has_relevance:
        smallest = min(int(g.relevance.flatten(1).sum(1).min()) for g in frames.groups.values())
        k = math.ceil(n_pix / smallest)
    else:
        k = math.ceil(1.0 / STEP_FRACTION - 1e-9)
    return int(min(n_pix, max(MIN_STEPS, k)))


def _takes_seed(method: str) -> bool:
    return "seed" in inspect.signature(METHODS[method].attribute).parameters


def _attribution_fn(method: str, policy: nn.Module, seed: int) -> Callable:
    """``(obs, actions) -> (B, H, W)`` magnitude map of ``method`` with its settings and seed."""
    settings = dict(METHOD_SETTINGS[method])
    if _takes_seed(method):
        settings["seed"] = int(seed)
    explainer = make_explainer(method, policy)
    return lambda obs, actions: spatial_map(explainer.attribute(obs, actions, **settings))


def _reuse_clean(fn: Callable, clean: torch.Tensor, clean_map: torch.Tensor) -> Callable:
    """``fn``, but the already computed map when called on the clean batch again (ASR-M
    explains ``x`` and ``x + delta``; ``x``'s map is the one just scored)."""
    def call(obs, actions):
        if obs.shape == clean.shape and torch.equal(obs, clean):
            return clean_map
        return fn(obs, actions)
    return call


def _constant(maps: torch.Tensor) -> torch.Tensor:
    """(B,) whether each (B, H, W) map is constant over all its pixels."""
    flat = maps.flatten(1)
    return flat.amax(1) == flat.amin(1)


def _sanity(method: str, frames: FrameSet, seed: int) -> dict[str, Any]:
    """Cascading randomization check on the first :data:`SANITY_OBS` observations: the mean
    Spearman correlation with every layer random, over all and over foreground pixels.

    One :func:`randomization_check` per group, over the foreground (``pixels="foreground"``);
    the all-pixel value is the same comparison of its ``original`` and last ``randomized``
    maps over every pixel (:func:`marl_fgmf.sanity.spearman`, 0 where only the randomized map
    is constant, as the check itself scores it), which saves a second cascade."""
    settings = dict(METHOD_SETTINGS[method])
    if _takes_seed(method):
        settings["seed"] = int(seed)
    finals: dict[str, list[torch.Tensor]] = {"all": [], "foreground": []}
    left, layers = SANITY_OBS, []
    for group in frames.groups.values():
        if left <= 0:
            break
        obs = group.obs[:left]
        left -= obs.shape[0]
        res = randomization_check(method, group.policy, obs, mode="cascading",
                                  settings=settings, seed=int(seed), pixels="foreground")
        finals["foreground"].append(res.spearman[-1])  # (B,) every layer random
        original, randomized = res.original, res.randomized[-1]
        rho = spearman(original, randomized)
        lost = _constant(randomized) & ~_constant(original)
        finals["all"].append(torch.where(lost, torch.zeros_like(rho), rho))
        layers = list(res.layers)
    out: dict[str, Any] = {"n_obs": SANITY_OBS - max(left, 0), "layers": layers}
    for pixels, key in (("all", "sanity_spearman_all"), ("foreground", "sanity_spearman_fg")):
        value = float(torch.nanmean(torch.cat(finals[pixels])))
        out[key] = value if math.isfinite(value) else None  # None: every original map constant
    return out


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def faithfulness_scores(frames: FrameSet, methods: Sequence[str], *, eps: float = 4 / 255,
                        seed: int = 0, deletion_steps: int | None = None, tie_orders: int = 4,
                        sanity: bool = True, chunk: int = 16,
                        progress: bool = False) -> dict[str, Any]:
    """Per method and observation: GHR, deletion AUC, insertion AUC, ASR-M; and the sanity check.

    Args:
        frames: :func:`collect_frames`'s observations (or a hand-made :class:`FrameSet`).
        methods: names from :data:`METHOD_NAMES`, with :data:`METHOD_SETTINGS`.
        eps: L-infinity budget of ASR-M's PGD, in [0, 1] units (a number or ``"4/255"``).
        seed: the seed of every random draw (see the module docstring).
        deletion_steps: ``K``; default :func:`default_deletion_steps`.
        tie_orders: random tie orders averaged by the deletion and insertion curves.
        sanity: run the randomization check (on the first :data:`SANITY_OBS` observations).
        chunk: observations per explainer call.
        progress: a tqdm bar over methods x observations.
    Returns:
        JSON-able ``{"methods": {m: {"ghr": [...] | None, "deletion_auc": [...],
        "insertion_auc": [...], "asr_m": [...], "sanity_spearman_all": float | None,
        "sanity_spearman_fg": float | None, "seconds": float}}, "n_obs", "deletion_steps",
        "deletion_steps_rule", "tie_orders", "eps", "seed", "chunk", "has_relevance",
        "settings", "sanity"}``; lists in the frames' order (group by group). A sanity value is
        ``None`` when it was not run or is undefined (every original map constant).
    Raises:
        ValueError: an unknown or repeated method, a bad setting;
            :class:`~marl_fgmf.protocol.InputGradientError` (a ``ValueError``): a policy
            without usable input gradients (see the module docstring).
    """
    if not isinstance(frames, FrameSet):
        raise ValueError(f"frames must be a FrameSet (collect_frames), got {type(frames).__name__}")
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {', '.join(METHOD_NAMES)}, got "
                         f"{methods}")
    eps = parse_budget(eps)
    seed = _check_int("seed", seed, -2**63)
    tie_orders = _check_int("tie_orders", tie_orders, 1)
    chunk = _check_int("chunk", chunk, 1)
    h, w, _ = frames.obs_shape
    if deletion_steps is None:
        steps, rule = default_deletion_steps(frames), (
            "max(20, ceil(H*W / min|R|)), capped at H*W" if frames.has_relevance
            else "max(20, ceil(1 / 0.02)), capped at H*W")
    else:
        steps, rule = _check_int("deletion_steps", deletion_steps, 1), "given"
        if steps > h * w:
            raise ValueError(f"deletion_steps must be <= H*W = {h * w}, got {steps}")
    for key, group in frames.groups.items():
        with eval_mode(group.policy):
            check_input_gradient(group.policy, group.obs,
                                 name=f"faithfulness_scores (policy {key!r}: ASR-M's PGD)")
    has_rel = frames.has_relevance
    bar = tqdm(total=frames.n_obs * len(methods), desc="faithfulness", unit="obs",
               disable=not progress, leave=False)
    rows: dict[str, dict[str, Any]] = {}
    sanity_info: dict[str, Any] = {}
    try:
        for method in methods:
            start = time.perf_counter()
            values: dict[str, list[float]] = {k: [] for k in PER_OBS_METRICS}
            offset = 0
            for group in frames.groups.values():
                policy = group.policy
                with eval_mode(policy):
                    for s in range(0, group.obs.shape[0], chunk):
                        obs = group.obs[s:s + chunk]
                        rel = None if group.relevance is None else group.relevance[s:s + chunk]
                        with torch.no_grad():
                            actions = policy(obs).argmax(-1)
                        fn = _attribution_fn(method, policy, seed + offset)
                        maps = fn(obs, actions)
                        if has_rel:
                            values["ghr"] += metrics.ghr(maps, rel).tolist()
                        curve = dict(steps=steps, tie_orders=tie_orders, seed=seed)
                        values["deletion_auc"] += metrics.deletion_auc(
                            policy, obs, maps, actions, **curve).tolist()
                        values["insertion_auc"] += metrics.insertion_auc(
                            policy, obs, maps, actions, **curve).tolist()
                        values["asr_m"] += metrics.asr_m(
                            policy, obs, _reuse_clean(fn, obs, maps), eps,
                            relevance=rel if has_rel else None, actions=actions,
                            seed=seed).tolist()
                        offset += obs.shape[0]
                        bar.update(obs.shape[0])
            row: dict[str, Any] = {k: [float(v) for v in values[k]] for k in PER_OBS_METRICS}
            if not has_rel:
                row["ghr"] = None
            row["sanity_spearman_all"] = row["sanity_spearman_fg"] = None
            if sanity:
                check = _sanity(method, frames, seed)
                row["sanity_spearman_all"] = check.pop("sanity_spearman_all")
                row["sanity_spearman_fg"] = check.pop("sanity_spearman_fg")
                sanity_info = check
            row["seconds"] = time.perf_counter() - start
            rows[method] = row
    finally:
        bar.close()
    return {"methods": rows, "n_obs": frames.n_obs, "deletion_steps": steps,
            "deletion_steps_rule": rule, "tie_orders": tie_orders, "eps": eps, "seed": seed,
            "chunk": chunk, "has_relevance": has_rel,
            "settings": {m: copy.deepcopy(METHOD_SETTINGS[m]) for m in methods},
            "sanity": ({"mode": "cascading", "max_obs": SANITY_OBS, **sanity_info} if sanity
                       else None)}


def summarize_faithfulness(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: ``{metric: {"mean", "ci95", "n"} | None}`` for the per-observation metrics
    (:func:`marl_fgmf.stats.mean_ci95`, Student t; ``ci95`` ``None`` for one value; a metric
    ``None`` when the result has none, e.g. GHR without relevance), plus the sanity values and
    the seconds as they are."""
    out: dict[str, dict[str, Any]] = {}
    for method, row in result["methods"].items():
        summary: dict[str, Any] = {}
        for key in PER_OBS_METRICS:
            vals = row.get(key)
            if not vals:
                summary[key] = None
                continue
            mean, half = mean_ci95(vals)
            summary[key] = {"mean": mean, "ci95": half if math.isfinite(half) else None,
                            "n": len(vals)}
        for key in ("sanity_spearman_all", "sanity_spearman_fg", "seconds"):
            summary[key] = row.get(key)
        out[method] = summary
    return out
