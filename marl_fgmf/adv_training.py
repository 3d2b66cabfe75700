"""Baseline adversarial training: the SA-PPO-style KL smoothness regularizer (torch only).

State-adversarial PPO (Zhang et al., "Robust Deep Reinforcement Learning against Adversarial
Perturbations on State Observations", NeurIPS 2020) regularizes the policy with

``R_adv = kappa * mean_x max_{||delta||_inf <= eps} KL( pi(.|x) || pi(.|x + delta) )``

where the inner maximum is approximated by a few projected-gradient steps on the KL from a
random start (SA-PPO's PGD variant; their SGLD variant differs only in the noise). The clean
distribution is the fixed target (detached), so the gradient pulls the perturbed policy
toward the clean one; the policy therefore also trains on the PGD-perturbed observations.

This is the reference that FGMF is measured against; it costs ``steps`` extra forward and
backward passes over the regularized sub-batch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from marl_fgmf.attribution import check_finite_obs


@dataclass
class AdvTrainingConfig:
    """Settings of the SA-PPO-style KL regularizer."""

    eps: float = 4 / 255
    """L-inf budget of the inner maximization, in [0, 1] observation units"""
    steps: int = 3
    """PGD steps of the inner maximization"""
    step_size: float | None = None
    """PGD step (default 2.5 * eps / steps)"""
    kappa: float = 1.0
    """weight of the KL term in the loss"""
    reg_fraction: float = 0.25
    """fraction of each minibatch regularized"""
    max_reg_samples: int = 128
    """cap on the regularized sub-batch"""

    def __post_init__(self) -> None:
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"adv eps must be in (0, 1], got {self.eps}")
        if int(self.steps) < 1:
            raise ValueError(f"adv steps must be >= 1, got {self.steps}")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"adv step_size must be > 0, got {self.step_size}")
        if self.kappa < 0:
            raise ValueError(f"adv kappa must be >= 0, got {self.kappa}")
        if not 0.0 < self.reg_fraction <= 1.0:
            raise ValueError(f"adv reg_fraction must be in (0, 1], got {self.reg_fraction}")
        if int(self.max_reg_samples) < 1:
            raise ValueError(f"adv max_reg_samples must be >= 1, got {self.max_reg_samples}")

    def to_dict(self) -> dict:
        return asdict(self)


def _kl(target_log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) from log-probabilities."""
    return (target_log_p.exp() * (target_log_p - log_q)).sum(-1)


def kl_pgd(policy: nn.Module, obs: torch.Tensor, eps: float, steps: int,
           step_size: float | None = None, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Approximate ``argmax_{||delta||_inf <= eps} KL(pi(x) || pi(x + delta))`` by PGD.

    Returns the perturbed observations (detached, inside the eps-ball and [0, 1]).
    """
    alpha = 2.5 * eps / steps if step_size is None else step_size
    with torch.no_grad():
        target = torch.log_softmax(policy(obs), -1)
    noise = torch.rand(obs.shape, generator=generator, device=obs.device, dtype=obs.dtype)
    x = (obs + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(int(steps)):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            kl = _kl(target, torch.log_softmax(policy(x), -1)).sum()
            (grad,) = torch.autograd.grad(kl, x)
        x = x.detach() + alpha * grad.sign()
        x = torch.min(torch.max(x, obs - eps), obs + eps).clamp(0, 1)
    return x.detach()


def sa_kl_regularizer(policy: nn.Module, obs: torch.Tensor, config: AdvTrainingConfig,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """``kappa * mean KL(pi(x) || pi(x + delta*))`` on a sub-batch; differentiable in the
    policy parameters.

    Args:
        policy: policy-protocol module.
        obs: (B, H, W, C) float in [0, 1].
    Returns:
        ``(loss, info)`` with info keys ``adv_kl``, ``adv_loss``, ``adv_n``.
    """
    check_finite_obs(obs)
    n = max(1, min(int(config.max_reg_samples), int(round(obs.shape[0] * config.reg_fraction))))
    sub = obs[:n].detach()
    x_adv = kl_pgd(policy, sub, config.eps, config.steps, config.step_size, generator)
    with torch.no_grad():
        target = torch.log_softmax(policy(sub), -1)
    kl = _kl(target, torch.log_softmax(policy(x_adv), -1)).mean()
    loss = config.kappa * kl
    return loss, {"adv_kl": float(kl.detach()), "adv_loss": float(loss.detach()), "adv_n": float(n)}
