"""Cost of the SCOR-PIO 2.0 penalty relative to a plain PPO minibatch update (torch only).

What it measures, on one minibatch of ``B`` observations (default CNN, obs 21x21x3):

* ``ppo``      forward, clipped-surrogate + value + entropy loss, backward, Adam step;
* ``+R fresh`` the same plus ``scorpio_regularizer(policy, obs, cfg)``: sub-batch selection,
               IG mask and direction, Hv, all inside the step (``ig_steps + 3`` passes);
* ``+R reuse`` the same with the subspace precomputed (what the Learner does from the second
               minibatch of an iteration on): 3 passes on the sub-batch;
* ``subspace`` one ``compute_exploitable_subspace`` on the sub-batch (once per iteration);
* ``iter(K)``  the update-time ratio of a training iteration of ``K`` SGD steps when the
               subspace is computed once and reused: ``(subspace + K * reuse) / (K * ppo)``.

Optionally (``--sgam``), on a copy of the policy with an SGAM layer, over plain PPO:
``sgam_layer`` (PPO step through the SGAM layer), ``sgam_distill_all`` (plus the distillation
term on the whole minibatch), ``sgam_distill_sub`` (on the SCOR-PIO sub-batch rows only) and
``fgmf`` (SGAM layer + SCOR-PIO with a reused subspace + distillation on the sub-batch).

How to run (one core, about a minute)::

    OMP_NUM_THREADS=1 python scripts/profile_scorpio.py
    OMP_NUM_THREADS=1 python scripts/profile_scorpio.py --batch-sizes 256 --reg-fraction 0.125 \
        --ig-steps 4 --sgam --json scorpio_cost.json

Results to expect: see the table it prints; ratios depend on the machine and its load, so
compare rows of one run (the script interleaves the variants to share the noise).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import make_policy_network  # noqa: E402
from marl_fgmf.scorpio import (ScorpioConfig, compute_exploitable_subspace,  # noqa: E402
                               scorpio_regularizer, select_sub_batch)


def ppo_loss(policy, obs, actions, old_logp, adv, returns, clip=0.2, vf_coef=0.5,
             ent_coef=0.01) -> torch.Tensor:
    """Clipped surrogate + value MSE - entropy bonus (CleanRL-style PPO loss)."""
    logits, values = policy.forward_both(obs)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, actions[:, None]).squeeze(1)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    return -surrogate + vf_coef * (values - returns).pow(2).mean() - ent_coef * entropy


def _timer(clock: str, device: torch.device):
    """``process``: CPU time of this process (robust on a shared machine with one intra-op
    thread: time spent descheduled is not counted); ``wall``: elapsed time (GPU: synchronized)."""
    now = time.process_time if clock == "process" else time.perf_counter

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return now() - t0
    return timed


def profile(batch: int, cfg: ScorpioConfig, obs_shape=(21, 21, 3), arch: str = "cnn",
            repeats: int = 5, sgam: bool = False, seed: int = 0, device: str = "cpu",
            clock: str = "process") -> dict[str, float]:
    torch.manual_seed(seed)
    dev = torch.device(device)
    timed = _timer(clock, dev)
    policy = make_policy_network(arch, obs_shape, 5).to(dev)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-4)
    obs = torch.rand(batch, *obs_shape, device=dev)
    with torch.no_grad():
        actions = torch.distributions.Categorical(logits=policy(obs)).sample()
        old_logp = torch.log_softmax(policy(obs), -1).gather(1, actions[:, None]).squeeze(1)
    adv, returns = torch.randn(batch, device=dev), torch.randn(batch, device=dev)
    rows = obs[select_sub_batch(batch, cfg)]
    subspace = compute_exploitable_subspace(policy, rows, cfg)

    def step(net, optim, extra=None):
        def run():
            optim.zero_grad(set_to_none=True)
            loss = ppo_loss(net, obs, actions, old_logp, adv, returns)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
            optim.step()
        return run

    variants = {
        "ppo": step(policy, opt),
        "fresh": step(policy, opt, lambda: scorpio_regularizer(policy, obs, cfg)[0]),
        "reuse": step(policy, opt, lambda: scorpio_regularizer(policy, None, cfg, subspace)[0]),
        "subspace": lambda: compute_exploitable_subspace(policy, rows, cfg),
    }
    if sgam:  # a copy of the policy with the SGAM layer; ratios are over plain PPO
        from marl_fgmf.sgam import attach_sgam, sgam_distillation_loss
        spol = copy.deepcopy(policy)
        layer = attach_sgam(spol)
        sopt = torch.optim.Adam(spol.parameters(), lr=3e-4)
        variants["sgam_layer"] = step(spol, sopt)
        variants["sgam_distill_all"] = step(
            spol, sopt, lambda: sgam_distillation_loss(layer, spol, obs))
        variants["sgam_distill_sub"] = step(
            spol, sopt, lambda: sgam_distillation_loss(layer, spol, rows))
        ssub = compute_exploitable_subspace(spol, rows, cfg)
        variants["fgmf"] = step(spol, sopt, lambda: (
            scorpio_regularizer(spol, None, cfg, ssub)[0]
            + sgam_distillation_loss(layer, spol, rows)))
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):  # interleaved: the variants share the machine's load
        for name, fn in variants.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"batch": batch, "reg_rows": len(rows), "ppo_s": med["ppo"],
           "fresh_ratio": med["fresh"] / med["ppo"], "reuse_ratio": med["reuse"] / med["ppo"],
           "subspace_over_ppo": med["subspace"] / med["ppo"]}
    for k in (8, 32):
        out[f"iter{k}_ratio"] = (med["subspace"] + k * med["reuse"]) / (k * med["ppo"])
    if sgam:
        for k in ("sgam_layer", "sgam_distill_all", "sgam_distill_sub", "fgmf"):
            out[f"{k}_ratio"] = med[k] / med["ppo"]
    return out


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--obs", type=int, nargs=3, default=[21, 21, 3], metavar=("H", "W", "C"))
    p.add_argument("--arch", default="cnn", choices=["cnn", "vit", "hybrid"])
    p.add_argument("--reg-fraction", type=float, default=ScorpioConfig.reg_fraction)
    p.add_argument("--ig-steps", type=int, default=ScorpioConfig.ig_steps)
    p.add_argument("--power-iters", type=int, default=ScorpioConfig.power_iters)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--clock", choices=["process", "wall"], default=None,
                   help="default: process CPU time on cpu with one thread, else wall time")
    p.add_argument("--sgam", action="store_true", help="also time the SGAM distillation term")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("process" if args.device == "cpu" and args.threads == 1 else "wall")
    cfg = ScorpioConfig(reg_fraction=args.reg_fraction, ig_steps=args.ig_steps,
                        power_iters=args.power_iters, seed=0)
    print(f"arch={args.arch} obs={tuple(args.obs)} reg_fraction={cfg.reg_fraction} "
          f"ig_steps={cfg.ig_steps} power_iters={cfg.power_iters} threads={args.threads} "
          f"device={args.device} clock={clock} repeats={args.repeats}")
    cols = ["batch", "reg_rows", "ppo_s", "fresh_ratio", "reuse_ratio", "subspace_over_ppo",
            "iter8_ratio", "iter32_ratio"]
    if args.sgam:
        cols += ["sgam_layer_ratio", "sgam_distill_all_ratio", "sgam_distill_sub_ratio",
                 "fgmf_ratio"]
    print(" | ".join(f"{c:>22}" for c in cols))
    rows = []
    for b in args.batch_sizes:
        row = profile(b, cfg, tuple(args.obs), args.arch, args.repeats, args.sgam,
                      device=args.device, clock=clock)
        rows.append(row)
        print(" | ".join(f"{row[c]:>22.3f}" if isinstance(row[c], float) else f"{row[c]:>22}"
                         for c in cols), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"config": cfg.to_dict(), "arch": args.arch,
                                         "obs": args.obs, "device": args.device,
                                         "clock": clock, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
