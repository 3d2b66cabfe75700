"""Benchmark: faithfulness of PGCA and five single attribution methods on beacon, and PGCA's cost.

How to run::

    python scripts/bench_explain.py                                  # PPO run in /work/runs/ppo
    python scripts/bench_explain.py --checkpoint runs/ppo --fgmf-checkpoint runs/fgmf
    python scripts/bench_explain.py --n-obs 40 --repeats 5 --out /tmp/be    # a quick look
    python scripts/bench_explain.py --skip-faithfulness                  # timing only (b)

It prints two Markdown tables and writes ``<out>/bench_explain.json`` (atomically).

(a) **Faithfulness** (DESIGN.md section 3). ``--n-obs`` agent observations are collected from
greedy rollouts of each checkpoint on its own beacon settings (episode ``e`` reset with seed
``--seed + e``, every ``--frame-stride``-th step, all agents), each with its ground-truth
relevance mask ``R`` (the agent's and its beacon's pixels). Every method explains the greedy
action ``a*``; each map is reduced to a (H, W) magnitude. Per method, mean and 95 % half-width
(Student t) over the observations of:

* GHR: fraction of the ``|R|`` most attributed pixels inside ``R`` (higher is better);
* deletion AUC (black substrate) and insertion AUC (blurred start), ``K = 20`` (lower / higher);
* ASR-M at ``--eps`` (4/255): top-``|R|`` overlap of the maps of ``x`` and of a 10-step PGD
  ``x + delta`` (higher: the explanation is stable under attack);
* pointing game: the peak pixel lies in ``R`` (higher).

Two reference rows bracket the scale: ``random`` (a map uniform over ALL pixels: GHR ~ |R| / HW
= 0.041, the all-pixel chance level) and ``intensity`` (the pixel brightness, the registered
``brightness`` explainer's map, which lights up every object, distractors included). The
all-pixel chance is not the bar a method must beat: the registered ``random`` explainer,
uniform over the non-background pixels only, scores GHR ~0.35 on beacon frames without
looking at the policy (``python scripts/bench_baselines.py``; this script's ``random`` row is
the all-pixel map, not that explainer).
The headline is PGCA's GHR over the best single method's GHR (target: >= 1.25).

(b) **Cost**. Time to explain all agents of one beacon frame with :func:`marl_fgmf.pgca.explain`
against Captum's ``IntegratedGradients`` and ``Occlusion`` run separately on the same inputs
(IG: ``riemann_right``, the same steps, baseline 0, all steps in one pass; occlusion: the same
window ``(patch, patch, C)``, strides ``(stride, stride, C)``, the same blurred substrate as
``baselines`` (its blur is timed too), the same rows per forward), for the cnn, vit and hybrid
encoders at their default sizes (weights seeded, not trained: the cost does not depend on them).
One process, the three calls interleaved, ``--repeats`` rounds after a warm-up, medians; the
ratio PGCA / (Captum IG + Captum occlusion) should be <= 1.0. The maps are checked against
Captum's on the way (max relative error).

Results to expect (2 shared, heavily loaded CPU cores, ``--threads 1``; PPO run of 80 iterations,
cnn, 96 % of the scripted optimum). (a) on 200 observations (seeds 1000..1003), about 6 minutes:

| method | GHR | deletion AUC | insertion AUC | ASR-M 4/255 | pointing game |
| --- | --- | --- | --- | --- | --- |
| random (reference) | 0.041 ± 0.006 | 0.599 ± 0.031 | 0.813 ± 0.026 | 0.044 ± 0.006 | 0.055 ± 0.032 |
| intensity (reference) | 0.435 ± 0.047 | 0.275 ± 0.029 | 0.873 ± 0.022 | 0.848 ± 0.028 | 0.170 ± 0.053 |
| ig | 0.561 ± 0.030 | 0.264 ± 0.029 | 0.876 ± 0.022 | 0.840 ± 0.022 | 0.655 ± 0.066 |
| smoothgrad | 0.168 ± 0.025 | 0.344 ± 0.035 | 0.843 ± 0.024 | 0.810 ± 0.031 | 0.200 ± 0.056 |
| occlusion | 0.623 ± 0.025 | 0.253 ± 0.027 | 0.874 ± 0.020 | 0.793 ± 0.024 | 0.995 ± 0.010 |
| gradcampp | 0.534 ± 0.020 | 0.262 ± 0.027 | 0.863 ± 0.021 | 0.870 ± 0.015 | 0.815 ± 0.054 |
| rise | 0.514 ± 0.017 | 0.105 ± 0.022 | 0.921 ± 0.016 | 0.835 ± 0.031 | 0.960 ± 0.027 |
| pgca | 0.836 ± 0.023 | 0.263 ± 0.029 | 0.879 ± 0.022 | 0.860 ± 0.019 | 0.995 ± 0.010 |

PGCA's GHR is 1.34x the best single method's (occlusion); 80 % of its attribution lies on the
agent and its beacon (IG 48 %, occlusion 61 %), 9 % on the distractors (IG 31 %). RISE has by
far the best deletion and insertion AUC (its map is built from the probability under random
masks, what those curves measure); PGCA's are IG's. (b) CPU-time ratio PGCA / (Captum IG +
Captum occlusion) about 0.85-0.92 for cnn, vit and hybrid (0.91-0.95 when Captum's occlusion
runs on the same attention path); the wall-time ratio wanders within about +-0.15 of it on a
loaded machine. The maps agree with Captum's to ~5e-8 (float64).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Args:
    checkpoint: str = "/work/runs/ppo"
    """run directory of the PPO policy (marl-fgmf train --out)"""
    fgmf_checkpoint: str = ""
    """run directory of an FGMF-defended policy (optional; '' skips it)"""
    extra_checkpoint: list = field(default_factory=list)
    """more runs to compare, as NAME=DIR (repeatable), e.g. adv=/work/runs/adv"""
    n_obs: int = 200
    """agent observations per checkpoint for the faithfulness table"""
    frame_stride: int = 2
    """keep every k-th step of the rollouts (less correlated observations)"""
    seed: int = 1000
    """episode e of the rollouts is reset with seed + e; the seed of SmoothGrad, RISE and PGD"""
    eps: str = "4/255"
    """L-infinity budget of the PGD perturbation of ASR-M"""
    chunk: int = 50
    """observations per explainer call in (a)"""
    methods: str = "ig,smoothgrad,occlusion,gradcampp,rise,pgca"
    """methods of the faithfulness table (comma-separated)"""
    repeats: int = 11
    """timed rounds per arch in (b) (after one warm-up round)"""
    archs: str = "cnn,vit,hybrid"
    """encoders timed in (b)"""
    threads: int = 1
    """torch intra-op threads (1: steadier timings on a shared machine)"""
    skip_faithfulness: bool = False
    """only run the timing (b)"""
    skip_timing: bool = False
    """only run the faithfulness table (a)"""
    out: str = "results/bench_explain"
    """output directory (bench_explain.json)"""


def parse_args(argv: list[str] | None = None) -> Args:
    """The dataclass fields as flags (``--n-obs 200``), their docstrings as help (CleanRL style)."""
    import ast
    import inspect
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(Args))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = str(nxt.value.value)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=docs.get(f.name))
        elif isinstance(default, list):
            p.add_argument(flag, action="append", default=[], help=docs.get(f.name))
        else:
            p.add_argument(flag, type=type(default), default=default,
                           help=f"{docs.get(f.name)} (default {default!r})")
    return Args(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# (a) faithfulness
# ---------------------------------------------------------------------------------------------

# each method's settings: the benchmark's (the library defaults, occlusion as magnitudes like
# PGCA's map), so that both measure the same maps
from marl_fgmf.benchmark.faithfulness import METHOD_SETTINGS  # noqa: E402


REFERENCES = ("random", "intensity")
METRICS = ("ghr", "deletion_auc", "insertion_auc", "asr_m", "pointing_game")
SHARES = ("share_relevant", "share_other_agents", "share_distractors", "share_background")


def object_classes(obs):
    """Beacon's pixels by what they show, from the observer's colours (envs.beacon): (B, H, W)
    long, 0 the agent and its beacon, 1 other agents and their beacons, 2 distractors (grey),
    3 background (black)."""
    import torch
    from envs.beacon import (BEACON_COLOUR, OTHER_AGENT_COLOUR, OTHER_BEACON_COLOUR,
                             SELF_COLOUR)
    rgb = torch.round(obs * 255).long()

    def has(colour):
        return (rgb == torch.tensor(colour)).all(-1)

    cls = torch.full(obs.shape[:3], 3, dtype=torch.long)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2]) & (rgb[..., 0] > 0)
    cls[grey] = 2
    cls[has(OTHER_AGENT_COLOUR) | has(OTHER_BEACON_COLOUR)] = 1
    cls[has(SELF_COLOUR) | has(BEACON_COLOUR)] = 0
    return cls


def attribution_shares(maps, obs):
    """Share of each map's total attribution on each object class (rows of SHARES), (4, B)."""
    import torch
    cls = object_classes(obs)
    total = maps.flatten(1).sum(1).clamp_min(1e-30)
    return torch.stack([(maps * (cls == k)).flatten(1).sum(1) / total for k in range(4)])


def collect(checkpoint: str, n_obs: int, frame_stride: int, seed: int):
    """Greedy rollouts of the checkpoint on its beacon settings: ``n_obs`` agent observations.

    Returns ``(groups, info)``: ``groups`` maps a policy module to ``(obs (N, H, W, C) float,
    relevance (N, H, W) bool)``; ``info`` says which env, episodes and seeds.
    """
    import numpy as np
    import torch
    from agents.checkpoint import agent_policy_map, load_policies, read_run_config
    from envs import make_env

    run = read_run_config(checkpoint)
    env_name = run.get("env", "beacon")
    if env_name != "beacon":
        raise SystemExit(f"{checkpoint} was trained on {env_name!r}; the faithfulness table needs "
                         "beacon's ground-truth relevance")
    env = make_env("beacon", **(run.get("env_kwargs") or {}))
    modules = load_policies(checkpoint, device="cpu")
    agents = list(env.possible_agents)
    mapping = ({a: next(iter(modules)) for a in agents} if len(modules) == 1
               else agent_policy_map(checkpoint, agents))
    kept: dict[str, tuple[list, list]] = {m: ([], []) for m in modules}
    total, episode = 0, 0
    while total < n_obs:
        obs, infos = env.reset(seed=seed + episode)
        t = 0
        while env.agents and total < n_obs:
            actions = {}
            for a in env.agents:
                x = torch.from_numpy(obs[a]).float().div(255.0)[None]
                with torch.no_grad():
                    actions[a] = int(modules[mapping[a]](x).argmax(-1))
                if t % frame_stride == 0 and total < n_obs:
                    kept[mapping[a]][0].append(x[0])
                    kept[mapping[a]][1].append(torch.as_tensor(np.asarray(infos[a]["relevance"])))
                    total += 1
            obs, _, _, _, infos = env.step(actions)
            t += 1
        episode += 1
    groups = {m: (modules[m], torch.stack(o), torch.stack(r)) for m, (o, r) in kept.items() if o}
    info = {"env": "beacon", "env_kwargs": run.get("env_kwargs") or {}, "arch": run.get("arch"),
            "defense": run.get("defense"), "episodes": episode,
            "episode_seeds": [seed, seed + episode - 1], "frame_stride": frame_stride,
            "n_obs": total}
    return groups, info


def attribution_fn(method: str, policy, seed: int):
    """``(obs, actions) -> (B, H, W)`` magnitude map of ``method`` (or a reference map)."""
    import torch
    from marl_fgmf.explainers import attribution_map

    if method == "random":
        g = torch.Generator().manual_seed(seed)  # one stream: every call draws a fresh map

        def random_map(obs, actions):
            return torch.rand(obs.shape[:3], generator=g, dtype=obs.dtype)
        return random_map
    if method == "intensity":
        return lambda obs, actions: obs.sum(-1)
    settings = dict(METHOD_SETTINGS[method])
    if method in ("smoothgrad", "rise"):
        settings["seed"] = seed
    return lambda obs, actions: attribution_map(method, policy, obs, actions, **settings)


def faithfulness(groups, methods: list[str], eps: float, chunk: int, seed: int,
                 progress: bool = True) -> dict[str, Any]:
    """Per method: every metric's per-observation values, pooled over the groups."""
    import torch
    from tqdm.auto import tqdm
    from marl_fgmf import metrics as M

    rows: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, float] = {}
    n_total = sum(len(g[1]) for g in groups.values())
    bar = tqdm(total=n_total * len(methods), desc="faithfulness", unit="obs",
               disable=not progress, leave=False)
    for method in methods:
        values = {k: [] for k in (*METRICS, *SHARES)}
        start = time.perf_counter()
        for policy, obs_all, rel_all in groups.values():
            fn = attribution_fn(method, policy, seed)
            for s in range(0, len(obs_all), chunk):
                obs, rel = obs_all[s:s + chunk], rel_all[s:s + chunk]
                with torch.no_grad():
                    actions = policy(obs).argmax(-1)
                maps = fn(obs, actions)
                values["ghr"] += M.ghr(maps, rel).tolist()
                values["pointing_game"] += M.pointing_game(maps, rel).tolist()
                values["deletion_auc"] += M.deletion_auc(policy, obs, maps, actions).tolist()
                values["insertion_auc"] += M.insertion_auc(policy, obs, maps, actions).tolist()
                values["asr_m"] += M.asr_m(policy, obs, fn, eps, relevance=rel, actions=actions,
                                           seed=seed).tolist()
                for key, share in zip(SHARES, attribution_shares(maps.detach(), obs)):
                    values[key] += share.tolist()
                bar.update(len(obs))
        seconds[method] = time.perf_counter() - start
        rows[method] = values
    bar.close()
    return {"values": rows, "seconds": seconds}


def summarize(values: list[float]) -> dict[str, Any]:
    from marl_fgmf.stats import mean_ci95
    mean, half = mean_ci95(values)
    return {"mean": mean, "ci95": half if math.isfinite(half) else None, "n": len(values)}


# ---------------------------------------------------------------------------------------------
# (b) cost
# ---------------------------------------------------------------------------------------------

def beacon_frame(seed: int):
    """All agents' observations of one beacon frame (a few steps into an episode), (N, H, W, C)."""
    import numpy as np
    import torch
    from envs import make_env
    from envs.beacon import scripted_actions
    env = make_env("beacon")
    obs, _ = env.reset(seed=seed)
    for _ in range(3):
        obs, *_ = env.step(scripted_actions(env))
    return torch.from_numpy(np.stack([obs[a] for a in env.possible_agents])).float() / 255.0


def timing(archs: list[str], repeats: int, seed: int) -> dict[str, Any]:
    """Median seconds of PGCA and of Captum IG + Captum occlusion on one frame, per arch.

    Each call is timed twice: CPU seconds of this process (``time.process_time``: what the
    call computes, insensitive to other processes taking turns on a shared CPU) and wall
    seconds (``time.perf_counter``). With ``--threads 1`` the CPU time is the steadier measure
    on a loaded machine; both ratios are reported.
    """
    import torch
    from captum.attr import IntegratedGradients, Occlusion

    from agents import make_policy_network
    from marl_fgmf.attribution import PerturbationForwards, gaussian_blur
    from marl_fgmf.pgca import DEFAULTS, explain

    obs = beacon_frame(seed)
    b, h, w, c = obs.shape
    steps, patch, stride = DEFAULTS["steps"], DEFAULTS["patch"], DEFAULTS["stride"]
    sigma, chunk = DEFAULTS["blur_sigma"], DEFAULTS["internal_batch_size"]
    per_eval = max(1, chunk // b)  # Captum evaluates per_eval windows of all B samples at once
    out: dict[str, Any] = {"batch": b, "obs_shape": [h, w, c], "steps": steps, "patch": patch,
                           "stride": stride, "blur_sigma": sigma, "rows_per_forward": chunk,
                           "captum_perturbations_per_eval": per_eval, "repeats": repeats,
                           "threads": torch.get_num_threads(), "archs": {}}
    for arch in archs:
        torch.manual_seed(seed)
        policy = make_policy_network(arch, (h, w, c), 5).eval()
        log_probs = lambda x, p=policy: torch.log_softmax(p(x), dim=-1)  # noqa: E731
        with torch.no_grad():
            target = policy(obs).argmax(-1)

        def run_pgca():
            return explain(policy, obs)

        def run_captum_ig():
            return IntegratedGradients(log_probs).attribute(
                obs, baselines=0.0, target=target, n_steps=steps, method="riemann_right")

        def run_captum_occlusion():
            return Occlusion(log_probs).attribute(
                obs, sliding_window_shapes=(patch, patch, c), strides=(stride, stride, c),
                baselines=gaussian_blur(obs, sigma), target=target,
                perturbations_per_eval=per_eval)

        def run_captum_occlusion_composite_mha():
            # Captum's occlusion on the attention path PGCA's perturbation forwards use on CPU
            # (marl_fgmf.attribution.PerturbationForwards): isolates that choice's share.
            with PerturbationForwards(obs.device):
                return run_captum_occlusion()

        calls = {"pgca": run_pgca, "captum_ig": run_captum_ig,
                 "captum_occlusion": run_captum_occlusion,
                 "captum_occlusion_composite_mha": run_captum_occlusion_composite_mha}
        for fn in calls.values():  # warm-up
            fn()
        cpu: dict[str, list[float]] = {name: [] for name in calls}
        wall: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():  # interleaved: load drifts hit all of them alike
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        ig_err, occ_err = agreement_with_captum(policy, obs, steps, patch, stride, sigma)
        row: dict[str, Any] = {}
        for clock, times in (("cpu", cpu), ("wall", wall)):
            med = {name: statistics.median(v) for name, v in times.items()}
            captum = med["captum_ig"] + med["captum_occlusion"]
            same_path = med["captum_ig"] + med["captum_occlusion_composite_mha"]
            paired = [p / (i + o) for p, i, o in zip(times["pgca"], times["captum_ig"],
                                                      times["captum_occlusion"])]
            row[clock] = {
                "pgca_s": med["pgca"], "captum_ig_s": med["captum_ig"],
                "captum_occlusion_s": med["captum_occlusion"], "captum_total_s": captum,
                "captum_occlusion_composite_mha_s": med["captum_occlusion_composite_mha"],
                "ratio": med["pgca"] / captum, "ratio_same_mha_path": med["pgca"] / same_path,
                "paired_ratio_quartiles": statistics.quantiles(paired, n=4) if len(paired) > 1
                else [paired[0]] * 3,
                "times": times}
        row["max_rel_err_vs_captum"] = {"gradient": ig_err, "perturbation": occ_err}
        out["archs"][arch] = row
    return out


def agreement_with_captum(policy, obs, steps, patch, stride, sigma) -> tuple[float, float]:
    """Max relative error of PGCA's G and signed P against Captum's IG and occlusion, in
    float64 (in float32 the occlusion drops of a near-uniform untrained policy, ~1e-6 nats,
    drown in Captum's float32 log-softmax rounding)."""
    import copy

    import torch
    from captum.attr import IntegratedGradients, Occlusion
    from marl_fgmf.attribution import gaussian_blur
    from marl_fgmf.pgca import explain
    p64, x64 = copy.deepcopy(policy).double(), obs.double()
    log_probs = lambda x: torch.log_softmax(p64(x), dim=-1)  # noqa: E731
    res = explain(p64, x64)
    c = x64.shape[-1]
    ig = IntegratedGradients(log_probs).attribute(x64, baselines=0.0, target=res.actions,
                                                  n_steps=steps, method="riemann_right")
    occ = Occlusion(log_probs).attribute(x64, sliding_window_shapes=(patch, patch, c),
                                         strides=(stride, stride, c),
                                         baselines=gaussian_blur(x64, sigma),
                                         target=res.actions, perturbations_per_eval=64)
    return _rel_err(res.gradient, ig.abs().sum(-1)), _rel_err(res.perturbation_signed, occ[..., 0])


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def _fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f}" + ("" if s["ci95"] is None else f" ± {s['ci95']:.3f}")


def faithfulness_table(name: str, block: dict[str, Any]) -> str:
    info = block["data"]
    lines = [f"\n(a) faithfulness on beacon, {name} policy ({info['arch']}, defense "
             f"{info['defense']}): {info['n_obs']} agent observations from {info['episodes']} "
             f"greedy episodes (seeds {info['episode_seeds'][0]}..{info['episode_seeds'][1]}, "
             f"one step in {info['frame_stride']}), mean ± 95% CI; ASR-M at "
             f"{block['eps_text']}, 10-step PGD; method seed {block['seed']}\n",
             "| method | GHR ↑ | deletion AUC ↓ | insertion AUC ↑ | ASR-M ↑ | pointing game ↑ "
             "| time (s, with metrics) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, row in block["methods"].items():
        label = f"{method} (reference)" if method in REFERENCES else method
        lines.append(f"| {label} | " + " | ".join(_fmt(row[k]) for k in METRICS)
                     + f" | {row['seconds']:.0f} |")
    lines += [f"\nwhere the attribution goes ({name} policy): share of each map's total on the "
              "agent and its beacon (= R), on the other agents and their beacons, on the "
              "flickering distractors and on the black background; mean ± 95% CI\n",
              "| method | agent + own beacon | other agents + beacons | distractors | background |",
              "| --- | --- | --- | --- | --- |"]
    for method, row in block["methods"].items():
        label = f"{method} (reference)" if method in REFERENCES else method
        lines.append(f"| {label} | " + " | ".join(_fmt(row[k]) for k in SHARES) + " |")
    ratio = block.get("ghr_ratio")
    if ratio is not None:
        lines.append(f"\nPGCA GHR / best single method's ({block['best_single']}): "
                     f"{ratio:.2f} (target >= 1.25: {'met' if ratio >= 1.25 else 'NOT met'})")
    return "\n".join(lines)


def timing_table(t: dict[str, Any]) -> str:
    lines = [f"\n(b) time to explain all {t['batch']} agents of one beacon frame "
             f"({t['obs_shape'][0]}x{t['obs_shape'][1]}x{t['obs_shape'][2]}): IG {t['steps']} "
             f"steps, occlusion {t['patch']}x{t['patch']} stride {t['stride']} blur sigma "
             f"{t['blur_sigma']}, {t['rows_per_forward']} rows per forward; median of "
             f"{t['repeats']} interleaved rounds, {t['threads']} thread(s); CPU seconds of the "
             "process (wall seconds in brackets)\n",
             "| arch | PGCA (s) | Captum IG (s) | Captum occlusion (s) | ratio PGCA / (IG + occl.) "
             "| paired ratio, quartiles | Captum occl., composite MHA (s) | ratio, same MHA path "
             "| max rel. err. G / P (float64) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arch, r in t["archs"].items():
        c, w = r["cpu"], r["wall"]
        q1, q2, q3 = c["paired_ratio_quartiles"]
        err = r["max_rel_err_vs_captum"]
        lines.append(
            f"| {arch} | {c['pgca_s']:.3f} ({w['pgca_s']:.3f}) | {c['captum_ig_s']:.3f} "
            f"({w['captum_ig_s']:.3f}) | {c['captum_occlusion_s']:.3f} "
            f"({w['captum_occlusion_s']:.3f}) | **{c['ratio']:.2f}** ({w['ratio']:.2f}) | "
            f"{q1:.2f} / {q2:.2f} / {q3:.2f} | {c['captum_occlusion_composite_mha_s']:.3f} "
            f"({w['captum_occlusion_composite_mha_s']:.3f}) | {c['ratio_same_mha_path']:.2f} "
            f"({w['ratio_same_mha_path']:.2f}) | {err['gradient']:.1e} / "
            f"{err['perturbation']:.1e} |")
    worst_cpu = max(r["cpu"]["ratio"] for r in t["archs"].values())
    worst_wall = max(r["wall"]["ratio"] for r in t["archs"].values())
    lines.append(f"\ntarget ratio <= 1.0: {'met' if worst_cpu <= 1.0 else 'NOT met'} in CPU time "
                 f"(worst {worst_cpu:.2f}); wall time worst {worst_wall:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from marl_fgmf.io import atomic_write_text
    from marl_fgmf.commands import parse_eps

    torch.set_num_threads(args.threads)
    eps = parse_eps(args.eps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": dataclasses.asdict(args), "torch": torch.__version__,
                              "faithfulness": {}, "timing": None}
    texts: list[str] = []
    if not args.skip_faithfulness:
        runs = [("ppo", args.checkpoint)]
        if args.fgmf_checkpoint:
            runs.append(("fgmf", args.fgmf_checkpoint))
        for item in args.extra_checkpoint:
            name, _, path = item.partition("=")
            runs.append((name, path))
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHOD_SETTINGS))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; allowed: {', '.join(METHOD_SETTINGS)}")
        for name, path in runs:
            if not Path(path).exists():
                raise SystemExit(f"checkpoint not found: {path}")
            groups, info = collect(path, args.n_obs, args.frame_stride, args.seed)
            raw = faithfulness(groups, [*REFERENCES, *methods], eps, args.chunk, args.seed)
            block: dict[str, Any] = {"checkpoint": path, "data": info, "eps": eps,
                                     "eps_text": args.eps, "seed": args.seed,
                                     "settings": METHOD_SETTINGS, "methods": {}}
            for method, values in raw["values"].items():
                block["methods"][method] = {k: summarize(v) for k, v in values.items()}
                block["methods"][method]["seconds"] = raw["seconds"][method]
            singles = {m: block["methods"][m]["ghr"]["mean"] for m in methods if m != "pgca"}
            if "pgca" in methods and singles:
                best = max(singles, key=singles.get)
                block["best_single"] = best
                block["ghr_ratio"] = block["methods"]["pgca"]["ghr"]["mean"] / max(singles[best], 1e-12)
            block["per_observation"] = raw["values"]
            report["faithfulness"][name] = block
            texts.append(faithfulness_table(name, block))
            print(texts[-1], flush=True)
            atomic_write_text(out / "bench_explain.json", json.dumps(report, indent=2))
    if not args.skip_timing:
        archs = [a.strip() for a in args.archs.split(",") if a.strip()]
        report["timing"] = timing(archs, args.repeats, args.seed)
        texts.append(timing_table(report["timing"]))
        print(texts[-1], flush=True)
    atomic_write_text(out / "bench_explain.json", json.dumps(report, indent=2))
    print(f"\nwritten {out / 'bench_explain.json'}")
    return report


if __name__ == "__main__":
    main()
