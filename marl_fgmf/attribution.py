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

import math
from typing import Callable

import torch
from torch import nn

__all__ = [
    "check_finite_obs", "greedy_actions", "action_log_prob", "integrated_gradients",
    "IntegratedGradients", "GradCAMPlusPlus", "grad_cam_plus_plus",
    "SmoothGrad", "Occlusion", "RISE", "METHODS", "make_explainer", "spatial_map",
    "attribution_map", "gaussian_blur", "make_substrate", "patch_masks", "rise_masks",
    "occlusion_patch_deltas", "patch_deltas_to_map",
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


def _input_grads(policy, x: torch.Tensor, actions: torch.Tensor, chunk: int) -> torch.Tensor:
    """``d log pi(actions | x) / dx`` for a stacked batch ``x``, ``chunk`` rows per pass."""
    grads = torch.empty_like(x)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk].clone().requires_grad_(True)
        with torch.enable_grad():
            lp = action_log_prob(policy, rows, actions[start:start + chunk])
            grads[start:start + chunk] = torch.autograd.grad(lp.sum(), rows)[0]
    return grads


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
        grads = _input_grads(self.policy, path, path_actions, chunk)
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


# ---------------------------------------------------------------------------------------------
# Shared helpers of the perturbation methods: substrates, patch masks, eval mode.
# ---------------------------------------------------------------------------------------------

def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 2) -> (3, 2)``; raises on non-positive sizes."""
    pair = (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a (rows, cols) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_chunk(internal_batch_size: int | None) -> None:
    if internal_batch_size is not None and int(internal_batch_size) < 1:
        raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")


class _EvalMode:
    """Context manager: put an ``nn.Module`` policy in eval mode and restore its mode after
    (torchattacks' lesson: an explainer must not leave dropout or SGAM's training noise on)."""

    def __init__(self, policy):
        self.policy = policy if isinstance(policy, nn.Module) else None
        self.was_training = False

    def __enter__(self):
        if self.policy is not None:
            self.was_training = self.policy.training
            self.policy.eval()
        return self

    def __exit__(self, *exc):
        if self.policy is not None and self.was_training:
            self.policy.train()
        return False


def gaussian_blur(obs: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Separable Gaussian blur of a (B, H, W, C) batch, channel by channel.

    ``x~ = G_sigma * x`` with a normalized kernel of radius ``ceil(3 sigma)`` and replicate
    padding (so the blurred copy keeps the observation's range and mean brightness near the
    border). This is the "blurred copy" substrate of PGCA and occlusion (Fong and Vedaldi
    2017: blur removes the fine detail of a region without inventing an out-of-distribution
    edge). ``sigma <= 0`` returns a copy of ``obs``.
    """
    if obs.dim() != 4:
        raise ValueError(f"gaussian_blur expects (B, H, W, C), got {tuple(obs.shape)}")
    if sigma <= 0:
        return obs.clone()
    b, h, w, c = obs.shape
    radius = max(1, math.ceil(3.0 * float(sigma)))
    t = torch.arange(-radius, radius + 1, dtype=obs.dtype, device=obs.device)
    kernel = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    kernel = kernel / kernel.sum()
    x = obs.permute(0, 3, 1, 2).reshape(b * c, 1, h, w)  # (B*C, 1, H, W)
    x = nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))  # along rows
    x = nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))  # along columns
    return x.reshape(b, c, h, w).permute(0, 2, 3, 1).contiguous()


def make_substrate(obs: torch.Tensor, substrate: str | float | torch.Tensor = "blur",
                   blur_sigma: float = 2.0) -> torch.Tensor:
    """The values a removed pixel takes, shaped like ``obs``.

    Args:
        substrate: ``"blur"`` (a :func:`gaussian_blur` copy, sigma ``blur_sigma``), ``"zero"``
            (a black frame), a number (a constant frame) or a tensor broadcastable to ``obs``.
    """
    if isinstance(substrate, str):
        if substrate == "blur":
            return gaussian_blur(obs, blur_sigma)
        if substrate == "zero":
            return torch.zeros_like(obs)
        raise ValueError(f"substrate must be 'blur', 'zero', a number or a tensor, got {substrate!r}")
    sub = torch.as_tensor(substrate, dtype=obs.dtype, device=obs.device)
    try:
        sub = sub.expand_as(obs)
    except RuntimeError:
        raise ValueError(f"substrate of shape {tuple(sub.shape)} does not broadcast to obs "
                         f"{tuple(obs.shape)}") from None
    if not torch.isfinite(sub).all():
        raise ValueError("substrate contains non-finite values (NaN or inf)")
    return sub


def _window_starts(size: int, window: int, stride: int) -> torch.Tensor:
    """Start indices ``0, s, 2s, ..., ceil((size - window) / s) * s`` of a sliding window; the
    last window is clipped at the border so every index is covered (Captum's convention)."""
    n = math.ceil((size - window) / stride) + 1
    return torch.arange(n) * stride


def patch_masks(height: int, width: int, patch: int | tuple[int, int] = 3,
                stride: int | tuple[int, int] = 1, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All occlusion windows of an ``height x width`` image as a (P, H, W) 0/1 tensor.

    Windows start at multiples of ``stride`` in each direction (row-major order) and are
    clipped at the border; ``P = n_rows * n_cols`` with ``n = ceil((size - patch) / stride) + 1``.

    Raises:
        ValueError: the patch is larger than the image, or the stride exceeds the patch (which
            would leave pixels uncovered).
    """
    (ph, pw), (sh, sw) = _pair(patch, "patch"), _pair(stride, "stride")
    if ph > height or pw > width:
        raise ValueError(f"patch {(ph, pw)} is larger than the observation {(height, width)}")
    if (sh > ph and ph < height) or (sw > pw and pw < width):
        raise ValueError(f"stride {(sh, sw)} must not exceed patch {(ph, pw)}: pixels would be "
                         "left uncovered")
    rows, cols = torch.arange(height), torch.arange(width)
    r0, c0 = _window_starts(height, ph, sh), _window_starts(width, pw, sw)
    row_in = (rows[None] >= r0[:, None]) & (rows[None] < r0[:, None] + ph)  # (nr, H)
    col_in = (cols[None] >= c0[:, None]) & (cols[None] < c0[:, None] + pw)  # (nc, W)
    masks = row_in[:, None, :, None] & col_in[None, :, None, :]  # (nr, nc, H, W)
    return masks.reshape(-1, height, width).to(device=device, dtype=dtype)


def _stable_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log pi(a)`` in float64, accurate even when ``pi(a)`` rounds to 1.

    ``log pi(a) = -log(1 + sum_{j != a} exp(z_j - z_a)) = -softplus(logsumexp_{j != a}(z_j - z_a))``.
    ``log_softmax`` in float32 returns exactly 0 once ``1 - pi(a) < 6e-8``, so the occlusion drop
    of a confident policy (a trained PPO agent often is) would vanish; this form keeps it.
    """
    z = logits.double()
    d = z - z.gather(1, actions[:, None])  # (B, A), 0 at the explained action
    others = d.masked_fill(nn.functional.one_hot(actions, z.shape[1]).bool(), float("-inf"))
    return -nn.functional.softplus(torch.logsumexp(others, dim=1), threshold=30.0)


def _score(logits: torch.Tensor, actions: torch.Tensor, score: str) -> torch.Tensor:
    """(B,) float64 score of the explained action: ``log_prob`` (log pi, computed stably),
    ``prob`` (pi) or ``logit``."""
    if actions.numel() and (int(actions.max()) >= logits.shape[-1] or int(actions.min()) < 0):
        raise ValueError(f"actions must be in [0, {logits.shape[-1] - 1}] for a policy with "
                         f"{logits.shape[-1]} actions, got {actions.tolist()[:8]}")
    if score == "log_prob":
        return _stable_log_prob(logits, actions)
    if score == "prob":
        out = torch.softmax(logits.double(), dim=-1)
    elif score == "logit":
        out = logits.double()
    else:
        raise ValueError(f"score must be 'log_prob', 'prob' or 'logit', got {score!r}")
    return out.gather(1, actions[:, None]).squeeze(1)


DEFAULT_CHUNK = 128
"""Default ``internal_batch_size`` of the perturbation methods: bounded memory, and on CPU
chunks of 64-256 small observations run about twice as fast as one huge batch (the activations
stay in cache)."""


class _PerturbationForwards:
    """Context of the batched no-grad forwards of the perturbation methods (occlusion, RISE,
    PGCA's occlusion): ``torch.inference_mode`` (no autograd bookkeeping at all) and, on CPU,
    PyTorch's composite multi-head attention instead of its fused inference kernel
    (``torch.backends.mha`` fast path). On CPU, for the short token sequences of small pixel
    observations, the fused kernel is the slower one (measured with the ViT encoder on 21x21
    beacon frames, 128 rows per forward, one thread: 112 ms fused, 73 ms composite); the two
    compute the same attention. The caller's fast-path setting is restored on exit.
    """

    def __init__(self, device: torch.device):
        self.cpu = torch.device(device).type == "cpu"
        self.mode = torch.inference_mode()
        self.fastpath = None

    def __enter__(self):
        mha = getattr(torch.backends, "mha", None)
        if self.cpu and mha is not None and hasattr(mha, "get_fastpath_enabled"):
            self.fastpath = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        if self.fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self.fastpath)
        return False


@torch.no_grad()
def _masked_scores(policy, obs: torch.Tensor, fill: torch.Tensor, masks: torch.Tensor,
                   actions: torch.Tensor, score: str, chunk: int | None,
                   clean_score: torch.Tensor | None = None) -> torch.Tensor:
    """Score of every (sample, mask) pair, (B, P) float64: ``s(x * (1 - M_p) + fill * M_p)``.

    The B*P perturbed observations are built chunk by chunk (``chunk`` rows at a time, all
    masks of all samples flattened sample-major), never all at once. With ``clean_score``
    given, pairs whose perturbed observation equals the clean one exactly (the mask only
    touches pixels where ``fill == obs``, e.g. a black background under a zero substrate) are
    not evaluated: their score is the clean score.
    """
    b, n_masks = obs.shape[0], masks.shape[0]
    out = torch.empty(b, n_masks, dtype=torch.float64, device=obs.device)
    if clean_score is not None:
        changed = ((obs != fill).any(-1)).to(masks.dtype)  # (B, H, W)
        active = torch.einsum("bhw,phw->bp", changed, masks) > 0
        out[:] = clean_score[:, None]
        rows = active.flatten().nonzero().squeeze(1)  # flat sample-major indices
    else:
        rows = torch.arange(b * n_masks, device=obs.device)
    flat = out.view(-1)
    total = rows.numel()
    step = max(total, 1) if chunk is None else int(chunk)
    with _PerturbationForwards(obs.device):
        for start in range(0, total, step):
            idx = rows[start:start + step]
            bi, pi = idx // n_masks, idx % n_masks  # sample and mask of each row
            m = masks[pi].unsqueeze(-1)  # (n, H, W, 1)
            x = obs[bi] * (1 - m) + fill[bi] * m
            flat[idx] = _score(policy(x), actions[bi], score)
    return out


# ---------------------------------------------------------------------------------------------
# SmoothGrad
# ---------------------------------------------------------------------------------------------

class SmoothGrad:
    """SmoothGrad (Smilkov, Thorat, Kim, Viegas and Wattenberg 2017).

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

    def __init__(self, policy: Callable[[torch.Tensor], torch.Tensor]):
        self.policy = policy

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
        check_finite_obs(obs)
        _check_chunk(internal_batch_size)
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        obs = obs.detach()
        with _EvalMode(self.policy):
            actions = _resolve_actions(self.policy, obs, actions)
            b, n = obs.shape[0], int(n_samples)
            gen = torch.Generator(device=obs.device).manual_seed(int(seed))
            noise = torch.randn((n, *obs.shape), generator=gen, device=obs.device, dtype=obs.dtype)
            noisy = (obs[None] + float(noise_level) * noise).reshape(n * b, *obs.shape[1:])
            noisy_actions = actions.repeat(n)
            step = n * b if internal_batch_size is None else int(internal_batch_size)
            grads = _input_grads(self.policy, noisy, noisy_actions, step)
        grads = grads.view(n, b, *obs.shape[1:])
        out = (grads * grads).mean(0) if squared else grads.mean(0)
        return (out * obs if multiply_by_inputs else out).detach()


# ---------------------------------------------------------------------------------------------
# Occlusion
# ---------------------------------------------------------------------------------------------

def occlusion_patch_deltas(policy, obs: torch.Tensor, actions: torch.Tensor,
                           clean_score: torch.Tensor, substrate: torch.Tensor,
                           masks: torch.Tensor, score: str = "log_prob",
                           internal_batch_size: int | None = None) -> torch.Tensor:
    """Per-patch score drops ``d_bp = s(x_b) - s(x_b with patch p replaced by substrate)``, (B, P).

    The building block shared by :class:`Occlusion` and PGCA: the clean scores are passed in
    (PGCA computes them once, in the same forward that picks the greedy actions).
    """
    drops = clean_score[:, None] - _masked_scores(policy, obs, substrate, masks, actions, score,
                                                  internal_batch_size, clean_score)
    return drops.to(obs.dtype)  # differences taken in float64, then back to the obs dtype


def patch_deltas_to_map(deltas: torch.Tensor, masks: torch.Tensor,
                        magnitude: bool = False) -> torch.Tensor:
    """Average per-patch values over the patches covering each pixel.

    ``O_b(i) = sum_p [i in p] d_bp / sum_p [i in p]`` (or ``|d_bp|`` when ``magnitude``):
    (B, P) and (P, H, W) -> (B, H, W).
    """
    values = deltas.abs() if magnitude else deltas
    counts = masks.sum(0)  # (H, W), >= 1 everywhere by construction of patch_masks
    return torch.einsum("bp,phw->bhw", values, masks) / counts


class Occlusion:
    """Occlusion (Zeiler and Fergus, ECCV 2014), sliding a patch over every channel.

    For each window ``p`` (``patch`` x ``patch`` pixels, all channels, moved by ``stride``) the
    score drop ``d_p = s(x) - s(x with window p replaced by the substrate)`` is spread over the
    window's pixels and averaged over the windows covering each pixel:

    ``O(i) = sum_{p : i in p} d_p / #{p : i in p}``  (signed), or with ``|d_p|`` (magnitude).

    The default score is ``log pi(a | x)`` and the default substrate a blurred copy of ``x``
    (:func:`gaussian_blur`); ``substrate="zero"`` or a number gives the classic constant patch.
    A positive signed value means the region supports the action; the magnitude counts
    evidence for and against alike (what PGCA uses). Windows follow Captum's convention
    (starts at multiples of the stride, last one clipped), so with Captum's ``baselines`` set to
    the same substrate the signed map equals ``captum.attr.Occlusion`` with window
    ``(patch, patch, C)`` and strides ``(stride, stride, C)``.

    Batched: all windows of all samples are evaluated as ``B * P`` perturbed observations in
    chunks of ``internal_batch_size`` rows, under ``no_grad``.

    Example:
        >>> occ = Occlusion(policy).attribute(obs, patch=3, stride=1, magnitude=True)  # (B,H,W)
    """

    def __init__(self, policy: Callable[[torch.Tensor], torch.Tensor]):
        self.policy = policy

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  patch: int | tuple[int, int] = 3, stride: int | tuple[int, int] = 1,
                  substrate: str | float | torch.Tensor = "blur", blur_sigma: float = 2.0,
                  magnitude: bool = False, score: str = "log_prob",
                  internal_batch_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: (B,) actions; default the clean greedy actions.
            patch, stride: window size and step (an int or a (rows, cols) pair).
            substrate: ``"blur"``, ``"zero"``, a number or a tensor like ``obs``.
            blur_sigma: Gaussian sigma of the blurred substrate, in pixels.
            magnitude: average ``|d_p|`` instead of ``d_p``.
            score: ``log_prob`` (default), ``prob`` or ``logit``.
            internal_batch_size: perturbed observations per forward (``None``: all ``B * P``
                at once; windows that change nothing are never evaluated).
        Returns:
            (B, H, W) map, detached.
        """
        check_finite_obs(obs)
        _check_chunk(internal_batch_size)
        obs = obs.detach()
        masks = patch_masks(obs.shape[1], obs.shape[2], patch, stride, obs.device, obs.dtype)
        fill = make_substrate(obs, substrate, blur_sigma)
        with _EvalMode(self.policy), torch.no_grad():
            logits = self.policy(obs)
            actions = logits.argmax(-1) if actions is None else _resolve_actions(self.policy, obs, actions)
            clean = _score(logits, actions, score)
            deltas = occlusion_patch_deltas(self.policy, obs, actions, clean, fill, masks, score,
                                            internal_batch_size)
        return patch_deltas_to_map(deltas, masks, magnitude)


# ---------------------------------------------------------------------------------------------
# RISE
# ---------------------------------------------------------------------------------------------

def rise_masks(n_masks: int, height: int, width: int, grid: int = 7, p_keep: float = 0.5,
               seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RISE's random smooth masks (Petsiuk, Das and Saenko, BMVC 2018), (N, H, W) in [0, 1].

    Each mask: a ``grid x grid`` binary grid with ``P(1) = p_keep``, bilinearly upsampled to
    ``(grid + 1) * ceil(H / grid)`` x ``(grid + 1) * ceil(W / grid)`` pixels, then cropped to
    ``H x W`` at a random offset in ``[0, cell)`` (so the mask edges do not align with a fixed
    lattice). Deterministic given ``seed``.
    """
    if int(n_masks) < 1 or int(grid) < 1 or not 0 < p_keep <= 1:
        raise ValueError(f"need n_masks >= 1, grid >= 1 and 0 < p_keep <= 1, got n_masks="
                         f"{n_masks}, grid={grid}, p_keep={p_keep}")
    gen = torch.Generator().manual_seed(int(seed))
    n, s = int(n_masks), int(grid)
    ch, cw = math.ceil(height / s), math.ceil(width / s)
    cells = (torch.rand((n, 1, s, s), generator=gen) < p_keep).to(torch.float64)
    up = nn.functional.interpolate(cells, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear",
                                   align_corners=False)[:, 0]  # (N, (s+1)ch, (s+1)cw)
    dy = torch.randint(0, ch, (n,), generator=gen)
    dx = torch.randint(0, cw, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(height)[None])[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(width)[None])[:, None, :]  # (N, 1, W)
    masks = up[torch.arange(n)[:, None, None], rows, cols]  # (N, H, W)
    return masks.to(device=device, dtype=dtype)


class RISE:
    """RISE: Randomized Input Sampling for Explanation (Petsiuk, Das and Saenko, BMVC 2018).

    ``S(i) = 1 / (N * p_keep) * sum_{j=1..N} pi(a | x (.) M_j + (1 - M_j) (.) b) * M_j(i)``

    with the random smooth masks of :func:`rise_masks` (shared by all samples) and substrate
    ``b`` (zero in the paper; ``"blur"`` or a number possible). The score is the action
    probability, as in the paper. Black-box: only forward passes, ``B * N`` of them in chunks
    of ``internal_batch_size`` rows, under ``no_grad``.

    Example:
        >>> sal = RISE(policy).attribute(obs, n_masks=1000, grid=7, seed=0)  # (B, H, W)
    """

    def __init__(self, policy: Callable[[torch.Tensor], torch.Tensor]):
        self.policy = policy

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  n_masks: int = 1000, grid: int = 7, p_keep: float = 0.5, seed: int = 0,
                  substrate: str | float | torch.Tensor = "zero", blur_sigma: float = 2.0,
                  internal_batch_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
        """Args:
            obs: (B, H, W, C) float in [0, 1].
            actions: (B,) actions; default the clean greedy actions.
            n_masks: ``N``; grid: low-resolution grid side ``s``; p_keep: ``P(cell kept)``.
            seed: mask seed (the same masks for every sample and every chunking).
            substrate: what a masked pixel becomes (default ``"zero"``, as in the paper).
            internal_batch_size: masked observations per forward (``None``: all ``B * N``).
        Returns:
            (B, H, W) saliency, detached.
        """
        check_finite_obs(obs)
        _check_chunk(internal_batch_size)
        obs = obs.detach()
        masks = rise_masks(n_masks, obs.shape[1], obs.shape[2], grid, p_keep, seed,
                           obs.device, obs.dtype)
        fill = make_substrate(obs, substrate, blur_sigma)
        with _EvalMode(self.policy), torch.no_grad():
            actions = _resolve_actions(self.policy, obs, actions)
            # _masked_scores replaces M with fill; RISE keeps M, so pass the complement.
            probs = _masked_scores(self.policy, obs, fill, 1 - masks, actions, "prob",
                                   internal_batch_size)  # (B, N)
        probs = probs.to(obs.dtype)
        return torch.einsum("bn,nhw->bhw", probs, masks) / (masks.shape[0] * float(p_keep))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def _make_pgca(policy):
    from marl_fgmf.pgca import PGCA  # lazy: pgca builds on this module
    return PGCA(policy)


METHODS: dict[str, Callable] = {
    "ig": IntegratedGradients,
    "smoothgrad": SmoothGrad,
    "occlusion": Occlusion,
    "gradcampp": GradCAMPlusPlus,
    "rise": RISE,
    "pgca": _make_pgca,
}
"""Explainer factories by name: ``METHODS[name](policy)`` has ``attribute(obs, actions=None,
...)``. Pixel methods (``ig``, ``smoothgrad``) return (B, H, W, C); spatial methods
(``occlusion``, ``gradcampp``, ``rise``, ``pgca``) return (B, H, W); :func:`spatial_map`
turns either into a (B, H, W) magnitude map."""


def make_explainer(name: str, policy):
    """The explainer ``name`` (one of :data:`METHODS`) for ``policy``.

    Example:
        >>> maps = make_explainer("occlusion", policy).attribute(obs, patch=3)
    """
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name](policy)


def spatial_map(attribution: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> channel-summed magnitude ``sum_c |A_c|`` (B, H, W); (B, H, W) -> ``|A|``.

    The common currency of the metrics: every method's map as a non-negative relevance."""
    if attribution.dim() == 4:
        return attribution.abs().sum(-1)
    if attribution.dim() == 3:
        return attribution.abs()
    raise ValueError(f"attribution must be (B, H, W) or (B, H, W, C), got {tuple(attribution.shape)}")


def attribution_map(name: str, policy, obs: torch.Tensor, actions: torch.Tensor | None = None,
                    **settings) -> torch.Tensor:
    """``spatial_map(make_explainer(name, policy).attribute(obs, actions, **settings))``:
    any method's explanation as a (B, H, W) non-negative map (what the metrics take)."""
    return spatial_map(make_explainer(name, policy).attribute(obs, actions, **settings))
