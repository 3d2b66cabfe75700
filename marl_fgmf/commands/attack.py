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
every step by the attack (:func:`attacks.evaluate`). The clean run is played once on the same
seeds; each attack at each budget of ``--eps`` is then one attacked run. Several attacks may be
named at once (``--attack random,fgsm,pgd``): each takes the settings (``--steps``,
``--settings``, ...) it accepts. Prints a table (team return clean vs attacked with 95%
confidence intervals, success rate per agent-step, mean Linf / L2 norm of the perturbation)
and the per-agent returns; ``--out FILE.json`` writes everything atomically.

Bad input (a budget outside (0, 1], steps < 1, an unknown attack, objective or setting, a
missing checkpoint, a policy whose observation or action shape does not fit the environment)
exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from marl_fgmf.tournament import eps_label  # "8/255", or the number itself ("1e-30")

from marl_fgmf.commands import (UsageError, add_checkpoint_arguments, add_cluster_arguments,
                                check_device, check_output, cluster_settings, parse_eps_list,
                                parse_settings, positive_int, run_failure)

NORMS = ("linf", "l2")
# for --help; the values are checked against attacks.OBJECTIVES
OBJECTIVES = ("ce", "kl", "value", "targeted", "margin", "dlr")
LEARNED = "learned"
DEFAULT_EPS = 8 / 255


def _eps_list(text: str) -> list[float]:
    values = parse_eps_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected one or more budgets such as 4/255 or "
                                         f"2/255,4/255,8/255, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--attack", required=True, metavar="NAME[,NAME...]",
                   help="random | fgsm | pgd | apgd | square | bpda | eot | ensemble | learned, "
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
                   help="further attack settings, e.g. restarts=2 or n_queries=1000 "
                        "(or a JSON object)")
    p.add_argument("--episodes", type=positive_int, default=10, help="episodes per run (10)")
    p.add_argument("--seed", type=int, default=0, help="episode i resets with seed + i (0)")
    p.add_argument("--policy-id", default=None,
                   help="one policy module for every agent (default: the checkpoint's mapping)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    add_cluster_arguments(p, default="run here, without Ray; with --address or --runtime-env "
                                     "every run is a Ray task on the cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------- validation
def _attack_keys(text: str) -> list[str]:
    """The registry keys of ``--attack NAME[,NAME...]`` (aliases resolved, duplicates dropped)."""
    from attacks import ALIASES, ATTACKS
    allowed = [*ATTACKS, LEARNED]
    keys: list[str] = []
    for raw in str(text).split(","):
        name = raw.strip().lower().replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in allowed:
            raise UsageError(f"unknown attack {raw.strip()!r}; allowed: {', '.join(allowed)}")
        if name not in keys:
            keys.append(name)
    return keys


def _accepted_settings(key: str) -> set[str] | None:
    """Setting names the attack ``key`` takes (None: it routes them itself)."""
    import inspect

    from attacks import ATTACKS, WRAPPERS
    if key in WRAPPERS or key == "ensemble":
        return None
    if key == LEARNED:
        return set()
    sig = inspect.signature(ATTACKS[key].__init__)
    return {n for n, p in sig.parameters.items() if n not in ("self", "policy")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _route_settings(keys: list[str], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per attack, the settings it takes. One attack gets them all (an unknown one is its own
    one-line error); with several, each gets those it accepts, and a setting no listed attack
    takes is an error."""
    if keys == [LEARNED]:
        if settings:
            flags = [f"--{k}" if k in ("steps", "norm", "objective") else f"--settings {k}"
                     for k in settings]
            raise UsageError(f"{', '.join(flags)} cannot apply to a learned adversary "
                             f"(its policy is trained)")
        return {LEARNED: {}}
    if len(keys) == 1:
        return {keys[0]: dict(settings)}
    routed: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for key in keys:
        accepted = _accepted_settings(key)
        mine = {k: v for k, v in settings.items() if accepted is None or k in accepted}
        routed[key] = mine
        used |= set(mine)
    unused = sorted(set(settings) - used)
    if unused:
        raise UsageError(f"setting(s) {', '.join(unused)} apply to none of the attacks "
                         f"{', '.join(keys)}")
    return routed


def _check_arguments(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Everything that can be checked before the checkpoint loads: the attack keys and the
    settings of each."""
    from attacks import OBJECTIVES as objectives
    keys = _attack_keys(args.attack)
    if args.objective is not None and args.objective not in objectives:
        raise UsageError(f"unknown objective {args.objective!r}; allowed: {', '.join(objectives)}")
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
    settings = _route_settings(keys, _attack_settings(args))
    if not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if args.out is not None:
        check_output(args.out, "--out", "file")
    args.device = check_device(args.device)
    return keys, settings


def _load_policies(args: argparse.Namespace, agents: list[str]) -> tuple[dict, dict[str, str]]:
    """``({agent: module}, {agent: module id})``."""
    from agents.checkpoint import agent_policy_map, load_agent_policies
    policies = load_agent_policies(args.checkpoint, agents, args.policy_id, args.device)
    mapping = ({a: args.policy_id for a in agents} if args.policy_id is not None
               else agent_policy_map(args.checkpoint, agents))
    return policies, mapping


def _attack_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(args.settings)
    for key in ("steps", "norm", "objective"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    return settings


def _build_attack(key: str, settings: dict[str, Any], args: argparse.Namespace, policy: Any,
                  eps: float | None) -> Any:
    if key == LEARNED:
        try:
            from agents.adversary import load_adversary
        except ImportError as exc:
            raise UsageError(f"learned adversaries are not available in this installation "
                             f"(agents.adversary.load_adversary: {exc})") from None
        return load_adversary(args.adversary, policy=policy, eps=eps, device=args.device)
    from attacks import make_attack
    return make_attack(key, policy, eps=eps, **settings)


# --------------------------------------------------------------------------- output
def _pm(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.2f}" + ("" if stats["ci95"] != stats["ci95"] else f" ± {stats['ci95']:.2f}")  # no CI from one episode


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (team return and attack statistics per attack and
    budget), then the per-agent returns."""
    clean = result["clean"]
    rows = [("attack", "eps", "team return clean", "team return attacked", "change", "success",
             "mean Linf", "mean L2")]
    for r in result["results"]:
        change = r["team_return"]["mean"] - clean["team_return"]["mean"]
        rows.append((r["name"], r["eps_label"], _pm(clean["team_return"]), _pm(r["team_return"]),
                     f"{change:+.2f}", f"{100 * r['success_rate']:.1f}%",
                     f"{r['mean_linf']:.4f}", f"{r['mean_l2']:.4f}"))
    agents = list(clean["agent_return"])
    per_agent = [("run", *agents), ("clean", *(_pm(clean["agent_return"][a]) for a in agents))]
    for r in result["results"]:
        per_agent.append((f"{r['name']} {r['eps_label']}",
                          *(_pm(r["agent_return"][a]) for a in agents)))
    return _markdown(rows) + "\n\nper-agent return (mean ± 95% CI):\n\n" + _markdown(per_agent)


def _markdown(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]

    def line(row: tuple) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def _stats(run: dict[str, Any]) -> dict[str, Any]:
    keep = ("team_return", "agent_return", "team_returns", "success_rate", "mean_linf",
            "mean_l2", "agent_steps", "time_s")
    return {k: run[k] for k in keep}


# --------------------------------------------------------------------------- command
def _evaluate_on_cluster(policies: Any, runs: list[tuple[str, Any]], spec: dict[str, Any],
                         address: str | None, runtime_env: dict[str, Any] | None,
                         progress: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The clean run and every attacked run as Ray tasks (weights shipped by the driver)."""
    from agents.ray_session import ensure_ray
    from marl_fgmf.workflows.remote import evaluate_job, run_remote
    started = ensure_ray(address, runtime_env=runtime_env, log=print)
    try:
        jobs = [("clean", spec, (policies,))]
        jobs += [(f"{name} {eps_label(float(attack.eps))}", spec, (policies, attack))
                 for name, attack in runs]
        try:
            values = run_remote(evaluate_job, jobs, log=print, progress=progress)
        except RuntimeError as exc:
            raise run_failure(exc) from exc
    finally:
        if started:
            import ray
            ray.shutdown()
    return values["clean"], [values[title] for title, _, _ in jobs[1:]]


def run(args: argparse.Namespace) -> int:
    keys, settings = _check_arguments(args)
    address, runtime_env = cluster_settings(args)
    on_ray = address is not None or runtime_env is not None
    import torch
    from agents.checkpoint import check_policy_fits_env, resolve_module_root, run_env
    from attacks import evaluate
    from envs import list_envs, make_env
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    resolve_module_root(args.checkpoint)  # CheckpointError (one line) if missing or partial
    env_name, env_kwargs = run_env(args.checkpoint, args.env, args.env_kwargs)
    if env_name not in list_envs():
        raise UsageError(f"unknown env {env_name!r}; allowed: {', '.join(list_envs())}")
    env = make_env(env_name, **env_kwargs)
    t0 = time.perf_counter()
    try:
        agents = list(env.possible_agents)
        policies, mapping = _load_policies(args, agents)
        for agent in agents:
            check_policy_fits_env(policies[agent], env, agent, mapping[agent])
        first = policies[agents[0]]
        runs = []  # (name, attack): every attack is built before any episode is played
        for key in keys:
            budgets = list(args.eps) if args.eps else [None if key == LEARNED else DEFAULT_EPS]
            runs += [(key, _build_attack(key, settings[key], args, first, eps))
                     for eps in budgets]

        progress = not args.quiet
        if on_ray:
            spec = {"env": env_name, "env_kwargs": env_kwargs, "episodes": args.episodes,
                    "seed": args.seed}
            clean, remote = _evaluate_on_cluster(policies, runs, spec, address, runtime_env,
                                                 progress)
        else:
            clean = evaluate(policies, env, None, episodes=args.episodes, seed=args.seed,
                             progress=progress)
            remote = None
        results = []
        for i, (name, attack) in enumerate(runs):
            run_result = remote[i] if remote is not None else evaluate(
                policies, env, attack, episodes=args.episodes, seed=args.seed,
                progress=progress, compare_clean=False)
            eps = float(attack.eps)
            results.append({"name": name, "eps": eps, "eps_label": eps_label(eps),
                            "attack": run_result["attack"], **_stats(run_result)})
    finally:
        env.close()

    argv = sys.argv[1:]
    result = {
        "command": "marl-fgmf " + " ".join(argv) if argv[:1] == ["attack"] else None,
        "checkpoint": str(args.checkpoint), "env": env_name, "env_kwargs": env_kwargs,
        "policies": mapping, "attacks": keys,
        "adversary": str(args.adversary) if LEARNED in keys else None,
        "settings": settings, "episodes": args.episodes, "seed": args.seed,
        "clean": _stats(clean), "results": results,
        "wall_time_s": time.perf_counter() - t0,
    }
    print(f"{', '.join(keys)} on {args.checkpoint} ({env_name}, {len(agents)} agents, "
          f"{args.episodes} episodes, seed {args.seed}); team return = sum of the agents' "
          f"returns, mean ± 95% CI; success = agent-steps whose greedy action the attack changed")
    print()
    print(format_table(result))
    if args.out:
        from marl_fgmf.io import atomic_write_text, to_jsonable
        out = check_output(args.out, "--out", "file")  # again: the run may have changed
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(to_jsonable(result), indent=2))
        print(f"\nwrote {out}")
    return 0
