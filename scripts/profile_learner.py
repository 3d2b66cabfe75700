"""Where the FGMF learner's time goes: one RLlib learner update per defence, per component.

How to run (about 15 minutes on 2 idle CPU cores with the defaults)::

    python scripts/profile_learner.py                              # results/profile_learner.json
    python scripts/profile_learner.py --archs cnn --cells 3 --repeats 1   # a quick look

For each encoder (``--archs``) and beacon frame size (``--cells``: 3, 6, 12 pixels a cell give
21x21, 42x42, 84x84 frames), the real FGMF PPO learners of ``--defenses`` (RLlib's new API
stack, defaults except the train batch) are built in this process and fed the SAME sampled
episodes; their updates alternate, ``--repeats`` times after a warm-up, and the fastest
repeat is kept (the least disturbed one). One update = GAE plus ``num_epochs`` passes of SGD
over the batch (``--train-batch`` / 250-row minibatches, 4 epochs: 16 SGD steps at 1000).

The learner times its own parts (``FGMFPPOTorchLearner.fgmf_timings``; the GPU is
synchronized around each part when the learner is on one):

* ``scorpio subspace``: IG masks and directions of the newly drawn rows (once per row and
  iteration); ``scorpio R``: the rest of SCOR-PIO's forward (g, Hv, R, the row draw);
* ``sgam distill``: Grad-CAM++ targets of new rows and the head's distillation loss;
* ``adv``: SA-PPO's PGD and KL; ``logging``: the per-step metric log;
* ``backward``: the loss's backward (PPO and every term's graph); ``optimizer``: Adam + clip;
* ``forward & rest``: everything else (batching, GAE's value pass, the policy forward with
  SGAM, the PPO loss): the update's wall time minus the parts above.

The table states each defence's update time, its ratio to plain PPO, and the per-SGD-step
milliseconds of every part; the JSON holds every repeat.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("forward & rest", "backward", "optimizer", "scorpio subspace", "scorpio R",
         "sgam distill", "adv", "logging")


def _parts(total: float, timings: dict[str, float]) -> dict[str, float]:
    """The learner's own timings as the PARTS of one update (seconds)."""
    t = dict(timings)
    sub = t.get("scorpio_subspace", 0.0)
    parts = {"backward": t.get("backward", 0.0), "optimizer": t.get("optimizer", 0.0),
             "scorpio subspace": sub, "scorpio R": t.get("scorpio_penalty", 0.0) - sub,
             "sgam distill": t.get("sgam_distill", 0.0), "adv": t.get("adv", 0.0),
             "logging": t.get("logging", 0.0)}
    parts["forward & rest"] = total - sum(parts.values())
    return parts


def profile_config(arch: str, cell: int, defenses: list[str], repeats: int,
                   train_batch: int, minibatch: int, num_epochs: int,
                   num_gpus_per_learner: float = 0.0) -> dict:
    """Update times and parts of every defence on one (arch, frame size); the learner on a
    GPU with ``num_gpus_per_learner`` (``scripts/gpu_check.py``)."""
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from agents.train import TrainConfig, build_algo_config

    algos = {}
    for defense in defenses:
        cfg = TrainConfig(defense=defense, arch=arch, env_kwargs={"cell": cell}, seed=0,
                          train_batch_size=train_batch, minibatch_size=minibatch,
                          num_epochs=num_epochs, num_gpus_per_learner=num_gpus_per_learner)
        algos[defense] = build_algo_config(cfg).build_algo()
    try:
        runner = algos[defenses[0]].env_runner_group.local_env_runner
        episodes = runner.sample(num_timesteps=train_batch, random_actions=False)
        devices = {d: str(next(a.learner_group._learner.module[m].parameters()).device)
                   for d, a in algos.items() for m in a.learner_group._learner.module.keys()}
        runs: dict[str, list[dict]] = {d: [] for d in defenses}
        for rep in range(repeats + 1):  # the first round warms up
            for defense, algo in algos.items():
                learner = algo.learner_group._learner
                learner.fgmf_timings = {}
                eps = copy.deepcopy(episodes)
                t0 = time.perf_counter()
                learner.update(episodes=eps, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0},
                               num_epochs=num_epochs, minibatch_size=minibatch,
                               shuffle_batch_per_epoch=True)
                total = time.perf_counter() - t0
                if rep:
                    runs[defense].append({"total_s": total,
                                          "parts_s": _parts(total, learner.fgmf_timings)})
                learner.fgmf_timings = None
    finally:
        for algo in algos.values():
            algo.stop()
    steps = num_epochs * -(-train_batch // minibatch)
    best = {d: min(r, key=lambda x: x["total_s"]) for d, r in runs.items()}
    base = best[defenses[0]]["total_s"]
    rows = [{"arch": arch, "obs": f"{7 * cell}x{7 * cell}x3", "defense": d,
             "learner_device": devices[d],
             "update_s": b["total_s"], "ratio": b["total_s"] / base, "sgd_steps": steps,
             "per_step_ms": {k: 1e3 * v / steps for k, v in b["parts_s"].items()},
             "repeats": runs[d]} for d, b in best.items()]
    return {"arch": arch, "cell": cell, "rows": rows}


def print_table(configs: list[dict]) -> None:
    cols = " | ".join(PARTS)
    print(f"| encoder | obs | defense | update (s) | ratio to none | {cols} (ms per SGD step) |")
    print("|" + " --- |" * (5 + len(PARTS)))
    for c in configs:
        for r in c["rows"]:
            parts = " | ".join(f"{r['per_step_ms'][p]:.1f}" for p in PARTS)
            print(f"| {r['arch']} | {r['obs']} | {r['defense']} | {r['update_s']:.2f} | "
                  f"{r['ratio']:.2f} | {parts} |")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archs", default="cnn,vit,hybrid", help="encoders to profile")
    p.add_argument("--cells", default="3,6,12",
                   help="beacon pixels per cell: 3, 6, 12 give 21x21, 42x42, 84x84 frames")
    p.add_argument("--defenses", default="none,adv,scorpio,sgam,fgmf",
                   help="defences, plain PPO ('none') first: ratios are to it")
    p.add_argument("--repeats", type=int, default=2, help="timed updates per defence")
    p.add_argument("--train-batch", type=int, default=1000, help="agent steps per update")
    p.add_argument("--minibatch", type=int, default=250, help="SGD minibatch (the default)")
    p.add_argument("--num-epochs", type=int, default=4, help="SGD epochs (the default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: ratios free of thread scheduling noise)")
    p.add_argument("--max-pixels", type=int, default=84 * 84,
                   help="skip token encoders (vit, hybrid) above this many pixels a frame "
                        "(attention over thousands of tokens: minutes per update on a CPU)")
    p.add_argument("--out", default="results/profile_learner.json", help="JSON output")
    p.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)
    if args.table_only:
        if not Path(args.out).is_file():
            p.error(f"--table-only: no results at {args.out}")
        result = json.loads(Path(args.out).read_text())
        print_table(result["configs"])
        return result
    archs = [a for a in args.archs.split(",") if a]
    defenses = [d for d in args.defenses.split(",") if d]
    try:
        cells = [int(c) for c in args.cells.split(",") if c]
    except ValueError:
        p.error(f"--cells must be comma-separated whole numbers, got {args.cells!r}")
    if not defenses or defenses[0] != "none":
        p.error(f"--defenses must start with 'none' (the reference), got {args.defenses!r}")
    bad = [a for a in archs if a not in ("cnn", "vit", "hybrid")]
    if bad:
        p.error(f"unknown arch(s) {bad}; allowed: cnn, vit, hybrid")
    if args.repeats < 1 or args.threads < 1 or any(c < 1 for c in cells):
        p.error("--repeats, --threads and --cells must be >= 1")

    import torch

    from agents.train import ensure_ray
    from marl_fgmf.io import atomic_write_text

    torch.set_num_threads(args.threads)
    ensure_ray()
    configs, skipped = [], []
    for arch in archs:
        for cell in cells:
            if arch != "cnn" and (7 * cell) ** 2 > args.max_pixels:
                skipped.append(f"{arch} {7 * cell}x{7 * cell}")
                continue
            t0 = time.perf_counter()
            configs.append(profile_config(arch, cell, defenses, args.repeats, args.train_batch,
                                          args.minibatch, args.num_epochs))
            print(f"  {arch} {7 * cell}x{7 * cell}: {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"device": "cuda" if torch.cuda.is_available() else "cpu",
              "torch_threads": torch.get_num_threads(), "settings": vars(args),
              "configs": configs, "skipped": skipped}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    print()
    print_table(configs)
    if skipped:
        print(f"skipped (over --max-pixels): {', '.join(skipped)}")
    print(f"\nwritten {out}")
    return result


if __name__ == "__main__":
    main()
