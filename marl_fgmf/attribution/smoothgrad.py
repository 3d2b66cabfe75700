"""SmoothGrad (Smilkov, Thorat, Kim, Viegas and Wattenberg 2017)."""
from __future__ import annotations

import torch

from marl_fgmf.attribution.base import GradientAttribution, check_chunk
from marl_fgmf.protocol import check_obs, eval_mode

__all__ = ["SmoothGrad"]


class SmoothGrad(GradientAttribution):
    """SmoothGrad: the mean input gradient over noisy copies of the observation.

    ``SG(x) = (1/n) sum_{j=1..n} grad_x log pi(a | x + e_j)``, ``e_j ~ N(0, sigma^2 I)``, with
    ``sigma = noise_level * (x_max - x_min) = noise_level`` on the [0, 1] observation contract
    (the paper recommends 10-20 %). ``squared=True`` averages squared gradients (SmoothGrad^2,
    Hooker et al. 2019); ``multiply_by_inputs=True`` returns ``x * SG(x)``. Noisy samples are
    not clipped to [0, 1] (as in the paper). All ``n * B`` noisy copies are differentiated as
    one batch, in chunks of ``internal_batch_size`` rows; the noise is drawn up front from a
    generator seeded with ``seed``, so chunking does not change the result.

    Example:
        >>> sg = SmoothGrad(policy).attribute(obs, n_samples=16, noise_level=0.15)  # like obs
    """

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  n_samples: int = 16, noise_level: float = 0.15, squared: bool = False,
                  multiply_by_inputs: bool = False, seed: int = 0,
                  internal_batch_size: int | None = None) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: (B,) actions; default the clean greedy actions.
            n_samples: noisy copies per observation (``n`` >= 1).
            noise_level: standard deviation of the noise in [0, 1] units (>= 0).
            squared, multiply_by_inputs: see the class docstring.
            seed: seed of the noise generator.
            internal_batch_size: rows per forward/backward chunk (default all ``n * B``).
        Returns:
            (B, H, W, C) signed (or squared) mean gradients, detached.
        """
        check_obs(obs)
        check_chunk(internal_batch_size)
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        obs = obs.detach()
        with eval_mode(self.policy):
            actions = self.resolve_actions(obs, actions)
            b, n = obs.shape[0], int(n_samples)
            gen = torch.Generator(device=obs.device).manual_seed(int(seed))
            noise = torch.randn((n, *obs.shape), generator=gen, device=obs.device, dtype=obs.dtype)
            noisy = (obs[None] + float(noise_level) * noise).reshape(n * b, *obs.shape[1:])
            noisy_actions = actions.repeat(n)
            step = n * b if internal_batch_size is None else int(internal_batch_size)
            grads = self.input_gradients(noisy, noisy_actions, step)
        grads = grads.view(n, b, *obs.shape[1:])
        out = (grads * grads).mean(0) if squared else grads.mean(0)
        return (out * obs if multiply_by_inputs else out).detach()
