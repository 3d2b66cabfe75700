"""Attribution primitives on the policy protocol (torch only).

Every method explains the log-probability of an action, by default the clean greedy action
``a* = argmax pi(x)`` (detached), for a policy ``policy(obs) -> logits`` with ``obs`` float in
[0, 1] shaped (B, H, W, C). Each method is a class with a Captum-like call,
``Method(policy).attribute(obs, actions=None, ...)``, returning maps in the input's shape
(pixel methods) or (B, H, W) (spatial methods); the functional form
:func:`integrated_gradients` is the public API of DESIGN.md.

Gradient methods: :class:`IntegratedGradients` (Sundararajan et al. 2017), :class:`SmoothGrad`
(Smilkov et al. 2017), :class:`GradCAMPlusPlus` (Chattopadhay et al. 2018).
Perturbation methods: :class:`Occlusion` (Zeiler & Fergus 2014), :class:`RISE` (Petsiuk et al.
2018).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "check_finite_obs", "greedy_actions", "action_log_prob", "integrated_gradients",
    "IntegratedGradients", "GradCAMPlusPlus", "grad_cam_plus_plus",
]


def check_finite_obs(obs: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``obs`` is a finite floating (B, H, W, C) tensor."""
    if not torch.is_tensor(obs) or obs.dim() != 4:
        shape = tuple(obs.shape) if torch.is_tensor(obs) else type(obs).__name__
        raise ValueError(f"obs must be a (B, H, W, C) tensor, got {shape}")
    if not obs.is_floating_point():
        raise ValueError(f"obs must be floating point in [0, 1], got dtype {obs.dtype}")
    if not torch.isfinite(obs).all():
        bad = int((~torch.isfinite(obs)).sum())
        raise ValueError(f"obs contains {bad} non-finite values (NaN or inf)")


@torch.no_grad()
def greedy_actions(policy: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
    """``argmax_a pi(a | obs)`` as a (B,) long tensor (no gradient)."""
    return policy(obs).argmax(dim=-1)


def _resolve_actions(policy, obs: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
    if actions is None:
        return greedy_actions(policy, obs)
    actions = torch.as_tensor(actions, device=obs.device).long().reshape(-1)
    if actions.shape[0] != obs.shape[0]:
        raise ValueError(f"actions has {actions.shape[0]} entries for a batch of {obs.shape[0]}")
    return actions


def action_log_prob(policy: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                    actions: torch.Tensor) -> torch.Tensor:
    """``log pi(actions | obs)`` as a (B,) tensor (differentiable)."""
    logits = policy(obs)
    if actions.max() >= logits.shape[-1] or actions.min() < 0:
        raise ValueError(f"actions must be in [0, {logits.shape[-1] - 1}] for a policy with "
                         f"{logits.shape[-1]} actions")
    return torch.log_softmax(logits, dim=-1).gather(1, actions[:, None]).squeeze(1)


class IntegratedGradients:
    """Integrated Gradients (Sundararajan, Taly and Yan, ICML 2017), right Riemann sum.

    ``IG_i(x) = (x_i - b_i) * (1/m) * sum_{k=1..m} d log pi(a | b + (k/m)(x - b)) / dx_i``

    All ``m`` interpolation points of all samples are evaluated as one batch of ``m * B``
    observations, split into chunks of ``internal_batch_size`` rows when memory matters.
    Completeness: ``sum_i IG_i ~= log pi(a|x) - log pi(a|b)`` (exact as ``m -> inf``).

    Example:
        >>> ig = IntegratedGradients(policy).attribute(obs, steps=32)   # same shape as obs
    """

    def __init__(self, policy: Callable[[torch.Tensor], torch.Tensor]):
        self.policy = policy

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
        check_finite_obs(obs)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if internal_batch_size is not None and int(internal_batch_size) < 1:
            raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
        obs = obs.detach()
        actions = _resolve_actions(self.policy, obs, actions)
        base = torch.zeros_like(obs) if baseline is None else torch.as_tensor(
            baseline, dtype=obs.dtype, device=obs.device).expand_as(obs)
        b, m = obs.shape[0], int(steps)
        alphas = torch.arange(1, m + 1, dtype=obs.dtype, device=obs.device) / m  # right sum
        delta = obs - base
        # (m, B, H, W, C) -> (m*B, H, W, C): step-major, so each chunk holds whole steps.
        path = (base[None] + alphas.view(m, 1, 1, 1, 1) * delta[None]).reshape(m * b, *obs.shape[1:])
        path_actions = actions.repeat(m)
        chunk = m * b if internal_batch_size is None else int(internal_batch_size)
        grads = torch.empty_like(path)
        for start in range(0, m * b, chunk):
            x = path[start:start + chunk].clone().requires_grad_(True)
            with torch.enable_grad():
                lp = action_log_prob(self.policy, x, path_actions[start:start + chunk])
                grads[start:start + chunk] = torch.autograd.grad(lp.sum(), x)[0]
        mean_grad = grads.view(m, b, *obs.shape[1:]).mean(dim=0)
        return (delta * mean_grad).detach()


def integrated_gradients(policy: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                         actions: torch.Tensor | None = None,
                         baseline: torch.Tensor | float | None = None, steps: int = 32,
                         internal_batch_size: int | None = None) -> torch.Tensor:
    """Functional form of :meth:`IntegratedGradients.attribute` (DESIGN.md section 3)."""
    return IntegratedGradients(policy).attribute(obs, actions, baseline, steps, internal_batch_size)


def find_cam_layer(policy: nn.Module) -> nn.Module:
    """The module whose output is the policy's (B, K, h, w) spatial feature map.

    Looks for ``policy.cam_layer`` (every :class:`agents.networks.PolicyNetwork` has one).

    Raises:
        ValueError: the policy has no such layer (Grad-CAM++ and SGAM distillation need it).
    """
    layer = getattr(policy, "cam_layer", None)
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{type(policy).__name__} has no 'cam_layer' module producing a "
                         "(B, K, h, w) feature map; Grad-CAM++ needs one (cnn, vit and hybrid "
                         "networks from agents.make_policy_network have it)")
    return layer


class GradCAMPlusPlus:
    """Grad-CAM++ (Chattopadhay, Sarkar, Howlader and Balasubramanian, WACV 2018).

    With feature maps ``A^k`` of ``layer`` and first derivatives ``g = dY/dA`` of the score
    ``Y`` (the logit of the explained action by default), the exponential-score closed form is

    ``alpha_kij = g_kij^2 / (2 g_kij^2 + sum_ab A_kab g_kij^3)``,
    ``w_k = sum_ij alpha_kij * relu(g_kij)``,  ``L = relu(sum_k w_k A^k)``.

    Sign, normalization and upsampling are explicit arguments: ``relu`` (the paper's final
    ReLU), ``normalize`` (divide by the per-sample max), ``upsample`` (bilinear to H x W).
    """

    def __init__(self, policy: nn.Module, layer: nn.Module | None = None):
        self.policy = policy
        self.layer = find_cam_layer(policy) if layer is None else layer

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  score: str = "logit", relu: bool = True, normalize: bool = False,
                  upsample: bool = True, create_graph: bool = False) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: (B,) actions; default greedy.
            score: ``logit`` (pre-softmax, as in the paper) or ``log_prob``.
            create_graph: keep the graph (to differentiate through the map).
        Returns:
            (B, H, W) if ``upsample`` else (B, h, w).
        """
        check_finite_obs(obs)
        if score not in ("logit", "log_prob"):
            raise ValueError(f"score must be 'logit' or 'log_prob', got {score!r}")
        actions = _resolve_actions(self.policy, obs, actions)
        captured: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            with torch.enable_grad():
                x = obs if create_graph else obs.detach()
                logits = self.policy(x)
                fmap = captured[-1]  # (B, K, h, w)
                if fmap.dim() != 4:
                    raise ValueError(f"cam layer output must be (B, K, h, w), got {tuple(fmap.shape)}")
                y = logits if score == "logit" else torch.log_softmax(logits, -1)
                y = y.gather(1, actions[:, None]).sum()
                g = torch.autograd.grad(y, fmap, create_graph=create_graph)[0]
        finally:
            handle.remove()
        a = fmap if create_graph else fmap.detach()
        g2, g3 = g * g, g * g * g
        denom = 2 * g2 + (a.sum(dim=(2, 3), keepdim=True) * g3)
        denom = torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
        alpha = g2 / denom
        weights = (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
        cam = (weights * a).sum(dim=1)  # (B, h, w)
        if relu:
            cam = torch.relu(cam)
        if upsample:
            cam = nn.functional.interpolate(cam[:, None], size=obs.shape[1:3], mode="bilinear",
                                            align_corners=False)[:, 0]
        if normalize:
            cam = cam / cam.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1)
        return cam if create_graph else cam.detach()


def grad_cam_plus_plus(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor | None = None,
                       **kwargs) -> torch.Tensor:
    """Functional form of :meth:`GradCAMPlusPlus.attribute`."""
    return GradCAMPlusPlus(policy).attribute(obs, actions, **kwargs)
