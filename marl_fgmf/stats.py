"""Statistics shared by every report: means with confidence intervals, the bootstrap, and
McNemar's exact test (torch-free; scipy where scipy has the method).

* :func:`mean_ci95`: mean and the half-width of its 95% Student-t confidence interval,
  ``t_{0.975, n-1} * s / sqrt(n)``; one value has no spread to estimate, so its half-width
  is NaN (never 0, which would claim certainty).
* :func:`summarize`: the same as a record ``{"mean", "ci95", "low", "high", "n"}``.
* :func:`bootstrap_ci`: a percentile bootstrap interval of any statistic (scipy's
  ``stats.bootstrap``), seeded.
* :func:`mcnemar_greater`: the exact one-sided McNemar (sign) test on paired outcomes.
* :func:`iqm`: the interquartile mean (Agarwal et al., NeurIPS 2021).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["t_quantile", "mean_ci95", "summarize", "bootstrap_ci", "mcnemar_greater", "iqm"]


def _values(values: Any) -> list[float]:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().flatten().tolist()
    elif isinstance(values, np.ndarray):
        values = values.flatten().tolist()
    return [float(v) for v in values]


def t_quantile(p: float, df: int) -> float:
    """Two-sided Student-t critical value: ``t`` with ``P(|T| <= t) = p``, e.g.
    ``t_quantile(0.95, 2) = 4.303``."""
    if not 0 < p < 1 or int(df) < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    return float(_scipy_stats.t.ppf(0.5 + p / 2.0, int(df)))


def mean_ci95(values: Iterable[float] | Any) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``t_{0.975, n-1} * s / sqrt(n)`` (Student t, sample
    standard deviation ``s``). One value gives a half-width of NaN (no spread to estimate).

    Raises:
        ValueError: no values, or non-finite values.
    """
    vals = _values(values)
    if not vals:
        raise ValueError("mean_ci95 needs at least one value, got none")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"mean_ci95 got non-finite values: {[v for v in vals if not math.isfinite(v)][:5]}")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, t_quantile(0.95, n - 1) * sd / math.sqrt(n)


def summarize(values: Iterable[float] | Any) -> dict[str, float]:
    """:func:`mean_ci95` as a record ``{"mean", "ci95", "low", "high", "n"}``; no values give
    NaNs and ``n = 0`` (a report row that is visibly empty rather than an exception)."""
    vals = _values(values)
    if not vals:
        nan = float("nan")
        return {"mean": nan, "ci95": nan, "low": nan, "high": nan, "n": 0}
    mean, half = mean_ci95(vals)
    return {"mean": mean, "ci95": half, "low": mean - half, "high": mean + half, "n": len(vals)}


def bootstrap_ci(values: Iterable[float] | Any, statistic: Callable[[np.ndarray], float] = np.mean,
                 confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (scipy's
    ``stats.bootstrap``, seeded). Fewer than two values give ``(nan, nan)``."""
    vals = np.asarray(_values(values), dtype=float)
    if vals.size < 2:
        return float("nan"), float("nan")
    res = _scipy_stats.bootstrap((vals,), lambda x, axis=-1: np.apply_along_axis(statistic, axis, x),
                                 confidence_level=confidence, n_resamples=n_resamples,
                                 method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar_greater(a: Any, b: Any) -> dict[str, Any]:
    """Exact one-sided McNemar (sign) test that success vector ``a`` beats ``b``.

    ``a`` and ``b`` are (B,) boolean outcomes of two attacks on the SAME observations. Under the
    null hypothesis (equal success probabilities) the discordant pairs split 50/50, so with
    ``n01 = #(a & ~b)`` and ``n10 = #(~a & b)``, ``p = P[Binomial(n01 + n10, 1/2) >= n01]``
    (scipy's exact ``binomtest``, alternative ``greater``).

    Returns:
        ``{"rate_a", "rate_b", "diff", "a_only", "b_only", "p"}``.
    """
    a = np.asarray(_values(a), dtype=bool)
    b = np.asarray(_values(b), dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"outcome vectors differ in shape: {a.shape} vs {b.shape}")
    n = max(a.size, 1)
    a_only = int((a & ~b).sum())
    b_only = int((~a & b).sum())
    m = a_only + b_only
    p = 1.0 if m == 0 else float(_scipy_stats.binomtest(a_only, m, 0.5, alternative="greater").pvalue)
    return {"rate_a": float(a.sum()) / n, "rate_b": float(b.sum()) / n,
            "diff": (a_only - b_only) / n, "a_only": a_only, "b_only": b_only, "p": p}


def iqm(values: Iterable[float] | Any) -> float:
    """Interquartile mean: the mean of the middle 50% of the values (scipy's 25%-trimmed mean),
    the robust aggregate of Agarwal et al. (NeurIPS 2021)."""
    vals = np.asarray(_values(values), dtype=float)
    if vals.size == 0:
        raise ValueError("iqm needs at least one value, got none")
    return float(_scipy_stats.trim_mean(vals, 0.25))
