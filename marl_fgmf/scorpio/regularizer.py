"""SCOR-PIO 2.0's maths: the exploitable subspace, Pearlmutter's HVP and the penalty R
(the package docstring, :mod:`marl_fgmf.scorpio`, states the algorithm and its cost)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from marl_fgmf.attribution import integrated_gradients
from marl_fgmf.protocol import check_input_gradient, check_obs, expected_obs_shape

__all__ = [
    "ScorpioConfig", "ExploitableSubspace", "hvp", "exploitable_mask", "select_sub_batch",
    "compute_exploitable_subspace", "scorpio_regularizer", "double_backward_safe",
]

_EPS = 1e-12


@contextlib.contextmanager
def double_backward_safe() -> Iterator[None]:
    """Context in which every forward pass is twice differentiable.

    PyTorch's fused scaled-dot-product-attention kernels (flash / memory-efficient, used by
    ``nn.MultiheadAttention``) have no derivative of their backward; the math kernel does.
    Only the forward needs the context: the backward replays the ops that were recorded.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # lazy: torch >= 2.3 only
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


@dataclass(frozen=True)
class ScorpioConfig:
    """Settings of SCOR-PIO 2.0, validated at construction (``ValueError`` names the setting).

    Defaults are sized for the cost target of issue 14 (FGMF's whole training at most 1.5x
    plain PPO's). The exact HVP penalty costs about 9 plain forward/backward passes per
    regularized row (a double-backward graph, backpropagated once more: 3.1 ms a row against
    0.34 ms on the default CNN at 21x21, one CPU thread, ``scripts/profile_learner.py``), so
    an SGD step costs about ``1 + 9 * reg_fraction`` plain steps plus a fixed ~7 ms per call;
    ``reg_fraction = 1/32`` gave update-time ratios of 1.26-1.63 across the CNN, ViT and
    hybrid encoders at 21x21 to 84x84 frames (``1/16`` about 1.6-1.7 at 21x21). ``R`` is a mean
    over the drawn rows, so the fraction sets the variance of the penalty's gradient, not its
    expected size. IG uses 8 steps, which is enough to rank coordinates (the mask needs an
    ordering of ``|IG|``, not completeness); computed once per row and iteration it adds about
    ``9 * reg_fraction / num_epochs``. Tune the lambdas on the task: both terms are in the
    units of ``l = -log pi``.
    """

    lambda_curv: float = 0.01
    """Weight of the curvature term ``mean ||M * Hv||^2`` (>= 0); SCOR-PIO's main term. The
    term is ~1e-9 at PPO's near-uniform initialization but ~1e3 on a trained beacon policy
    (measured), so a weight of 1 would swamp a PPO loss of ~0.1 once the policy sharpens;
    0.01 is the setting measured in the README (robust, 94% of the optimum at 80 iterations)."""
    lambda_grad: float = 0.01
    """Weight of the gradient term ``mean ||M * g||^2`` (>= 0); LLR pairs it with the
    curvature term. ``mean ||M g||^2`` is ~6 on a trained beacon policy."""
    rho: float = 0.2
    """Fraction in (0, 1] of coordinates, by ``|g|``, that count as sensitive."""
    rho_salient: float = 0.1
    """Fraction in (0, 1] of coordinates, by ``|IG|``, that count as salient (never masked)."""
    ig_steps: int = 8
    """Right-Riemann steps of IG (>= 1); cost is linear in it, ranking needs few."""
    power_iters: int = 0
    """Power-iteration refinements of ``v`` (>= 0); each costs one HVP pass, so the default
    keeps the cost within ``ig_steps + 3`` passes; the sign direction is CURE's choice."""
    reg_fraction: float = 0.03125
    """Fraction in (0, 1] of the minibatch rows the penalty is computed on (at least 1 row;
    in training a content-based draw of about this fraction of each minibatch, see
    :class:`IterationSubspaces`); 1/32 (1/16 before issue 14) keeps the update-time ratio
    at 1.3-1.6 (see above)."""
    reg_every: int = 2
    """SGD steps per penalty evaluation in training (>= 1; :class:`IterationSubspaces`): the
    penalty is evaluated on every ``reg_every``-th step, on the rows drawn in the last
    ``reg_every`` minibatches, times ``reg_every``: the same rows and the same total weight
    per iteration as a penalty at every step, in fewer and larger double-backward calls. A
    call has a fixed cost about that of 3-4 rows (parameter-sized products and sums in the
    third-order graph: 14 ms for 1 row, 31 ms for 8, 44 ms for 16 on the default CNN at
    21x21, two CPU threads), so 2 cuts the penalty's time by about 30%. 1: every step. Rows
    pending when an iteration ends are penalized in the next one (never dropped).
    :func:`scorpio_regularizer` alone ignores it."""
    max_reg_samples: int | None = None
    """Optional cap (>= 1) on the sub-batch rows, for a fixed absolute cost on large batches."""
    ig_internal_batch_size: int | None = None
    """Rows per IG chunk (>= 1), to bound memory; default all ``ig_steps * n`` rows at once."""
    seed: int | None = None
    """Seed of the sub-batch selection; ``None`` uses torch's global RNG (seeded by RLlib)."""

    def __post_init__(self) -> None:
        for name in ("lambda_curv", "lambda_grad"):
            val = getattr(self, name)
            if not _is_real(val) or not math.isfinite(val) or val < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
        for name in ("rho", "rho_salient", "reg_fraction"):
            val = getattr(self, name)
            if not _is_real(val) or not 0 < val <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {val!r}")
        if not _is_int(self.ig_steps) or self.ig_steps < 1:
            raise ValueError(f"ig_steps must be an integer >= 1, got {self.ig_steps!r}")
        if not _is_int(self.reg_every) or self.reg_every < 1:
            raise ValueError(f"reg_every must be an integer >= 1, got {self.reg_every!r}")
        if not _is_int(self.power_iters) or self.power_iters < 0:
            raise ValueError(f"power_iters must be an integer >= 0, got {self.power_iters!r}")
        for name in ("max_reg_samples", "ig_internal_batch_size"):
            val = getattr(self, name)
            if val is not None and (not _is_int(val) or val < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {val!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``learner_config_dict`` and checkpoints); ``ScorpioConfig(**d)``."""
        return asdict(self)


def _is_real(val: Any) -> bool:
    return isinstance(val, (int, float)) and not isinstance(val, bool)


def _is_int(val: Any) -> bool:
    return isinstance(val, int) and not isinstance(val, bool)


@dataclass
class ExploitableSubspace:
    """The exploitable subspace of a sub-batch, computed once and reused across SGD steps.

    Attributes:
        obs: (n, H, W, C) the rows (detached) the penalty is evaluated on.
        actions: (n,) greedy actions ``a*`` at computation time (the attacker's target).
        mask: (n, H, W, C) bool, ``M``.
        direction: (n, H, W, C) ``v``, unit L2 norm per sample inside ``M`` (zero where a
            sample's mask is empty).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    direction: torch.Tensor

    @property
    def mask_fraction(self) -> float:
        """Mean over samples of ``|M| / D`` (D = H*W*C)."""
        return float(self.mask.float().mean())

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def to(self, device: torch.device | str) -> "ExploitableSubspace":
        return ExploitableSubspace(self.obs.to(device), self.actions.to(device),
                                   self.mask.to(device), self.direction.to(device))

    def rows(self, index: torch.Tensor | list[int]) -> "ExploitableSubspace":
        """The subspace of the rows ``index`` (a new object; tensors indexed, not copied twice)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.obs.device)
        return ExploitableSubspace(self.obs[index], self.actions[index], self.mask[index],
                                   self.direction[index])

    @staticmethod
    def cat(parts: list["ExploitableSubspace"]) -> "ExploitableSubspace":
        """The rows of ``parts``, in order, as one subspace."""
        if not parts:
            raise ValueError("cat needs at least one subspace")
        return ExploitableSubspace(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                     ("obs", "actions", "mask", "direction")))


def hvp(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor,
        create_graph: bool = False) -> torch.Tensor:
    """Exact Hessian-vector product ``H(x) v`` with ``H = d^2 loss_fn / dx^2`` (Pearlmutter 1994).

    ``Hv = grad_x <grad_x loss_fn(x), v>``: one backward with graph and one double backward,
    about the cost of two gradients, never forming the Hessian. Samples of a batch are
    independent, so for a summed per-sample loss ``Hv`` is the per-sample products stacked.

    Args:
        loss_fn: maps ``x`` to a scalar (e.g. ``-log pi(a*|x).sum()``).
        x: the point; it is detached and becomes a fresh leaf (no gradient flows to ``x``).
        v: the direction, shaped like ``x``.
        create_graph: keep the graph of ``Hv`` (to the parameters ``loss_fn`` closes over),
            so that a penalty on ``Hv`` trains them.
    Returns:
        Tensor shaped like ``x``; zeros where the loss is linear in ``x``.

    Example:
        >>> hv = hvp(lambda x: -torch.log_softmax(policy(x), -1)[:, 0].sum(), obs, v)
    """
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), double_backward_safe():
        loss = loss_fn(leaf)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        return _hvp_from_grad(g, leaf, v, create_graph=create_graph, retain_graph=create_graph)


def _hvp_from_grad(g: torch.Tensor, x: torch.Tensor, v: torch.Tensor, create_graph: bool,
                   retain_graph: bool) -> torch.Tensor:
    """Double backward ``grad_x <g, v>`` for ``g = grad_x l`` built with ``create_graph``."""
    if not g.requires_grad:  # loss linear in x: the Hessian is zero
        return torch.zeros_like(x)
    (hv,) = torch.autograd.grad(g, x, grad_outputs=v.detach().to(g.dtype),
                                create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True)
    return torch.zeros_like(x) if hv is None else hv


def _top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``ceil(fraction * D)`` largest entries of each row of (n, D) ``scores``
    (ties broken by ``torch.topk``)."""
    d = scores.shape[1]
    k = min(d, max(1, math.ceil(round(fraction * d, 6))))
    top = torch.zeros_like(scores, dtype=torch.bool)
    if k == d:
        return ~top
    return top.scatter_(1, scores.topk(k, dim=1, sorted=False).indices, True)


def exploitable_mask(grad: torch.Tensor, attribution: torch.Tensor, rho: float,
                     rho_salient: float) -> torch.Tensor:
    """Exploitable mask ``M = top_rho(|g|) AND NOT top_rho_salient(|A|)``, per sample.

    Per sample (dimension 0) over its ``D`` coordinates: the ``ceil(rho * D)`` coordinates of
    largest ``|grad|`` that are not among the ``ceil(rho_salient * D)`` of largest
    ``|attribution|``. ``rho = 1`` makes every coordinate sensitive (``M`` = the non-salient
    ones); ``rho_salient = 1`` makes every coordinate salient (``M`` empty).

    Args:
        grad: (n, ...) input gradient ``g`` of the attacker loss.
        attribution: (n, ...) attribution ``A`` (IG), same shape; absolute values are taken.
        rho, rho_salient: fractions in (0, 1].
    Returns:
        Bool tensor shaped like ``grad``.
    """
    for name, val in (("rho", rho), ("rho_salient", rho_salient)):
        if not _is_real(val) or not 0 < val <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {val!r}")
    if grad.shape != attribution.shape or grad.dim() < 2:
        raise ValueError(f"grad and attribution must share a (n, ...) shape, got "
                         f"{tuple(grad.shape)} and {tuple(attribution.shape)}")
    n = grad.shape[0]
    sensitive = _top_fraction(grad.detach().abs().reshape(n, -1), rho)
    salient = _top_fraction(attribution.detach().abs().reshape(n, -1), rho_salient)
    return (sensitive & ~salient).reshape(grad.shape)


def _normalize_per_sample(t: torch.Tensor) -> torch.Tensor:
    norm = t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))
    return torch.where(norm > _EPS, t / norm.clamp_min(_EPS), torch.zeros_like(t))


def select_sub_batch(batch_size: int, config: ScorpioConfig,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows on which the penalty is computed: ``n = min(max(1, ceil(reg_fraction * B)),
    max_reg_samples)`` rows drawn without replacement (sorted); all rows when ``n == B``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = max(1, math.ceil(round(config.reg_fraction * batch_size, 6)))
    if config.max_reg_samples is not None:
        n = min(n, config.max_reg_samples)
    if n >= batch_size:
        return torch.arange(batch_size, device=device)
    if generator is None and config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(batch_size, generator=generator)[:n].sort().values
    return idx.to(device)


def _check_rows(policy: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor) -> None:
    """The entry checks of SCOR-PIO: ``obs`` on the protocol (layout, range, the policy's
    declared ``obs_shape``), then the input-gradient guard (a no_grad or rounding policy has no
    input curvature to penalize: R would be 0 and say nothing)."""
    check_obs(obs, expected_obs_shape(policy))
    check_input_gradient(policy, obs.detach(), name="SCOR-PIO")


def _attacker_grad(policy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   actions: torch.Tensor | None, create_graph: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward/backward on a fresh leaf: ``(leaf, a*, g = grad_x l)`` with ``l`` summed.

    ``a*`` is the greedy action of this very forward when ``actions`` is None."""
    leaf = x.detach().clone().requires_grad_(True)
    safe = double_backward_safe() if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), safe:
        logits = policy(leaf)
        if actions is None:
            actions = logits.detach().argmax(dim=-1)
        loss = -torch.log_softmax(logits, dim=-1).gather(1, actions[:, None]).sum()
        (g,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
    return leaf, actions, g


def _subspace_from_grad(policy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        actions: torch.Tensor, g: torch.Tensor, config: ScorpioConfig,
                        hvp_fn: Callable[[torch.Tensor], torch.Tensor]) -> ExploitableSubspace:
    """Steps 1-3 given ``g`` (detached): IG, mask, direction, power iterations."""
    attribution = integrated_gradients(policy, x, actions=actions, steps=config.ig_steps,
                                       internal_batch_size=config.ig_internal_batch_size)
    mask = exploitable_mask(g, attribution, config.rho, config.rho_salient)
    maskf = mask.to(x.dtype)
    v = _normalize_per_sample(maskf * torch.sign(g))
    for _ in range(config.power_iters):
        v = _normalize_per_sample(maskf * hvp_fn(v))
    return ExploitableSubspace(obs=x.detach(), actions=actions.detach(), mask=mask,
                               direction=v.detach())


def compute_exploitable_subspace(policy: Callable[[torch.Tensor], torch.Tensor],
                                 obs: torch.Tensor, config: ScorpioConfig,
                                 actions: torch.Tensor | None = None
                                 ) -> ExploitableSubspace:
    """The exploitable mask ``M`` and direction ``v`` of every row of ``obs``.

    Steps 1-3 of SCOR-PIO: ``g = grad_x l``, ``A = |IG|``, ``M = exploitable_mask(g, A)``,
    ``v = normalize(M * sign(g))`` refined by ``power_iters`` steps ``v <- normalize(M * Hv)``.
    Nothing here is differentiated w.r.t. the parameters. Cost: ``1 + ig_steps + power_iters``
    passes over ``obs``. No rows are dropped here: pass the sub-batch you want regularized
    (``obs[select_sub_batch(len(obs), config)]``). Meant to run once per training iteration;
    pass the result to :func:`scorpio_regularizer` on every SGD step.

    Args:
        policy: ``policy(obs) -> logits`` (the policy protocol).
        obs: (n, H, W, C) float in [0, 1], finite: the rows to regularize.
        config: :class:`ScorpioConfig` (``rho``, ``rho_salient``, ``ig_steps``,
            ``power_iters``, ``ig_internal_batch_size``).
        actions: (n,) actions to use as ``a*``; default the greedy actions.
    Returns:
        :class:`ExploitableSubspace` of the rows of ``obs``.
    Raises:
        ValueError: non-finite, malformed, channels-first or 0-255 ``obs``;
            :class:`~marl_fgmf.protocol.InputGradientError` (a ``ValueError``) for a policy
            without usable input gradients (``torch.no_grad`` forward, rounding input layer).
    """
    _check_rows(policy, obs)
    x = obs.detach()
    if actions is not None:
        actions = torch.as_tensor(actions, device=obs.device).long().reshape(-1)
        if actions.shape[0] != obs.shape[0]:
            raise ValueError(f"actions has {actions.shape[0]} entries for a batch of "
                             f"{obs.shape[0]}")
    # Power iterations reuse the graph of g (one double backward each, no new forward).
    leaf, actions, g = _attacker_grad(policy, x, actions, create_graph=config.power_iters > 0)

    def reuse_hvp(v: torch.Tensor) -> torch.Tensor:
        return _hvp_from_grad(g, leaf, v, create_graph=False, retain_graph=True)

    return _subspace_from_grad(policy, x, actions, g.detach(), config, reuse_hvp)


def scorpio_regularizer(policy: Callable[[torch.Tensor], torch.Tensor],
                        obs: torch.Tensor | None, config: ScorpioConfig,
                        subspace: ExploitableSubspace | None = None,
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """The SCOR-PIO 2.0 penalty ``R`` (DESIGN.md section 3), differentiable w.r.t. parameters.

    ``R = lambda_curv * mean_i ||M_i * (H v)_i||^2 + lambda_grad * mean_i ||M_i * g_i||^2``
    with ``g = grad_x l``, ``l(x) = -log pi(a*|x)``, ``Hv`` by Pearlmutter's trick at the
    current parameters; the mean is over the ``n`` sub-batch rows.

    Args:
        policy: ``policy(obs) -> logits`` with smooth activations.
        obs: (B, H, W, C) minibatch in [0, 1]. Without ``subspace``, a sub-batch is selected
            (:func:`select_sub_batch`: ``reg_fraction``, ``max_reg_samples``, ``seed``) and
            its subspace computed here (``ig_steps + 3`` passes). With ``subspace``, ``obs``
            is None (R is evaluated on ``subspace.obs``) or the rows the subspace was
            computed on (same shape); no further selection happens.
        config: :class:`ScorpioConfig`.
        subspace: from :func:`compute_exploitable_subspace` (reuse across SGD steps: 3 passes).
    Returns:
        ``(R, info)``: ``R`` a scalar tensor with a graph to the parameters; ``info`` floats:
        ``R``, ``curvature_term`` and ``gradient_term`` (weighted), ``curvature``
        (``mean ||M Hv||^2``), ``grad_sq`` (``mean ||M g||^2``), ``curvature_along_v``
        (``mean v.Hv``; 0 when ``lambda_curv = 0``, as ``Hv`` is then not computed),
        ``mask_fraction``, ``reg_samples``.
    Raises:
        ValueError: non-finite, malformed, channels-first or 0-255 observations, or ``obs``
            not aligned with ``subspace``; :class:`~marl_fgmf.protocol.InputGradientError`
            (a ``ValueError``) for a policy without usable input gradients (its forward
            under ``torch.no_grad`` / ``inference_mode``, a detached or rounding input layer).
    """
    if subspace is None:
        if obs is None:
            raise ValueError("obs is required when no subspace is given")
        _check_rows(policy, obs)
        idx = select_sub_batch(obs.shape[0], config, device=obs.device)
        x, actions = obs.detach()[idx], None
    else:
        if obs is None:
            x = subspace.obs
            check_input_gradient(policy, x, name="SCOR-PIO")
        else:
            _check_rows(policy, obs)
            if obs.shape != subspace.obs.shape:
                raise ValueError(f"obs {tuple(obs.shape)} does not align with the subspace "
                                 f"rows {tuple(subspace.obs.shape)}; pass obs=None to use them")
            x = obs.detach()
        actions = subspace.actions
    # One forward/backward with graph: g for the gradient term, the graph for Hv.
    leaf, actions, g = _attacker_grad(policy, x, actions, create_graph=True)
    if subspace is None:
        def reuse_hvp(v: torch.Tensor) -> torch.Tensor:
            return _hvp_from_grad(g, leaf, v, create_graph=False, retain_graph=True)
        subspace = _subspace_from_grad(policy, x, actions, g.detach(), config, reuse_hvp)
    maskf = subspace.mask.to(g.dtype)
    v = subspace.direction.to(g.dtype)
    n = x.shape[0]
    grad_sq = (maskf * g).pow(2).flatten(1).sum(1)  # (n,)
    if config.lambda_curv > 0:
        hv = _hvp_from_grad(g, leaf, v, create_graph=True, retain_graph=True)
        curv = (maskf * hv).pow(2).flatten(1).sum(1)  # (n,)
        along_v = float((v * hv.detach()).flatten(1).sum(1).mean())
    else:  # skip the double backward
        curv = torch.zeros(n, dtype=g.dtype, device=g.device)
        along_v = 0.0
    curvature_term = config.lambda_curv * curv.mean()
    gradient_term = config.lambda_grad * grad_sq.mean()
    reg = curvature_term + gradient_term
    info = {
        "R": float(reg.detach()),
        "curvature_term": float(curvature_term.detach()),
        "gradient_term": float(gradient_term.detach()),
        "curvature": float(curv.detach().mean()),
        "grad_sq": float(grad_sq.detach().mean()),
        "curvature_along_v": along_v,
        "mask_fraction": float(maskf.mean()),
        "reg_samples": float(n),
    }
    return reg, info
