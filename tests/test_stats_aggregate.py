"""marl_fgmf.stats, aggregates across runs and tasks (Agarwal et al., NeurIPS 2021): oracles
(scipy's trim_mean and mannwhitneyu, hand-computed profiles), invariants, stratification of the
bootstrap, determinism and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from marl_fgmf import stats

R = 300  # resamples: enough for stable percentiles, fast


def method_scores(seed: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Three tasks with different run counts and scales."""
    rng = np.random.default_rng(seed)
    return {"beacon": rng.normal(0.6 + shift, 0.2, 7), "pong": rng.normal(0.3 + shift, 0.1, 5),
            "pursuit": rng.normal(0.9 + shift, 0.3, 4)}


# ----------------------------------------------------------------------------- normalize
def test_normalize_score_by_hand_and_vectorized():
    assert stats.normalize_score(5.0, 1.0, 9.0) == 0.5
    assert isinstance(stats.normalize_score(5.0, 1.0, 9.0), float)
    np.testing.assert_allclose(stats.normalize_score([1.0, 9.0, 13.0], 1.0, 9.0), [0.0, 1.0, 1.5])
    np.testing.assert_allclose(stats.normalize_score([2.0, 2.0], [0.0, 1.0], [4.0, 3.0]),
                               [0.5, 0.5])
    assert stats.normalize_score(-1.0, 0.0, -2.0) == 0.5  # a reference below random is allowed
    with pytest.raises(ValueError, match="reference == random"):
        stats.normalize_score([1.0, 2.0], [0.0, 1.0], [1.0, 1.0])
    for args in [(np.nan, 0.0, 1.0), (1.0, np.inf, 2.0), (1.0, 0.0, np.nan)]:
        with pytest.raises(ValueError, match="non-finite"):
            stats.normalize_score(*args)


# ---------------------------------------------------------------------------- aggregates
def test_aggregate_iqm_is_the_pooled_25_percent_trimmed_mean():
    rng = np.random.default_rng(0)
    for n in range(1, 25):
        scores = {"a": rng.normal(size=n), "b": rng.exponential(size=n + 3), "c": [7.0]}
        pooled = np.concatenate([scores["a"], scores["b"], [7.0]])
        assert stats.aggregate_iqm(scores) == pytest.approx(scipy_stats.trim_mean(pooled, 0.25),
                                                            abs=1e-12)
    assert stats.aggregate_iqm({"x": [0.0, 1.0, 2.0, 100.0]}) == 1.5  # outlier trimmed


def test_aggregate_mean_and_median_are_over_per_task_means():
    scores = {"a": [0.0, 1.0], "b": [2.0, 2.0, 2.0, 2.0], "c": [10.0]}
    assert stats.aggregate_mean(scores) == pytest.approx((0.5 + 2.0 + 10.0) / 3)
    assert stats.aggregate_median(scores) == 2.0
    assert set(stats.AGGREGATES) == {"iqm", "mean", "median"}


def test_aggregate_with_ci_is_json_and_contains_estimates():
    by_method = {"fgmf": method_scores(1, 0.2), "ppo": method_scores(2)}
    out = stats.aggregate_with_ci(by_method, n_resamples=R, seed=3)
    assert json.loads(json.dumps(out)) == out
    assert out["confidence"] == 0.95 and out["n_resamples"] == R and out["seed"] == 3
    assert out["methods"]["fgmf"]["runs"] == {"beacon": 7, "pong": 5, "pursuit": 4}
    for method, scores in by_method.items():
        for metric, fn in stats.AGGREGATES.items():
            rec = out["methods"][method][metric]
            assert rec["estimate"] == pytest.approx(fn(scores), abs=1e-12)
            assert rec["low"] <= rec["estimate"] <= rec["high"], (method, metric, rec)
            assert rec["low"] < rec["high"]
    # a method's numbers do not depend on which other methods are compared with it
    alone = stats.aggregate_with_ci({"ppo": by_method["ppo"]}, n_resamples=R, seed=3)
    assert alone["methods"]["ppo"] == out["methods"]["ppo"]
    only_iqm = stats.aggregate_with_ci(by_method, metrics=("iqm",), n_resamples=R, seed=3)
    assert set(only_iqm["methods"]["ppo"]) == {"runs", "iqm"}


# ----------------------------------------------------------------- stratified bootstrap
def test_stratified_bootstrap_never_moves_a_run_to_another_task():
    scores = {"low": [0.0, 1.0, 2.0], "high": [100.0, 101.0, 102.0, 103.0, 104.0]}
    seen = []

    def check(sample):
        assert list(sample) == ["high", "low"]  # every task, in sorted order
        assert len(sample["low"]) == 3 and len(sample["high"]) == 5
        assert set(sample["low"]) <= {0.0, 1.0, 2.0}
        assert set(sample["high"]) <= {100.0, 101.0, 102.0, 103.0, 104.0}
        seen.append(sample["low"].copy())
        return float((np.concatenate(list(sample.values())) >= 100).sum())

    point, low, high = stats.stratified_bootstrap_ci(scores, check, n_resamples=R, seed=0)
    assert point == low == high == 5.0  # pooled count of the high task's runs never changes
    assert len(seen) == R + 1 and len({tuple(s) for s in seen}) > 5  # runs really resampled


def test_stratified_bootstrap_single_task_matches_scipy_percentile_bootstrap():
    values = np.random.default_rng(4).normal(2.0, 1.0, 30)
    _, low, high = stats.stratified_bootstrap_ci({"t": values}, lambda s: s["t"].mean(),
                                                 n_resamples=2000, seed=0)
    ref = scipy_stats.bootstrap((values,), np.mean, n_resamples=2000, method="percentile",
                                rng=np.random.default_rng(1)).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.06) and high == pytest.approx(ref.high, abs=0.06)


def test_stratified_bootstrap_is_deterministic_given_the_seed():
    scores = method_scores(5)
    a = stats.stratified_bootstrap_ci(scores, stats.aggregate_iqm, n_resamples=R, seed=7)
    b = stats.stratified_bootstrap_ci(scores, stats.aggregate_iqm, n_resamples=R, seed=7)
    c = stats.stratified_bootstrap_ci(scores, stats.aggregate_iqm, n_resamples=R, seed=8)
    assert a == b
    assert a[0] == c[0] and (a[1], a[2]) != (c[1], c[2])
    assert a[1] <= a[0] <= a[2]
    # the key order of the mapping does not change the draws
    reordered = dict(reversed(list(scores.items())))
    assert stats.stratified_bootstrap_ci(reordered, stats.aggregate_iqm, n_resamples=R,
                                         seed=7) == a


def test_stratified_bootstrap_of_a_vector_statistic_gives_arrays():
    point, low, high = stats.stratified_bootstrap_ci(
        method_scores(6), lambda s: np.array([stats.aggregate_mean(s), stats.aggregate_iqm(s)]),
        n_resamples=R)
    assert point.shape == low.shape == high.shape == (2,)
    assert (low <= point).all() and (point <= high).all()


# ------------------------------------------------------------ probability of improvement
def test_probability_of_improvement_matches_mann_whitney_u():
    rng = np.random.default_rng(0)
    x = {"a": rng.integers(0, 4, 6).astype(float), "b": rng.normal(size=5), "c": [1.0, 2.0]}
    y = {"a": rng.integers(0, 4, 8).astype(float), "b": rng.normal(size=3), "c": [2.0, 0.5, 1.0]}
    expected = np.mean([scipy_stats.mannwhitneyu(x[t], y[t]).statistic / (len(x[t]) * len(y[t]))
                        for t in x])  # U of x counts ties as 1/2
    point, low, high = stats.probability_of_improvement(x, y, n_resamples=R)
    assert point == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= low <= point <= high <= 1.0
    back, _, _ = stats.probability_of_improvement(y, x, n_resamples=R)
    assert point + back == pytest.approx(1.0, abs=1e-12)
    assert stats.probability_of_improvement(x, x, n_resamples=R)[0] == 0.5
    by_hand = {"t": [1.0, 3.0]}, {"t": [2.0, 3.0]}  # S: 0, 0, 1, 1/2 -> 1.5 / 4
    assert stats.probability_of_improvement(*by_hand, n_resamples=R)[0] == 0.375


def test_probability_of_improvement_resamples_x_and_y_within_tasks():
    x = {"a": [10.0, 11.0, 12.0], "b": [0.0, 1.0]}
    y = {"a": [0.0, 1.0], "b": [10.0, 11.0, 12.0, 13.0]}  # x wins task a, loses task b
    point, low, high = stats.probability_of_improvement(x, y, n_resamples=R, seed=1)
    assert point == low == high == 0.5  # no resample can move a run across tasks
    x2, y2 = method_scores(1, 0.3), method_scores(2)
    first = stats.probability_of_improvement(x2, y2, n_resamples=R, seed=1)
    assert stats.probability_of_improvement(x2, y2, n_resamples=R, seed=1) == first
    assert stats.probability_of_improvement(x2, y2, n_resamples=R, seed=2)[1:] != first[1:]


# ------------------------------------------------------------------- performance profile
def test_performance_profile_by_hand():
    scores = {"a": [0.1, 0.5, 0.9], "b": [0.2, 0.8]}
    prof = stats.performance_profile(scores, [0.0, 0.5, 0.85, 1.0], n_resamples=R)
    # a: 3/3, 1/3 (0.5 is not > 0.5), 1/3, 0; b: 2/2, 1/2, 0, 0; tasks weighted equally
    assert prof["fraction"] == pytest.approx([1.0, 5 / 12, 1 / 6, 0.0], abs=1e-12)
    assert prof["tau"] == [0.0, 0.5, 0.85, 1.0]
    assert prof["low"][0] == prof["high"][0] == 1.0 and prof["low"][-1] == prof["high"][-1] == 0.0
    assert json.loads(json.dumps(prof)) == prof


def test_performance_profile_is_non_increasing_and_bands_contain_it():
    taus = np.linspace(-0.5, 2.0, 26)
    prof = stats.performance_profile(method_scores(3), taus, n_resamples=R, seed=2)
    for key in ("fraction", "low", "high"):
        assert (np.diff(prof[key]) <= 1e-12).all(), key
    f, lo, hi = (np.array(prof[k]) for k in ("fraction", "low", "high"))
    assert (lo <= f + 1e-12).all() and (f <= hi + 1e-12).all()
    assert f[0] == 1.0 and f[-1] == 0.0
    again = stats.performance_profile(method_scores(3), taus, n_resamples=R, seed=2)
    other = stats.performance_profile(method_scores(3), taus, n_resamples=R, seed=9)
    assert again == prof and other["fraction"] == prof["fraction"]
    assert (other["low"], other["high"]) != (prof["low"], prof["high"])


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("scores, match", [
    ({}, r"scores: need a non-empty mapping task -> run scores"),
    ([1.0, 2.0], r"scores: need a non-empty mapping"),
    ({"a": [1.0], "b": []}, r"scores\['b'\]: no runs; every task needs at least one run score"),
    ({"a": [1.0, np.nan]}, r"scores\['a'\]: non-finite scores at runs \[1\]; all must be finite"),
    ({"a": [[1.0, 2.0]]}, r"scores\['a'\]: runs must be a 1-D array, got shape \(1, 2\)"),
])
def test_bad_scores_raise_one_line_errors(scores, match):
    for call in (stats.aggregate_iqm, stats.aggregate_mean, stats.aggregate_median,
                 lambda s: stats.stratified_bootstrap_ci(s, stats.aggregate_mean, n_resamples=5),
                 lambda s: stats.performance_profile(s, [0.0], n_resamples=5)):
        with pytest.raises(ValueError, match=match) as info:
            call(scores)
        assert "\n" not in str(info.value)


def test_bad_settings_and_mismatched_tasks_raise():
    x = {"a": [1.0], "b": [2.0]}
    with pytest.raises(ValueError, match=r"tasks differ: missing from y_scores \['b'\], "
                                         r"missing from x_scores \['c'\]"):
        stats.probability_of_improvement(x, {"a": [1.0], "c": [0.0]})
    with pytest.raises(ValueError, match=r"y_scores\['a'\]: non-finite"):
        stats.probability_of_improvement(x, {"a": [np.inf], "b": [0.0]})
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1.5"):
        stats.stratified_bootstrap_ci(x, stats.aggregate_mean, confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples must be a positive integer, got 0"):
        stats.probability_of_improvement(x, x, n_resamples=0)
    with pytest.raises(ValueError, match=r"metrics \['median', 'max'\] unknown or empty; "
                                         r"allowed: \['iqm', 'mean', 'median'\]"):
        stats.aggregate_with_ci({"m": x}, metrics=("median", "max"))
    with pytest.raises(ValueError, match=r"scores_by_method\['m'\]\['b'\]: no runs"):
        stats.aggregate_with_ci({"m": {"a": [1.0], "b": []}})
    with pytest.raises(ValueError, match="taus must be a non-empty finite 1-D array"):
        stats.performance_profile(x, [0.0, np.nan])
    with pytest.raises(ValueError, match="taus must be a non-empty finite 1-D array"):
        stats.performance_profile(x, [])
