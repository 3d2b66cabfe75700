"""Benchmark: what GHR and the pointing game give without a policy (model-free baselines on beacon).

How to run::

    python scripts/bench_baselines.py                      # 2000 observations, ~15 s
    python scripts/bench_baselines.py --n-obs 400 --out results/bench_baselines

``--n-obs`` agent observations of beacon (default settings: 2 agents, 21 x 21, 2 distractors)
are collected from rollouts that take the scripted optimal move with probability
``--p-scripted`` and a uniformly random move otherwise (episode ``e`` reset with ``--seed + e``,
every step, all agents), each with its ground-truth relevance mask ``R`` (the agent's and its
beacon's 3 x 3 cells, ``|R| = 18``). No policy is involved: every row is a map computed from the
frame alone. Per row, mean and 95 % half-width (Student t) over the observations:

* ``chance |R|/HW``: the expected GHR of a map uniform over ALL pixels (exact, per frame);
* ``uniform (all pixels)``: i.i.d. U(0, 1) over all pixels (measured: it should match chance);
* ``random``: the registered ``random`` baseline, uniform over the non-background pixels
  (background = the frame's most common colour, black here), and its exact expectation
  ``|R & F| / |F|`` (``F`` the foreground);
* ``brightness``: the registered ``brightness`` baseline, ``sum_c x_c``.

Results to expect (``python scripts/bench_baselines.py``, 2000 observations, seeds 0..):

| map | GHR | pointing game |
| --- | --- | --- |
| chance \\|R\\|/HW (exact) | 0.041 ± 0.000 | 0.041 ± 0.000 |
| uniform (all pixels) | 0.041 ± 0.002 | 0.045 ± 0.009 |
| random (non-background), exact expectation | 0.350 ± 0.001 | 0.350 ± 0.001 |
| random (non-background) | 0.348 ± 0.004 | 0.362 ± 0.021 |
| brightness | 0.397 ± 0.015 | 0.155 ± 0.016 |

With ``--n-obs 400``: random 0.342 ± 0.009, brightness 0.360 ± 0.033; with ``--n-obs 4000``:
0.348 ± 0.003 and 0.416 ± 0.011 (``--seed 1000``: 0.347, 0.430). Brightness scores about 1, 1/2 or
0 per frame as 0, 1 or 2 distractors (grey level 60-200 per channel) outshine the agent's
colours, hence its wider spread. The half-widths treat observations as independent; frames of
one episode are not, so they are somewhat optimistic.

Read a method's GHR against the ``random`` and ``brightness`` rows, not against 0.04: a map
that merely marks where the objects are already reaches about 0.35.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = ("chance", "uniform", "random_expected", "random", "brightness")
TITLES = {"chance": "chance \\|R\\|/HW (exact)", "uniform": "uniform (all pixels)",
          "random_expected": "random (non-background), exact expectation",
          "random": "random (non-background)", "brightness": "brightness"}


def collect(n_obs: int = 2000, seed: int = 0, p_scripted: float = 0.8, **env_kwargs):
    """``n_obs`` beacon observations (N, H, W, C) float in [0, 1] and relevance (N, H, W) bool,
    from rollouts mixing the scripted optimal move (probability ``p_scripted``) and random ones."""
    import numpy as np
    import torch
    from envs import make_env
    from envs.beacon import scripted_actions

    env = make_env("beacon", **env_kwargs)
    rng = np.random.default_rng(seed)
    frames, masks = [], []
    episode = 0
    while len(frames) < n_obs:
        obs, infos = env.reset(seed=seed + episode)
        while env.agents and len(frames) < n_obs:
            for a in env.agents:
                if len(frames) < n_obs:
                    frames.append(obs[a])
                    masks.append(infos[a]["relevance"])
            best = scripted_actions(env)
            obs, _, _, _, infos = env.step({a: best[a] if rng.random() < p_scripted
                                            else int(rng.integers(5)) for a in env.agents})
        episode += 1
    x = torch.from_numpy(np.stack(frames)).double() / 255.0
    return x, torch.from_numpy(np.stack(masks))


def measure(obs, relevance, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Per row of :data:`ROWS`: per-observation ``ghr`` and ``pointing_game`` values."""
    import torch
    from marl_fgmf import metrics as M
    from marl_fgmf.attribution import background_mask
    from marl_fgmf.explainers import attribution_map

    k = relevance.flatten(1).sum(1).double()
    n_pix = relevance.shape[1] * relevance.shape[2]
    fg = ~background_mask(obs)
    inside = (fg & relevance).flatten(1).sum(1).double()
    expected = inside / fg.flatten(1).sum(1).double()  # |R & F| / |F|, valid for |R| <= |F|
    uniform = torch.rand(obs.shape[:3], generator=torch.Generator().manual_seed(seed),
                         dtype=obs.dtype)
    maps = {"uniform": uniform,
            "random": attribution_map("random", None, obs, seed=seed),
            "brightness": attribution_map("brightness", None, obs)}
    out = {"chance": {"ghr": (k / n_pix).tolist(), "pointing_game": (k / n_pix).tolist()},
           "random_expected": {"ghr": expected.tolist(), "pointing_game": expected.tolist()}}
    for name, m in maps.items():
        out[name] = {"ghr": M.ghr(m, relevance).tolist(),
                     "pointing_game": M.pointing_game(m, relevance).tolist()}
    return {row: out[row] for row in ROWS}


def summarize(values: list[float]) -> dict[str, Any]:
    from marl_fgmf.stats import mean_ci95
    mean, half = mean_ci95(values)
    return {"mean": mean, "ci95": half if math.isfinite(half) else 0.0, "n": len(values)}


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["| map | GHR | pointing game |", "| --- | --- | --- |"]
    for row in ROWS:
        cells = [f"{summary[row][m]['mean']:.3f} ± {summary[row][m]['ci95']:.3f}"
                 for m in ("ghr", "pointing_game")]
        lines.append(f"| {TITLES[row]} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-obs", type=int, default=2000, help="agent observations (2000)")
    p.add_argument("--seed", type=int, default=0, help="episode e is reset with seed + e (0)")
    p.add_argument("--p-scripted", type=float, default=0.8,
                   help="probability of the scripted optimal move, else a random one (0.8)")
    p.add_argument("--out", default="", help="directory for bench_baselines.json ('' : none)")
    args = p.parse_args(argv)
    if args.n_obs < 2 or not 0.0 <= args.p_scripted <= 1.0:
        p.error("--n-obs must be >= 2 and --p-scripted in [0, 1]")
    obs, rel = collect(args.n_obs, args.seed, args.p_scripted)
    values = measure(obs, rel, args.seed)
    summary = {row: {m: summarize(v) for m, v in cols.items()} for row, cols in values.items()}
    print(f"beacon, {len(obs)} observations, seeds {args.seed}.., p_scripted {args.p_scripted}")
    print(table(summary))
    if args.out:
        from marl_fgmf.io import atomic_write_text
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "bench_baselines.json", json.dumps(
            {"settings": vars(args), "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
