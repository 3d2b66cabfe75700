"""``marl-fgmf train-adversary``: learned adversary agents (ATLA / PA-AD) against a frozen victim.

Examples::

    marl-fgmf train-adversary --victim runs/ppo --eps 8/255 --mode perturb --iterations 20 \\
        --out runs/adv-perturb
    marl-fgmf train-adversary --victim runs/ppo --mode pa-ad --team --out runs/adv-paad
    marl-fgmf train-adversary --out runs/adv-perturb --iterations 40 --resume

Ends with one summary line: the victims' mean per-agent return without and with the trained
adversary (``attacks.evaluate``, ``--eval-episodes`` episodes, same seeds), also written to
``OUT/eval.json``. See :mod:`agents.adversary` and :mod:`attacks.learned`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from marl_fgmf.commands import (UsageError, add_cluster_arguments, check_output,
                                cluster_settings, non_negative_int, parse_eps, parse_settings,
                                positive_int, run_training)
from marl_fgmf.io import atomic_write_text, to_jsonable


MODES = ("perturb", "pa-ad")  # attacks.learned.MODES, repeated so --help needs no torch import


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--victim", default=None, metavar="DIR",
                   help="the victim's run directory (marl-fgmf train --out) or checkpoint")
    p.add_argument("--env", default=None,
                   help="victim environment (default: the one in the victim's run.json)")
    p.add_argument("--env-kwargs", type=parse_settings, default=None, metavar="K=V,...",
                   help="environment settings (default: the victim's)")
    p.add_argument("--eps", type=parse_eps, default=8 / 255,
                   help="Linf budget in [0, 1] units, e.g. 8/255 (default)")
    p.add_argument("--mode", choices=MODES, default="perturb",
                   help="perturb: the action is a low-resolution perturbation (ATLA); "
                        "pa-ad: the action is a target action realized by PGD (PA-AD)")
    p.add_argument("--team", action="store_true",
                   help="one adversary for the whole team (default: one per victim)")
    p.add_argument("--grid", type=positive_int, default=7,
                   help="perturb: side of the low-resolution perturbation grid (default 7)")
    p.add_argument("--upsample", choices=("nearest", "bilinear"), default="nearest")
    p.add_argument("--pa-ad-steps", type=positive_int, default=3,
                   help="pa-ad: PGD steps realizing the target action (default 3)")
    p.add_argument("--victim-sampling", choices=("greedy", "sample"), default="greedy",
                   help="victims play argmax (default) or sample their policy")
    p.add_argument("--policies", choices=("shared", "per-agent"), default="shared",
                   help="one adversary module for all adversary agents (default) or one each")
    p.add_argument("--arch", default="cnn", help="adversary network: cnn | vit | hybrid")
    p.add_argument("--net", type=parse_settings, default={}, metavar="K=V,...",
                   help="adversary encoder settings, e.g. hidden=128")
    p.add_argument("--iterations", type=positive_int, default=20)
    p.add_argument("--train-batch-size", type=positive_int, default=2000,
                   help="agent steps per iteration")
    p.add_argument("--minibatch-size", type=positive_int, default=250)
    p.add_argument("--num-epochs", type=positive_int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--entropy-coeff", type=float, default=0.01)
    p.add_argument("--num-env-runners", type=int, default=0)
    p.add_argument("--num-envs-per-env-runner", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=positive_int, default=1)
    p.add_argument("--eval-episodes", type=non_negative_int, default=10,
                   help="episodes of the final clean-vs-attacked evaluation (0 skips it)")
    p.add_argument("--out", required=True, help="the adversary's run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_cluster_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    # lazy: agents.adversary imports Ray (3 s); train-adversary --help stays light
    from agents.adversary import AdversaryConfig, evaluate_adversary, resolve_victim, train_adversary
    from agents.checkpoint import CheckpointError, resolve_module_root  # lazy: torch, as above

    settings = dict(
        env_kwargs=args.env_kwargs, grid=args.grid, upsample=args.upsample,
        pa_ad_steps=args.pa_ad_steps, victim_greedy=args.victim_sampling == "greedy",
        policies=args.policies, arch=args.arch, net=args.net,
        train_batch_size=args.train_batch_size, minibatch_size=args.minibatch_size,
        num_epochs=args.num_epochs, lr=args.lr, entropy_coeff=args.entropy_coeff,
        num_env_runners=args.num_env_runners,
        num_envs_per_env_runner=args.num_envs_per_env_runner, seed=args.seed,
        checkpoint_every=args.checkpoint_every)
    if args.env_kwargs is None:
        settings.pop("env_kwargs")
    check_output(args.out, "--out", "dir", allow_run=True)
    if not args.resume:
        if not args.victim:
            raise UsageError("--victim DIR is required (the victim's run directory)")
        if not Path(args.victim).exists():
            raise CheckpointError(f"victim checkpoint not found: {args.victim}")
        resolve_module_root(args.victim)  # a missing/partial victim fails before Ray starts
        cfg = AdversaryConfig(victim=args.victim, env=args.env or "", eps=args.eps,
                              mode=args.mode, team=args.team, iterations=args.iterations,
                              **settings)
        resolve_victim(cfg)
        cfg.validate()
    address, runtime_env = cluster_settings(args)
    result = run_training(
        lambda: train_adversary(args.victim, args.out, env=args.env, eps=args.eps,
                                mode=args.mode, team=args.team, iterations=args.iterations,
                                resume=args.resume, address=address, progress=not args.quiet,
                                runtime_env=runtime_env, log=print, **settings),
        args.out, args.iterations)
    last = result["last"]
    cfg = result["config"]
    head = (f"done: iteration {last['iteration']}, {last['env_steps']} env steps, "
            f"{last['wall_time_s']:.0f}s; {cfg['mode']}{' team' if cfg['team'] else ''} "
            f"adversary at eps {cfg['eps']:.4f}")
    if args.eval_episodes == 0:
        print(f"{head}; victim return under attack while training "
              f"{last['victim_return_mean']:.2f}; checkpoints in {args.out}/checkpoints")
        return 0
    ev = evaluate_adversary(args.out, episodes=args.eval_episodes, seed=args.seed + 10_000,
                            progress=not args.quiet)
    summary = {"episodes": args.eval_episodes, "eps": cfg["eps"], "mode": cfg["mode"],
               "team": cfg["team"], "clean_agent_return": ev["clean_agent_return_mean"],
               "attacked_agent_return": ev["agent_return_mean"],
               "clean_team_return": ev["clean"]["team_return"],
               "attacked_team_return": ev["team_return"], "success_rate": ev["success_rate"],
               "mean_linf": ev["mean_linf"]}
    atomic_write_text(Path(args.out) / "eval.json", json.dumps(to_jsonable(summary), indent=2))
    print(f"{head}; victim per-agent return clean {ev['clean_agent_return_mean']:.2f} -> "
          f"{ev['agent_return_mean']:.2f} under the adversary ({args.eval_episodes} episodes, "
          f"attack success {100 * ev['success_rate']:.0f}% of steps); "
          f"checkpoints in {args.out}/checkpoints")
    return 0
