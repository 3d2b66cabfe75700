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

Aggregates across runs (training seeds) and tasks (environments), after Agarwal, Schwarzer,
Castro, Courville and Bellemare, "Deep Reinforcement Learning at the Edge of the Statistical
Precipice" (NeurIPS 2021), written from the paper's definitions. Scores are a mapping
``task -> 1-D array of per-run scores``; tasks may have different numbers of runs.

* :func:`normalize_score`: ``(score - random) / (reference - random)``.
* :func:`stratified_bootstrap_ci`: resample runs with replacement within each task, percentile
  interval of any statistic of the mapping.
* :func:`aggregate_iqm`, :func:`aggregate_mean`, :func:`aggregate_median` and
  :func:`aggregate_with_ci` (every method and metric with its interval, as JSON).
* :func:`probability_of_improvement`: ``P(X > Y)``, the task-averaged Mann-Whitney statistic.
* :func:`performance_profile`: the fraction of runs above each ``tau``, with CI bands.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["t_quantile", "mean_ci95", "summarize", "bootstrap_ci", "mcnemar_greater", "iqm",
           "normalize_score", "stratified_bootstrap_ci", "aggregate_iqm", "aggregate_mean",
           "aggregate_median", "AGGREGATES", "aggregate_with_ci", "probability_of_improvement",
           "performance_profile", "ratio_of_aggregates", "margin_of_aggregates"]


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


# ------------------------------------------------------------------ aggregates across tasks
# Agarwal et al., "Deep Reinforcement Learning at the Edge of the Statistical Precipice",
# NeurIPS 2021: scores are ``{task: (n_runs,) array}``, runs = training seeds, tasks = envs.

Scores = Mapping[Any, Any]


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=float)


def normalize_score(score: Any, random: Any, reference: Any) -> float | np.ndarray:
    """Normalized score ``(score - random) / (reference - random)``: 0 is the random policy,
    1 the reference (the clean undefended policy, or the optimum where known). Broadcasts like
    numpy; scalars in give a float out.

    Raises:
        ValueError: a non-finite input, or ``reference == random`` (nothing to scale by).
    """
    s, r, ref = _array(score), _array(random), _array(reference)
    for name, a in (("score", s), ("random", r), ("reference", ref)):
        if not np.isfinite(a).all():
            raise ValueError(f"normalize_score: {name} has non-finite values; all must be finite")
    span = ref - r
    if (span == 0).any():
        raise ValueError("normalize_score: reference == random; they must differ to scale by")
    out = (s - r) / span
    return float(out) if out.ndim == 0 else out


def _check_scores(scores: Scores, name: str = "scores") -> dict[Any, np.ndarray]:
    """``{task: finite non-empty 1-D float array}``, tasks in sorted order (by ``str``)."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"{name}: need a non-empty mapping task -> run scores, "
                         f"got {scores!r:.60}")
    checked = {}
    for task in sorted(scores, key=str):
        runs = _array(scores[task])
        if runs.ndim != 1:
            raise ValueError(f"{name}[{task!r}]: runs must be a 1-D array, got shape {runs.shape}")
        if runs.size == 0:
            raise ValueError(f"{name}[{task!r}]: no runs; every task needs at least one run score")
        if not np.isfinite(runs).all():
            bad = np.flatnonzero(~np.isfinite(runs)).tolist()[:5]
            raise ValueError(f"{name}[{task!r}]: non-finite scores at runs {bad}; "
                             "all must be finite")
        checked[task] = runs
    return checked


def _check_bootstrap(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")


def _stratified_bootstrap(samples: Sequence[dict[Any, np.ndarray]],
                          statistic: Callable[..., Any], confidence: float, n_resamples: int,
                          seed: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and percentile interval of ``statistic(*samples)`` (checked samples).

    Each resample draws, for every sample and every task independently, as many runs as the
    task has, with replacement from that task's runs only (the stratification); the draws
    come from one ``numpy.random.default_rng(seed)`` in sample, then sorted-task order.
    """
    _check_bootstrap(confidence, n_resamples)
    rng = np.random.default_rng(seed)
    point = np.asarray(statistic(*samples), dtype=float)
    drawn = [{task: runs[rng.integers(0, runs.size, size=(n_resamples, runs.size))]
              for task, runs in sample.items()} for sample in samples]  # (n_resamples, n_runs)
    values = np.stack([np.asarray(statistic(*({task: runs[b] for task, runs in d.items()}
                                               for d in drawn)), dtype=float)
                       for b in range(n_resamples)])
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2], axis=0)
    return point, low, high


def _scalar_or_array(*arrays: np.ndarray) -> tuple[Any, ...]:
    return tuple(float(a) if a.ndim == 0 else a for a in arrays)


def stratified_bootstrap_ci(scores: Scores, statistic: Callable[[dict[Any, np.ndarray]], Any],
                            confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                            ) -> tuple[Any, Any, Any]:
    """Stratified percentile bootstrap (Agarwal et al., NeurIPS 2021).

    A resample keeps every task and its number of runs ``N_m`` and draws ``N_m`` runs with
    replacement from that task's runs only, independently per task (a run never moves to
    another task); ``statistic`` is recomputed on each resample and the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those values.

    Args:
        scores: ``{task: 1-D array of per-run scores}`` (finite, at least one run per task).
        statistic: called with a ``{task: 1-D array}`` dict (tasks in sorted order) and
            returning a scalar or a 1-D array (then the interval is per element); e.g.
            :func:`aggregate_iqm`. Pooled statistics use ``np.concatenate(list(d.values()))``.
        seed: the resamples depend on it only (same seed, same numbers).

    Returns:
        ``(point_estimate, low, high)``: floats for a scalar statistic, else arrays.
    """
    return _scalar_or_array(*_stratified_bootstrap((_check_scores(scores),), statistic,
                                                   confidence, n_resamples, seed))


def _pooled_iqm(checked: dict[Any, np.ndarray]) -> float:
    # the same 25% trimmed mean as iqm(), without its per-call validation (bootstrap loop)
    return float(_scipy_stats.trim_mean(np.concatenate(list(checked.values())), 0.25))


def _mean_of_task_means(checked: dict[Any, np.ndarray]) -> float:
    return float(np.mean([runs.mean() for runs in checked.values()]))


def _median_of_task_means(checked: dict[Any, np.ndarray]) -> float:
    return float(np.median([runs.mean() for runs in checked.values()]))


def aggregate_iqm(scores: Scores) -> float:
    """Interquartile mean of all ``run x task`` scores pooled (Agarwal et al., NeurIPS 2021):
    the 25% trimmed mean ``IQM = 1/(n - 2k) sum_{i=k+1}^{n-k} x_(i)`` of the ``n`` pooled
    scores sorted, ``k = floor(n / 4)`` (what scipy's ``trim_mean(.., 0.25)`` computes).
    Pooling weights a task by its run count (equally when all have the same number of runs)."""
    return _pooled_iqm(_check_scores(scores))


def aggregate_mean(scores: Scores) -> float:
    """Mean over tasks of the per-task mean score ``(1/M) sum_m mean_n x_{m,n}`` (each task
    weighted equally; the pooled mean when all tasks have the same number of runs)."""
    return _mean_of_task_means(_check_scores(scores))


def aggregate_median(scores: Scores) -> float:
    """Median over tasks of the per-task mean score, the median of Agarwal et al. (NeurIPS
    2021): ``median_m mean_n x_{m,n}``."""
    return _median_of_task_means(_check_scores(scores))


AGGREGATES: dict[str, Callable[[Scores], float]] = {
    "iqm": aggregate_iqm, "mean": aggregate_mean, "median": aggregate_median}
_UNCHECKED = {"iqm": _pooled_iqm, "mean": _mean_of_task_means, "median": _median_of_task_means}


def aggregate_with_ci(scores_by_method: Mapping[str, Scores],
                      metrics: Sequence[str] = ("iqm", "mean", "median"),
                      confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                      ) -> dict[str, Any]:
    """Every method's aggregates (:data:`AGGREGATES`) with stratified bootstrap intervals.

    Every method and metric is resampled from the same ``seed``, so a method's numbers do not
    depend on which other methods are compared with it.

    Returns:
        JSON-serializable ``{"confidence", "n_resamples", "seed", "methods": {method:
        {"runs": {task: n}, metric: {"estimate", "low", "high"}, ...}}}``.
    """
    unknown = [m for m in metrics if m not in AGGREGATES]
    if unknown or not metrics:
        raise ValueError(f"aggregate_with_ci: metrics {list(metrics)} unknown or empty; "
                         f"allowed: {sorted(AGGREGATES)}")
    if not isinstance(scores_by_method, Mapping) or not scores_by_method:
        raise ValueError("aggregate_with_ci: need a non-empty mapping "
                         "method -> {task: run scores}")
    _check_bootstrap(confidence, n_resamples)
    methods: dict[str, Any] = {}
    for method, scores in scores_by_method.items():
        checked = _check_scores(scores, f"scores_by_method[{method!r}]")
        record: dict[str, Any] = {"runs": {str(t): int(r.size) for t, r in checked.items()}}
        for metric in metrics:
            point, low, high = _stratified_bootstrap((checked,), _UNCHECKED[metric],
                                                     confidence, n_resamples, seed)
            record[metric] = {"estimate": float(point), "low": float(low), "high": float(high)}
        methods[str(method)] = record
    return {"confidence": confidence, "n_resamples": int(n_resamples), "seed": seed,
            "methods": methods}


def _improvement(x: dict[Any, np.ndarray], y: dict[Any, np.ndarray]) -> float:
    per_task = [((xr[:, None] > yr[None, :]).mean() + 0.5 * (xr[:, None] == yr[None, :]).mean())
                for xr, yr in zip(x.values(), y.values())]  # same sorted tasks
    return float(np.mean(per_task))


def probability_of_improvement(x_scores: Scores, y_scores: Scores, confidence: float = 0.95,
                               n_resamples: int = 2000, seed: int = 0
                               ) -> tuple[float, float, float]:
    """Probability that method X beats method Y on a task drawn at random (Agarwal et al.,
    NeurIPS 2021): ``P(X > Y) = (1/M) sum_m P(X_m > Y_m)`` with the Mann-Whitney
    statistic per task ``P(X_m > Y_m) = 1/(N K) sum_i sum_j S(x_{m,i}, y_{m,j})``, ``S = 1``
    if ``x > y``, ``1/2`` if equal, ``0`` otherwise (so ``P(X > Y) + P(Y > X) = 1``). The
    interval resamples X's runs and Y's runs within each task independently.

    Returns:
        ``(estimate, low, high)``.

    Raises:
        ValueError: the two methods' tasks differ (the message names the missing ones).
    """
    x, y = _check_scores(x_scores, "x_scores"), _check_scores(y_scores, "y_scores")
    if x.keys() != y.keys():
        no_y = sorted(map(str, x.keys() - y.keys()))
        no_x = sorted(map(str, y.keys() - x.keys()))
        raise ValueError(f"probability_of_improvement: tasks differ: missing from y_scores "
                         f"{no_y}, missing from x_scores {no_x}; both need the same tasks")
    return _scalar_or_array(*_stratified_bootstrap((x, y), _improvement, confidence,
                                                   n_resamples, seed))


def ratio_of_aggregates(x_scores: Scores, y_scores: Scores, metric: str = "iqm",
                        confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                        ) -> tuple[float, float, float]:
    """``aggregate(X) / aggregate(Y)`` (``metric`` of :data:`AGGREGATES`) with a stratified
    bootstrap interval that resamples X's and Y's runs independently within each task (two
    methods trained on separate seeds). A resample whose denominator is not positive gives
    ``+inf`` when the numerator exceeds it, else ``-inf`` (X beats a Y at or below zero by
    any factor, or loses to it), so an interval touching it is unbounded: a ratio to a score
    near zero is not evidence.

    Returns:
        ``(estimate, low, high)``.
    """
    if metric not in _UNCHECKED:
        raise ValueError(f"ratio_of_aggregates: metric {metric!r} unknown; allowed: "
                         f"{sorted(AGGREGATES)}")
    x, y = _check_scores(x_scores, "x_scores"), _check_scores(y_scores, "y_scores")
    if x.keys() != y.keys():
        raise ValueError("ratio_of_aggregates: x_scores and y_scores need the same tasks")
    agg = _UNCHECKED[metric]
    huge = 1e300  # stands for an infinite ratio inside the quantiles (inf - inf is nan)

    def ratio(a: dict[Any, np.ndarray], b: dict[Any, np.ndarray]) -> float:
        num, den = agg(a), agg(b)
        if den <= 0:
            return huge if num > den else -huge
        return num / den

    point, low, high = _stratified_bootstrap((x, y), ratio, confidence, n_resamples, seed)
    return tuple(float(v) if abs(v) < huge else math.copysign(math.inf, v)
                 for v in (point, low, high))


def margin_of_aggregates(x_scores: Scores, y_scores: Scores, factor: float,
                         metric: str = "iqm", confidence: float = 0.95, n_resamples: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """``aggregate(X) - factor * aggregate(Y)`` with the stratified bootstrap interval of
    :func:`ratio_of_aggregates` (X's and Y's runs resampled independently within each task).

    "X beats Y by ``factor``" is ``aggregate(X) >= factor * aggregate(Y)``: for a positive
    ``aggregate(Y)`` the same question as ``ratio >= factor``, but the margin stays finite
    (and its interval informative) when Y's aggregate nears zero, where the ratio's interval
    is unbounded.

    Returns:
        ``(estimate, low, high)``.
    """
    if metric not in _UNCHECKED:
        raise ValueError(f"margin_of_aggregates: metric {metric!r} unknown; allowed: "
                         f"{sorted(AGGREGATES)}")
    if not math.isfinite(factor):
        raise ValueError(f"margin_of_aggregates: factor must be finite, got {factor!r}")
    x, y = _check_scores(x_scores, "x_scores"), _check_scores(y_scores, "y_scores")
    if x.keys() != y.keys():
        raise ValueError("margin_of_aggregates: x_scores and y_scores need the same tasks")
    agg = _UNCHECKED[metric]
    point, low, high = _stratified_bootstrap(
        (x, y), lambda a, b: agg(a) - factor * agg(b), confidence, n_resamples, seed)
    return float(point), float(low), float(high)


def performance_profile(scores: Scores, taus: Any, confidence: float = 0.95,
                        n_resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """Score distribution (performance profile) of Agarwal et al. (NeurIPS 2021):
    ``F(tau) = (1/M) sum_m (1/N_m) sum_n [x_{m,n} > tau]``, the fraction of runs scoring above
    ``tau``, each task weighted equally, with stratified bootstrap bands per ``tau``.

    Returns:
        JSON-serializable ``{"tau", "fraction", "low", "high"}`` lists, in the order of ``taus``.
    """
    checked = _check_scores(scores)
    tau = _array(taus)
    if tau.ndim != 1 or tau.size == 0 or not np.isfinite(tau).all():
        raise ValueError("performance_profile: taus must be a non-empty finite 1-D array, "
                         f"got {taus!r:.60}")

    def profile(sample: dict[Any, np.ndarray]) -> np.ndarray:
        return np.mean([(runs[:, None] > tau[None, :]).mean(0) for runs in sample.values()], 0)

    point, low, high = _stratified_bootstrap((checked,), profile, confidence, n_resamples, seed)
    return {"tau": tau.tolist(), "fraction": point.tolist(), "low": low.tolist(),
            "high": high.tolist()}
