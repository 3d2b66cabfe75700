"""Robust return of the default FGMF policy over training seeds, and before/after a change.

How to run (about 10 minutes a seed on 2 idle CPU cores: 80 iterations, then the attacks)::

    python scripts/bench_fgmf_robustness.py --runs runs/robust --out results/fgmf_robustness.json
    # the same on another commit (a git worktree), then:
    python scripts/bench_fgmf_robustness.py --compare BEFORE.json AFTER.json

For every ``--seeds`` it trains ``marl-fgmf train --env beacon --defense fgmf --iterations 80
--seed S`` into ``RUNS/fgmf_sS`` (a finished run is reused, an interrupted one resumed), then
``marl-fgmf attack --attack pgd,bpda --steps 50 --eps 4/255,8/255 --episodes E --seed 0``
(PGD-50 through SGAM and the adaptive BPDA-50 around it; a seed's attack JSON is reused when
newer than its checkpoint). Both run as the CLI a user runs, so the checkout on ``PYTHONPATH``
(or installed) is the code measured.

Reported per attack and budget: each seed's mean team return, and over all episodes of all
seeds the mean with its 95% CI; the robust return is the lower of PGD and BPDA. ``--compare``
prints after - before with the 95% CI of the difference (``sqrt(ci_a^2 + ci_b^2)``) and says
"not lower" when the difference's CI reaches 0 or above (the acceptance of issue 14).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cli() -> list[str]:
    return [sys.executable, "-m", "marl_fgmf.cli"]


def _finished(run: Path, iterations: int) -> bool:
    latest = run / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"iter_{iterations:05d}"


def train_seed(run: Path, seed: int, iterations: int, defense: str) -> None:
    if _finished(run, iterations):
        return
    cmd = _cli() + ["train", "--out", str(run), "--iterations", str(iterations), "--quiet"]
    if (run / "run.json").is_file():
        cmd += ["--resume"]
    else:
        cmd += ["--env", "beacon", "--defense", defense, "--seed", str(seed)]
    subprocess.run(cmd, check=True)


def attack_seed(run: Path, out: Path, episodes: int, steps: int, eps: str) -> dict:
    ckpt = run / "checkpoints" / "latest"
    if out.is_file() and out.stat().st_mtime > ckpt.stat().st_mtime:
        old = json.loads(out.read_text())
        wanted = (episodes, steps, sorted(e.strip() for e in eps.split(",")))
        if (old["episodes"], old["settings"].get("pgd", {}).get("steps"),
                sorted({r["eps_label"] for r in old["results"]})) == wanted:
            return old  # the same attacks on the same checkpoint
    # missing, older than the checkpoint or other settings: attack again
    subprocess.run(_cli() + ["attack", "--checkpoint", str(run), "--attack", "pgd,bpda",
                             "--steps", str(steps), "--eps", eps, "--episodes", str(episodes),
                             "--seed", "0", "--quiet", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Rows per (attack, eps) and the clean return: per-seed means, pooled mean and CI."""
    from marl_fgmf.stats import summarize

    rows: dict[str, dict] = {}

    def add(key: str, seed: int, returns: list[float]) -> None:
        row = rows.setdefault(key, {"per_seed": {}, "episodes": []})
        row["per_seed"][str(seed)] = sum(returns) / len(returns)
        row["episodes"].extend(returns)

    for seed, res in per_seed.items():
        add("clean", seed, res["clean"]["team_returns"])
        for r in res["results"]:
            add(f"{r['name']} {r['eps_label']}", seed, r["team_returns"])
    for row in rows.values():
        row["pooled"] = summarize(row["episodes"])
    eps_labels = sorted({k.split(" ", 1)[1] for k in rows if k != "clean"})
    robust = {}
    for label in eps_labels:
        keys = [k for k in rows if k.endswith(" " + label)]
        worst = min(keys, key=lambda k: rows[k]["pooled"]["mean"])
        robust[label] = {"attack": worst.split(" ")[0], **rows[worst]["pooled"]}
    return {"rows": rows, "robust": robust}


def compare(before: dict, after: dict) -> list[dict]:
    out = []
    for key, b in before["summary"]["rows"].items():
        a = after["summary"]["rows"].get(key)
        if a is None:
            continue
        pb, pa = b["pooled"], a["pooled"]
        diff = pa["mean"] - pb["mean"]
        half = math.sqrt(pa["ci95"] ** 2 + pb["ci95"] ** 2)
        out.append({"row": key, "before": pb["mean"], "before_ci": pb["ci95"],
                    "after": pa["mean"], "after_ci": pa["ci95"], "diff": diff, "diff_ci": half,
                    "not_lower": diff + half >= 0})
    return out


def print_summary(result: dict) -> None:
    seeds = result["seeds"]
    print(f"| row | {' | '.join(f'seed {s}' for s in seeds)} | all episodes (95% CI) |")
    print("|" + " --- |" * (len(seeds) + 2))
    for key, row in result["summary"]["rows"].items():
        per = " | ".join(f"{row['per_seed'][str(s)]:.2f}" for s in seeds)
        p = row["pooled"]
        print(f"| {key} | {per} | {p['mean']:.2f} ± {p['ci95']:.2f} |")
    for label, r in result["summary"]["robust"].items():
        print(f"robust return {label} (min over PGD, BPDA): {r['mean']:.2f} ± {r['ci95']:.2f} "
              f"({r['attack']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default="runs/robust", help="folder of the seeds' runs")
    p.add_argument("--seeds", default="0,1,2", help="training seeds")
    p.add_argument("--iterations", type=int, default=80, help="training iterations")
    p.add_argument("--defense", default="fgmf", help="the defence trained")
    p.add_argument("--episodes", type=int, default=5, help="attack episodes per seed")
    p.add_argument("--steps", type=int, default=50, help="PGD and BPDA iterations")
    p.add_argument("--eps", default="4/255,8/255", help="budgets")
    p.add_argument("--out", default="results/fgmf_robustness.json", help="JSON output")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                   help="print after - before from two JSON outputs of this script and exit")
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        rows = compare(before, after)
        print("| row | before | after | after - before (95% CI) | not lower |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['row']} | {r['before']:.2f} ± {r['before_ci']:.2f} | {r['after']:.2f} ± "
                  f"{r['after_ci']:.2f} | {r['diff']:+.2f} ± {r['diff_ci']:.2f} | "
                  f"{'yes' if r['not_lower'] else 'NO'} |")
        return 0
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated whole numbers, got {args.seeds!r}")
    if not seeds or args.iterations < 1 or args.episodes < 1 or args.steps < 1:
        p.error("--seeds, --iterations, --episodes and --steps must be non-empty and >= 1")
    from marl_fgmf.io import atomic_write_text

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in seeds:
        run = runs / f"{args.defense.replace('+', '_')}_s{seed}"
        train_seed(run, seed, args.iterations, args.defense)
        per_seed[seed] = attack_seed(run, runs / f"attack_s{seed}.json", args.episodes,
                                     args.steps, args.eps)
        print(f"seed {seed}: trained and attacked", flush=True)
    result = {"seeds": seeds, "settings": vars(args), "code": os.environ.get("PYTHONPATH", ""),
              "summary": aggregate(per_seed)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print_summary(result)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
