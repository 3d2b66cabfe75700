"""The two bases every attribution method builds on (Captum's layout: one method per file).

Every method explains a score of an action, by default the clean greedy action
``a* = argmax pi(x)`` (detached), for a policy ``policy(obs) -> logits`` with ``obs`` float in
[0, 1] shaped (B, H, W, C), and is a class with a Captum-like call
``Method(policy).attribute(obs, actions=None, ...)``.

* Gradient base (:class:`GradientAttribution`): :func:`resolve_actions` (the explained
  actions), :func:`action_log_prob` (the differentiable score) and :func:`input_gradients`
  (``d log pi(a | x) / dx`` for a stacked batch, in chunks), behind the input-gradient guard
  of :mod:`marl_fgmf.protocol`. Used by Integrated Gradients, SmoothGrad and Grad-CAM++.
* Perturbation base (:class:`PerturbationAttribution`): substrates (:func:`gaussian_blur`,
  :func:`make_substrate`), occlusion windows (:func:`patch_masks`), the stable float64 score
  of an action (:func:`action_score`) and the batched no-grad forwards of masked observations
  (:class:`PerturbationForwards`, :func:`masked_scores`). Used by occlusion, RISE, PGCA and
  the deletion/insertion metrics.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from marl_fgmf.protocol import check_input_gradient

__all__ = [
    "Attribution", "GradientAttribution", "PerturbationAttribution", "DEFAULT_CHUNK",
    "greedy_actions", "resolve_actions", "action_log_prob", "input_gradients", "check_chunk",
    "gaussian_blur", "make_substrate", "patch_masks", "action_score", "PerturbationForwards",
    "masked_scores", "spatial_map",
]

Policy = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_CHUNK = 128
"""Default ``internal_batch_size`` of the perturbation methods: bounded memory, and on CPU
chunks of 64-256 small observations run about twice as fast as one huge batch (the activations
stay in cache)."""


# ---------------------------------------------------------------------------------------------
# common to both bases
# ---------------------------------------------------------------------------------------------

class Attribution:
    """An explainer of ``policy``: ``attribute(obs, actions=None, **settings) -> map``."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def attribute(self, obs: torch.Tensor, actions: torch.Tensor | None = None,
                  **settings) -> torch.Tensor:
        raise NotImplementedError

    def resolve_actions(self, obs: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
        """:func:`resolve_actions` for this policy."""
        return resolve_actions(self.policy, obs, actions)


@torch.no_grad()
def greedy_actions(policy: Policy, obs: torch.Tensor) -> torch.Tensor:
    """``argmax_a pi(a | obs)`` as a (B,) long tensor (no gradient)."""
    return policy(obs).argmax(dim=-1)


def resolve_actions(policy: Policy, obs: torch.Tensor, actions: torch.Tensor | None) -> torch.Tensor:
    """The explained actions: ``actions`` as a (B,) long tensor on ``obs``'s device (its length
    checked against the batch), or the clean greedy actions when None."""
    if actions is None:
        return greedy_actions(policy, obs)
    actions = torch.as_tensor(actions, device=obs.device).long().reshape(-1)
    if actions.shape[0] != obs.shape[0]:
        raise ValueError(f"actions has {actions.shape[0]} entries for a batch of {obs.shape[0]}")
    return actions


def check_chunk(internal_batch_size: int | None) -> None:
    """Raise ``ValueError`` unless ``internal_batch_size`` is None or >= 1."""
    if internal_batch_size is not None and int(internal_batch_size) < 1:
        raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")


def spatial_map(attribution: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> channel-summed magnitude ``sum_c |A_c|`` (B, H, W); (B, H, W) -> ``|A|``.

    The common currency of the metrics: every method's map as a non-negative relevance."""
    if attribution.dim() == 4:
        return attribution.abs().sum(-1)
    if attribution.dim() == 3:
        return attribution.abs()
    raise ValueError(f"attribution must be (B, H, W) or (B, H, W, C), got {tuple(attribution.shape)}")


# ---------------------------------------------------------------------------------------------
# gradient base
# ---------------------------------------------------------------------------------------------

def action_log_prob(policy: Policy, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log pi(actions | obs)`` as a (B,) tensor (differentiable)."""
    logits = policy(obs)
    if actions.max() >= logits.shape[-1] or actions.min() < 0:
        raise ValueError(f"actions must be in [0, {logits.shape[-1] - 1}] for a policy with "
                         f"{logits.shape[-1]} actions")
    return torch.log_softmax(logits, dim=-1).gather(1, actions[:, None]).squeeze(1)


def input_gradients(policy: Policy, x: torch.Tensor, actions: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """``d log pi(actions | x) / dx`` for a stacked batch ``x``, ``chunk`` rows per pass."""
    grads = torch.empty_like(x)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk].clone().requires_grad_(True)
        with torch.enable_grad():
            lp = action_log_prob(policy, rows, actions[start:start + chunk])
            grads[start:start + chunk] = torch.autograd.grad(lp.sum(), rows)[0]
    return grads


class GradientAttribution(Attribution):
    """Base of the gradient methods: chunked input gradients of the explained actions.

    Before its first gradient on a policy, :meth:`input_gradients` runs the input-gradient
    guard (:func:`marl_fgmf.protocol.check_input_gradient`, cached per policy): a policy whose
    forward runs under ``torch.no_grad`` / ``inference_mode``, detaches its input or rounds it
    (a zero gradient) raises an :class:`~marl_fgmf.protocol.InputGradientError` naming the
    likely cause, instead of yielding an all-zero map (or a bare autograd error).
    """

    def input_gradients(self, x: torch.Tensor, actions: torch.Tensor, chunk: int) -> torch.Tensor:
        """:func:`input_gradients` for this policy, after the input-gradient guard."""
        check_input_gradient(self.policy, x, name=type(self).__name__)
        return input_gradients(self.policy, x, actions, chunk)


# ---------------------------------------------------------------------------------------------
# perturbation base: substrates, patch masks, scores, batched masked forwards
# ---------------------------------------------------------------------------------------------

def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 2) -> (3, 2)``; raises on non-positive sizes."""
    pair = (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a (rows, cols) pair, got {value!r}")
    return pair  # type: ignore[return-value]


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


def action_score(logits: torch.Tensor, actions: torch.Tensor, score: str) -> torch.Tensor:
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


class PerturbationForwards:
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
def masked_scores(policy: Policy, obs: torch.Tensor, fill: torch.Tensor, masks: torch.Tensor,
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
    with PerturbationForwards(obs.device):
        for start in range(0, total, step):
            idx = rows[start:start + step]
            bi, pi = idx // n_masks, idx % n_masks  # sample and mask of each row
            m = masks[pi].unsqueeze(-1)  # (n, H, W, 1)
            x = obs[bi] * (1 - m) + fill[bi] * m
            flat[idx] = action_score(policy(x), actions[bi], score)
    return out


class PerturbationAttribution(Attribution):
    """Base of the perturbation methods: batched no-grad scores of masked observations."""

    def masked_scores(self, obs: torch.Tensor, fill: torch.Tensor, masks: torch.Tensor,
                      actions: torch.Tensor, score: str, chunk: int | None,
                      clean_score: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`masked_scores` for this policy."""
        return masked_scores(self.policy, obs, fill, masks, actions, score, chunk, clean_score)
