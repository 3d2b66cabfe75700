"""GPU check: every defence trains with the RLlib learner on a CUDA device, and what it costs.

How to run (on a machine with an NVIDIA GPU and a CUDA build of torch; a few minutes)::

    python scripts/gpu_check.py                    # writes results/gpu_check.json
    python scripts/gpu_check.py --cells 3,12       # also 84x84 frames

On a machine without CUDA it prints one line saying so and exits 0: nothing in the toolkit
depends on a GPU (the device always comes from torch).

What it does, per defence (none, adv, scorpio, sgam, fgmf, fgmf+adv; defaults, beacon):
1. one full training iteration (``Algorithm.train``: sampling on the CPU, the update on the
   GPU) with ``num_gpus_per_learner=1``, checking that the learner's parameters live on the
   GPU, that the iteration ends episodes and that every switched-on FGMF term was logged
   (R > 0 for SCOR-PIO, a distillation loss for SGAM);
2. the learner update times of ``scripts/profile_learner.py`` on the same episodes, the GPU
   synchronized around each part: the update ratio to plain PPO per frame size, and where
   the time goes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFENSES = ("none", "adv", "scorpio", "sgam", "fgmf", "fgmf+adv")
TERMS = {"scorpio": "fgmf_scorpio_R", "sgam": "fgmf_sgam_distill_loss", "adv": "fgmf_adv_kl"}


def one_iteration(defense: str, cell: int, num_gpus: float = 1.0) -> dict:
    """One ``Algorithm.train`` iteration with the learner on the GPU (``num_gpus`` 0: on the
    CPU, as the tests run it); what it logged and whether everything was there."""
    from agents.defenses import COMPONENTS
    from agents.train import TrainConfig, build_algo_config
    from agents.train_log import as_count

    cfg = TrainConfig(defense=defense, env_kwargs={"cell": cell}, num_gpus_per_learner=num_gpus)
    algo = build_algo_config(cfg).build_algo()
    try:
        t0 = time.perf_counter()
        result = algo.train()
        wall = time.perf_counter() - t0
        learner = algo.learner_group._learner
        device = str(next(learner.module["shared"].parameters()).device)
        logged = result.get("learners", {}).get("shared", {})
        terms = {}
        for comp in COMPONENTS[defense]:
            key = TERMS[comp]
            found = [k for k in logged if k == key or (comp == "adv" and k.startswith("fgmf_")
                                                       and "kl" in k)]
            terms[comp] = float(logged[found[0]]) if found else None
    finally:
        algo.stop()
    episodes = as_count(result.get("env_runners", {}).get("num_episodes"))
    ok = device.startswith("cuda" if num_gpus > 0 else "cpu") and episodes > 0 and all(
        v is not None and v == v for v in terms.values()) and (
        "scorpio" not in terms or (terms["scorpio"] or 0) > 0)
    return {"defense": defense, "iteration_s": wall, "learner_device": device,
            "episodes": episodes, "terms": terms, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cells", default="3,6", help="beacon pixels per cell (21x21, 42x42)")
    p.add_argument("--archs", default="cnn", help="encoders for the update timings")
    p.add_argument("--repeats", type=int, default=3, help="timed updates per defence")
    p.add_argument("--out", default="results/gpu_check.json", help="JSON output")
    args = p.parse_args(argv)
    try:
        cells = [int(c) for c in args.cells.split(",") if c]
    except ValueError:
        p.error(f"--cells must be comma-separated whole numbers, got {args.cells!r}")

    import torch
    if not torch.cuda.is_available():
        print(f"gpu_check: skipped, no CUDA device here (torch {torch.__version__}, "
              f"cuda build: {torch.version.cuda or 'no'}); run it on a GPU machine")
        return 0

    from agents.train import ensure_ray
    from marl_fgmf.io import atomic_write_text
    from profile_learner import print_table, profile_config

    ensure_ray()
    checks = [one_iteration(d, cells[0]) for d in DEFENSES]
    for c in checks:
        print(f"  {c['defense']:9s} one iteration {c['iteration_s']:.1f} s on "
              f"{c['learner_device']}, {c['episodes']} episodes, terms {c['terms']}: "
              f"{'ok' if c['ok'] else 'FAILED'}", flush=True)
    configs = [profile_config(arch, cell, list(DEFENSES), args.repeats, 1000, 250, 4,
                              num_gpus_per_learner=1.0)
               for arch in args.archs.split(",") for cell in cells]
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "checks": checks, "configs": configs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"\nLearner on {result['device']}: update time per defence (ms per SGD step by part)")
    print_table(configs)
    print(f"\nwritten {out}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
