"""``marl-fgmf attack``: evaluate a trained policy under an observation attack.

Examples::

    marl-fgmf attack --checkpoint runs/ppo --attack pgd --eps 4/255 --steps 20 --episodes 10
    marl-fgmf attack --checkpoint runs/ppo --attack apgd --eps 2/255,4/255,8/255 \\
        --objective dlr --out results/apgd.json
    marl-fgmf attack --checkpoint runs/ppo --attack square --settings n_queries=1000
    marl-fgmf attack --checkpoint runs/ppo --attack ensemble --steps 20 \\
        --settings '{"attacks": ["pgd", "square"], "n_queries": 500}'
    marl-fgmf attack --checkpoint runs/ppo --attack learned --adversary runs/adv-perturb
    marl-fgmf attack --checkpoint runs/ppo --attack random,fgsm,pgd,apgd --steps 20 \\
        --eps 2/255,4/255,8/255 --out results/attack_table.json

Every agent plays its own policy module (``shared``, or one per agent as in the checkpoint;
``--policy-id`` makes one module play for all agents) greedily on observations perturbed at
every step by the attack. The clean run is played once on the same seeds; each attack at each
budget of ``--eps`` is then one attacked run (:func:`marl_fgmf.workflows.evaluate.
evaluate_attacks`). Several attacks may be named at once (``--attack random,fgsm,pgd``): each
takes the settings (``--steps``, ``--settings``, ...) it accepts. Prints a table (team return clean vs attacked with 95%
confidence intervals, success rate per agent-step, mean Linf / L2 norm of the perturbation)
and the per-agent returns; ``--out FILE.json`` writes everything atomically.

Bad input (a budget outside (0, 1], steps < 1, an unknown attack, objective or setting, a
missing checkpoint, a policy whose observation or action shape does not fit the environment)
exits 2 with one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


from agents.threads import apply_thread_budget, cpu_budget
from marl_fgmf.commands import (UsageError, add_checkpoint_arguments, add_cluster_arguments,
                                check_device, check_output, cluster_settings, parse_eps_list,
                                parse_settings, positive_int)
from marl_fgmf.workflows.evaluate import (LEARNED, attack_keys, check_objective,
                                          evaluate_attacks, format_table, route_settings,
                                          write_result)

NORMS = ("linf", "l2")
SQUARE_QUERIES = 1000
"""Square's query budget per observation when ``--settings`` names none."""
# for --help; the values are checked against attacks.OBJECTIVES
OBJECTIVES = ("ce", "kl", "value", "targeted", "margin", "dlr", "dlr_targeted")


def _eps_list(text: str) -> list[float]:
    values = parse_eps_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected one or more budgets such as 4/255 or "
                                         f"2/255,4/255,8/255, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--attack", required=True, metavar="NAME[,NAME...]",
                   help="random | fgsm | pgd | apgd | apgdt | fab | square | bpda | eot | "
                        "ensemble | autoattack | learned, "
                        "or several, comma-separated (each setting goes to the attacks that "
                        "take it)")
    p.add_argument("--adversary", default=None, metavar="DIR",
                   help="with --attack learned: the adversary's run directory "
                        "(marl-fgmf train-adversary --out)")
    p.add_argument("--eps", type=_eps_list, default=None, metavar="EPS[,EPS...]",
                   help="budget(s) in [0, 1] observation units, e.g. 8/255 or 2/255,4/255,8/255 "
                        "(default 8/255; learned: the budget it was trained at)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="iterations of the gradient attacks (default: the attack's own)")
    p.add_argument("--norm", choices=NORMS, default=None, help="distance (default: linf)")
    p.add_argument("--objective", default=None, metavar="NAME",
                   help=f"attacker loss: {' | '.join(OBJECTIVES)} (default: the attack's own)")
    p.add_argument("--settings", type=parse_settings, default={}, metavar="K=V,...",
                   help="further attack settings, e.g. restarts=2 or n_queries=500 (or a JSON "
                        f"object); square's n_queries defaults to {SQUARE_QUERIES} here (the "
                        "class default is AutoAttack's 5000: minutes per observation on a "
                        "real env)")
    p.add_argument("--episodes", type=positive_int, default=10, help="episodes per run (10)")
    p.add_argument("--seed", type=int, default=0, help="episode i resets with seed + i (0)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop each episode after this many steps (default: the env's own "
                        "length; e.g. 100 for a quick look at pong's 900-step episodes)")
    p.add_argument("--policy-id", default=None,
                   help="one policy module for every agent (default: the checkpoint's mapping)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    add_cluster_arguments(p, default="run here, without Ray; with --address or --runtime-env "
                                     "every run is a Ray task on the cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------- validation
def _attack_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(args.settings)
    for key in ("steps", "norm", "objective"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    return settings


def _check_arguments(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Everything that can be checked before the checkpoint loads: the attack keys and the
    settings of each."""
    keys = attack_keys(args.attack)
    check_objective(args.objective)
    for key, flag in (("eps", "--eps"), ("steps", "--steps"), ("norm", "--norm"),
                      ("objective", "--objective"), ("seed", "--seed")):
        if key in args.settings:
            raise UsageError(f"set {key} with {flag}, not in --settings")
    if LEARNED in keys:
        if not args.adversary:
            raise UsageError("--attack learned needs --adversary DIR (a train-adversary run)")
        if not Path(args.adversary).exists():
            raise UsageError(f"adversary run not found: {args.adversary}")
    elif args.adversary:
        raise UsageError("--adversary is only used with --attack learned")
    settings = route_settings(keys, _attack_settings(args))
    if "square" in settings and "n_queries" not in settings["square"]:
        settings["square"]["n_queries"] = SQUARE_QUERIES
    if not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if args.out is not None:
        check_output(args.out, "--out", "file")
    args.device = check_device(args.device)
    return keys, settings


# --------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    keys, settings = _check_arguments(args)
    address, runtime_env = cluster_settings(args)
    apply_thread_budget(min(2, cpu_budget()))  # small batches: 2 threads at most
    argv = sys.argv[1:]
    result = evaluate_attacks(
        args.checkpoint, keys, settings, env=args.env, env_kwargs=args.env_kwargs, eps=args.eps,
        episodes=args.episodes, seed=args.seed, max_steps=args.max_steps, policy_id=args.policy_id, device=args.device,
        adversary=args.adversary, address=address, runtime_env=runtime_env,
        progress=not args.quiet,
        command="marl-fgmf " + " ".join(argv) if argv[:1] == ["attack"] else None)
    print(f"{', '.join(keys)} on {args.checkpoint} ({result['env']}, {len(result['policies'])} "
          f"agents, {args.episodes} episodes, seed {args.seed}); team return = sum of the "
          f"agents' returns, mean ± 95% CI; success = agent-steps whose greedy action the "
          f"attack changed")
    print()
    print(format_table(result))
    if args.out:
        out = write_result(args.out, result)
        print(f"\nwrote {out}")
    return 0
