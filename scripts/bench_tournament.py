"""Tournament wall time with 1 and 2 Ray workers on the same matches (the speed-up of Ray tasks).

How to run::

    python scripts/bench_tournament.py                       # 2 defenders x 4 attackers x 2 eps
    python scripts/bench_tournament.py --workers 1,2 --repeats 3 --episodes 3
    python scripts/bench_tournament.py --quick               # a short check that it works

What it does: trains two tiny beacon defenders (undefended and FGMF, one RLlib iteration each;
not timed; reused from ``--out`` when present, or pass ``--defenders DIR DIR``), starts ONE
local Ray with ``--num-cpus`` CPUs, warms a worker per CPU up (imports and policy loading
are not what is measured), then for each worker count plays the same tournament
(defenders x fgsm, pgd, square, random x eps 4/255, 8/255 x 1 seed, plus clean; no audit) into a
fresh directory and times :func:`marl_fgmf.tournament.run_tournament`. Prints a table and
writes JSON (``--json``, default ``OUT/bench_tournament.json``).

Results to expect: matches are independent, CPU-bound and single-threaded, so on an otherwise
idle 2-core machine 2 workers should finish in about half the time (target speed-up >= 1.7x);
on a machine shared with other jobs the speed-up drops with the load (the JSON records the load
average before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ATTACKERS = [{"name": "fgsm", "attack": "fgsm"},
             {"name": "pgd", "attack": "pgd", "settings": {"steps": 10}},
             {"name": "square", "attack": "square", "settings": {"n_queries": 100}},
             {"name": "random", "attack": "random"}]
TINY_TRAIN = dict(train_batch_size=200, minibatch_size=100, num_epochs=1,
                  num_envs_per_env_runner=2, iterations=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench_tournament", help="working directory")
    p.add_argument("--defenders", nargs="*", default=None, metavar="DIR",
                   help="defender checkpoints (default: train two tiny ones into OUT)")
    p.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    p.add_argument("--episodes", type=int, default=3, help="episodes per match (3)")
    p.add_argument("--eps", default="4/255,8/255", help="budgets (4/255,8/255)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per worker count (1)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (2)")
    p.add_argument("--quick", action="store_true",
                   help="a short check: 1 episode, 2 attackers (fgsm, random), 1 eps")
    p.add_argument("--json", default=None, help="result file (default OUT/bench_tournament.json)")
    return p.parse_args(argv)


def ensure_defenders(out: Path, given: list[str] | None) -> dict[str, Path]:
    """The defenders' checkpoints: the given ones, or two tiny beacon runs trained once."""
    if given:
        return {f"d{i}_{Path(d).name}": Path(d).resolve() for i, d in enumerate(given)}
    from agents.checkpoint import latest_checkpoint
    from agents.train import TrainConfig, train
    runs = {}
    for defense in ("none", "fgmf"):
        run = out / "defenders" / defense
        if latest_checkpoint(run) is None:
            if run.exists():
                shutil.rmtree(run)
            print(f"training tiny defender {defense} (not timed) ...", flush=True)
            train(TrainConfig(defense=defense, **TINY_TRAIN), run, progress=False)
        runs[defense] = run
    return runs


def warm_up(defenders: dict[str, Path], n: int) -> float:
    """Start ``n`` workers concurrently and import/load everything a match needs in each."""
    import ray

    from marl_fgmf.tournament import _load_defender

    def load(paths: list[str]) -> int:
        import attacks  # noqa: F401
        for p in paths:
            _load_defender(p, None, ["agent_0", "agent_1"])
        time.sleep(1.0)  # keep this worker busy so the next warm-up lands on another one
        return os.getpid()

    t0 = time.perf_counter()
    remote = ray.remote(num_cpus=1)(load)
    pids = ray.get([remote.remote([str(p) for p in defenders.values()]) for _ in range(n)])
    print(f"warmed up {len(set(pids))} worker(s) in {time.perf_counter() - t0:.1f}s", flush=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    eps = [e.strip() for e in args.eps.split(",") if e.strip()]
    attackers = ATTACKERS
    episodes = args.episodes
    if args.quick:
        attackers, eps, episodes = [ATTACKERS[0], ATTACKERS[3]], eps[-1:], 1

    import ray

    from marl_fgmf.tournament import TournamentConfig, run_tournament

    tmp = tempfile.mkdtemp(prefix="rt")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=tmp)
    try:
        defenders = ensure_defenders(out, args.defenders)
        cfg = TournamentConfig.from_dict({
            "name": "bench", "defenders": [{"name": n, "checkpoint": str(p)}
                                           for n, p in defenders.items()],
            "attackers": attackers, "eps": eps, "seeds": [0], "episodes": episodes,
            "audit": False})
        cfg.check()
        n_matches = len(cfg.matches())
        warm = warm_up(defenders, max(workers))
        load_before = os.getloadavg()
        runs = []
        for rep in range(args.repeats):
            for w in workers:
                target = out / f"run_w{w}_r{rep}"
                if target.exists():
                    shutil.rmtree(target)
                t0 = time.perf_counter()
                run_tournament(cfg, target, workers=w, progress=False, log=lambda m: None)
                wall = time.perf_counter() - t0
                match_s = sum(json.loads(line)["wall_s"]
                              for line in (target / "matches.jsonl").read_text().splitlines())
                runs.append({"workers": w, "repeat": rep, "wall_s": wall,
                             "sum_match_s": match_s, "matches": n_matches})
                print(f"workers={w} repeat={rep}: {wall:.1f}s for {n_matches} matches "
                      f"(sum of match times {match_s:.1f}s)", flush=True)
        load_after = os.getloadavg()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    base = statistics.median(r["wall_s"] for r in runs if r["workers"] == workers[0])
    rows = []
    for w in workers:
        wall = statistics.median(r["wall_s"] for r in runs if r["workers"] == w)
        rows.append({"workers": w, "wall_s": wall, "matches_per_s": n_matches / wall,
                     "speedup": base / wall})
    print()
    print(f"{'workers':>7}  {'wall s':>8}  {'matches/s':>9}  {'speed-up':>8}")
    for r in rows:
        print(f"{r['workers']:>7}  {r['wall_s']:>8.1f}  {r['matches_per_s']:>9.3f}  "
              f"{r['speedup']:>7.2f}x")
    print(f"({n_matches} matches: {len(defenders)} defenders x {len(attackers)} attackers x "
          f"{len(eps)} eps + clean, {episodes} episodes each; load average before "
          f"{load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPUs; "
          f"target speed-up >= 1.7x with 2 workers on an idle 2-core machine)")
    result = {"rows": rows, "runs": runs, "matches": n_matches, "episodes": episodes,
              "attackers": [a["name"] for a in attackers], "eps": eps,
              "defenders": {k: str(v) for k, v in defenders.items()},
              "num_cpus": args.num_cpus, "cpu_count": os.cpu_count(), "warm_up_s": warm,
              "load_before": load_before, "load_after": load_after,
              "python": sys.version.split()[0]}
    path = Path(args.json) if args.json else out / "bench_tournament.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
