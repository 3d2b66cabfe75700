"""Square Attack: a query-efficient, gradient-free black-box attack (Linf)."""
from __future__ import annotations

import math

import torch
from torch import nn

from attacks.base import Attack, AttackContext, check_fraction, check_positive_int
from attacks.objectives import TargetSpec

# Iterations (rescaled to a 10,000-query budget) after which the square size fraction halves.
P_HALVING_AT = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
EARLY_STOP_OBJECTIVES = ("ce", "margin", "dlr", "targeted", "dlr_targeted")


def square_fraction(p_init: float, iteration: int, n_queries: int) -> float:
    """The fraction ``p`` of pixels a square covers at ``iteration`` (Andriushchenko et al.).

    ``p`` starts at ``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000, 4000,
    6000 and 8000 of a 10,000-query run; other budgets rescale the iteration to that run.
    """
    scaled = int(iteration / n_queries * 10000)
    return p_init / 2 ** sum(scaled > t for t in P_HALVING_AT)


class Square(Attack):
    r"""Square Attack (Linf): random search over square-shaped updates, no gradients.

    Paper: Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020
    (https://arxiv.org/abs/1912.00049), Algorithms 1 and 2.

    Initialisation: vertical stripes, each column of each channel ``+-eps`` at random. Each
    iteration, for every sample still being attacked, a square window of side
    ``s = round(sqrt(p * H * W))`` at a random position gets a new value ``+-eps`` per channel
    (redrawn if it would not change the current best point); the candidate replaces the best
    point when it raises the loss. ``p`` follows :func:`square_fraction`. One query = one forward
    pass per sample; with ``ce``, ``margin``, ``dlr`` or ``targeted`` a sample stops being
    queried once it succeeds (its greedy action changed / reached the target); with ``kl`` or
    ``value`` every sample uses the full budget. ``last_queries`` holds the queries per sample.

    Gradient-free, so it is the reference of audit check 1 (DESIGN.md section 4): a defence
    where Square beats the gradient attacks masks its gradients.

    Distance Measure: Linf.

    Arguments:
        policy (nn.Module): policy on the protocol, ``policy(obs) -> logits``.
        eps (float): budget in [0, 1] units. (Default: 8/255)
        n_queries (int): query budget per sample including the initial one, >= 1.
            (Default: 5000)
        p_init (float): initial fraction of pixels changed per square, in (0, 1].
            (Default: 0.8)
        objective (str): ``margin`` (the paper's untargeted loss), ``ce``, ``dlr``, ``kl``,
            ``value`` or ``targeted`` (the paper's targeted loss). (Default: ``"margin"``)
        target: target for ``objective="targeted"``. (Default: None = the worst action)
        seed (int | None): reproducible search. (Default: None)

    Shape:
        - obs: (B, H, W, C) float in [0, 1].
        - actions: (B,) integer or None (default: the clean greedy actions).
        - output: (B, H, W, C) with ``|out - obs| <= eps`` and in [0, 1].

    Example::

        >>> attack = Square(policy, eps=8/255, n_queries=1000, p_init=0.8, seed=0)
        >>> adv_obs = attack(obs)
    """

    name = "square"
    norms = ("linf",)
    uses_gradients = False
    _extra_settings = ("n_queries", "p_init")

    def __init__(self, policy: nn.Module, eps: float | str = 8 / 255, *, n_queries: int = 5000,
                 p_init: float = 0.8, objective: str = "margin", target: TargetSpec = None,
                 seed: int | None = None, norm: str = "linf"):
        super().__init__(policy, eps, norm=norm, objective=objective, target=target, seed=seed)
        self.n_queries = check_positive_int(n_queries, "n_queries")
        self.p_init = check_fraction(p_init, "p_init")
        self.last_queries: torch.Tensor | None = None

    def _perturb(self, ctx: AttackContext) -> torch.Tensor:
        x0, gen = ctx.obs, ctx.generator
        b, h, w, c = x0.shape
        dev, dt = x0.device, x0.dtype

        def signs(*shape: int) -> torch.Tensor:
            return (torch.randint(0, 2, shape, generator=gen, device=dev) * 2 - 1).to(dt)

        # vertical stripes: one sign per (sample, column, channel), constant down each column
        x_best = (x0 + self.eps * signs(b, 1, w, c)).clamp(0, 1)
        loss_best, success = self.evaluate_loss(x_best, ctx)
        queries = torch.ones(b, dtype=torch.long, device=dev)
        early_stop = self.objective in EARLY_STOP_OBJECTIVES
        rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)

        for it in range(1, self.n_queries):
            active = (~success if early_stop else torch.ones_like(success)).nonzero().flatten()
            if active.numel() == 0:
                break
            n = active.numel()
            p = square_fraction(self.p_init, it, self.n_queries)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
            xa, xb = x0[active], x_best[active]
            r0 = torch.randint(0, h - s + 1, (n,), generator=gen, device=dev)
            c0 = torch.randint(0, w - s + 1, (n,), generator=gen, device=dev)
            in_rows = (rows[None] >= r0[:, None]) & (rows[None] < r0[:, None] + s)  # (n, H)
            in_cols = (cols[None] >= c0[:, None]) & (cols[None] < c0[:, None] + s)  # (n, W)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]            # (n, H, W, 1)
            values = self.eps * signs(n, 1, 1, c)
            cand = torch.where(window, (xa + values).clamp(0, 1), xb)
            for _ in range(10):  # redraw squares that would leave the best point unchanged
                same = ((cand - xb).abs() < 1e-7).flatten(1).all(dim=1)
                if not bool(same.any()):
                    break
                values = torch.where(same.view(-1, 1, 1, 1), self.eps * signs(n, 1, 1, c), values)
                cand = torch.where(window, (xa + values).clamp(0, 1), xb)
            loss, succ = self.evaluate_loss(cand, ctx, active)
            queries[active] += 1
            improved = loss > loss_best[active]
            upd = active[improved]
            x_best[upd] = cand[improved]
            loss_best[upd] = loss[improved]
            success[upd] = succ[improved]
        self.last_queries = queries.cpu()
        ctx.success = success
        return x_best
