"""``marl-fgmf explain``: explain every agent's actions over an episode, with figures.

Examples::

    marl-fgmf explain --checkpoint runs/ppo --out explain/ppo
    marl-fgmf explain --checkpoint runs/fgmf --episodes 2 --every 2 --out explain/fgmf
    marl-fgmf explain --checkpoint runs/ppo --method ig --settings steps=64 --out explain/ig

Plays ``--episodes`` episodes of the run's environment (or ``--env``; the first ``--max-steps``
steps of each, 50 by default) with the greedy policy
and explains the greedy action of every agent of every ``--every``-th step; writes
``frame_XXXX.png``, ``episode_XX.gif`` and ``metrics.json`` into ``--out`` and prints the
metrics. The work is :func:`marl_fgmf.workflows.explain.explain_run` (the files it writes are
described there). Bad input (a missing checkpoint, an unknown method, env or policy id, a
setting the method does not take) exits 2 with one line.
"""
from __future__ import annotations

import argparse


from agents.threads import apply_thread_budget, cpu_budget
from marl_fgmf.commands import (add_checkpoint_arguments, non_negative_int, parse_settings,
                                positive_int)
from marl_fgmf.workflows.explain import METHOD_NAMES, explain_run, format_summary


DEFAULT_MAX_STEPS = 50
"""Steps explained per episode unless ``--max-steps`` says otherwise (0: no cap)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--episodes", type=positive_int, default=1, help="episodes to explain (1)")
    p.add_argument("--method", default="pgca",
                   help=f"explainer: {' | '.join(METHOD_NAMES)} (default pgca)")
    p.add_argument("--settings", type=parse_settings, default={}, metavar="K=V,...",
                   help="explainer settings, e.g. steps=16,patch=3 (PGCA: steps, patch, stride, "
                        "substrate, blur_sigma, q, internal_batch_size)")
    p.add_argument("--max-steps", type=non_negative_int, default=DEFAULT_MAX_STEPS,
                   help=f"stop each episode after this many steps (default {DEFAULT_MAX_STEPS}, "
                        f"a whole beacon episode; 0: the env's own length, e.g. 900 steps of "
                        f"pong: minutes per step with PGCA)")
    p.add_argument("--every", type=positive_int, default=1,
                   help="explain every K-th step (1: every step)")
    p.add_argument("--seed", type=int, default=0, help="episode e is reset with seed + e")
    p.add_argument("--policy-id", default=None,
                   help="explain with this policy module for every agent (default: the "
                        "checkpoint's own agent -> module map)")
    p.add_argument("--fps", type=float, default=4.0, help="GIF frames per second (4)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    apply_thread_budget(min(2, cpu_budget()))  # small batches: 2 threads at most
    result = explain_run(args.checkpoint, args.out, env=args.env, env_kwargs=args.env_kwargs,
                         episodes=args.episodes, method=args.method,
                         max_steps=args.max_steps or None,
                         every=args.every, seed=args.seed, policy_id=args.policy_id,
                         settings=args.settings, fps=args.fps, progress=not args.quiet)
    print(format_summary(result))
    return 0
