"""The five checks of the gradient-masking audit (described in :mod:`marl_fgmf.audit`), each
from the per-sample successes of the attacks that :func:`marl_fgmf.audit.audit` ran (a dict
``label -> bool tensor``, all on the same observations) compared with McNemar's test."""
from __future__ import annotations

from typing import Any

import torch

from marl_fgmf.audit.report import AuditCheck, eps_text
from marl_fgmf.stats import mcnemar_greater

__all__ = ["check_square", "check_noise", "check_steps", "check_large", "check_adaptive",
           "significant", "rate", "gradient_pgd_label", "likely_cause", "CAUSES",
           "GRADIENT_LESS"]


def significant(test: dict[str, Any], margin: float, alpha: float) -> bool:
    """A McNemar comparison (:func:`marl_fgmf.stats.mcnemar_greater`) counts as a failure:
    the difference of rates is at least ``margin`` AND the one-sided p-value below ``alpha``."""
    return test["diff"] >= margin and test["p"] < alpha


def rate(outcome: torch.Tensor) -> float:
    """Success rate of a per-sample outcome."""
    return float(outcome.float().mean())


def gradient_pgd_label(e: float) -> str:
    """Label of the gradient-only PGD (no random start) of the eps ladder at budget ``e``."""
    return f"pgd-grad@{eps_text(e)}"


def check_square(o: dict[str, torch.Tensor], white: torch.Tensor, stat: dict) -> AuditCheck:
    t = mcnemar_greater(o["square"], white)
    failed = significant(t, stat["margin"], stat["alpha"])
    nums = {"square": t["rate_a"], "white_box": t["rate_b"], "fgsm": rate(o["fgsm"]),
            "diff": t["diff"], "square_only": t["a_only"], "white_box_only": t["b_only"],
            "p": t["p"], **stat}
    verdict = "Square beats the white-box attacks" if failed else "white-box >= Square (within noise)"
    return AuditCheck("gradient_free_vs_white_box", not failed, nums,
                      f"{verdict}: Square {t['rate_a']:.3f} vs white-box {t['rate_b']:.3f} "
                      f"(diff {t['diff']:+.3f}, p={t['p']:.2g})")


def check_noise(o: dict[str, torch.Tensor], stat: dict) -> AuditCheck:
    t = mcnemar_greater(o["random"], o["fgsm"])
    failed = significant(t, stat["margin"], stat["alpha"])
    nums = {"random": t["rate_a"], "fgsm": t["rate_b"], "diff": t["diff"],
            "random_only": t["a_only"], "fgsm_only": t["b_only"], "p": t["p"], **stat}
    verdict = "random noise beats FGSM" if failed else "FGSM >= random noise (within noise)"
    return AuditCheck("noise_vs_fgsm", not failed, nums,
                      f"{verdict}: random {t['rate_a']:.3f} vs FGSM {t['rate_b']:.3f} "
                      f"(diff {t['diff']:+.3f}, p={t['p']:.2g})")


def check_steps(o: dict[str, torch.Tensor], steps: list[int], restarts: list[int],
                mid_steps: int, clean_loss: torch.Tensor, pgd_loss: torch.Tensor,
                reachable: torch.Tensor, min_progress: float, stat: dict,
                objective: str) -> AuditCheck:
    problems: list[str] = []
    nums: dict[str, Any] = {f"pgd_steps_{k}": rate(o[f"pgd{k}"]) for k in steps}
    for r in restarts:
        label = f"pgd{mid_steps}" if r == restarts[0] else f"pgd{mid_steps}x{r}"
        nums[f"pgd_{mid_steps}steps_restarts_{r}"] = rate(o[label])
    nums["fgsm"] = rate(o["fgsm"])
    worst_p = 1.0
    # (a) more steps must not be weaker than fewer
    for i, k_few in enumerate(steps):
        for k_many in steps[i + 1:]:
            t = mcnemar_greater(o[f"pgd{k_few}"], o[f"pgd{k_many}"])
            worst_p = min(worst_p, t["p"])
            if significant(t, stat["margin"], stat["alpha"]):
                problems.append(f"{k_many} steps weaker than {k_few} ({t['rate_b']:.3f} < "
                                f"{t['rate_a']:.3f}, p={t['p']:.2g})")
    # (b) more restarts must not be weaker
    base = o[f"pgd{mid_steps}"]
    for r in restarts[1:]:
        t = mcnemar_greater(base, o[f"pgd{mid_steps}x{r}"])
        worst_p = min(worst_p, t["p"])
        if significant(t, stat["margin"], stat["alpha"]):
            problems.append(f"{r} restarts weaker than {restarts[0]} ({t['rate_b']:.3f} < "
                            f"{t['rate_a']:.3f}, p={t['p']:.2g})")
    # (c) iterative must not be weaker than single-step
    top = f"pgd{steps[-1]}"
    t = mcnemar_greater(o["fgsm"], o[top])
    worst_p = min(worst_p, t["p"])
    if significant(t, stat["margin"], stat["alpha"]):
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
    curve = ", ".join(f"{k}:{rate(o[f'pgd{k}']):.3f}" for k in steps)
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


def check_large(o: dict[str, torch.Tensor], ladder: list[float], large_eps: float,
                large_success: float, reachable: torch.Tensor, stat: dict) -> AuditCheck:
    problems: list[str] = []
    curve = {eps_text(e): rate(o[gradient_pgd_label(e)]) for e in ladder}
    for lo, hi in zip(ladder, ladder[1:]):
        t = mcnemar_greater(o[gradient_pgd_label(lo)], o[gradient_pgd_label(hi)])
        if significant(t, stat["margin"], stat["alpha"]):
            problems.append(f"success falls from {t['rate_a']:.3f} at eps {eps_text(lo)} to "
                            f"{t['rate_b']:.3f} at {eps_text(hi)} (p={t['p']:.2g})")
    big = eps_text(large_eps)
    grad = o[gradient_pgd_label(ladder[-1])]
    t = mcnemar_greater(reachable, grad)
    grad_rate, reach_rate = t["rate_b"], t["rate_a"]
    nums = {"pgd_success_by_eps": curve, "pgd_large": grad_rate, "reachable_large": reach_rate,
            "large_eps": large_eps, "large_success": large_success, "reach_only": t["a_only"],
            "p": t["p"], **stat}
    if grad_rate < large_success and significant(t, stat["margin"], stat["alpha"]):
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


def check_adaptive(o: dict[str, torch.Tensor], plain_label: str, adaptive: list[str],
                   filtered: bool, stochastic: bool, stat: dict) -> AuditCheck:
    if not adaptive:
        return AuditCheck("adaptive_attack", True,
                          {"input_filter": False, "stochastic": False, **stat},
                          "not applicable: deterministic policy with no input filter "
                          "(BPDA/EOT equal the plain attack)", applicable=False)
    plain = o[plain_label]
    nums: dict[str, Any] = {"plain": rate(plain), "plain_attack": plain_label,
                            "input_filter": filtered, "stochastic": stochastic, **stat}
    best_label, best_t = None, None
    for label in adaptive:
        t = mcnemar_greater(o[label], plain)
        nums[label] = t["rate_a"]
        if best_t is None or t["diff"] > best_t["diff"]:
            best_label, best_t = label, t
    nums.update({"best_adaptive": best_label, "diff": best_t["diff"], "p": best_t["p"],
                 "adaptive_only": best_t["a_only"], "plain_only": best_t["b_only"]})
    failed = significant(best_t, stat["margin"], stat["alpha"])
    verdict = "the adaptive attack beats the plain one" if failed else "adaptive <= plain (within noise)"
    return AuditCheck("adaptive_attack", not failed, nums,
                      f"{verdict}: {best_label} {best_t['rate_a']:.3f} vs {plain_label} "
                      f"{best_t['rate_b']:.3f} (diff {best_t['diff']:+.3f}, p={best_t['p']:.2g})")




GRADIENT_LESS = ("no_grad", "detached")
"""Probe verdicts that flag a policy by themselves: with no gradient graph to obs at all, no
gradient attack can evaluate it, whatever the five checks say (an exactly zero gradient does
not: an input-insensitive policy has one too, and the checks tell the two apart)."""

CAUSES = ("no_grad", "detached", "zero_gradient", "quantized_input", "input_filter",
          "randomness", "useless_gradients")
"""The causes :func:`likely_cause` names, most specific first."""


def likely_cause(checks: list[AuditCheck], gradient: dict[str, Any], filter_name: str | None,
                 stochastic: bool) -> dict[str, str] | None:
    """The likeliest cause of a flagged audit, from its checks and its input-gradient probe.

    Args:
        checks: the five checks (none failed: no cause).
        gradient: :func:`marl_fgmf.protocol.diagnose_input_gradient` as a dict (``ok``,
            ``cause``, ``summary``, ``likely``).
        filter_name: the class of the policy's input filter (or BPDA's preprocessing), or None.
        stochastic: two forward passes differ.
    Returns:
        None when no check failed and the policy has a gradient graph, else ``{"cause": one of CAUSES, "text": one line}``:
        a missing gradient (``no_grad``, ``detached``) or an exactly zero one (``quantized_input``
        behind an input filter, else ``zero_gradient``) first, as probed; then what the
        adaptive check found (BPDA: the input filter; EOT: randomness); then the policy's
        facts; else gradients that exist but lead nowhere (``useless_gradients``).
    """
    failed = [c for c in checks if not c.passed]
    if not failed and gradient.get("cause") not in GRADIENT_LESS:
        return None
    cause = gradient.get("cause")
    if cause in ("no_grad", "detached"):
        where = f" (the policy has the input filter {filter_name})" if filter_name else ""
        return {"cause": cause, "text": f"{gradient['summary']}{where}: {gradient['likely']}"}
    if cause == "zero":
        if filter_name:
            return {"cause": "quantized_input",
                    "text": f"the input gradient is exactly zero on every observation behind "
                            f"the input filter {filter_name}: a quantizing or otherwise "
                            f"non-differentiable input layer; evaluate it with BPDA"}
        return {"cause": "zero_gradient", "text": f"{gradient['summary']}: {gradient['likely']}"}
    adaptive = next((c for c in failed if c.name == "adaptive_attack"), None)
    best = str(adaptive.numbers.get("best_adaptive", "")) if adaptive is not None else ""
    if best.startswith("eot"):
        return {"cause": "randomness",
                "text": f"a randomized policy: {best} (averaging gradients over its randomness) "
                        f"beats the plain attack; its single-pass gradients are noise"}
    if best.startswith("bpda"):
        return {"cause": "input_filter",
                "text": f"the input filter {filter_name or '(BPDA preprocessing)'} obstructs "
                        f"the gradient: {best} (straight-through) beats the plain attack"}
    if stochastic:
        return {"cause": "randomness",
                "text": "a randomized policy (two forward passes differ): single-pass "
                        "gradients are noisy; evaluate it with EOT"}
    if filter_name:
        return {"cause": "input_filter",
                "text": f"the input filter {filter_name} may obstruct the "
                        f"gradient; evaluate it with BPDA"}
    names = ", ".join(c.name for c in failed)
    return {"cause": "useless_gradients",
            "text": f"the input gradient exists and is nonzero but does not lead the attacks "
                    f"to adversarial inputs ({names} failed): a saturated or shattered "
                    f"gradient; trust the gradient-free results"}
