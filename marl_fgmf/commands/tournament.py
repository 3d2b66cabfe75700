"""``marl-fgmf tournament``: every defender against every attacker, with the audit.

Examples::

    marl-fgmf tournament --config tournament.yaml --out results/t1
    marl-fgmf tournament --config tournament.yaml --out results/t1 --workers 2   # resume
    marl-fgmf tournament --config t.json --out results/t1 --address 10.0.0.1:6379
    marl-fgmf tournament --config t.json --out results/t1 --address 10.0.0.1:6379 \
        --runtime-env runtime_env.yaml          # nodes without the package

The configuration format is documented in :mod:`marl_fgmf.tournament`. Rerunning the same
command resumes: finished matches (``DIR/matches.jsonl``) are reused while everything that
decides them (weights, env, episodes, attack settings) is unchanged, else replayed. Exit
codes: 0 done, 1 some matches failed (the others and the leaderboard are written), 2 bad
input (every problem of the configuration on its own line), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from marl_fgmf.commands import (UsageError, add_cluster_arguments, check_output,
                                cluster_settings, positive_int, print_failures)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE",
                   help="tournament configuration (YAML or JSON)")
    p.add_argument("--out", required=True, metavar="DIR", help="tournament directory")
    add_cluster_arguments(p, default="the config's address, else a local Ray")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="matches in flight at once (default: the config's max_concurrency, "
                        "else the cluster's CPUs / num_cpus_per_match)")
    p.add_argument("--no-audit", action="store_true", help="skip the gradient-masking audit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _errors(lines: list[str]) -> int:
    for line in lines:
        print(f"marl-fgmf tournament: error: {line}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    # lazy: the tournament imports torch, attacks and agents; `marl-fgmf --help` must not
    from marl_fgmf.tournament import (ConfigError, TournamentConfig, TournamentError,
                                      format_leaderboard, run_tournament)
    try:
        cfg = TournamentConfig.from_file(args.config)
        cfg.check(args.out)  # every problem, before Ray starts
    except ConfigError as exc:
        return _errors(exc.errors)
    if args.address is None and cfg.address:
        args.address = cfg.address
    try:
        check_output(args.out, "--out", "dir")
        address, runtime_env = cluster_settings(args)  # before anything is written
    except UsageError as exc:
        return _errors([str(exc)])
    matches = len(cfg.matches())
    print(f"tournament {cfg.name}: {len(cfg.defenders)} defenders x {len(cfg.attackers)} "
          f"attackers x {len(cfg.eps)} eps x {len(cfg.seeds)} seed(s) + clean = {matches} "
          f"matches (+ BPDA/EOT for defenders with an input filter, unless listed), "
          f"{cfg.episodes} episodes each; results in {args.out}", flush=True)
    try:
        result = run_tournament(cfg, args.out, address=address, workers=args.workers,
                                progress=not args.quiet, audit=False if args.no_audit else None,
                                runtime_env=runtime_env)
    except ConfigError as exc:
        return _errors(exc.errors)
    except TournamentError as exc:
        return print_failures("tournament", exc.errors,
                              f"the finished matches and the leaderboard are in {args.out}")
    print()
    print(format_leaderboard(result.leaderboard))
    flagged = [r["defender"] for r in result.leaderboard["defenders"] if r["flagged"]]
    if flagged:
        print(f"FLAGGED by the gradient-masking audit: {', '.join(flagged)}")
    print(f"\n{result.reused} matches reused, {result.replayed} replayed (settings changed), "
          f"{result.new} new, {result.seconds:.0f}s; report: {result.files['report.md']}")
    return 0
