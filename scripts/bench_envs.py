"""Benchmark: the real PettingZoo envs, their raw speed, PPO's training speed with the defaults,
and what a fixed wall-clock training budget learns, against a random policy.

How to run::

    python scripts/bench_envs.py                         # 3 envs x 15 min (about an hour)
    python scripts/bench_envs.py --envs pistonball --budget-s 120 --out /tmp/bench_envs

Results to expect (2 CPU cores): the README's "Real environments" table. Targets (issue 9):
training env steps/s at least 60% of the env's raw rate with the default env runners; the
greedy return after 15 minutes of training clearly above a random policy's (95% CIs apart) on
pistonball and cooperative_pong.

Per env, in one process, one env after the other:

1. **raw**: one env, uniform random actions, ``--raw-s`` seconds: env steps/s, the env's own
   limit in one process (resets included).
2. **training**: ``agents.train.train(TrainConfig(env=NAME, seed=...))``, every other setting
   at its default (the env's declared sampling, ``TrainConfig.resolved``), stopped after the
   iteration that crosses ``--budget-s`` of wall time. Training env steps/s is the env steps
   over the summed iteration times (sampling + learner update, the steady state); the rate
   with Ray's start and the algorithm's build included is reported too. The run folder keeps
   the learning curve (``learning_curve.png``) and ``metrics.csv``.
3. **return**: the final checkpoint's greedy policy (``attacks.evaluate``, clean) and a
   uniform random policy over the same ``--eval-episodes`` episodes (reset seeds 50,000 +
   i), team return (sum over agents) mean with a 95% t confidence interval; "clearly above"
   means the two intervals do not overlap. The training return of the sampling (stochastic)
   policy in the first and the last iteration is shown beside them: a greedy policy can do
   much worse than the policy it was trained as (pursuit's pursuers get stuck).

Writes ``OUT/bench_envs.json`` (all figures, the resolved settings; the rows of envs not
benchmarked in this call are kept) and prints a Markdown table. An existing ``OUT/runs/NAME`` is never deleted: pass a new ``--out`` (or
``--overwrite`` to replace this script's own earlier runs).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

REAL_ENVS = ("pistonball", "cooperative_pong", "pursuit")
EVAL_SEED = 50_000


def raw_rate(name: str, seconds: float, seed: int) -> dict:
    """Env steps/s of one env under uniform random actions (resets included)."""
    from envs import make_env

    env = make_env(name)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    steps = episodes = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        actions = {a: int(rng.integers(env.action_space(a).n)) for a in env.agents}
        _, _, term, trunc, _ = env.step(actions)
        steps += 1
        if not env.agents or all(term[a] or trunc[a] for a in term):
            episodes += 1
            env.reset(seed=seed + episodes)
    wall = time.perf_counter() - t0
    env.close()
    return {"env_steps": steps, "episodes": episodes, "seconds": wall,
            "env_steps_per_s": steps / wall}


def random_returns(name: str, episodes: int, seed: int) -> list[float]:
    """Team returns (sum over agents) of uniform random actions, episode i reset with
    ``seed + i`` (the seeds ``attacks.evaluate`` uses for the greedy policy)."""
    from envs import make_env

    env = make_env(name)
    returns = []
    for i in range(episodes):
        rng = np.random.default_rng(seed + i)
        env.reset(seed=seed + i)
        total = 0.0
        while env.agents:
            actions = {a: int(rng.integers(env.action_space(a).n)) for a in env.agents}
            _, rewards, _, _, _ = env.step(actions)
            total += float(sum(rewards.values()))
        returns.append(total)
    env.close()
    return returns


def bench_env(name: str, args: argparse.Namespace, out: Path) -> dict:
    from agents.checkpoint import load_agent_policies
    from agents.train import TrainConfig, train
    from attacks.evaluate import evaluate
    from envs import make_env
    from marl_fgmf.stats import summarize

    print(f"\n== {name}: raw speed ({args.raw_s:.0f} s of random actions)", flush=True)
    raw = raw_rate(name, args.raw_s, args.seed)
    print(f"   {raw['env_steps_per_s']:.1f} env steps/s", flush=True)

    run_dir = out / "runs" / name
    if run_dir.exists():
        if not args.overwrite:
            raise SystemExit(f"bench_envs: {run_dir} exists; pass a new --out, or --overwrite "
                             f"to replace this benchmark's earlier run")
        shutil.rmtree(run_dir)
    cfg = TrainConfig(env=name, iterations=1_000_000, seed=args.seed).resolved()
    print(f"== {name}: training {args.budget_s:.0f} s with the defaults (batch "
          f"{cfg.train_batch_size}, {cfg.num_env_runners} env runners x "
          f"{cfg.num_envs_per_env_runner} env, {cfg.policies} policies, net "
          f"{cfg.net or 'default'})", flush=True)
    t0 = time.time()
    result = train(cfg, run_dir, progress=not args.quiet, time_budget_s=args.budget_s)
    wall = time.time() - t0
    records = result["records"]
    last = records[-1]
    iter_time = sum(r["iter_time_s"] for r in records)
    ended = [r for r in records if math.isfinite(r["agent_return_mean"])]
    train_rate = last["env_steps"] / iter_time

    print(f"== {name}: greedy vs random, {args.eval_episodes} episodes each", flush=True)
    env = make_env(name)
    policy = load_agent_policies(run_dir, list(env.possible_agents), device="cpu",
                                 single_if_shared=True)
    greedy = evaluate(policy, env, None, episodes=args.eval_episodes, seed=EVAL_SEED,
                      progress=False)["team_return"]
    env.close()
    rand = summarize(random_returns(name, args.eval_episodes, EVAL_SEED))
    n_agents = len(make_env(name).possible_agents)
    return {
        "env": name, "agents": n_agents,
        "raw": raw,
        "training": {
            "budget_s": args.budget_s, "wall_s": wall, "iterations": last["iteration"],
            "env_steps": last["env_steps"], "agent_steps": last["agent_steps"],
            "iteration_time_s": iter_time,
            "env_steps_per_s": train_rate,
            "env_steps_per_s_with_startup": last["env_steps"] / wall,
            "ratio_to_raw": train_rate / raw["env_steps_per_s"],
            "iterations_ending_episodes": len(ended),
            "episodes_per_iteration_min": min((r["num_episodes"] for r in records), default=0),
            "last_team_return_sampling": last["agent_return_mean"] * n_agents,
            "first_team_return_sampling": (ended[0]["agent_return_mean"] * n_agents
                                           if ended else float("nan")),
            "settings": cfg.to_json(),
            "run_dir": str(run_dir),
        },
        "greedy_team_return": greedy,
        "random_team_return": rand,
        "clearly_above_random": bool(greedy["low"] > rand["high"]),
    }


def table(rows: list[dict]) -> str:
    head = ("| env | raw env steps/s | training env steps/s (ratio) | env steps in budget "
            "| iterations ending episodes | training return, first -> last iteration "
            "| random team return | greedy team return | greedy above random (CIs apart) |"
            "\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        t, g, q = r["training"], r["greedy_team_return"], r["random_team_return"]
        lines.append(
            f"| {r['env']} | {r['raw']['env_steps_per_s']:.0f} "
            f"| {t['env_steps_per_s']:.0f} ({100 * t['ratio_to_raw']:.0f}%) "
            f"| {t['env_steps']:,} in {t['wall_s'] / 60:.1f} min "
            f"| {t['iterations_ending_episodes']}/{t['iterations']} "
            f"| {t['first_team_return_sampling']:.1f} -> {t['last_team_return_sampling']:.1f} "
            f"| {q['mean']:.1f} ± {q['ci95']:.1f} | {g['mean']:.1f} ± {g['ci95']:.1f} "
            f"| {'yes' if r['clearly_above_random'] else 'no'} |")
    return "\n".join(lines)


def print_table(path: str) -> None:
    """The Markdown table of an existing ``bench_envs.json`` (``--table-only``)."""
    print(table(json.loads(Path(path).read_text())))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--envs", default=",".join(REAL_ENVS), help="comma-separated env names")
    p.add_argument("--budget-s", type=float, default=900.0, help="training wall time per env")
    p.add_argument("--raw-s", type=float, default=20.0, help="seconds of random stepping")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per policy")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--out", default="results/bench_envs", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this script's earlier runs in --out/runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of --out's bench_envs.json and exit")
    args = p.parse_args(argv)
    if args.table_only:
        print_table(str(Path(args.out) / "bench_envs.json"))
        return []

    from envs import list_envs
    from marl_fgmf.io import atomic_write_text

    names = [n.strip() for n in args.envs.split(",") if n.strip()]
    unknown = [n for n in names if n not in list_envs()]
    if unknown or not names:
        p.error(f"unknown env(s) {unknown or args.envs!r}; allowed: {', '.join(list_envs())}")
    for flag, value in (("--budget-s", args.budget_s), ("--raw-s", args.raw_s),
                        ("--eval-episodes", args.eval_episodes)):
        if not value > 0:
            p.error(f"{flag} must be > 0, got {value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "bench_envs.json"
    # rows of envs not rerun now are kept (one table for envs benchmarked one at a time)
    rows = json.loads(summary.read_text()) if summary.is_file() else []
    kept = [r["env"] for r in rows if r["env"] not in names]
    if kept:
        print(f"keeping the earlier rows of {', '.join(kept)} from {summary}")
    for name in names:
        row = bench_env(name, args, out)
        rows = [r for r in rows if r["env"] != name] + [row]
        atomic_write_text(summary, json.dumps(rows, indent=2, default=str))
    print("\n" + table(rows))
    print(f"\nwritten {out / 'bench_envs.json'}; learning curves in {out / 'runs'}/*/")
    return rows


if __name__ == "__main__":
    main()
