"""Tournament wall time with 1 and 2 Ray workers, or on 1 and 2 Ray nodes, on the same matches.

How to run::

    python scripts/bench_tournament.py                       # 2 defenders x 4 attackers x 2 eps
    python scripts/bench_tournament.py --workers 1,2 --repeats 3 --episodes 3
    python scripts/bench_tournament.py --nodes 1,2           # a local multi-node cluster
    python scripts/bench_tournament.py --quick               # a short check that it works

``--nodes 1,2``: for each node count N, starts a real local Ray cluster of N ``ray start``
nodes with one CPU each (:class:`agents.local_cluster.LocalCluster`; every node but the head
in a private mount namespace that cannot see OUT, so the defenders' weights must travel
through the object store), connects the driver to it, warms one worker per node up, and
times the same tournament with N matches in flight. Reports matches per minute and the
speed-up over one node (target >= 1.7x with 2 nodes).

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

``--threads budget,all`` plays the same tournaments a second time with every match's torch on
all cores (``MARL_FGMF_CPUS=all``) instead of its one CPU: with 2 workers, two jobs at once on
one machine, what the thread budget saves (issue 14).
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
    p.add_argument("--nodes", default=None, metavar="N,N",
                   help="compare Ray node counts on a local multi-node cluster instead "
                        "(e.g. 1,2; one CPU per node)")
    p.add_argument("--episodes", type=int, default=3, help="episodes per match (3)")
    p.add_argument("--eps", default="4/255,8/255", help="budgets (4/255,8/255)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per worker count (1)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (2)")
    p.add_argument("--threads", default="budget",
                   help="thread arms to compare (budget,all): 'budget' = each match's torch "
                        "uses its num_cpus (the toolkit's rule), 'all' = every core "
                        "(MARL_FGMF_CPUS=all, torch's own default); with --workers 2 this is "
                        "two jobs at once on one machine (budget)")
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


def warm_up(n: int) -> float:
    """Run ``n`` concurrent tasks that import everything a match needs (one per CPU), so
    worker start-up and imports are not what is measured."""
    import importlib

    import ray

    from agents.ray_session import get_result, remote_call
    t0 = time.perf_counter()
    refs = [remote_call(importlib.import_module, "marl_fgmf.tournament") for _ in range(n)]
    nodes = {get_result(r)["node"]["node_id"] for r in refs}
    ray.get([remote_call(time.sleep, 1.0) for _ in range(n)])
    print(f"warmed up {n} worker(s) on {len(nodes)} node(s) in {time.perf_counter() - t0:.1f}s",
          flush=True)
    return time.perf_counter() - t0


def timed_run(cfg, target: Path, workers: int, address: str | None = None) -> dict:
    """One timed tournament into a fresh ``target``."""
    from marl_fgmf.tournament import run_tournament
    if target.exists():
        shutil.rmtree(target)
    t0 = time.perf_counter()
    run_tournament(cfg, target, workers=workers, address=address, progress=False,
                   log=lambda m: None)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (target / "matches.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "sum_match_s": sum(r["wall_s"] for r in records),
            "nodes_used": len({r.get("node_id") for r in records})}


def bench_nodes(cfg, out: Path, node_counts: list[int], repeats: int, token: str
                ) -> list[dict]:
    """Time the tournament on local clusters of each node count (one CPU per node)."""
    import ray

    from agents.local_cluster import LocalCluster, can_hide_paths
    from agents.ray_session import ensure_ray
    hide = [out] if can_hide_paths() else []
    if not hide:
        print("note: cannot start nodes in a private mount namespace here (needs root and "
              "unshare); the nodes share the driver's files", flush=True)
    runs = []
    for n in node_counts:
        with LocalCluster(nodes=n, cpus=1, hide=hide, token=token) as cluster:
            os.environ["RAY_AUTH_MODE"] = "token"
            ensure_ray(cluster.address, log=lambda m: print(m, flush=True))
            try:
                warm_up(n)
                for rep in range(repeats):
                    run = timed_run(cfg, out / f"run_n{n}_r{rep}", n, cluster.address)
                    runs.append({"nodes": n, "repeat": rep, **run,
                                 "matches": len(cfg.matches())})
                    print(f"nodes={n} repeat={rep}: {run['wall_s']:.1f}s for "
                          f"{len(cfg.matches())} matches on {run['nodes_used']} node(s)",
                          flush=True)
            finally:
                ray.shutdown()
    return runs


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

    nodes = [int(n) for n in args.nodes.split(",") if n.strip()] if args.nodes else None
    unit = "nodes" if nodes else "workers"
    counts = nodes or workers
    tmp = tempfile.mkdtemp(prefix="rt")
    token = None
    if nodes is not None:
        # a driver process keeps the first auth token it used: the same one for the local
        # Ray that trains the defenders and for every cluster measured after it
        import secrets
        token = secrets.token_hex(32)
        (Path(tmp) / "auth_token").write_text(token)
        os.environ.update({"RAY_AUTH_MODE": "token",  # before Ray is imported
                           "RAY_AUTH_TOKEN_PATH": str(Path(tmp) / "auth_token")})

    import ray

    from marl_fgmf.tournament import TournamentConfig

    arms = [a.strip() for a in args.threads.split(",") if a.strip()]
    if not arms or set(arms) - {"budget", "all"} or (nodes is not None and arms != ["budget"]):
        print(f"bench_tournament: error: --threads takes budget and/or all (not with --nodes), "
              f"got {args.threads!r}", file=sys.stderr)
        return 2

    def start_ray(arm: str) -> None:
        env = {"env_vars": {"MARL_FGMF_CPUS": "all"}} if arm == "all" else None
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _temp_dir=tmp, runtime_env=env)

    start_ray(arms[0])
    warm = 0.0
    try:
        defenders = ensure_defenders(out, args.defenders)
        cfg = TournamentConfig.from_dict({
            "name": "bench", "defenders": [{"name": n, "checkpoint": str(p)}
                                           for n, p in defenders.items()],
            "attackers": attackers, "eps": eps, "seeds": [0], "episodes": episodes,
            "audit": False})
        cfg.check()
        n_matches = len(cfg.matches())
        load_before = os.getloadavg()
        runs = []
        if nodes is None:
            for i, arm in enumerate(arms):
                if i:
                    ray.shutdown()
                    start_ray(arm)
                warm = warm_up(max(workers))
                for rep in range(args.repeats):
                    for w in workers:
                        run = timed_run(cfg, out / f"run_w{w}_r{rep}", w)
                        runs.append({"workers": w, "threads": arm, "repeat": rep, **run,
                                     "matches": n_matches})
                        print(f"threads={arm} workers={w} repeat={rep}: {run['wall_s']:.1f}s "
                              f"for {n_matches} matches (sum of match times "
                              f"{run['sum_match_s']:.1f}s)", flush=True)
    finally:
        ray.shutdown()
    try:
        if nodes is not None:
            runs = bench_nodes(cfg, out, nodes, args.repeats, token)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    rows = []
    for arm in (arms if nodes is None else ["budget"]):
        mine = [r for r in runs if r.get("threads", "budget") == arm]
        base = statistics.median(r["wall_s"] for r in mine if r[unit] == counts[0])
        for c in counts:
            wall = statistics.median(r["wall_s"] for r in mine if r[unit] == c)
            rows.append({"threads": arm, unit: c, "wall_s": wall,
                         "matches_per_s": n_matches / wall,
                         "matches_per_min": 60 * n_matches / wall, "speedup": base / wall})
    print()
    print(f"{'threads':>8}  {unit:>7}  {'wall s':>8}  {'matches/min':>11}  {'speed-up':>8}")
    for r in rows:
        print(f"{r['threads']:>8}  {r[unit]:>7}  {r['wall_s']:>8.1f}  "
              f"{r['matches_per_min']:>11.1f}  {r['speedup']:>7.2f}x")
    print(f"({n_matches} matches: {len(defenders)} defenders x {len(attackers)} attackers x "
          f"{len(eps)} eps + clean, {episodes} episodes each; load average before "
          f"{load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPUs; "
          f"target speed-up >= 1.7x with 2 {unit} on an idle 2-core machine)")
    result = {"mode": unit, "rows": rows, "runs": runs, "matches": n_matches, "episodes": episodes,
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
