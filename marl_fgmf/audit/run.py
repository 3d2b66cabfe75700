"""Gradient-masking audit: does a defence resist attacks, or only hide its gradients?

DESIGN.md section 4. A defence can look robust because its input gradients are useless (zero,
shattered, random) rather than because no small perturbation changes its actions: "obfuscated
gradients give a false sense of security" (Athalye, Carlini and Wagner, ICML 2018,
https://arxiv.org/abs/1802.00420). :func:`audit` runs the symptoms of that failure from their
checklist and from Carlini et al., "On Evaluating Adversarial Robustness" (2019,
https://arxiv.org/abs/1902.06705, sections 4-5 and the appendix checklist) on a batch of
observations, and flags the policy when any check fails.

Success of an attack on an observation (DESIGN.md section 3): the greedy action of the perturbed
observation differs from the clean greedy action. Every rate below is a fraction of the ``B``
observations. All attacks attack the same observations, so two attacks are compared sample by
sample with an exact one-sided **McNemar (sign) test** on the discordant pairs; a comparison
"fails" only when BOTH the difference of rates is at least ``margin`` (an effect size: 5
percentage points by default) AND the p-value is below ``alpha`` (0.01 by default; about ten
comparisons are made, so a clean policy is flagged by chance with probability below ~0.1 even
in the worst case, and in practice far less because the margin must also be met). With
``B = 64`` a failure needs at least 7 more successes on one side than the other.

The five checks (names as in :attr:`AuditCheck.name`):

1. ``gradient_free_vs_white_box``: Square (gradient-free, Andriushchenko et al. 2020) must not
   succeed more often than the white-box attacks, taken per sample as the union of FGSM, every
   PGD run and APGD ("black-box attacks better than white-box" is Athalye et al.'s first
   symptom).
2. ``noise_vs_fgsm``: random sign noise of the same budget (one draw, one query like FGSM's one
   gradient) must not succeed more often than FGSM.
3. ``steps_and_restarts``: more PGD steps (``steps``, e.g. 1, 10, 50) and more restarts
   (``restarts``, e.g. 1 vs 5) must not LOWER success, an iterative attack must not be weaker
   than single-step FGSM ("iterative attacks perform worse than single-step"), and gradient
   ascent must make progress: the attacker's loss after PGD without a random start must exceed
   the clean loss on at least ``min_progress`` of the samples whose action some attack at
   ``large_eps`` can change (an action no input changes has a flat loss without any masking,
   so those samples do not count). Success that stays flat is NOT by
   itself a failure: a genuinely robust policy is flat (near 0) too. What distinguishes it from a
   masked one is that its gradient still raises the loss; a zero or useless gradient does not
   move the iterate at all. (PGD keeps its best iterate, so success is reported for every
   setting; a plateau below 100% is normal for a robust policy.)
4. ``large_budget``: success of gradient PGD (no random start, so only the gradient can move
   it) as eps grows from ``eps`` to ``large_eps`` (1.0: every observation in [0, 1] is
   reachable) must not fall, and at ``large_eps`` it must reach ``large_success`` (0.9) unless
   nothing reaches it: the check compares it with what ANY attack at ``large_eps`` achieves
   (PGD, several random-noise draws and Square: "reachable"). A policy whose action no input
   can change (input-insensitive) is not flagged; one whose action random noise changes but
   gradient PGD cannot is.
5. ``adaptive_attack``: when the policy has a non-identity ``input_filter`` (SGAM, a quantizer)
   BPDA through it (Athalye et al. 2018, section 4.1), and when the policy is stochastic (two
   forward passes differ) EOT, must not beat the plain PGD of the same budget by a margin. Not
   applicable (passes) for a deterministic policy without an input filter.

The gradient attacks use the Carlini-Wagner margin loss ``max_{j != a} z_j - z_a`` by default
(``objective="margin"``): unlike cross-entropy it does not saturate on the very confident
policies RL produces, so a vanishing gradient is not mistaken for a masked one (Carlini et
al. 2019, section 5.2). ``objective="ce"`` is available.

Example::

    >>> report = audit(policy, obs, eps=8/255)
    >>> print(report.to_text())
    >>> report.flagged, [c.name for c in report.checks if not c.passed]
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from attacks import APGD, BPDA, EOT, FGSM, PGD, RandomNoise, Square
from marl_fgmf.io import to_jsonable
from attacks.base import Attack
from marl_fgmf.protocol import check_obs, eval_mode as policy_mode, parse_budget, policy_device
from marl_fgmf.stats import mcnemar_greater

__all__ = ["AuditCheck", "AuditReport", "audit", "audit_checkpoint", "audit_policies",
           "collect_observations", "load_audit_target",
           "mcnemar_greater", "is_stochastic", "has_input_filter", "CHECK_NAMES"]

CHECK_NAMES = ("gradient_free_vs_white_box", "noise_vs_fgsm", "steps_and_restarts",
               "large_budget", "adaptive_attack")
CHECK_TITLES = {
    "gradient_free_vs_white_box": "1. gradient-free (Square) vs white-box",
    "noise_vs_fgsm": "2. random noise vs FGSM",
    "steps_and_restarts": "3. PGD steps and restarts",
    "large_budget": "4. success as eps grows",
    "adaptive_attack": "5. adaptive (BPDA/EOT) vs plain",
}


@dataclass
class AuditCheck:
    """One audit check.

    Attributes:
        name: one of :data:`CHECK_NAMES`.
        passed: False when the check found a symptom of gradient masking.
        numbers: the rates, differences, p-values and settings behind the verdict.
        message: one line stating the verdict and its key numbers.
        applicable: False when the check does not apply to this policy (it then passes).
    """

    name: str
    passed: bool
    numbers: dict[str, Any]
    message: str
    applicable: bool = True

    @property
    def title(self) -> str:
        return CHECK_TITLES.get(self.name, self.name)


@dataclass
class AuditReport:
    """The result of :func:`audit`.

    Attributes:
        flagged: True when any check failed (the policy shows gradient masking).
        checks: the five :class:`AuditCheck` in order.
        eps: the audited budget (Linf, [0, 1] units).
        n_obs: number of observations audited.
        success: every attack's success rate, by attack label.
        settings: the audit settings (steps, restarts, margins, ...).
        policy: facts about the policy (input filter, stochastic).
        seconds: wall time of the audit.
    """

    flagged: bool
    checks: list[AuditCheck]
    eps: float
    n_obs: int
    success: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> list[AuditCheck]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (``AuditReport.from_dict`` reads it back)."""
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AuditReport":
        checks = [AuditCheck(**c) for c in data.get("checks", [])]
        return cls(flagged=bool(data["flagged"]), checks=checks, eps=float(data["eps"]),
                   n_obs=int(data["n_obs"]), success=dict(data.get("success", {})),
                   settings=dict(data.get("settings", {})), policy=dict(data.get("policy", {})),
                   seconds=float(data.get("seconds", 0.0)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """Plain-text listing: verdict, then each check with its numbers."""
        eps_txt = _eps_text(self.eps)
        head = (f"gradient-masking audit: {'FLAGGED' if self.flagged else 'not flagged'} "
                f"(eps {eps_txt}, {self.n_obs} observations, {self.seconds:.1f}s)")
        lines = [head]
        for c in self.checks:
            verdict = "PASS" if c.passed else "FAIL"
            if not c.applicable:
                verdict = "n/a "
            lines.append(f"  [{verdict}] {c.title}: {c.message}")
            lines.append(f"         {_numbers_text(c.numbers)}")
        if self.flagged:
            lines.append(f"FLAGGED: {len(self.failed)} check(s) failed: "
                         f"{', '.join(c.name for c in self.failed)}")
        return "\n".join(lines)

    def to_markdown(self, title: str | None = None) -> str:
        """A Markdown section: verdict line, a table of the checks, and the success rates."""
        lines = []
        if title:
            lines += [f"### {title}", ""]
        verdict = "**FLAGGED**" if self.flagged else "not flagged"
        lines += [f"Gradient-masking audit: {verdict} (eps {_eps_text(self.eps)}, "
                  f"{self.n_obs} observations, McNemar one-sided p < "
                  f"{self.settings.get('alpha', 0.01)} and margin >= "
                  f"{self.settings.get('margin', 0.05)}).", "",
                  "| check | result | message | numbers |", "| --- | --- | --- | --- |"]
        for c in self.checks:
            res = "n/a" if not c.applicable else ("pass" if c.passed else "**FAIL**")
            lines.append(f"| {c.title} | {res} | {_md(c.message)} | {_md(_numbers_text(c.numbers))} |")
        if self.success:
            lines += ["", "| attack | success |", "| --- | --- |"]
            lines += [f"| {_md(k)} | {v:.3f} |" for k, v in self.success.items()]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_text()


# --------------------------------------------------------------------------- statistics
def _significant(test: dict[str, Any], margin: float, alpha: float) -> bool:
    return test["diff"] >= margin and test["p"] < alpha


# --------------------------------------------------------------------------- policy facts
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
    with policy_mode(policy, train=False), \
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


# --------------------------------------------------------------------------- the audit
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

    def rate(self, label: str) -> float:
        return float(self.outcomes[label].float().mean())


def _loss(policy: nn.Module, x: torch.Tensor, actions: torch.Tensor, objective: str,
          samples: int) -> torch.Tensor:
    """Per-sample attacker loss (float64, mean over ``samples`` passes) without gradients."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    with torch.no_grad(), policy_mode(policy, train=False):
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

    Returns:
        An :class:`AuditReport`; ``report.flagged`` is True when any check failed.

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
    check_obs(obs)
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
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
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
    filtered = has_input_filter(policy) or preprocess is not None
    loss_samples = eot_samples if stochastic else 1
    with torch.no_grad(), policy_mode(policy, train=False):
        clean = torch.cat([policy(x[i:i + batch_size]).argmax(dim=1)
                           for i in range(0, x.shape[0], batch_size)])
    n = x.shape[0]
    ladder = _ladder(eps, large_eps, ladder_points)
    mid_steps = steps[len(steps) // 2]
    top_steps = steps[-1]

    n_runs = (4 + len(steps) + len(restarts) - 1 + len(ladder) + large_random_draws + 1
              + int(filtered) + int(stochastic) + int(filtered and stochastic))
    bar = None
    if progress:
        from tqdm.auto import tqdm
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
            runner.run(_nrs_label(e), PGD(policy, e, steps=top_steps, random_start=False,
                                         **common), keep_adv=(e == ladder[0]))
        big = _eps_text(large_eps)
        draws = [runner.run(f"random@{big}#{i}", RandomNoise(policy, large_eps, seed=seed + 100 + i))
                 for i in range(large_random_draws)]
        for i in range(large_random_draws):  # keep one entry in the success table
            runner.outcomes.pop(f"random@{big}#{i}")
        runner.outcomes[f"random@{big} (any of {large_random_draws})"] = torch.stack(draws).any(0)
        runner.run(f"square@{big}", Square(policy, large_eps, n_queries=min(n_queries, 100),
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
        pgd_loss = _loss(policy, runner.adv[_nrs_label(ladder[0])], clean, objective, loss_samples)
    finally:
        if bar is not None:
            bar.close()

    o = runner.outcomes
    white_labels = ["fgsm"] + [f"pgd{k}" for k in steps] + \
        [f"pgd{mid_steps}x{r}" for r in restarts[1:]] + [f"apgd{top_steps}", _nrs_label(ladder[0])]
    white = torch.stack([o[k] for k in white_labels]).any(0)
    o["white-box (any)"] = white
    stat = {"margin": margin, "alpha": alpha, "n": n}

    big = _eps_text(large_eps)
    reachable = (o[_nrs_label(ladder[-1])] | o[f"random@{big} (any of {large_random_draws})"]
                 | o[f"square@{big}"])
    checks = [
        _check_square(o, white, stat),
        _check_noise(o, stat),
        _check_steps(o, steps, restarts, mid_steps, clean_loss, pgd_loss, reachable,
                     min_progress, stat, objective),
        _check_large(o, ladder, large_eps, large_success, large_random_draws, stat),
        _check_adaptive(o, plain_label, adaptive, filtered, stochastic, stat, policy),
    ]
    settings = {"steps": list(steps), "restarts": list(restarts), "large_eps": large_eps,
                "n_queries": n_queries, "ladder": ladder, "large_random_draws": large_random_draws,
                "eot_samples": eot_samples, "objective": objective, "margin": margin,
                "alpha": alpha, "large_success": large_success, "min_progress": min_progress,
                "seed": seed, "test": "exact one-sided McNemar on paired outcomes"}
    filt = getattr(policy, "input_filter", None)
    info = {"class": type(policy).__name__, "stochastic": stochastic,
            "input_filter": type(filt).__name__ if isinstance(filt, nn.Module) else None,
            "bpda_preprocess": (None if not filtered else
                                (preprocess if isinstance(preprocess, str) else
                                 "input_filter" if preprocess is None else type(preprocess).__name__)),
            "clean_action_counts": torch.bincount(clean.cpu()).tolist()}
    return AuditReport(flagged=any(not c.passed for c in checks), checks=checks, eps=eps,
                       n_obs=n, success={k: float(v.float().mean()) for k, v in o.items()},
                       settings=settings, policy=info, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- from a checkpoint
def collect_observations(policy: Any, env: Any, n_obs: int = 64, episodes: int = 4,
                         seed: int = 10_000) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Frames seen by the greedy ``policy`` playing ``env`` clean, grouped per policy module.

    Args:
        policy: one module for every agent, or a mapping agent id -> module.
        env: a PettingZoo ``ParallelEnv`` with image observations (uint8 frames are / 255).
        n_obs: at most this many frames per module, spread evenly over the rollout.
        episodes: episodes played (episode ``i`` resets with ``seed + i``).
        seed: base seed.

    Returns:
        ``{name: (module, frames)}``, ``frames`` float (B, H, W, C) in [0, 1]; ``name`` is the
        first agent using the module (``"shared"`` for a single module).
    """
    import numpy as np
    shared = isinstance(policy, nn.Module)
    frames: dict[int, list[torch.Tensor]] = {}
    modules: dict[int, tuple[str, nn.Module]] = {}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        while env.agents:
            actions = {}
            for agent in env.agents:
                if agent not in obs:
                    continue
                p = policy if shared else policy[agent]
                device, dtype = policy_device(p)
                frame = np.asarray(obs[agent])
                x = torch.as_tensor(frame).float()
                if frame.dtype == np.uint8:
                    x = x / 255.0
                with torch.no_grad(), policy_mode(p, train=False):
                    actions[agent] = int(p(x[None].to(device=device, dtype=dtype)).argmax(dim=1))
                frames.setdefault(id(p), []).append(x)
                modules.setdefault(id(p), ("shared" if shared else agent, p))
            obs, *_ = env.step(actions)
    out: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for key, fs in frames.items():
        idx = sorted(set(np.linspace(0, len(fs) - 1, num=min(n_obs, len(fs))).round()
                         .astype(int).tolist()))
        name, module = modules[key]
        out[name] = (module, torch.stack([fs[i] for i in idx]).clamp(0.0, 1.0))
    return out


def audit_checkpoint(checkpoint: Any, env: str | None = None,
                     env_kwargs: dict[str, Any] | None = None, policy_id: str | None = None,
                     eps: float | str = 8 / 255, n_obs: int = 64, episodes: int = 4,
                     seed: int = 0, progress: bool = False, **settings: Any
                     ) -> dict[str, AuditReport]:
    """Audit a trained checkpoint on observations from its own environment.

    Loads every policy module of the checkpoint (or ``policy_id``), plays ``episodes`` clean
    greedy episodes of the env (``env`` or the run's ``run.json`` env), keeps ``n_obs`` frames
    per module and runs :func:`audit` on each.

    Args:
        checkpoint: a run directory or checkpoint (``agents.load_policy``).
        env, env_kwargs: environment override (default: the run's).
        policy_id: audit only this module.
        eps, seed, progress, **settings: passed to :func:`audit`.
        n_obs, episodes: how many observations, from how many episodes.

    Returns:
        ``{module name: AuditReport}`` (``shared``, or per agent).

    Raises:
        agents.checkpoint.CheckpointError: missing or unreadable checkpoint.
        ValueError: unknown env, env setting or policy id.
    """
    policy, env_name, env_kwargs = load_audit_target(checkpoint, env, env_kwargs, policy_id)
    return audit_policies(policy, env_name, env_kwargs, policy_id=policy_id, eps=eps,
                          n_obs=n_obs, episodes=episodes, seed=seed, progress=progress,
                          **settings)


def load_audit_target(checkpoint: Any, env: str | None = None,
                      env_kwargs: dict[str, Any] | None = None, policy_id: str | None = None
                      ) -> tuple[Any, str, dict[str, Any]]:
    """``(policy, env name, env settings)`` of a checkpoint on CPU, checked against its env
    (:func:`agents.checkpoint.run_env` picks the env): what :func:`audit_checkpoint` audits,
    and what ``marl-fgmf audit --address`` ships to the cluster."""
    import os

    from agents.checkpoint import check_policy_fits_env, load_agent_policies, run_env
    from envs import make_env
    checkpoint = os.path.abspath(checkpoint)  # RLlib's loader rejects relative paths
    env_name, env_kwargs = run_env(checkpoint, env, env_kwargs)
    environment = make_env(env_name, **env_kwargs)
    try:
        agents = list(environment.possible_agents)
        policy = load_agent_policies(checkpoint, agents, policy_id, device="cpu",
                                     single_if_shared=True)
        for agent in agents:
            check_policy_fits_env(policy if not isinstance(policy, dict) else policy[agent],
                                  environment, agent)
    finally:
        environment.close()
    return policy, env_name, env_kwargs


def audit_policies(policy: Any, env: str, env_kwargs: dict[str, Any] | None = None,
                   policy_id: str | None = None, eps: float | str = 8 / 255, n_obs: int = 64,
                   episodes: int = 4, seed: int = 0, progress: bool = False, **settings: Any
                   ) -> dict[str, AuditReport]:
    """Audit loaded policies on observations from the env ``env`` (no checkpoint is read).

    ``policy`` is one module for every agent, or ``{agent: module}`` (modules shared by
    several agents are audited once); ``policy_id`` names the single module's report.
    The rest as in :func:`audit_checkpoint`. This is what a tournament's audit task runs on
    the weights the driver shipped.
    """
    from envs import make_env
    environment = make_env(env, **dict(env_kwargs or {}))
    try:
        groups = collect_observations(policy, environment, n_obs, episodes, 10_000 + seed)
    finally:
        environment.close()
    if policy_id is not None:
        groups = {policy_id: g for g in groups.values()}
    return {name: audit(module, obs, eps, seed=seed, progress=progress, **settings)
            for name, (module, obs) in groups.items()}


# --------------------------------------------------------------------------- the checks
def _check_square(o: dict[str, torch.Tensor], white: torch.Tensor, stat: dict) -> AuditCheck:
    t = mcnemar_greater(o["square"], white)
    failed = _significant(t, stat["margin"], stat["alpha"])
    nums = {"square": t["rate_a"], "white_box": t["rate_b"], "fgsm": _rate(o["fgsm"]),
            "diff": t["diff"], "square_only": t["a_only"], "white_box_only": t["b_only"],
            "p": t["p"], **stat}
    verdict = "Square beats the white-box attacks" if failed else "white-box >= Square (within noise)"
    return AuditCheck("gradient_free_vs_white_box", not failed, nums,
                      f"{verdict}: Square {t['rate_a']:.3f} vs white-box {t['rate_b']:.3f} "
                      f"(diff {t['diff']:+.3f}, p={t['p']:.2g})")


def _check_noise(o: dict[str, torch.Tensor], stat: dict) -> AuditCheck:
    t = mcnemar_greater(o["random"], o["fgsm"])
    failed = _significant(t, stat["margin"], stat["alpha"])
    nums = {"random": t["rate_a"], "fgsm": t["rate_b"], "diff": t["diff"],
            "random_only": t["a_only"], "fgsm_only": t["b_only"], "p": t["p"], **stat}
    verdict = "random noise beats FGSM" if failed else "FGSM >= random noise (within noise)"
    return AuditCheck("noise_vs_fgsm", not failed, nums,
                      f"{verdict}: random {t['rate_a']:.3f} vs FGSM {t['rate_b']:.3f} "
                      f"(diff {t['diff']:+.3f}, p={t['p']:.2g})")


def _check_steps(o: dict[str, torch.Tensor], steps: list[int], restarts: list[int],
                 mid_steps: int, clean_loss: torch.Tensor, pgd_loss: torch.Tensor,
                 reachable: torch.Tensor, min_progress: float, stat: dict,
                 objective: str) -> AuditCheck:
    problems: list[str] = []
    nums: dict[str, Any] = {f"pgd_steps_{k}": _rate(o[f"pgd{k}"]) for k in steps}
    for r in restarts:
        label = f"pgd{mid_steps}" if r == restarts[0] else f"pgd{mid_steps}x{r}"
        nums[f"pgd_{mid_steps}steps_restarts_{r}"] = _rate(o[label])
    nums["fgsm"] = _rate(o["fgsm"])
    worst_p = 1.0
    # (a) more steps must not be weaker than fewer
    for i, k_few in enumerate(steps):
        for k_many in steps[i + 1:]:
            t = mcnemar_greater(o[f"pgd{k_few}"], o[f"pgd{k_many}"])
            worst_p = min(worst_p, t["p"])
            if _significant(t, stat["margin"], stat["alpha"]):
                problems.append(f"{k_many} steps weaker than {k_few} ({t['rate_b']:.3f} < "
                                f"{t['rate_a']:.3f}, p={t['p']:.2g})")
    # (b) more restarts must not be weaker
    base = o[f"pgd{mid_steps}"]
    for r in restarts[1:]:
        t = mcnemar_greater(base, o[f"pgd{mid_steps}x{r}"])
        worst_p = min(worst_p, t["p"])
        if _significant(t, stat["margin"], stat["alpha"]):
            problems.append(f"{r} restarts weaker than {restarts[0]} ({t['rate_b']:.3f} < "
                            f"{t['rate_a']:.3f}, p={t['p']:.2g})")
    # (c) iterative must not be weaker than single-step
    top = f"pgd{steps[-1]}"
    t = mcnemar_greater(o["fgsm"], o[top])
    worst_p = min(worst_p, t["p"])
    if _significant(t, stat["margin"], stat["alpha"]):
        problems.append(f"PGD-{steps[-1]} weaker than FGSM ({t['rate_b']:.3f} < "
                        f"{t['rate_a']:.3f}, p={t['p']:.2g})")
    # (d) gradient ascent must raise the loss, on the observations whose action SOME attack
    # can change (an input-insensitive action has a flat loss without any masking)
    tol = 1e-6 * (clean_loss.abs() + 1e-3)
    rose = (pgd_loss > clean_loss + tol).cpu()
    movable = reachable.cpu()
    n_movable = int(movable.sum())
    progress = float(rose[movable].double().mean()) if n_movable else float("nan")
    nums.update({"gradient_progress": progress, "progress_samples": n_movable,
                 "min_progress": min_progress, "loss_objective": objective,
                 "clean_loss_mean": float(clean_loss.mean()),
                 "pgd_loss_mean": float(pgd_loss.mean()), "min_p": worst_p, **stat})
    if n_movable and progress < min_progress:
        problems.append(f"gradient ascent raised the {objective} loss on only {progress:.0%} of "
                        f"the {n_movable} samples whose action can be changed (< "
                        f"{min_progress:.0%}): the gradient does not move the iterate")
    curve = ", ".join(f"{k}:{_rate(o[f'pgd{k}']):.3f}" for k in steps)
    rcurve = ", ".join(f"{r}:{nums[f'pgd_{mid_steps}steps_restarts_{r}']:.3f}" for r in restarts)
    if problems:
        return AuditCheck("steps_and_restarts", False, nums, "; ".join(problems) +
                          f" [steps {curve}; restarts {rcurve}]")
    progress_txt = (f"gradient ascent raised the loss on {progress:.0%} of the {n_movable} "
                    f"changeable samples" if n_movable else
                    "no sample's action can be changed, so loss progress is not tested")
    return AuditCheck("steps_and_restarts", True, nums,
                      f"success never falls with budget (steps {curve}; restarts {rcurve}); "
                      f"{progress_txt}")


def _check_large(o: dict[str, torch.Tensor], ladder: list[float], large_eps: float,
                 large_success: float, draws: int, stat: dict) -> AuditCheck:
    problems: list[str] = []
    curve = {_eps_text(e): _rate(o[_nrs_label(e)]) for e in ladder}
    for lo, hi in zip(ladder, ladder[1:]):
        t = mcnemar_greater(o[_nrs_label(lo)], o[_nrs_label(hi)])
        if _significant(t, stat["margin"], stat["alpha"]):
            problems.append(f"success falls from {t['rate_a']:.3f} at eps {_eps_text(lo)} to "
                            f"{t['rate_b']:.3f} at {_eps_text(hi)} (p={t['p']:.2g})")
    big = _eps_text(large_eps)
    grad = o[_nrs_label(ladder[-1])]
    reach = grad | o[f"random@{big} (any of {draws})"] | o[f"square@{big}"]
    t = mcnemar_greater(reach, grad)
    grad_rate, reach_rate = t["rate_b"], t["rate_a"]
    nums = {"pgd_success_by_eps": curve, "pgd_large": grad_rate, "reachable_large": reach_rate,
            "large_eps": large_eps, "large_success": large_success, "reach_only": t["a_only"],
            "p": t["p"], **stat}
    if grad_rate < large_success and _significant(t, stat["margin"], stat["alpha"]):
        problems.append(f"gradient PGD reaches only {grad_rate:.3f} at eps {big} while other "
                        f"attacks reach {reach_rate:.3f} (p={t['p']:.2g})")
    curve_txt = ", ".join(f"{k}:{v:.3f}" for k, v in curve.items())
    if problems:
        return AuditCheck("large_budget", False, nums, "; ".join(problems) + f" [{curve_txt}]")
    if grad_rate >= large_success:
        msg = f"success approaches 100%: {grad_rate:.3f} at eps {big} [{curve_txt}]"
    else:
        msg = (f"{grad_rate:.3f} at eps {big}, and no attack does better ({reach_rate:.3f}): "
               f"those actions are input-insensitive, not masked [{curve_txt}]")
    return AuditCheck("large_budget", True, nums, msg)


def _check_adaptive(o: dict[str, torch.Tensor], plain_label: str, adaptive: list[str],
                    filtered: bool, stochastic: bool, stat: dict, policy: nn.Module) -> AuditCheck:
    if not adaptive:
        return AuditCheck("adaptive_attack", True,
                          {"input_filter": False, "stochastic": False, **stat},
                          "not applicable: deterministic policy with no input filter "
                          "(BPDA/EOT equal the plain attack)", applicable=False)
    plain = o[plain_label]
    nums: dict[str, Any] = {"plain": _rate(plain), "plain_attack": plain_label,
                            "input_filter": filtered, "stochastic": stochastic, **stat}
    best_label, best_t = None, None
    for label in adaptive:
        t = mcnemar_greater(o[label], plain)
        nums[label] = t["rate_a"]
        if best_t is None or t["diff"] > best_t["diff"]:
            best_label, best_t = label, t
    nums.update({"best_adaptive": best_label, "diff": best_t["diff"], "p": best_t["p"],
                 "adaptive_only": best_t["a_only"], "plain_only": best_t["b_only"]})
    failed = _significant(best_t, stat["margin"], stat["alpha"])
    verdict = "the adaptive attack beats the plain one" if failed else "adaptive <= plain (within noise)"
    return AuditCheck("adaptive_attack", not failed, nums,
                      f"{verdict}: {best_label} {best_t['rate_a']:.3f} vs {plain_label} "
                      f"{best_t['rate_b']:.3f} (diff {best_t['diff']:+.3f}, p={best_t['p']:.2g})")


# --------------------------------------------------------------------------- helpers
def _rate(outcome: torch.Tensor) -> float:
    return float(outcome.float().mean())


def _nrs_label(e: float) -> str:
    return f"pgd-grad@{_eps_text(e)}"


def _eps_text(e: float) -> str:
    k = e * 255
    if abs(k - round(k)) < 1e-6 and e < 1:
        return f"{int(round(k))}/255"
    return f"{e:g}"


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


def _numbers_text(numbers: dict[str, Any]) -> str:
    parts = []
    for k, v in numbers.items():
        if k in ("margin", "alpha", "n"):
            continue
        if isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        elif isinstance(v, dict):
            parts.append(f"{k}={{" + ", ".join(f"{a}: {b:.3f}" if isinstance(b, float) else
                                                f"{a}: {b}" for a, b in v.items()) + "}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
