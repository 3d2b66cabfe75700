"""``marl-fgmf train``: multi-agent PPO with RLlib, optionally FGMF-defended.

Examples::

    marl-fgmf train --env beacon --arch cnn --iterations 60 --out runs/ppo
    marl-fgmf train --env beacon --defense fgmf --scorpio lambda_curv=1.0,rho=0.1 --out runs/fgmf
    marl-fgmf train --out runs/ppo --iterations 100 --resume
"""
from __future__ import annotations

import argparse

from agents.networks import ARCHS
from agents.train import DEFENSES, POLICY_MODES, TrainConfig, train
from marl_fgmf.commands import (add_cluster_arguments, check_output, cluster_settings,
                                parse_settings, positive_int, run_training)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--env", default=d.env, help="environment (see envs.list_envs()); default beacon")
    p.add_argument("--env-kwargs", type=parse_settings, default={}, metavar="K=V,...",
                   help="environment settings, e.g. n_agents=3,grid=9")
    p.add_argument("--arch", default=d.arch, help=f"policy encoder: {' | '.join(ARCHS)}")
    p.add_argument("--net", type=parse_settings, default={}, metavar="K=V,...",
                   help="encoder settings, e.g. hidden=128")
    p.add_argument("--policies", default=d.policies,
                   help=f"{' | '.join(POLICY_MODES)} (default: the env's: per-agent for "
                        f"cooperative_pong, whose paddles see the same screen; shared otherwise)")
    p.add_argument("--defense", default=d.defense, help=f"{' | '.join(DEFENSES)}")
    p.add_argument("--scorpio", type=parse_settings, default={}, metavar="K=V,...",
                   help="SCOR-PIO settings (lambda_curv, lambda_grad, rho, rho_salient, "
                        "ig_steps, power_iters, reg_fraction)")
    p.add_argument("--sgam", type=parse_settings, default={}, metavar="K=V,...",
                   help="SGAM settings (keep, temperature, kernel, distill_weight, ...)")
    p.add_argument("--adv", type=parse_settings, default={}, metavar="K=V,...",
                   help="adversarial-training settings (eps, steps, kappa, reg_fraction)")
    p.add_argument("--iterations", type=positive_int, default=d.iterations)
    p.add_argument("--train-batch-size", type=positive_int, default=d.train_batch_size,
                   help="agent steps per iteration (default: at least 2000 and one "
                        "full-length episode per env copy, e.g. pistonball 2000, "
                        "cooperative_pong 4000, pursuit 8000, so every iteration ends episodes)")
    p.add_argument("--minibatch-size", type=positive_int, default=d.minibatch_size)
    p.add_argument("--num-epochs", type=positive_int, default=d.num_epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--entropy-coeff", type=float, default=d.entropy_coeff)
    p.add_argument("--num-env-runners", type=int, default=d.num_env_runners,
                   help="sampling processes (default: the env's: 2 for pistonball, "
                        "cooperative_pong and pursuit, whose steps are slow; 0 otherwise, "
                        "sampling in the driver)")
    p.add_argument("--num-envs-per-env-runner", type=positive_int,
                   default=d.num_envs_per_env_runner,
                   help="env copies per sampling process (default: the env's: 1 for "
                        "pistonball, cooperative_pong and pursuit; 8 otherwise)")
    p.add_argument("--num-learners", type=int, default=d.num_learners)
    p.add_argument("--num-gpus-per-learner", type=float, default=d.num_gpus_per_learner,
                   help="GPUs per learner (RLlib setting); 1 on a GPU machine")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_cluster_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    settings = {k: v for k, v in (("scorpio", args.scorpio), ("sgam", args.sgam),
                                  ("adv", args.adv)) if v}
    return TrainConfig(
        env=args.env, env_kwargs=args.env_kwargs, arch=args.arch, net=args.net,
        policies=args.policies, defense=args.defense, defense_settings=settings,
        iterations=args.iterations, train_batch_size=args.train_batch_size,
        minibatch_size=args.minibatch_size, num_epochs=args.num_epochs, lr=args.lr,
        entropy_coeff=args.entropy_coeff, num_env_runners=args.num_env_runners,
        num_envs_per_env_runner=args.num_envs_per_env_runner, num_learners=args.num_learners,
        num_gpus_per_learner=args.num_gpus_per_learner, seed=args.seed,
        checkpoint_every=args.checkpoint_every)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_output(args.out, "--out", "dir", allow_run=True)
    if not args.resume:
        cfg.validate()  # fail before Ray starts
    address, runtime_env = cluster_settings(args)
    result = run_training(lambda: train(cfg, args.out, resume=args.resume, address=address,
                                        progress=not args.quiet, runtime_env=runtime_env,
                                        log=print), args.out, cfg.iterations)
    last = result["last"]
    ref = result["reference_return"]
    ref_txt = f" (scripted optimum {ref:.2f}, {100 * last['agent_return_mean'] / ref:.0f}%)" if ref else ""
    print(f"done: iteration {last['iteration']}, {last['env_steps']} env steps, mean agent "
          f"return {last['agent_return_mean']:.2f}{ref_txt}, {last['wall_time_s']:.0f}s; "
          f"checkpoints in {args.out}/checkpoints")
    return 0
