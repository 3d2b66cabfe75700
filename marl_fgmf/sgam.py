"""SGAM: saliency-guided adaptive masking, an input layer in front of the policy encoder.

DESIGN.md section 3::

    SGAM(x) = m(x) * x + (1 - m(x)) * s(x)
    m(x) = sigmoid((c(x) - tau) / (T * std(c(x))))    (T in units of the per-sample std of c)

* ``x``: (B, H, W, C) observation in [0, 1] (the policy protocol).
* ``s(x)``: a smoothed copy of ``x``, a depthwise local mean (box) or Gaussian blur with an odd
  ``kernel`` and replicate padding; the output is a convex combination of ``x`` and a
  normalized blur of ``x``, so it stays in [0, 1].
* ``c(x)``: a saliency estimate in [0, 1] from ONE forward pass of a lightweight head. The head
  imitates Grad-CAM++ (Chattopadhay, Sarkar, Howlader and Balasubramanian, WACV 2018), whose
  map is a weighted sum of feature maps ``L = relu(sum_k w_k A^k)`` with weights from
  gradients. Without a backward pass the head computes feature maps ``F^k`` with two small
  convolutions, predicts the per-sample channel weights ``w_k`` from the globally pooled
  features (a linear layer), and returns ``softplus(sum_k w_k F^k + b)``, upsampled
  (bilinear) to H x W and divided by its per-sample max. It is trained by
  :func:`sgam_distillation_loss` toward the policy's true Grad-CAM++ map, and by that loss
  only: the learner runs each SGD step inside :meth:`SGAM.saliency_detached`, so the policy
  loss reaches the encoder through the blend but never the head.
* ``tau(x)``: per-sample quantile of ``c`` at ``1 - keep`` (between the ``n``-th and
  ``n+1``-th largest values, ``n = round(keep * H * W)``), so the top ``keep`` fraction of
  pixels has ``m > 1/2``; ``T`` (``temperature``) sets how sharp the mask is, in units of the
  per-sample standard deviation of ``c`` (the implementation divides ``c - tau`` by
  ``T * std(c)``): scale-free, so a flat map early in training is thresholded as sharply as
  a peaked one and the mean of ``m`` stays near ``keep``. ``keep = 1`` is exactly the
  identity (every pixel kept).

High-saliency pixels pass (almost) unchanged; low-saliency pixels lose the fine detail an
attacker would write into. This is the input-transformation family of defences: feature
squeezing and spatial smoothing (Xu, Evans and Qi, "Feature squeezing", NDSS 2018), with the
smoothing confined to where the policy does not look.

**Evaluate it with adaptive attacks.** SGAM is differentiable end to end, but blurring and a
sharp sigmoid shrink and distort input gradients, which can make white-box attacks look weaker
than they are (obfuscated gradients, Athalye, Carlini and Wagner 2018). Every evaluation of an
SGAM policy must include attacks through SGAM with BPDA (backward pass as the identity) and EOT,
and the gradient-masking audit (DESIGN.md section 4). For BPDA, :meth:`SGAM.bypassed` makes the
layer the identity: with ``z = SGAM(x).detach()``, the BPDA gradient is ``grad_z l(policy(z))``
computed with SGAM bypassed (the backward of SGAM replaced by the identity).

``SGAM.last_mask`` holds the last mask (B, H, W) in [0, 1] (detached) for visualization.

Example:
    >>> sgam = attach_sgam(policy, keep=0.5)          # policy.input_filter = SGAM(...)
    >>> logits = policy(obs)                           # obs goes through SGAM first
    >>> loss = sgam_distillation_loss(sgam, policy, obs)            # trains the head only
    >>> loss, info = sgam_distillation_loss(sgam, policy, obs, return_info=True)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from marl_fgmf.attribution import find_cam_layer, grad_cam_plus_plus
from marl_fgmf.protocol import check_obs

__all__ = ["SGAM", "SGAMConfig", "SaliencyHead", "attach_sgam", "distillation_target",
           "sgam_distillation_loss"]

SMOOTHINGS = ("mean", "gaussian")


@dataclass(frozen=True)
class SGAMConfig:
    """Settings of an :class:`SGAM` layer (all but ``in_channels``, which the policy gives),
    validated at construction: ``ValueError`` names the setting and its range.
    ``attach_sgam(policy, **asdict(SGAMConfig(...)))`` builds the layer."""

    keep: float = 0.5
    """Fraction in (0, 1] of pixels kept (1 = identity). Conservative: the head is untrained
    early in training."""
    temperature: float = 0.1
    """``T > 0`` in units of the per-sample std of ``c``: 0.3 std above ``tau`` gives
    ``m = 0.95``, a near-binary yet differentiable mask."""
    kernel: int = 3
    """Odd smoothing window >= 1 (1 = no smoothing); 3 removes single-pixel detail on small
    (21 x 21) frames without erasing objects."""
    smoothing: str = "mean"
    """``mean`` (local mean) or ``gaussian``."""
    sigma: float | None = None
    """Gaussian std (> 0); default the OpenCV rule from ``kernel``."""
    head_channels: int = 8
    """Feature maps (>= 1) of the saliency head; 8 keeps the layer's cost small next to the
    encoder (the map it imitates is a coarse, low-rank object)."""
    head_stride: int = 2
    """Stride (>= 1) of the head's second convolution (a Grad-CAM++ map is coarse too)."""

    def __post_init__(self) -> None:
        keep, temperature, kernel, sigma = self.keep, self.temperature, self.kernel, self.sigma
        if not _is_real(keep) or not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep!r}")
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {kernel!r}")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {', '.join(SMOOTHINGS)}, "
                             f"got {self.smoothing!r}")
        if sigma is not None and (not _is_real(sigma) or not math.isfinite(sigma) or sigma <= 0):
            raise ValueError(f"sigma must be None or a finite number > 0, got {sigma!r}")
        _check_int("head_channels", self.head_channels, 1)
        _check_int("head_stride", self.head_stride, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SaliencyHead(nn.Module):
    """One-forward-pass Grad-CAM++-like saliency map, (B, C, H, W) -> (B, H, W) in [0, 1].

    ``F = SiLU(conv3x3_s(SiLU(conv3x3(x))))`` (K = ``channels`` maps at stride ``stride``),
    ``w = Linear(mean_hw F)`` (B, K), ``c = softplus(sum_k w_k F^k + b)``, bilinear to H x W,
    divided by the per-sample max.
    """

    def __init__(self, in_channels: int, channels: int = 8, stride: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride, 1), nn.SiLU())
        self.weights = nn.Linear(channels, channels)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.features(x)  # (B, K, h, w)
        w = self.weights(feat.mean(dim=(2, 3)))  # (B, K): the "gradient" weights, predicted
        cam = F.softplus((w[:, :, None, None] * feat).sum(dim=1, keepdim=True) + self.bias)
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        return cam / cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def _smoothing_kernel(kernel: int, smoothing: str, sigma: float | None) -> torch.Tensor:
    """(kernel, kernel) weights summing to 1: box, or Gaussian with ``sigma`` (default the
    OpenCV rule ``0.3 * ((kernel - 1) / 2 - 1) + 0.8``)."""
    if smoothing == "mean":
        return torch.full((kernel, kernel), 1.0 / (kernel * kernel))
    if sigma is None:
        sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8
    r = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k2 = g[:, None] * g[None, :]
    return (k2 / k2.sum()).float()


class SGAM(nn.Module):
    """Saliency-guided adaptive masking layer on (B, H, W, C) observations in [0, 1].

    ``SGAM(x) = m * x + (1 - m) * s(x)``, ``m = sigmoid((c(x) - tau) / (T std(c)))``
    (module docstring).

    Args:
        in_channels: ``C`` of the observations.
        keep, temperature, kernel, smoothing, sigma, head_channels, head_stride: see
            :class:`SGAMConfig` (ranges, defaults and why); validated the same way.

    Attributes:
        last_mask: (B, H, W) in [0, 1], the mask of the last forward (detached), or None.
    """

    def __init__(self, in_channels: int, keep: float = 0.5, temperature: float = 0.1,
                 kernel: int = 3, smoothing: str = "mean", sigma: float | None = None,
                 head_channels: int = 8, head_stride: int = 2):
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        SGAMConfig(keep, temperature, kernel, smoothing, sigma, head_channels, head_stride)
        self.in_channels = in_channels
        self.keep = float(keep)
        self.temperature = float(temperature)
        self.kernel = kernel
        self.smoothing = smoothing
        self.sigma = sigma
        self.head_channels = head_channels
        self.head_stride = head_stride
        self.head = SaliencyHead(in_channels, head_channels, head_stride)
        weight = _smoothing_kernel(kernel, smoothing, sigma)
        # Depthwise (C, 1, k, k); not persistent: rebuilt from the settings.
        self.register_buffer("smoothing_weight", weight.expand(in_channels, 1, kernel, kernel)
                             .clone(), persistent=False)
        self.last_mask: torch.Tensor | None = None
        self._bypass = False
        self._detached = False

    @property
    def config(self) -> dict[str, Any]:
        """The constructor settings, so that ``SGAM(**sgam.config)`` rebuilds the layer."""
        return {"in_channels": self.in_channels, "keep": self.keep,
                "temperature": self.temperature, "kernel": self.kernel,
                "smoothing": self.smoothing, "sigma": self.sigma,
                "head_channels": self.head_channels, "head_stride": self.head_stride}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "in_channels")

    @contextlib.contextmanager
    def bypassed(self) -> Iterator["SGAM"]:
        """Within the context, ``forward`` is the identity (``last_mask`` untouched): the
        unfiltered policy, e.g. for the distillation target or a BPDA attack's forward."""
        prev, self._bypass = self._bypass, True
        try:
            yield self
        finally:
            self._bypass = prev

    @contextlib.contextmanager
    def saliency_detached(self) -> Iterator["SGAM"]:
        """Within the context, the mask ``m(x)`` is computed without a graph: the filter's
        output is unchanged and differentiable in ``x`` through ``m * x + (1 - m) * s(x)``,
        but no loss reaches the saliency head through ``m``. For training: the head learns
        from :func:`sgam_distillation_loss` only (DESIGN.md section 3), and the policy loss
        skips the head's backward. Evaluations and attacks run outside it (the full
        derivative, mask included)."""
        prev, self._detached = self._detached, True
        try:
            yield self
        finally:
            self._detached = prev

    def _check(self, obs: torch.Tensor) -> None:
        if obs.dim() != 4 or obs.shape[-1] != self.in_channels:
            raise ValueError(f"SGAM expects (B, H, W, {self.in_channels}) observations, "
                             f"got {tuple(obs.shape)}")

    def saliency(self, obs: torch.Tensor) -> torch.Tensor:
        """``c(x)``: (B, H, W, C) -> (B, H, W) in [0, 1] (per-sample max 1), one forward."""
        self._check(obs)
        return self.head(obs.permute(0, 3, 1, 2))

    def mask_from_saliency(self, c: torch.Tensor) -> torch.Tensor:
        """``m = sigmoid((c - tau) / (T * std(c)))`` per sample, ``std(c)`` the per-sample
        standard deviation and ``tau`` the midpoint between the ``n``-th and ``(n+1)``-th
        largest values of ``c``, ``n = round(keep * H * W)`` clamped to ``[1, H*W - 1]``: the
        ``1 - keep`` quantile, placed so that exactly ``n`` pixels have ``m > 1/2`` (no ties)."""
        if self.keep >= 1:
            return torch.ones_like(c)
        flat = c.flatten(1)
        d = flat.shape[1]
        if d < 2:
            return torch.ones_like(c)
        n_keep = min(d - 1, max(1, round(self.keep * d)))
        # the n-th and (n+1)-th largest values = the two smallest of the (unsorted) top n+1,
        # a multiset that ties do not change (one selection, not two kthvalue sorts)
        top = flat.topk(n_keep + 1, dim=1, sorted=False).values
        two = top.topk(2, dim=1, largest=False, sorted=True).values  # ((n+1)-th, n-th)
        tau = 0.5 * two.sum(dim=1, keepdim=True)
        scale = self.temperature * flat.std(dim=1, keepdim=True).clamp_min(1e-6)
        return torch.sigmoid((flat - tau) / scale).view_as(c)

    def mask(self, obs: torch.Tensor) -> torch.Tensor:
        """``m(x)``: (B, H, W) in [0, 1]."""
        return self.mask_from_saliency(self.saliency(obs))

    def smooth(self, obs: torch.Tensor) -> torch.Tensor:
        """``s(x)``: depthwise blur of (B, H, W, C) with replicate padding, same shape."""
        self._check(obs)
        if self.kernel == 1:
            return obs
        x = obs.permute(0, 3, 1, 2)
        pad = self.kernel // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        w = self.smoothing_weight.to(dtype=x.dtype)
        return F.conv2d(x, w, groups=self.in_channels).permute(0, 2, 3, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) in [0, 1] -> (B, H, W, C) in [0, 1]; stores ``last_mask``; the identity
        inside :meth:`bypassed`."""
        if self._bypass:
            return obs
        return self.filter(obs)

    def filter(self, obs: torch.Tensor) -> torch.Tensor:
        """``SGAM(x)``, also inside :meth:`bypassed` (for what the encoder behind the filter
        sees, e.g. SCOR-PIO's rows on an SGAM policy); stores ``last_mask``."""
        self._check(obs)
        if self.keep >= 1:  # exactly the identity
            self.last_mask = torch.ones(obs.shape[:3], dtype=obs.dtype, device=obs.device)
            return obs
        if self._detached:
            with torch.no_grad():
                m = self.mask(obs)
        else:
            m = self.mask(obs)  # (B, H, W)
        self.last_mask = m.detach()
        m = m[..., None]
        smoothed = self.smooth(obs)
        return smoothed + m * (obs - smoothed)  # = m * x + (1 - m) * s(x), exact when s(x) = x


def _is_real(val: Any) -> bool:
    return isinstance(val, (int, float)) and not isinstance(val, bool)


def _check_int(name: str, val: Any, low: int) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")


def attach_sgam(policy: nn.Module, require_cam_layer: bool = True, **settings: Any) -> SGAM:
    """Put an :class:`SGAM` in front of the policy encoder: ``policy.input_filter = SGAM(...)``.

    Works for every arch of ``agents.make_policy_network`` (cnn, vit, hybrid); the layer is
    moved to the policy's device and dtype and replaces any previous input filter.

    Args:
        policy: a module with an ``input_filter`` slot and ``obs_shape`` ``(H, W, C)``
            (:class:`agents.networks.PolicyNetwork`).
        require_cam_layer: fail now unless the policy has the ``cam_layer`` that
            :func:`sgam_distillation_loss` needs (set False to train the head by RL alone).
        **settings: :class:`SGAM` arguments (``in_channels`` defaults to ``obs_shape[-1]``).
    Returns:
        The attached :class:`SGAM`.
    Raises:
        ValueError: no ``input_filter`` slot, no ``cam_layer`` (if required), bad settings.
    """
    if not hasattr(policy, "input_filter"):
        raise ValueError(f"{type(policy).__name__} has no 'input_filter' slot for SGAM; use a "
                         "network from agents.make_policy_network or apply SGAM to obs yourself")
    if require_cam_layer:
        find_cam_layer(policy)
    if "in_channels" not in settings:
        obs_shape = getattr(policy, "obs_shape", None)
        if obs_shape is None:
            raise ValueError("pass in_channels: the policy has no obs_shape")
        settings["in_channels"] = int(obs_shape[-1])
    sgam = SGAM(**settings)
    ref = next(iter(policy.parameters()), None)
    if ref is not None:
        sgam = sgam.to(device=ref.device, dtype=ref.dtype)
    policy.input_filter = sgam
    return sgam


def distillation_target(sgam: SGAM, policy: nn.Module, obs: torch.Tensor,
                        actions: torch.Tensor | None = None) -> torch.Tensor:
    """The distillation target of :func:`sgam_distillation_loss`: (B, H, W) detached, the
    Grad-CAM++ map of ``policy`` (greedy or given ``actions``) on the raw ``obs`` with SGAM
    bypassed, upsampled and divided by its per-sample max. One forward and a backward to the
    cam layer; compute it once per row and training iteration and pass it as ``target``.

    Raises:
        ValueError: a policy without a ``cam_layer``.
    """
    find_cam_layer(policy)
    with sgam.bypassed():
        return grad_cam_plus_plus(policy, obs.detach(), actions, score="logit", relu=True,
                                  normalize=True, upsample=True).detach()


def sgam_distillation_loss(sgam: SGAM, policy: nn.Module, obs: torch.Tensor,
                           actions: torch.Tensor | None = None, return_info: bool = False,
                           target: torch.Tensor | None = None
                           ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Distill the policy's Grad-CAM++ map into the SGAM saliency head.

    ``L = mean_{b,i,j} (c(x)_bij - G_bij)^2`` with ``G`` the Grad-CAM++ map of the greedy (or
    given) action, upsampled to H x W and divided by its per-sample max (detached), and
    ``c(x)`` the head's map (per-sample max 1). Only the head receives gradient.

    The target is computed on the raw observation, with SGAM bypassed: it is where the encoder
    looks in the true frame. Through the filter the target would depend on the mask itself
    (blurred regions lose attribution and stay masked), a self-confirming loop from which a
    wrongly masked region never recovers. If ``sgam`` is not inside ``policy`` the bypass is a
    no-op and the policy is used as is.

    Args:
        sgam: the layer to train.
        policy: the policy (with ``cam_layer``), usually the one ``sgam`` is attached to.
        obs: (B, H, W, C) in [0, 1], finite.
        actions: (B,) actions to explain; default greedy on the raw observation.
        return_info: also return a dict of floats: ``distill_loss``, ``keep_ratio`` (mean of
            ``m``) and ``top_overlap`` (fraction of the target's top-``keep`` pixels among the
            head's top-``keep`` pixels: how well the head ranks).
        target: (B, H, W) a target computed before by :func:`distillation_target` (reused
            across SGD steps: the Grad-CAM++ pass is skipped); default computed here.
    Returns:
        The scalar loss, or ``(loss, info)`` with ``return_info``.
    Cost: one forward of the policy and a backward to its cam layer (Grad-CAM++), plus one
    forward/backward of the small head; use a sub-batch of the minibatch to bound it.
    Raises:
        ValueError: non-finite obs; a policy without a ``cam_layer``.
    """
    check_obs(obs)
    obs = obs.detach()
    if target is None:
        target = distillation_target(sgam, policy, obs, actions)
    elif target.shape != obs.shape[:3]:
        raise ValueError(f"target must be (B, H, W) = {tuple(obs.shape[:3])}, got "
                         f"{tuple(target.shape)}")
    pred = sgam.saliency(obs)
    loss = F.mse_loss(pred, target.to(pred.dtype))
    if not return_info:
        return loss
    with torch.no_grad():
        mask = sgam.mask_from_saliency(pred)
        d = pred[0].numel()
        k = min(d, max(1, math.ceil(round(sgam.keep * d, 6))))
        top_pred = pred.flatten(1).topk(k, dim=1).indices
        top_tgt = target.flatten(1).topk(k, dim=1).indices
        hit = torch.zeros_like(pred.flatten(1), dtype=torch.bool).scatter_(1, top_pred, True)
        overlap = hit.gather(1, top_tgt).float().mean()
    info = {"distill_loss": float(loss.detach()), "keep_ratio": float(mask.mean()),
            "top_overlap": float(overlap)}
    return loss, info
