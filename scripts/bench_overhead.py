"""Benchmark: the training-time cost of the FGMF defences, and what the thread budget saves.

How to run (about 30 minutes on 2 idle CPU cores)::

    python scripts/bench_overhead.py                  # writes results/bench_overhead.json
    python scripts/bench_overhead.py --quick          # one repeat, short runs: checks it works
    python scripts/bench_overhead.py --parts B        # only the whole-training ratios

A. Learner update time, SCOR-PIO over plain PPO. For each observation size (beacon with 3 or
   6 pixels a cell: 21x21 and 42x42) and SGD minibatch (128, 256, 512), a plain PPO learner
   and a SCOR-PIO learner (defaults) are built in this process and fed the SAME sampled
   episodes (deep copies): one ``Learner.update`` = one iteration's update (train batch = 4
   minibatches, 4 epochs: 16 SGD steps, GAE included). Calls alternate between the two; each
   repeat gives one paired ratio; the table shows their mean and 95% CI, and the spread of the
   mean ratios across sizes ((max - min) / mean). One torch thread (``--threads``).
B. Whole training. Every ``--defenses`` trains on beacon for ``--iterations`` iterations (equal
   env steps) with all defaults (threads included), ``--repeats`` times, the order rotated
   each repeat (interleaved: a slow spell of the machine hits every defence); each repeat's
   wall time over plain PPO's in the same repeat gives a ratio; mean and 95% CI.
C. Two jobs on one machine. Two FGMF trainings (``--iterations-c`` iterations each) run at
   once as Ray jobs with one CPU each (:func:`agents.jobs.run_jobs`), first with the thread
   budget (each job's torch uses its 1 CPU), then with ``MARL_FGMF_CPUS=all`` (each uses
   every core, torch's own default); one job alone for reference. Wall time of each job and of
   the pair.

Targets (issue 14): fgmf's whole-training ratio <= 1.5 and <= adv's; SCOR-PIO's update ratio
spread <= 20% across frame and batch sizes. ``README.md``'s cost table is generated from the
JSON (``--table-only`` prints it again from an existing JSON).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"training_ratio_fgmf": 1.5, "update_ratio_spread": 0.2}


def _summary(values: list[float]) -> dict:
    from marl_fgmf.stats import summarize
    return summarize(values)


def _learner_update_times(minibatch: int, cell: int, repeats: int, defense: str = "scorpio",
                          num_epochs: int = 4) -> dict:
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from agents.train import TrainConfig, build_algo_config

    algos = {}
    for name in ("none", defense):
        cfg = TrainConfig(defense=name, env_kwargs={"cell": cell}, minibatch_size=minibatch,
                          train_batch_size=4 * minibatch, num_epochs=num_epochs, seed=0)
        algos[name] = build_algo_config(cfg).build_algo()
    try:
        runner = algos["none"].env_runner_group.local_env_runner
        episodes = runner.sample(num_timesteps=4 * minibatch, random_actions=False)
        times: dict[str, list[float]] = {n: [] for n in algos}
        for rep in range(repeats + 1):  # the first round warms up
            for name, algo in algos.items():
                learner = algo.learner_group._learner
                eps = copy.deepcopy(episodes)
                t0 = time.perf_counter()
                learner.update(episodes=eps, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0},
                               num_epochs=num_epochs, minibatch_size=minibatch,
                               shuffle_batch_per_epoch=True)
                if rep:
                    times[name].append(time.perf_counter() - t0)
    finally:
        for algo in algos.values():
            algo.stop()
    ratios = [d / p for d, p in zip(times[defense], times["none"])]
    return {"obs": f"{7 * cell}x{7 * cell}x3", "minibatch": minibatch,
            "train_batch": 4 * minibatch, "sgd_steps": 4 * num_epochs,
            "plain_s": statistics.median(times["none"]),
            f"{defense}_s": statistics.median(times[defense]),
            "ratios": ratios, "ratio": _summary(ratios)}


def _whole_training(defenses: list[str], iterations: int, repeats: int, tmp: Path) -> dict:
    from agents.train import TrainConfig, train
    runs = []
    for rep in range(repeats):
        order = defenses[rep % len(defenses):] + defenses[:rep % len(defenses)]
        walls = {}
        for defense in order:
            cfg = TrainConfig(defense=defense, iterations=iterations, seed=rep)
            out = tmp / f"{defense.replace('+', '_')}_r{rep}"
            t0 = time.perf_counter()
            result = train(cfg, out, progress=False)
            walls[defense] = time.perf_counter() - t0
            runs.append({"defense": defense, "repeat": rep, "wall_s": walls[defense],
                         "env_steps": result["last"]["env_steps"],
                         "final_return": result["last"]["agent_return_mean"]})
            print(f"  B repeat {rep}: {defense} {walls[defense]:.1f} s", flush=True)
        for r in runs[-len(order):]:
            r["ratio"] = r["wall_s"] / walls["none"]
    rows = []
    for defense in defenses:
        mine = [r for r in runs if r["defense"] == defense]
        rows.append({"defense": defense, "iterations": iterations,
                     "env_steps": mine[0]["env_steps"],
                     "wall_s": statistics.median(r["wall_s"] for r in mine),
                     "ratio": _summary([r["ratio"] for r in mine])})
    return {"rows": rows, "runs": runs}


def _two_jobs(iterations: int, tmp: Path) -> dict:
    """Part C: one job alone, two at once with the budget, two at once with all threads."""
    import ray

    from agents.jobs import Job, run_jobs
    from agents.threads import ENV_VAR, machine_cpus

    def spec(name: str) -> dict:
        return {"config": {"defense": "fgmf", "iterations": iterations, "seed": 0},
                "out": str(tmp / name)}

    arms = [("alone", 1, {}), ("two, budget", 2, {}), ("two, all threads", 2, {ENV_VAR: "all"})]
    rows = []
    for label, n, env_vars in arms:
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=machine_cpus(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": env_vars} if env_vars else None)
        try:
            jobs = [Job(_train_job(), spec(f"{label}-{i}"), title=f"{label} job {i}")
                    for i in range(n)]
            records: list[dict] = []
            t0 = time.perf_counter()
            failures = run_jobs(jobs, num_cpus=1.0, limit=n,
                                on_result=lambda job, res: records.append(res["value"]))
            pair = time.perf_counter() - t0
        finally:
            ray.shutdown()
        if failures:
            raise RuntimeError(f"part C: {failures[0]}")
        rows.append({"arm": label, "jobs": n, "makespan_s": pair,
                     "job_wall_s": [r["wall_s"] for r in records],
                     "threads": [r["threads"] for r in records]})
        print(f"  C {label}: {pair:.1f} s, jobs {[round(w, 1) for w in rows[-1]['job_wall_s']]} s, "
              f"threads {rows[-1]['threads']}", flush=True)
    return {"rows": rows, "iterations": iterations, "defense": "fgmf"}


def _train_job():
    from agents.train import train_job
    return train_job


def print_tables(result: dict) -> None:
    update_rows = result.get("update") or []
    if update_rows:
        print("\nA. Learner update time, SCOR-PIO (defaults) vs plain PPO, same episodes, "
              "one thread")
        print("| obs | minibatch | SGD steps | plain (s) | SCOR-PIO (s) | ratio (95% CI) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in update_rows:
            ci = r["ratio"]
            print(f"| {r['obs']} | {r['minibatch']} | {r['sgd_steps']} | {r['plain_s']:.3f} | "
                  f"{r['scorpio_s']:.3f} | {ci['mean']:.2f} ({ci['low']:.2f}-{ci['high']:.2f}) |")
        print(f"mean ratios {result['update_ratio_min']:.2f}-{result['update_ratio_max']:.2f}, "
              f"spread {100 * result['update_ratio_spread']:.0f}% of their mean (target <= 20%)")
    training = result.get("training") or {}
    if training.get("rows"):
        print("\nB. Whole training on beacon, equal env steps, defaults; ratio to none per "
              "repeat, mean (95% CI)")
        print("| defense | iterations | env steps | wall (s, median) | ratio to none (95% CI) |")
        print("| --- | --- | --- | --- | --- |")
        for r in training["rows"]:
            ci = r["ratio"]
            print(f"| {r['defense']} | {r['iterations']} | {r['env_steps']} | {r['wall_s']:.1f} "
                  f"| {ci['mean']:.2f} ({ci['low']:.2f}-{ci['high']:.2f}) |")
        verdict = result.get("verdict", {})
        if verdict:
            print(f"fgmf {verdict['fgmf']:.2f} vs target <= 1.5: "
                  f"{'met' if verdict['fgmf_le_1_5'] else 'MISSED'}; vs adv {verdict['adv']:.2f}: "
                  f"{'met' if verdict['fgmf_le_adv'] else 'MISSED'}")
    two = result.get("two_jobs") or {}
    if two.get("rows"):
        print(f"\nC. Two {two['defense']} trainings ({two['iterations']} iterations) as Ray jobs "
              f"with 1 CPU each on {result.get('cpus', '?')} CPUs")
        print("| arm | jobs | torch threads per job | job wall (s) | both done (s) |")
        print("| --- | --- | --- | --- | --- |")
        for r in two["rows"]:
            walls = ", ".join(f"{w:.1f}" for w in r["job_wall_s"])
            print(f"| {r['arm']} | {r['jobs']} | {', '.join(map(str, r['threads']))} | {walls} | "
                  f"{r['makespan_s']:.1f} |")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="FGMF training-time overhead",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="A,B,C", help="which parts to run (A, B, C)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of parts A and B")
    p.add_argument("--minibatches", default="128,256,512", help="part A: SGD minibatch sizes")
    p.add_argument("--cells", default="3,6", help="part A: beacon pixels per cell (21x21, 42x42)")
    p.add_argument("--threads", type=int, default=1, help="part A: torch threads")
    p.add_argument("--iterations", type=int, default=8, help="part B: iterations per training")
    p.add_argument("--defenses", default="none,adv,scorpio,sgam,fgmf",
                   help="part B: defences ('none' is the reference)")
    p.add_argument("--iterations-c", type=int, default=3, help="part C: iterations per job")
    p.add_argument("--quick", action="store_true", help="1 repeat, 2 iterations, 1 minibatch size")
    p.add_argument("--table-only", action="store_true", help="print the tables of --out and exit")
    p.add_argument("--out", default="results/bench_overhead.json", help="JSON output")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        if not out.is_file():
            p.error(f"--table-only: no results at {out}")
        result = json.loads(out.read_text())
        print_tables(result)
        return result
    parts = {x.strip().upper() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - {"A", "B", "C"}:
        p.error(f"--parts must name A, B and/or C, got {args.parts!r}")
    defenses = [d for d in args.defenses.split(",") if d]
    if "none" not in defenses:
        p.error("--defenses must include 'none' (the reference)")
    try:
        cells = [int(c) for c in args.cells.split(",") if c]
        minibatches = [int(m) for m in args.minibatches.split(",") if m]
    except ValueError:
        p.error("--cells and --minibatches must be comma-separated whole numbers")
    if args.repeats < 1 or args.iterations < 1 or args.iterations_c < 1 or args.threads < 1:
        p.error("--repeats, --iterations, --iterations-c and --threads must be >= 1")
    if args.quick:
        args.repeats, args.iterations, args.iterations_c = 1, 2, 1
        minibatches = minibatches[:1]

    import torch

    from agents.threads import machine_cpus
    from agents.train import ensure_ray
    from marl_fgmf.io import atomic_write_text
    from marl_fgmf.scorpio import ScorpioConfig

    result: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu",
                    "cpus": machine_cpus(), "scorpio_defaults": ScorpioConfig().to_dict(),
                    "targets": TARGETS, "settings": vars(args)}
    default_threads = torch.get_num_threads()
    ensure_ray()
    if "A" in parts:
        torch.set_num_threads(args.threads)
        update_rows = []
        for cell in cells:
            for mb in minibatches:
                row = _learner_update_times(mb, cell, args.repeats)
                update_rows.append(row)
                print(f"  A {row['obs']} minibatch {mb}: ratio {row['ratio']['mean']:.2f}",
                      flush=True)
        means = [r["ratio"]["mean"] for r in update_rows]
        result.update(update=update_rows, update_ratio_max=max(means),
                      update_ratio_min=min(means),
                      update_ratio_spread=(max(means) - min(means)) / statistics.mean(means))
        torch.set_num_threads(default_threads)
    with tempfile.TemporaryDirectory() as tmp:
        if "B" in parts:
            result["training"] = _whole_training(defenses, args.iterations, args.repeats,
                                                 Path(tmp))
            ratio = {r["defense"]: r["ratio"]["mean"] for r in result["training"]["rows"]}
            if "fgmf" in ratio and "adv" in ratio:
                result["verdict"] = {"fgmf": ratio["fgmf"], "adv": ratio["adv"],
                                     "fgmf_le_1_5": ratio["fgmf"] <= TARGETS["training_ratio_fgmf"],
                                     "fgmf_le_adv": ratio["fgmf"] <= ratio["adv"]}
        if "C" in parts:
            result["two_jobs"] = _two_jobs(args.iterations_c, Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print_tables(result)
    print(f"\nwritten {out}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
