"""Baseline adversarial training: the SA-PPO-style KL smoothness regularizer (torch only).

State-adversarial PPO (Zhang et al., "Robust Deep Reinforcement Learning against Adversarial
Perturbations on State Observations", NeurIPS 2020) regularizes the policy with

``R_adv = kappa * mean_x max_{||delta||_inf <= eps} KL( pi(.|x) || pi(.|x + delta) )``

where the inner maximum is approximated by a few projected-gradient steps on the KL from a
random start (SA-PPO's PGD variant; their SGLD variant differs only in the noise). The clean
distribution is the fixed target (detached), so the gradient pulls the perturbed policy
toward the clean one; the policy therefore also trains on the PGD-perturbed observations.

The regularized rows are a random draw (without replacement) of ``reg_fraction`` of the batch
(at most ``max_reg_samples``), from the caller's generator (seeded) or torch's global RNG. The
clean distribution is computed ONCE per call and serves both as the PGD target and as the KL's
target. This is the reference that FGMF is measured against; per call it costs one clean
forward, ``steps`` forward/backward passes (the inner maximization, :func:`marl_fgmf.perturbation.linf_pgd`
with a random start) and one forward (plus the caller's backward) on the perturbed rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from marl_fgmf.perturbation import linf_pgd
from marl_fgmf.protocol import check_obs

__all__ = ["AdvTrainingConfig", "kl_pgd", "sa_kl_regularizer", "select_rows"]


def _is_int(val) -> bool:
    return isinstance(val, int) and not isinstance(val, bool)


def _is_real(val) -> bool:
    return isinstance(val, (int, float)) and not isinstance(val, bool)


@dataclass
class AdvTrainingConfig:
    """Settings of the SA-PPO-style KL regularizer (validated at construction: a one-line
    ``ValueError`` names the setting and its range)."""

    eps: float = 4 / 255
    """L-inf budget of the inner maximization, in [0, 1] observation units"""
    steps: int = 3
    """PGD steps of the inner maximization (an integer >= 1)"""
    step_size: float | None = None
    """PGD step (default 2.5 * eps / steps)"""
    kappa: float = 1.0
    """weight of the KL term in the loss"""
    reg_fraction: float = 0.25
    """fraction of each minibatch regularized (a random draw of its rows)"""
    max_reg_samples: int = 128
    """cap on the regularized sub-batch (an integer >= 1)"""
    seed: int | None = None
    """seed of the learner's generator for the row draws and PGD starts; None: torch's
    global RNG (seeded by RLlib)"""

    def __post_init__(self) -> None:
        if not _is_real(self.eps) or not 0.0 < self.eps <= 1.0:
            raise ValueError(f"adv eps must be in (0, 1], got {self.eps!r}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"adv steps must be an integer >= 1, got {self.steps!r}")
        if self.step_size is not None and (not _is_real(self.step_size) or self.step_size <= 0):
            raise ValueError(f"adv step_size must be None or a number > 0, got {self.step_size!r}")
        if not _is_real(self.kappa) or self.kappa < 0:
            raise ValueError(f"adv kappa must be >= 0, got {self.kappa!r}")
        if not _is_real(self.reg_fraction) or not 0.0 < self.reg_fraction <= 1.0:
            raise ValueError(f"adv reg_fraction must be in (0, 1], got {self.reg_fraction!r}")
        if not _is_int(self.max_reg_samples) or self.max_reg_samples < 1:
            raise ValueError(f"adv max_reg_samples must be an integer >= 1, got "
                             f"{self.max_reg_samples!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"adv seed must be None or an integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _kl(target_log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) from log-probabilities."""
    return (target_log_p.exp() * (target_log_p - log_q)).sum(-1)


def select_rows(batch_size: int, config: AdvTrainingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A random draw, without replacement, of ``n = max(1, min(max_reg_samples,
    round(reg_fraction * B)))`` row indices (on the generator's device, CPU by default)."""
    n = max(1, min(int(config.max_reg_samples), int(round(batch_size * config.reg_fraction))))
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(batch_size, generator=generator, device=device)[:n]


def kl_pgd(policy: nn.Module, obs: torch.Tensor, eps: float, steps: int,
           step_size: float | None = None, generator: torch.Generator | None = None,
           target_log_p: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate ``argmax_{||delta||_inf <= eps} KL(pi(x) || pi(x + delta))`` by PGD
    (:func:`marl_fgmf.perturbation.linf_pgd`, random start drawn with ``generator``).

    ``target_log_p`` (B, A): the clean log-probabilities, if the caller has them (no clean
    forward here then). Returns the perturbed observations (detached, inside the eps-ball and
    [0, 1]).
    """
    if target_log_p is None:
        with torch.no_grad():
            target_log_p = torch.log_softmax(policy(obs), -1)
    target = target_log_p.detach()

    def objective(x: torch.Tensor) -> torch.Tensor:
        return _kl(target, torch.log_softmax(policy(x), -1))

    with torch.enable_grad():
        return linf_pgd(objective, obs.detach(), eps, steps, alpha=step_size,
                        random_start=True, generator=generator)


def sa_kl_regularizer(policy: nn.Module, obs: torch.Tensor, config: AdvTrainingConfig,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """``kappa * mean KL(pi(x) || pi(x + delta*))`` on a random sub-batch; differentiable in
    the policy parameters.

    Args:
        policy: policy-protocol module.
        obs: (B, H, W, C) float in [0, 1].
        config: :class:`AdvTrainingConfig`.
        generator: draws the rows and the PGD start (seeded: reproducible); it must live on
            ``obs``'s device. None: torch's global RNG.
    Returns:
        ``(loss, info)`` with info keys ``adv_kl``, ``adv_loss``, ``adv_n``.
    Cost: one clean forward (no graph), ``steps`` PGD forward/backward passes, one forward
    with graph on the perturbed rows.
    """
    check_obs(obs)
    idx = select_rows(obs.shape[0], config, generator).to(obs.device)
    sub = obs.detach()[idx]
    with torch.no_grad():
        target = torch.log_softmax(policy(sub), -1)  # the one clean forward
    x_adv = kl_pgd(policy, sub, config.eps, config.steps, config.step_size, generator,
                   target_log_p=target)
    kl = _kl(target, torch.log_softmax(policy(x_adv), -1)).mean()
    loss = config.kappa * kl
    n = int(idx.numel())
    return loss, {"adv_kl": float(kl.detach()), "adv_loss": float(loss.detach()), "adv_n": float(n)}
