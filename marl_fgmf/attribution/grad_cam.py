"""Grad-CAM++ (Chattopadhay, Sarkar, Howlader and Balasubramanian, WACV 2018)."""
from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch import nn

from marl_fgmf.attribution.base import GradientAttribution
from marl_fgmf.protocol import check_obs, eval_mode

__all__ = ["find_cam_layer", "probe_feature_layer", "GradCAMPlusPlus", "grad_cam_plus_plus"]


_PROBED: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def find_cam_layer(policy: nn.Module) -> nn.Module:
    """The module whose output is the policy's (B, K, h, w) spatial feature map.

    ``policy.cam_layer`` when the policy names one (every
    :class:`agents.networks.PolicyNetwork` does); otherwise, for a policy that declares its
    ``obs_shape`` (adapted and RLlib policies do), the layer found by
    :func:`probe_feature_layer` (cached per policy).

    Raises:
        ValueError: neither (Grad-CAM++ and SGAM distillation need such a layer).
    """
    layer = getattr(policy, "cam_layer", None)
    if isinstance(layer, nn.Module):
        return layer
    cached = _PROBED.get(policy)
    if cached is not None:
        return cached
    obs_shape = getattr(policy, "obs_shape", None)
    found = probe_feature_layer(policy, obs_shape) if obs_shape is not None else None
    if found is None:
        raise ValueError(f"{type(policy).__name__} has no 'cam_layer' module producing a "
                         "(B, K, h, w) feature map, and probing it found no spatial feature map "
                         "the logits depend on; Grad-CAM++ needs one (cnn, vit and hybrid "
                         "networks from agents.make_policy_network have it)")
    _PROBED[policy] = found
    return found


def probe_feature_layer(policy: nn.Module, obs_shape) -> nn.Module | None:
    """The deepest (B, K, h, w) feature map of ``policy`` that its logits depend on.

    One forward pass (eval mode, a fixed random observation batch of two, the global RNG
    untouched) with a hook on every submodule: among the modules called exactly once whose
    output is a 4-D tensor with ``h, w > 1``, the last one whose output gets a non-zero
    gradient from the logits (so a critic-only branch is never chosen). The policy's
    ``input_filter`` (SGAM) is skipped: it is not part of the encoder. The output is read as
    channels first, as torch convolutions produce it.

    Returns:
        The module, or None when there is none (a policy without convolutions, e.g. an MLP).
    """
    skip: set[int] = set()
    filt = getattr(policy, "input_filter", None)
    if isinstance(filt, nn.Module):
        skip = {id(m) for m in filt.modules()}
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module: nn.Module, _inputs, output) -> None:
        if (torch.is_tensor(output) and output.dim() == 4 and output.requires_grad
                and output.shape[2] > 1 and output.shape[3] > 1):
            calls.append((module, output))

    handles = [m.register_forward_hook(record) for m in policy.modules()
               if m is not policy and id(m) not in skip]
    try:
        ref = next(policy.parameters(), None)
        x = torch.rand((2, *tuple(int(s) for s in obs_shape)),
                       generator=torch.Generator().manual_seed(0))
        if ref is not None:
            x = x.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else x.dtype)
        with torch.enable_grad(), eval_mode(policy):
            logits = policy(x)
    finally:
        for handle in handles:
            handle.remove()
    if not calls or not torch.is_tensor(logits) or not logits.requires_grad:
        return None
    counts = Counter(id(m) for m, _ in calls)
    grads = torch.autograd.grad(logits.sum(), [out for _, out in calls], allow_unused=True)
    for (module, _), grad in reversed(list(zip(calls, grads))):
        if counts[id(module)] == 1 and grad is not None and bool(grad.abs().sum() > 0):
            return module
    return None


class GradCAMPlusPlus(GradientAttribution):
    """Grad-CAM++ on the policy's cam layer.

    With feature maps ``A^k`` of ``layer`` and first derivatives ``g = dY/dA`` of the score
    ``Y`` (the logit of the explained action by default), the exponential-score closed form is

    ``alpha_kij = g_kij^2 / (2 g_kij^2 + sum_ab A_kab g_kij^3)``,
    ``w_k = sum_ij alpha_kij * relu(g_kij)``,  ``L = relu(sum_k w_k A^k)``.

    Sign, normalization and upsampling are explicit arguments: ``relu`` (the paper's final
    ReLU), ``normalize`` (divide by the per-sample max), ``upsample`` (bilinear to H x W).
    """

    def __init__(self, policy: nn.Module, layer: nn.Module | None = None):
        super().__init__(policy)
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
        check_obs(obs)
        if score not in ("logit", "log_prob"):
            raise ValueError(f"score must be 'logit' or 'log_prob', got {score!r}")
        actions = self.resolve_actions(obs, actions)
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
