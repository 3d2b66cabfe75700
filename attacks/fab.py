"""FAB-T: the targeted Fast Adaptive Boundary attack (minimal perturbations)."""
from __future__ import annotations

import math

import torch
from torch import nn

from attacks.base import Attack, AttackContext, check_fraction, check_positive_int
from attacks.objectives import ranked_targets

__all__ = ["FAB", "project_hyperplane_box"]


def project_hyperplane_box(w: torch.Tensor, c: torch.Tensor, x: torch.Tensor,
                           norm: str = "linf") -> torch.Tensor:
    """The smallest ``delta`` (in ``norm``) with ``<w, delta> = c`` and ``x + delta`` in [0, 1].

    Per sample: the projection of ``x`` onto the hyperplane ``{z : <w, z - x> = c}``
    intersected with the box [0, 1]^d (Croce & Hein 2020, FAB, section 3.1). Coordinate ``j``
    moves in the direction ``sign(w_j * c)`` by ``min(s * a_j, cap_j)``, where ``cap_j`` is
    how far the box lets it move that way and ``a_j = 1`` (Linf) or ``|w_j|`` (L2, the KKT
    solution ``delta = clip(lambda * w)``); the scalar ``s >= 0`` is the smallest one that
    reaches ``|c|``. ``h(s) = sum_j |w_j| min(s a_j, cap_j)`` is piecewise linear and
    increasing, so ``s`` is found exactly by sorting the breakpoints ``cap_j / a_j``. When
    even the whole box cannot reach ``|c|``, every coordinate moves to its box limit (the
    closest feasible point to the hyperplane).

    Args:
        w: (n, ...) hyperplane normals (gradients), any shape after the batch dimension.
        c: (n,) right-hand sides.
        x: (n, ...) points in [0, 1], shaped like ``w``.
        norm: ``"linf"`` or ``"l2"``.
    Returns:
        (n, ...) ``delta`` shaped like ``x``.
    """
    wf, xf = w.flatten(1), x.flatten(1)                          # (n, d)
    aw = wf.abs()
    direction = torch.sign(wf) * torch.sign(c)[:, None]          # (n, d) in {-1, 0, 1}
    cap = torch.where(direction > 0, 1 - xf, xf).clamp_min(0)
    cap = torch.where(direction == 0, torch.zeros_like(cap), cap)
    a = torch.ones_like(aw) if norm == "linf" else aw
    moving = (a > 0) & (aw > 0)
    s_break = torch.where(moving, cap / torch.where(moving, a, torch.ones_like(a)),
                          torch.zeros_like(cap))
    s_sorted, order = s_break.sort(dim=1)
    full = (aw * cap).gather(1, order)           # a coordinate's share once saturated
    slope = (aw * a).gather(1, order)            # its share per unit of s before that
    prefix = full.cumsum(dim=1) - full           # sum of the saturated shares before k
    suffix = slope.flip(1).cumsum(dim=1).flip(1)  # slopes of the coordinates k, k+1, ...
    h_at = prefix + s_sorted * suffix            # h(s) at each sorted breakpoint
    goal = c.abs()[:, None]
    reached = h_at >= goal
    k = reached.to(torch.int8).argmax(dim=1, keepdim=True)       # first breakpoint reaching it
    s = (goal - prefix.gather(1, k)) / suffix.gather(1, k).clamp_min(1e-30)
    s = torch.where(reached.any(dim=1, keepdim=True), s, s_sorted[:, -1:])  # else saturate
    delta = direction * torch.minimum(s * a, cap)
    return delta.view_as(x)


class FAB(Attack):
    r"""FAB-T: the targeted Fast Adaptive Boundary attack, minimal perturbations.

    Paper: Croce and Hein, "Minimally distorted adversarial examples with a fast adaptive
    boundary attack", ICML 2020 (https://arxiv.org/abs/1907.02044), Algorithm 1; the targeted
    version FAB-T of the AutoAttack ensemble (Croce & Hein, ICML 2020, section 5).

    For each target ``t`` among the ``n_target_classes`` actions the clean policy ranks
    highest after the reference action ``a`` (most likely first), from ``x_0 = x_orig``, each
    step linearizes the decision boundary ``g(x) = z_t(x) - z_a(x) = 0`` at the current point
    ``x_i`` (one forward and backward pass) and projects onto that hyperplane intersected with
    the box [0, 1] (:func:`project_hyperplane_box`) both ``x_i`` (giving ``delta_i``) and
    ``x_orig`` (giving ``delta_orig``), then takes the adaptive, extrapolated step
    ``x_{i+1} = clip((1 - alpha) (x_i + eta delta_i) + alpha (x_orig + eta delta_orig))`` with
    ``alpha = min(|delta_i| / (|delta_i| + |delta_orig|), alpha_max)``. When ``x_{i+1}`` is
    adversarial (its greedy action leaves ``a``: untargeted success, as AutoAttack counts it)
    it is recorded if it is the closest to ``x_orig`` so far, and the backward step
    ``x_{i+1} <- (1 - beta) x_orig + beta x_{i+1}`` moves it toward the original. Restart
    ``r >= 1`` starts from a uniform random point of the ball of radius
    ``min(best norm so far, eps) / 2``. Later targets attack only the samples not yet fooled
    within ``eps`` (AutoAttack's convention).

    **Budget**: FAB minimizes the perturbation instead of using the budget. The output of a
    sample is its smallest adversarial point found when that lies within ``eps`` (and it is
    in [0, 1] by construction); otherwise the sample is returned CLEAN (unperturbed), as in
    AutoAttack. ``last_norms`` holds the smallest norm found per sample (``inf``: none; 0 when
    the clean greedy action already differs from the reference), whatever ``eps``.

    Distance Measure: Linf (default) or L2.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units: results farther than it are returned clean.
            (Default: 8/255)
        steps (int): iterations per target and restart, >= 1. (Default: 100)
        restarts (int): runs per target, the first from ``x_orig``, >= 1. (Default: 1)
        n_target_classes (int): how many target actions to try, >= 1 (capped at
            ``n_actions - 1``). (Default: 9, as in AutoAttack)
        alpha_max (float): the largest weight of the step from ``x_orig``, in [0, 1].
            (Default: 0.1)
        eta (float): extrapolation (overshoot) factor of the projection step, >= 1.
            (Default: 1.05)
        beta (float): backward step toward ``x_orig`` after a success, in (0, 1].
            (Default: 0.9)
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        seed (int | None): reproducible random restarts. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) within the eps-ball and [0, 1].

    Example::

        >>> attack = FAB(policy, eps=8/255, steps=100, n_target_classes=9, seed=0)
        >>> adv_obs = attack(obs)
        >>> attack.last_norms   # the smallest perturbation found per sample
    """

    name = "fab"
    objectives = ("ce",)
    _extra_settings = ("steps", "restarts", "n_target_classes", "alpha_max", "eta", "beta")

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, steps: int = 100,
                 restarts: int = 1, n_target_classes: int = 9, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, norm: str = "linf",
                 seed: int | None = None):
        super().__init__(policy, eps, norm=norm, objective="ce", seed=seed)
        self.steps = check_positive_int(steps, "steps")
        self.restarts = check_positive_int(restarts, "restarts")
        self.n_target_classes = check_positive_int(n_target_classes, "n_target_classes")
        self.alpha_max = check_fraction(alpha_max, "alpha_max", low_open=False)
        self.beta = check_fraction(beta, "beta")
        try:
            self.eta = float(eta)
        except (TypeError, ValueError):
            raise ValueError(f"eta must be a number >= 1, got {eta!r}") from None
        if not (math.isfinite(self.eta) and self.eta >= 1.0):
            raise ValueError(f"eta must be a number >= 1, got {eta!r}")
        self.last_norms: torch.Tensor | None = None

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        x0 = ctx.obs
        best_x = x0.clone()
        best_norm = torch.full((ctx.batch,), math.inf, device=x0.device, dtype=x0.dtype)
        best_norm[ctx.clean_logits.argmax(dim=1) != ctx.actions] = 0.0
        k = min(self.n_target_classes, ctx.n_actions - 1)
        targets = ranked_targets(ctx.clean_logits, ctx.actions, k)  # (B, k)
        for j in range(k):
            idx = (best_norm > self.eps).nonzero().flatten()
            if idx.numel() == 0:
                break
            x, norms = self._search(x0[idx], ctx.actions[idx], targets[idx, j], ctx)
            improved = norms < best_norm[idx]
            best_x[idx[improved]] = x[improved]
            best_norm[idx[improved]] = norms[improved]
        self.last_norms = best_norm.cpu()
        # the smallest adversarial point within the budget, else the clean observation
        return torch.where((best_norm <= self.eps).view(-1, 1, 1, 1), best_x, x0)

    def _norm(self, delta: torch.Tensor) -> torch.Tensor:
        flat = delta.flatten(1)
        return flat.abs().amax(dim=1) if self.norm == "linf" else flat.norm(dim=1)

    def _boundary(self, x: torch.Tensor, actions: torch.Tensor, target: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``g = z_t - z_a`` (n,) at ``x`` and its input gradient (n, H, W, C); averaged over
        stochastic passes under :class:`~attacks.EOT`."""
        g_sum = grad_sum = None
        for _ in range(self._eot_samples):
            xr = x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self._logits(xr)
                g = (logits.gather(1, target[:, None]) - logits.gather(1, actions[:, None]))[:, 0]
                (grad,) = torch.autograd.grad(g.sum(), xr, allow_unused=True)
            grad = torch.zeros_like(xr) if grad is None else grad
            g_sum = g.detach() if g_sum is None else g_sum + g.detach()
            grad_sum = grad if grad_sum is None else grad_sum + grad
        n = self._eot_samples
        return g_sum / n, grad_sum / n

    def _search(self, x0: torch.Tensor, actions: torch.Tensor, target: torch.Tensor,
                ctx: AttackContext) -> tuple[torch.Tensor, torch.Tensor]:
        """FAB toward ``target`` on a sub-batch: its closest adversarial points and norms."""
        n = x0.shape[0]
        best_x = x0.clone()
        best_norm = torch.full((n,), math.inf, device=x0.device, dtype=x0.dtype)
        for r in range(self.restarts):
            x = x0.clone()
            if r > 0:
                radius = torch.clamp(best_norm, max=self.eps) / 2          # (n,)
                delta = self.random_delta(x0, ctx.generator) * (radius / self.eps).view(-1, 1, 1, 1)
                x = (x0 + delta).clamp(0.0, 1.0)
            for _ in range(self.steps):
                g, w = self._boundary(x, actions, target)
                d_x = project_hyperplane_box(w, -g, x, self.norm)
                g_orig = g + (w * (x0 - x)).flatten(1).sum(dim=1)   # the same plane at x_orig
                d_orig = project_hyperplane_box(w, -g_orig, x0, self.norm)
                n_x, n_orig = self._norm(d_x), self._norm(d_orig)
                alpha = (n_x / (n_x + n_orig).clamp_min(1e-12)).clamp(0.0, self.alpha_max)
                alpha = alpha.view(-1, 1, 1, 1)
                x_new = ((1 - alpha) * (x + self.eta * d_x)
                         + alpha * (x0 + self.eta * d_orig)).clamp(0.0, 1.0)
                with torch.no_grad():
                    fooled = self._logits(x_new).argmax(dim=1) != actions
                dist = self._norm(x_new - x0)
                closer = fooled & (dist < best_norm)
                best_x[closer] = x_new[closer]
                best_norm[closer] = dist[closer]
                x = torch.where(fooled.view(-1, 1, 1, 1),
                                (1 - self.beta) * x0 + self.beta * x_new, x_new)
        return best_x, best_norm
