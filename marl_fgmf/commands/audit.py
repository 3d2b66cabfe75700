"""``marl-fgmf audit``: the gradient-masking audit of one trained policy (DESIGN.md section 4).

Examples::

    marl-fgmf audit --checkpoint runs/fgmf
    marl-fgmf audit --checkpoint runs/fgmf --env beacon --eps 8/255 --n-obs 64 --out audit.json

Plays a few clean episodes of the policy's environment, audits each policy module on the
frames it saw (:func:`marl_fgmf.audit.audit`) and prints every check with its numbers. The
exit code is 0 whether the policy is flagged or not (a finding, not an error); ``FLAGGED`` is
printed on its own line. Bad input exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from marl_fgmf.commands import (UsageError, add_checkpoint_arguments, add_cluster_arguments,
                                check_output, cluster_settings, parse_eps, positive_int,
                                run_failure)
from marl_fgmf.io import atomic_write_text
from marl_fgmf.workflows.remote import audit_job, run_remote


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,10,50, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--policy-id", default=None, help="audit only this module")
    p.add_argument("--eps", type=parse_eps, default=8 / 255, help="budget, e.g. 8/255 (default)")
    p.add_argument("--n-obs", type=positive_int, default=64, help="observations per module (64)")
    p.add_argument("--episodes", type=positive_int, default=4, help="episodes to collect them (4)")
    p.add_argument("--steps", type=_int_list, default=[1, 10, 50], help="PGD steps (1,10,50)")
    p.add_argument("--restarts", type=_int_list, default=[1, 5], help="PGD restarts (1,5)")
    p.add_argument("--large-eps", type=parse_eps, default=1.0, help="large budget of check 4 (1)")
    p.add_argument("--n-queries", type=positive_int, default=300, help="Square queries (300)")
    p.add_argument("--objective", choices=("margin", "ce"), default="margin",
                   help="loss of the gradient attacks (margin: Carlini-Wagner, default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="FILE", help="write the reports as JSON")
    add_cluster_arguments(p, default="run here, without Ray; with --address or --runtime-env "
                                     "the audit is a Ray task on the cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _audit_on_cluster(args: argparse.Namespace, settings: dict, address: str | None,
                      runtime_env: dict | None) -> dict:
    """The audit as one Ray task: the driver loads the policy and ships its weights."""
    from agents.ray_session import ensure_ray  # lazy: agents imports torch (1 s)
    from marl_fgmf.audit import AuditReport, load_audit_target  # lazy: torch, attacks (2 s)
    policy, env_name, env_kwargs = load_audit_target(args.checkpoint, args.env,
                                                     args.env_kwargs, args.policy_id)
    spec = {"env": env_name, "env_kwargs": env_kwargs, "policy_id": args.policy_id,
            "settings": settings}
    started = ensure_ray(address, runtime_env=runtime_env, log=print)
    try:
        values = run_remote(audit_job, [("audit", spec, (policy,))], log=print,
                            progress=not args.quiet)
    except RuntimeError as exc:
        raise run_failure(exc) from exc
    finally:
        if started:
            import ray  # lazy: Ray (0.4 s) stays out of CLI start-up
            ray.shutdown()
    return {name: AuditReport.from_dict(rep) for name, rep in values["audit"].items()}


def run(args: argparse.Namespace) -> int:
    # lazy: torch and the attacks (2 s) and the envs (numpy, PettingZoo) stay out of
    # `marl-fgmf audit --help`
    from agents.threads import apply_thread_budget, cpu_budget  # lazy: see above
    from envs import is_import_path, list_envs  # lazy: see above
    from marl_fgmf.audit import audit_checkpoint  # lazy: see above
    apply_thread_budget(min(2, cpu_budget()))  # small batches: 2 threads at most
    if args.env is not None and args.env not in list_envs() and not is_import_path(args.env):
        raise UsageError(f"unknown env {args.env!r}; allowed: {', '.join(list_envs())}")
    if not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if args.out is not None:
        check_output(args.out, "--out", "file")
    address, runtime_env = cluster_settings(args)
    settings = dict(eps=args.eps, n_obs=args.n_obs, episodes=args.episodes, seed=args.seed,
                    steps=tuple(args.steps), restarts=tuple(args.restarts),
                    large_eps=args.large_eps, n_queries=args.n_queries, objective=args.objective)
    if address is None and runtime_env is None:
        reports = audit_checkpoint(args.checkpoint, env=args.env, env_kwargs=args.env_kwargs,
                                   policy_id=args.policy_id, progress=not args.quiet,
                                   **settings)
    else:
        reports = _audit_on_cluster(args, settings, address, runtime_env)
    for name, report in reports.items():
        print(f"policy {name}:")
        print(report.to_text())
        print()
    flagged = [name for name, r in reports.items() if r.flagged]
    if flagged:
        print(f"FLAGGED: gradient masking suspected in {', '.join(flagged)} of {args.checkpoint}")
    else:
        print(f"not flagged: no gradient-masking symptom in {args.checkpoint}")
    if args.out:
        check_output(args.out, "--out", "file")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data = {"checkpoint": str(args.checkpoint), "flagged": bool(flagged),
                "policies": {name: r.to_dict() for name, r in reports.items()}}
        atomic_write_text(Path(args.out), json.dumps(data, indent=2))
        print(f"wrote {args.out}")
    return 0
