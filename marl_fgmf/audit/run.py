"""The audit's runner: validates the settings, runs every attack on the audit batch and hands
the per-sample successes to the checks (:mod:`marl_fgmf.audit.checks`)."""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks import APGD, BPDA, EOT, FGSM, PGD, RandomNoise, Square
from attacks.base import Attack
from marl_fgmf.audit.checks import (GRADIENT_LESS, check_adaptive, check_large, check_noise,
                                    check_square, check_steps, gradient_pgd_label, likely_cause)
from marl_fgmf.audit.report import AuditReport, eps_text
from marl_fgmf.protocol import (allow_masked_gradients, check_obs, diagnose_input_gradient,
                                eval_mode, expected_obs_shape, parse_budget, policy_device)

__all__ = ["audit", "has_input_filter", "is_stochastic"]


def has_input_filter(policy: nn.Module) -> bool:
    """True when ``policy.input_filter`` is a module other than ``nn.Identity``."""
    f = getattr(policy, "input_filter", None)
    return isinstance(f, nn.Module) and not isinstance(f, nn.Identity)


@torch.no_grad()
def is_stochastic(policy: nn.Module, obs: torch.Tensor, trials: int = 3, seed: int = 0) -> bool:
    """True when two forward passes (eval mode, different RNG states) give different logits.

    The caller's global RNG is left untouched (the passes run in a forked RNG).
    """
    device, _ = policy_device(policy)
    devices = [device] if device.type == "cuda" else []
    with eval_mode(policy, train=False), \
            torch.random.fork_rng(devices=devices, device_type="cuda"):
        ref = None
        for t in range(trials):
            torch.manual_seed(seed + 7919 * t)
            out = policy(obs).double()
            if ref is None:
                ref = out
            elif not torch.allclose(out, ref, rtol=1e-6, atol=1e-7):
                return True
    return False


class _Runner:
    """Runs attacks on the audit batch (in chunks) and keeps their per-sample successes."""

    def __init__(self, policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                 batch_size: int, progress: Any):
        self.policy, self.obs, self.actions = policy, obs, actions
        self.batch_size = batch_size
        self.bar = progress
        self.outcomes: dict[str, torch.Tensor] = {}
        self.adv: dict[str, torch.Tensor] = {}

    def run(self, label: str, attack: Attack, keep_adv: bool = False) -> torch.Tensor:
        if self.bar is not None:
            self.bar.set_description(f"audit {label}")
        succ, advs = [], []
        for i in range(0, self.obs.shape[0], self.batch_size):
            x = self.obs[i:i + self.batch_size]
            adv = attack(x, self.actions[i:i + self.batch_size])
            succ.append(attack.last_success.bool().cpu())
            if keep_adv:
                advs.append(adv.detach())
        out = torch.cat(succ)
        self.outcomes[label] = out
        if keep_adv:
            self.adv[label] = torch.cat(advs)
        if self.bar is not None:
            self.bar.update(1)
        return out


def _loss(policy: nn.Module, x: torch.Tensor, actions: torch.Tensor, objective: str,
          samples: int) -> torch.Tensor:
    """Per-sample attacker loss (float64, mean over ``samples`` passes) without gradients."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    with torch.no_grad(), eval_mode(policy, train=False):
        for _ in range(samples):
            z = policy(x).double().cpu()
            if objective == "ce":
                total += torch.nn.functional.cross_entropy(z, actions.cpu(), reduction="none")
            else:
                z_a = z.gather(1, actions.cpu()[:, None])[:, 0]
                other = z.scatter(1, actions.cpu()[:, None], float("-inf")).amax(dim=1)
                total += other - z_a
    return total / samples


def _ladder(eps: float, large_eps: float, points: int) -> list[float]:
    """``points`` budgets from ``eps`` to ``large_eps``, geometric, ascending, distinct."""
    if large_eps <= eps or points < 2:
        return [eps] if large_eps <= eps else [eps, large_eps]
    ratio = (large_eps / eps) ** (1.0 / (points - 1))
    values = [eps * ratio ** i for i in range(points - 1)] + [large_eps]
    return sorted({round(v, 9) for v in values})


def _ascending_ints(values: Sequence[int], name: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers >= 1, got {values!r}") from None
    if not out or any(v < 1 for v in out) or any(
            isinstance(v, bool) or (isinstance(v, float) and not float(v).is_integer())
            for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= 1, got {values!r}")
    return sorted(set(out))


def audit(policy: nn.Module, obs: torch.Tensor, eps: float | str = 8 / 255, *,
          steps: Sequence[int] = (1, 10, 50), restarts: Sequence[int] = (1, 5),
          large_eps: float | str = 1.0, n_queries: int = 300, ladder_points: int = 4,
          large_random_draws: int = 8, eot_samples: int = 8, objective: str = "margin",
          margin: float = 0.05, alpha: float = 0.01, large_success: float = 0.9,
          min_progress: float = 0.5, preprocess: Any = None, batch_size: int = 256,
          seed: int = 0, progress: bool = False) -> AuditReport:
    """Audit ``policy`` for gradient masking on the observations ``obs`` at budget ``eps``.

    Runs FGSM, PGD (every ``steps`` value; ``restarts`` at the middle step count), APGD, Square,
    random noise, a PGD eps ladder up to ``large_eps`` and, where they apply, BPDA/EOT, then the
    five checks of the module docstring. All attacks are Linf and seeded from ``seed``.

    Args:
        policy: a module on the policy protocol (``policy(obs) -> logits``).
        obs: (B, H, W, C) float observations in [0, 1] (e.g. frames from the policy's env).
        eps: the audited budget in (0, 1] (a number or a string such as ``"8/255"``).
        steps: PGD step counts, ascending (check 3). (Default: 1, 10, 50)
        restarts: PGD restart counts, ascending (check 3). (Default: 1, 5)
        large_eps: the large budget of check 4 (1.0 reaches every observation). (Default: 1.0)
        n_queries: Square's query budget per observation at ``eps``. (Default: 300)
        ladder_points: budgets from ``eps`` to ``large_eps`` in check 4. (Default: 4)
        large_random_draws: random-noise draws at ``large_eps`` for "reachable". (Default: 8)
        eot_samples: EOT samples per gradient for a stochastic policy. (Default: 8)
        objective: loss of the gradient attacks, ``margin`` (CW) or ``ce``. (Default: margin)
        margin: smallest difference of success rates that counts. (Default: 0.05)
        alpha: significance level of the one-sided McNemar test. (Default: 0.01)
        large_success: success expected at ``large_eps`` when reachable. (Default: 0.9)
        min_progress: fraction of samples whose loss gradient ascent must raise. (Default: 0.5)
        preprocess: BPDA's preprocessing (None = ``policy.input_filter`` when it is not the
            identity; a dotted submodule name or a submodule otherwise). (Default: None)
        batch_size: observations per attack call. (Default: 256)
        seed: base seed of every attack. (Default: 0)
        progress: show a progress bar over the attack runs.

    Before the attacks, the input gradient is probed once
    (:func:`marl_fgmf.protocol.diagnose_input_gradient`); the attacks then run with the
    gradient guard off (:func:`marl_fgmf.protocol.allow_masked_gradients`: the audit measures
    masking instead of refusing it). A policy with no gradient graph to obs (its forward under
    ``torch.no_grad``, a detached input) is flagged whatever the checks say, and a flagged
    report names its likeliest cause in ``report.cause``
    (:func:`marl_fgmf.audit.checks.likely_cause`: zero gradients, quantized input / input
    filter, randomness, ...), in its text, Markdown and JSON.

    Returns:
        An :class:`AuditReport`; ``report.flagged`` is True when any check failed (or the
        policy has no gradient graph to obs).

    Raises:
        ValueError: bad observations or settings (one line naming the value).

    Example:
        >>> report = audit(policy, obs, "8/255", steps=(1, 10, 50), restarts=(1, 5))
        >>> report.flagged
        False
    """
    t0 = time.perf_counter()
    if not isinstance(policy, nn.Module):
        raise ValueError(f"policy must be a torch.nn.Module on the policy protocol, "
                         f"got {type(policy).__name__}")
    check_obs(obs, expected_obs_shape(policy))
    eps = parse_budget(eps)
    large_eps = parse_budget(large_eps, "large_eps")
    steps = _ascending_ints(steps, "steps")
    restarts = _ascending_ints(restarts, "restarts")
    if objective not in ("margin", "ce"):
        raise ValueError(f"objective must be 'margin' or 'ce', got {objective!r}")
    for name, value in (("n_queries", n_queries), ("ladder_points", ladder_points),
                        ("large_random_draws", large_random_draws),
                        ("eot_samples", eot_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("margin", margin), ("alpha", alpha), ("large_success", large_success),
                        ("min_progress", min_progress)):
        if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")

    device, _ = policy_device(policy)
    devices = [device] if device.type == "cuda" else []
    # the policy's own randomness (a randomized defence) is drawn from a forked RNG seeded by
    # ``seed``: the audit is reproducible and leaves the caller's RNG untouched
    # The audit MEASURES what gradient attacks achieve on a masked policy, which the guard of
    # protocol.check_input_gradient would refuse, and names the cause from its own probe.
    with torch.random.fork_rng(devices=devices, device_type="cuda"), allow_masked_gradients():
        torch.manual_seed(seed)
        return _audit(policy, obs, eps, steps=steps, restarts=restarts, large_eps=large_eps,
                      n_queries=n_queries, ladder_points=ladder_points,
                      large_random_draws=large_random_draws, eot_samples=eot_samples,
                      objective=objective, margin=margin, alpha=alpha,
                      large_success=large_success, min_progress=min_progress,
                      preprocess=preprocess, batch_size=batch_size, seed=seed,
                      progress=progress, t0=t0)


def _audit(policy: nn.Module, obs: torch.Tensor, eps: float, *, steps: list[int],
           restarts: list[int], large_eps: float, n_queries: int, ladder_points: int,
           large_random_draws: int, eot_samples: int, objective: str, margin: float,
           alpha: float, large_success: float, min_progress: float, preprocess: Any,
           batch_size: int, seed: int, progress: bool, t0: float) -> AuditReport:
    """The body of :func:`audit` (arguments already validated)."""
    device, dtype = policy_device(policy)
    x = obs.detach().to(device=device, dtype=dtype)
    stochastic = is_stochastic(policy, x[: min(16, x.shape[0])], seed=seed)
    with eval_mode(policy, train=False):  # the probe the gradient attacks' guard would make
        gradient = diagnose_input_gradient(policy, x[: min(16, x.shape[0])])
    filtered = has_input_filter(policy) or preprocess is not None
    loss_samples = eot_samples if stochastic else 1
    with torch.no_grad(), eval_mode(policy, train=False):
        clean = torch.cat([policy(x[i:i + batch_size]).argmax(dim=1)
                           for i in range(0, x.shape[0], batch_size)])
    n = x.shape[0]
    ladder = _ladder(eps, large_eps, ladder_points)
    mid_steps = steps[len(steps) // 2]
    top_steps = steps[-1]
    big = eps_text(large_eps)
    random_large = f"random@{big} (any of {large_random_draws})"
    square_large = f"square@{big}"

    n_runs = (4 + len(steps) + len(restarts) - 1 + len(ladder) + large_random_draws + 1
              + int(filtered) + int(stochastic) + int(filtered and stochastic))
    bar = None
    if progress:
        bar = tqdm(total=n_runs, desc="audit", unit="attack")
    runner = _Runner(policy, x, clean, batch_size, bar)
    common = {"objective": objective}
    try:
        # --- attacks at eps ------------------------------------------------------
        runner.run("fgsm", FGSM(policy, eps, **common))
        runner.run("random", RandomNoise(policy, eps, seed=seed + 1))
        for k in steps:
            runner.run(f"pgd{k}", PGD(policy, eps, steps=k, seed=seed + 2, **common))
        for r in restarts[1:]:
            runner.run(f"pgd{mid_steps}x{r}", PGD(policy, eps, steps=mid_steps, restarts=r,
                                                  seed=seed + 2, **common))
        runner.run(f"apgd{top_steps}", APGD(policy, eps, steps=top_steps, seed=seed + 3, **common))
        runner.run("square", Square(policy, eps, n_queries=n_queries, seed=seed + 4))
        # --- gradient-only PGD (no random start) over the eps ladder -------------------
        for e in ladder:
            runner.run(gradient_pgd_label(e), PGD(policy, e, steps=top_steps,
                                                  random_start=False, **common),
                       keep_adv=(e == ladder[0]))
        draws = [runner.run(f"random@{big}#{i}", RandomNoise(policy, large_eps, seed=seed + 100 + i))
                 for i in range(large_random_draws)]
        for i in range(large_random_draws):  # keep one entry in the success table
            runner.outcomes.pop(f"random@{big}#{i}")
        runner.outcomes[random_large] = torch.stack(draws).any(0)
        runner.run(square_large, Square(policy, large_eps, n_queries=min(n_queries, 100),
                                        seed=seed + 5))
        # --- adaptive attacks ------------------------------------------------------
        plain_label = f"pgd{top_steps}"
        adaptive: list[str] = []
        if filtered:
            runner.run(f"bpda-pgd{top_steps}", BPDA(PGD(policy, eps, steps=top_steps, seed=seed + 2,
                                                        **common), preprocess=preprocess))
            adaptive.append(f"bpda-pgd{top_steps}")
        if stochastic:
            runner.run(f"eot-pgd{top_steps}", EOT(PGD(policy, eps, steps=top_steps, seed=seed + 2,
                                                      **common), samples=eot_samples))
            adaptive.append(f"eot-pgd{top_steps}")
            if filtered:
                runner.run(f"eot-bpda-pgd{top_steps}",
                           EOT(BPDA(PGD(policy, eps, steps=top_steps, seed=seed + 2, **common),
                                    preprocess=preprocess), samples=eot_samples))
                adaptive.append(f"eot-bpda-pgd{top_steps}")
        if bar is not None:
            bar.set_description("audit checks")
        clean_loss = _loss(policy, x, clean, objective, loss_samples)
        pgd_loss = _loss(policy, runner.adv[gradient_pgd_label(ladder[0])], clean, objective,
                         loss_samples)
    finally:
        if bar is not None:
            bar.close()

    o = runner.outcomes
    white_labels = (["fgsm"] + [f"pgd{k}" for k in steps]
                    + [f"pgd{mid_steps}x{r}" for r in restarts[1:]]
                    + [f"apgd{top_steps}", gradient_pgd_label(ladder[0])])
    white = torch.stack([o[k] for k in white_labels]).any(0)
    o["white-box (any)"] = white
    stat = {"margin": margin, "alpha": alpha, "n": n}

    # "reachable" at large_eps: what ANY attack there achieves
    reachable = o[gradient_pgd_label(ladder[-1])] | o[random_large] | o[square_large]
    checks = [
        check_square(o, white, stat),
        check_noise(o, stat),
        check_steps(o, steps, restarts, mid_steps, clean_loss, pgd_loss, reachable,
                    min_progress, stat, objective),
        check_large(o, ladder, large_eps, large_success, reachable, stat),
        check_adaptive(o, plain_label, adaptive, filtered, stochastic, stat),
    ]
    settings = {"steps": list(steps), "restarts": list(restarts), "large_eps": large_eps,
                "n_queries": n_queries, "ladder": ladder, "large_random_draws": large_random_draws,
                "eot_samples": eot_samples, "objective": objective, "margin": margin,
                "alpha": alpha, "large_success": large_success, "min_progress": min_progress,
                "seed": seed, "test": "exact one-sided McNemar on paired outcomes"}
    filt = getattr(policy, "input_filter", None)
    filter_name = (type(filt).__name__ if has_input_filter(policy) else
                   None if preprocess is None else
                   preprocess if isinstance(preprocess, str) else type(preprocess).__name__)
    grad_info = {"ok": gradient.ok, "cause": gradient.cause, "summary": gradient.summary,
                 "likely": gradient.likely}
    info = {"class": type(policy).__name__, "stochastic": stochastic,
            "input_gradient": "ok" if gradient.ok else gradient.cause,
            "input_filter": type(filt).__name__ if isinstance(filt, nn.Module) else None,
            "bpda_preprocess": (None if not filtered else
                                (preprocess if isinstance(preprocess, str) else
                                 "input_filter" if preprocess is None else type(preprocess).__name__)),
            "clean_action_counts": torch.bincount(clean.cpu()).tolist()}
    flagged = any(not c.passed for c in checks) or gradient.cause in GRADIENT_LESS
    return AuditReport(flagged=flagged, checks=checks, eps=eps,
                       n_obs=n, success={k: float(v.float().mean()) for k, v in o.items()},
                       settings=settings, policy=info, seconds=time.perf_counter() - t0,
                       cause=likely_cause(checks, grad_info, filter_name, stochastic))
