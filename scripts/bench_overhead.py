"""Benchmark: the training-time cost of the FGMF defences (issue 3).

How to run::

    python scripts/bench_overhead.py                  # writes results/bench_overhead.json
    python scripts/bench_overhead.py --quick          # fewer repeats and iterations

Part A, learner update time. For each observation size (beacon with 3 or 6 pixels a cell:
21x21 and 42x42) and SGD minibatch size (128, 256, 512), a plain PPO learner and a SCOR-PIO
learner (defaults) are built in this process and fed the SAME sampled episodes (deep copies):
one ``Learner.update`` = one training iteration's update (train batch = 4 minibatches,
``num_epochs`` = 4, so 16 SGD steps, GAE included). Calls alternate between the two learners;
the median of ``--repeats`` calls is reported, and the ratio SCOR-PIO / plain. The
exploitable subspace (IG mask) is computed once per update call, as in training.

Part B, whole training. Every ``--defense`` trains on beacon for the same number of
iterations (equal env-step budget) with the default settings; wall time and its ratio to
plain PPO.

Targets (issue 3): update ratio <= 2.0 with defaults, flat within 20% across batch and
observation sizes; whole-training ratio <= 1.5 (for SCOR-PIO, the regularizer under test).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _learner_update_times(minibatch: int, cell: int, repeats: int, defense: str = "scorpio",
                          num_epochs: int = 4) -> dict:
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from agents.train import TrainConfig, build_algo_config

    env_kwargs = {"cell": cell}
    algos = {}
    for name in ("none", defense):
        cfg = TrainConfig(defense=name, env_kwargs=env_kwargs, minibatch_size=minibatch,
                          train_batch_size=4 * minibatch, num_epochs=num_epochs, seed=0)
        algos[name] = build_algo_config(cfg).build_algo()
    runner = algos["none"].env_runner_group.local_env_runner
    episodes = runner.sample(num_timesteps=4 * minibatch, random_actions=False)
    times: dict[str, list[float]] = {n: [] for n in algos}
    for _ in range(repeats + 1):  # the first round warms up
        for name, algo in algos.items():
            learner = algo.learner_group._learner
            eps = copy.deepcopy(episodes)
            t0 = time.perf_counter()
            learner.update(episodes=eps, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0},
                           num_epochs=num_epochs, minibatch_size=minibatch,
                           shuffle_batch_per_epoch=True)
            times[name].append(time.perf_counter() - t0)
    for algo in algos.values():
        algo.stop()
    plain = statistics.median(times["none"][1:])
    defended = statistics.median(times[defense][1:])
    return {"obs": f"{7 * cell}x{7 * cell}x3", "minibatch": minibatch,
            "train_batch": 4 * minibatch, "sgd_steps": 4 * num_epochs, "plain_s": plain,
            f"{defense}_s": defended, "ratio": defended / plain,
            "agent_steps": sum(e.agent_steps() for e in episodes)}


def _whole_training(defenses: list[str], iterations: int, tmp: Path) -> list[dict]:
    from agents.train import TrainConfig, train
    rows = []
    for defense in defenses:
        cfg = TrainConfig(defense=defense, iterations=iterations, seed=0)
        t0 = time.perf_counter()
        result = train(cfg, tmp / defense.replace("+", "_"), progress=False)
        wall = time.perf_counter() - t0
        rows.append({"defense": defense, "iterations": iterations,
                     "env_steps": result["last"]["env_steps"], "wall_s": wall,
                     "final_return": result["last"]["agent_return_mean"]})
    base = next(r["wall_s"] for r in rows if r["defense"] == "none")
    for r in rows:
        r["ratio"] = r["wall_s"] / base
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="FGMF training-time overhead")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--minibatches", default="128,256,512")
    p.add_argument("--cells", default="3,6", help="beacon pixels per cell (obs 21x21, 42x42)")
    p.add_argument("--iterations", type=int, default=10, help="part B: iterations per defense")
    p.add_argument("--defenses", default="none,adv,scorpio,sgam,fgmf")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--out", default="results/bench_overhead.json")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.iterations = 1, 3

    import torch

    from agents.train import ensure_ray
    from marl_fgmf.io import atomic_write_text
    from marl_fgmf.scorpio import ScorpioConfig

    ensure_ray()
    update_rows = []
    for cell in [int(c) for c in args.cells.split(",")]:
        for mb in [int(m) for m in args.minibatches.split(",")]:
            row = _learner_update_times(mb, cell, args.repeats)
            update_rows.append(row)
            print(f"  update {row['obs']} minibatch {mb}: plain {row['plain_s']:.3f}s, "
                  f"scorpio {row['scorpio_s']:.3f}s, ratio {row['ratio']:.2f}", flush=True)
    ratios = [r["ratio"] for r in update_rows]
    spread = (max(ratios) - min(ratios)) / statistics.mean(ratios)
    training_rows = []
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            training_rows = _whole_training(args.defenses.split(","), args.iterations, Path(tmp))
    result = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "scorpio_defaults": ScorpioConfig().to_dict(),
        "update": update_rows,
        "update_ratio_max": max(ratios), "update_ratio_min": min(ratios),
        "update_ratio_spread": spread,
        "training": training_rows,
        "targets": {"update_ratio_max": 2.0, "update_ratio_spread": 0.2,
                    "training_ratio_scorpio": 1.5},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))

    print("\nA. Learner update time, SCOR-PIO (defaults) vs plain PPO, same episodes, same process")
    print("| obs | minibatch | SGD steps | plain (s) | SCOR-PIO (s) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in update_rows:
        print(f"| {r['obs']} | {r['minibatch']} | {r['sgd_steps']} | {r['plain_s']:.3f} | "
              f"{r['scorpio_s']:.3f} | {r['ratio']:.2f} |")
    print(f"ratio range {min(ratios):.2f}-{max(ratios):.2f}, spread {100 * spread:.0f}% of the mean "
          f"(target: max <= 2.0, spread <= 20%)")
    if training_rows:
        print("\nB. Whole training on beacon, equal env-step budget")
        print("| defense | iterations | env steps | wall (s) | ratio to none | final return |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in training_rows:
            print(f"| {r['defense']} | {r['iterations']} | {r['env_steps']} | {r['wall_s']:.1f} | "
                  f"{r['ratio']:.2f} | {r['final_return']:.2f} |")
    print(f"\nwritten {out}")
    return result


if __name__ == "__main__":
    main()
