"""Integrated Gradients (Sundararajan, Taly and Yan, ICML 2017), DESIGN.md section 3."""
from __future__ import annotations

import torch

from marl_fgmf.attribution.base import GradientAttribution, Policy, check_chunk
from marl_fgmf.protocol import check_obs

__all__ = ["IntegratedGradients", "integrated_gradients"]


class IntegratedGradients(GradientAttribution):
    """Integrated Gradients, right Riemann sum.

    ``IG_i(x) = (x_i - b_i) * (1/m) * sum_{k=1..m} d log pi(a | b + (k/m)(x - b)) / dx_i``

    All ``m`` interpolation points of all samples are evaluated as one batch of ``m * B``
    observations, split into chunks of ``internal_batch_size`` rows when memory matters.
    Completeness: ``sum_i IG_i ~= log pi(a|x) - log pi(a|b)`` (exact as ``m -> inf``).

    Example:
        >>> ig = IntegratedGradients(policy).attribute(obs, steps=32)   # same shape as obs
    """

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  baseline: torch.Tensor | float | None = None, steps: int = 32,
                  internal_batch_size: int | None = None) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: (B,) actions to explain; default the clean greedy actions.
            baseline: tensor broadcastable to ``obs`` or a scalar; default 0 (black frame).
            steps: ``m`` >= 1.
            internal_batch_size: rows per forward/backward chunk (default: all ``m*B``).
        Returns:
            (B, H, W, C) attributions, detached.
        """
        check_obs(obs)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_chunk(internal_batch_size)
        obs = obs.detach()
        actions = self.resolve_actions(obs, actions)
        base = torch.zeros_like(obs) if baseline is None else torch.as_tensor(
            baseline, dtype=obs.dtype, device=obs.device).expand_as(obs)
        b, m = obs.shape[0], int(steps)
        alphas = torch.arange(1, m + 1, dtype=obs.dtype, device=obs.device) / m  # right sum
        delta = obs - base
        # (m, B, H, W, C) -> (m*B, H, W, C): step-major, so each chunk holds whole steps.
        path = (base[None] + alphas.view(m, 1, 1, 1, 1) * delta[None]).reshape(m * b, *obs.shape[1:])
        path_actions = actions.repeat(m)
        chunk = m * b if internal_batch_size is None else int(internal_batch_size)
        grads = self.input_gradients(path, path_actions, chunk)
        mean_grad = grads.view(m, b, *obs.shape[1:]).mean(dim=0)
        return (delta * mean_grad).detach()


def integrated_gradients(policy: Policy, obs: torch.Tensor, actions: torch.Tensor | None = None,
                         baseline: torch.Tensor | float | None = None, steps: int = 32,
                         internal_batch_size: int | None = None) -> torch.Tensor:
    """Functional form of :meth:`IntegratedGradients.attribute` (DESIGN.md section 3)."""
    return IntegratedGradients(policy).attribute(obs, actions, baseline, steps, internal_batch_size)
