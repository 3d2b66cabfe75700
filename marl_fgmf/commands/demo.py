"""``marl-fgmf demo``: train, attack, audit and explain on beacon, end to end, in one command.

Examples::

    marl-fgmf demo --out results/demo                 # ~15 minutes on 2 CPU cores
    marl-fgmf demo --out /tmp/demo --budget tiny      # a smoke run (a couple of minutes)

Trains an undefended and an FGMF-defended team, plays a tournament between them and a set of
attacks (BPDA and EOT added through SGAM's input filter) with the gradient-masking audit,
explains one episode of the defended team and writes ``DIR/report.md``; the work is
:func:`marl_fgmf.workflows.demo.run_demo` (what each step writes is described there). Reruns
reuse finished runs and matches and resume interrupted ones. A failed step stops the demo with
its cause (exit 1); nothing is deleted or falls back.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from marl_fgmf.commands import check_output, cluster_settings
from marl_fgmf.workflows.demo import BUDGETS, run_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="demo directory")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="small",
                   help="small: the real demo (~15 min on 2 cores); tiny: a smoke run")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (steps still print)")


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    out = Path(os.path.abspath(args.out))  # RLlib's checkpoint loader needs absolute paths
    check_output(out, "--out", "dir")
    address, _ = cluster_settings(args)  # an unreachable cluster: one line, nothing written
    argv = sys.argv[1:]
    command = "marl-fgmf " + " ".join(argv) if argv[:1] == ["demo"] else None
    result = run_demo(out, args.budget, address=address, progress=not args.quiet,
                      log=_say, command=command)
    print(f"\ndemo finished in {result['seconds']:.0f}s: {result['report']}")
    flagged = [r["defender"] for r in result["board"]["defenders"] if r["flagged"]]
    if flagged:
        print(f"FLAGGED by the gradient-masking audit: {', '.join(flagged)}")
    return 1 if result["failed"] else 0


__all__ = ["add_arguments", "run"]
