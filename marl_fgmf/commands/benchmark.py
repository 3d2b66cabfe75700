"""``marl-fgmf benchmark``: the multi-seed, multi-environment robustness benchmark.

Examples::

    marl-fgmf benchmark --suite smoke --out results/bench-smoke      # minutes: the pipeline
    marl-fgmf benchmark --suite small --out results/bench-small --workers 2
    marl-fgmf benchmark --suite small --out results/bench-small      # rerun: resumes
    marl-fgmf benchmark --list                                       # the suites

Every (env, defence, seed) is trained, attacked by the whole ensemble (with a PA-AD adversary
per defender), audited for gradient masking and explained; then the report
(``DIR/report.md``, ``DIR/benchmark.json``, figures) states each claim with its CI. See
:mod:`marl_fgmf.benchmark`. Exit codes: 0 done, 1 some jobs failed (rerun to retry them),
2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse

from marl_fgmf.commands import (UsageError, add_cluster_arguments, cluster_settings,
                                positive_int, print_failures)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marl_fgmf.benchmark.suites import SUITES  # lazy: only this subcommand's help needs it
    p.add_argument("--suite", choices=list(SUITES), default=None,
                   help="which grid to run: " + "; ".join(f"{n}: {s.description}"
                                                          for n, s in SUITES.items()))
    p.add_argument("--out", metavar="DIR", default=None,
                   help="benchmark folder (a rerun with the same suite resumes)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="jobs in flight at once (default: the cluster's CPUs / CPUs per job)")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_cluster_arguments(p)


def run(args: argparse.Namespace) -> int:
    from marl_fgmf.benchmark.suites import SUITES, get_suite  # lazy: imports torch (protocol)
    if args.list:
        for name, s in SUITES.items():
            print(f"{name}: {s.description}\n  {s.summary()}\n  time: {s.expected}")
        return 0
    if args.suite is None or args.out is None:
        raise UsageError("give --suite NAME and --out DIR (or --list); suites: "
                         + ", ".join(SUITES))
    suite = get_suite(args.suite)
    # lazy: the runner imports torch, Ray and RLlib; `marl-fgmf --help` must not
    from marl_fgmf.benchmark.runner import BenchmarkError, check_out, check_suite, run_benchmark
    try:
        check_suite(suite, check_out(suite, args.out))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    address, runtime_env = cluster_settings(args)  # before anything is written
    print(suite.summary(), flush=True)
    try:
        result = run_benchmark(suite, args.out, address=address, workers=args.workers,
                               progress=not args.quiet, runtime_env=runtime_env)
    except BenchmarkError as exc:
        return print_failures("benchmark", exc.errors, f"what finished is kept in {args.out}")
    from marl_fgmf.benchmark.report import claims_markdown  # lazy: imports matplotlib
    print()
    print(claims_markdown(result.summary))
    done = ", ".join(f"{k}: {v.get('new', 0)} new, {v.get('reused', 0)} reused"
                     + (f", {v['replayed']} replayed" if v.get("replayed") else "")
                     + f" ({v.get('seconds', 0):.0f}s)" for k, v in result.counts.items())
    print(f"\n{done}; {result.seconds:.0f}s; report: {result.files['report.md']}")
    return 0
