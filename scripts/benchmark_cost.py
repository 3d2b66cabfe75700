"""The benchmark's training-cost table (claim 3) from a benchmark folder's training records,
before its tournament has finished.

How to run::

    python scripts/benchmark_cost.py runs/bench-full --suite full --out results/cost.json

What it computes. ``marl-fgmf benchmark`` states claim 3 only in its final report, after every
match; the trainings, which decide it, finish hours earlier. This script reads the finished
equal-steps training records ``DIR/runs/<run>.json`` of the suite's runs and applies the
benchmark's own :func:`marl_fgmf.benchmark.analysis.cost` (CPU time of uninterrupted jobs,
else wall time under a recorded sane load, else "untrusted" with the reason) and
:func:`marl_fgmf.benchmark.analysis.cost_verdict` (at most 1.5x, decided on at least 3 seeds):
per env and defence, the mean training time and its ratio to the undefended runs' with a
bootstrap 95% CI over seeds. It prints a table and writes JSON; it trains and changes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marl_fgmf.benchmark.analysis import CLAIMS, cost, cost_verdict, timing_record
from marl_fgmf.benchmark.suites import SUITES, get_suite

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="the benchmark folder (--out of marl-fgmf benchmark)")
    p.add_argument("--suite", default="full", choices=list(SUITES),
                   help="the suite the folder holds (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    if not (args.dir / "runs").is_dir():
        print(f"error: {args.dir} holds no runs/ folder; give a benchmark's --out folder",
              file=sys.stderr)
        return 2
    if args.out is not None and args.out.exists():
        print(f"error: --out {args.out} exists; give a new path (nothing is overwritten)",
              file=sys.stderr)
        return 2
    suite = get_suite(args.suite)
    runs = []
    for r in suite.runs():
        path = args.dir / "runs" / f"{r['name']}.json"
        if path.is_file():
            runs.append({**r, **timing_record(json.loads(path.read_text()))})
    table = cost(runs, suite)
    threshold = CLAIMS["cost"][1]
    print(f"{'env':<11} {'defence':<9} {'runs':>4} {'mean (s)':>9}  ratio to none (95% CI)")
    for env, entry in table.items():
        for d in suite.defences:
            if d not in entry:
                continue
            iv = entry[d].get("ratio_to_none") or {}
            ci = (f"{iv['estimate']:.2f} ({iv['low']:.2f} to {iv['high']:.2f})" if iv
                  else "-")
            n = len(entry[d]["seconds"])
            print(f"{env:<11} {d:<9} {n:>4} {entry[d]['mean_s']:>9.0f}  {ci}")
        decided = cost_verdict(entry)
        if decided:
            entry["claim"] = decided[0]
            print(f"{env:<11} timing {entry['timing']}; claim 3 (fgmf / none <= {threshold}): "
                  f"{entry['claim']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dir": str(args.dir), "suite": args.suite,
                                        "cost": table}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
