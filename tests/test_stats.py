"""cp3er.stats: the one IQM / bootstrap / optimality-gap implementation of cp3er-eval and
cp3er-plot, against hand numbers and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cp3er.stats import (
    aggregate_metrics,
    bootstrap_mean_ci,
    interquartile_mean,
    optimality_gap,
    pairwise_improvement,
    probability_of_improvement,
)


def test_interquartile_mean_and_gap_hand_numbers():
    assert interquartile_mean(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # mean of 3..6
    assert optimality_gap(np.array([0.2, 1.0, 1.4])) == pytest.approx(0.8 / 3)


def test_bootstrap_mean_ci_matches_scipy_percentile_bootstrap():
    """One CI of a sample's mean: scipy's percentile bootstrap within Monte-Carlo error."""
    values = np.random.default_rng(3).normal(10.0, 2.0, size=40)
    low, high = bootstrap_mean_ci(values, reps=20_000, rng=1)
    ref = scipy_stats.bootstrap((values,), np.mean, n_resamples=20_000, method="percentile",
                                random_state=2).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.06)
    assert high == pytest.approx(ref.high, abs=0.06)
    # the normal-theory half width 1.96 * s / sqrt(n) ~ 0.62: a bootstrap of the wrong
    # axis or without replacement would be far from it
    assert (high - low) / 2 == pytest.approx(1.96 * values.std() / np.sqrt(40), rel=0.1)


def test_bootstrap_mean_ci_columns_share_resamples_and_degenerate_cases():
    values = np.random.default_rng(0).normal(size=(5, 3))
    low, high = bootstrap_mean_ci(values, reps=500, rng=7)
    one_low, one_high = bootstrap_mean_ci(values[:, 1], reps=500, rng=7)
    assert (one_low, one_high) == (pytest.approx(low[1]), pytest.approx(high[1]))
    assert bootstrap_mean_ci(np.full(4, 3.0)) == (pytest.approx(3.0), pytest.approx(3.0))
    assert bootstrap_mean_ci(np.array([2.5])) == (pytest.approx(2.5), pytest.approx(2.5))


def test_stratified_bootstrap_resamples_within_tasks():
    """Constant tasks: resampling within each task never changes the pooled statistics."""
    agg = aggregate_metrics({"a": np.zeros(3), "b": np.ones(3)}, reps=500)
    for name in ("iqm", "mean", "optimality_gap"):
        assert agg[name] == pytest.approx(0.5)
        assert agg[f"{name}_ci"] == pytest.approx([0.5, 0.5])


def test_optimality_gap_clips_scores_above_one():
    """A normalized score above 1 contributes 0 to the gap, not a negative shortfall."""
    agg = aggregate_metrics({"a": np.array([0.5, 1.5])}, reps=200)
    assert agg["optimality_gap"] == pytest.approx(0.25)
    assert agg["mean"] == pytest.approx(1.0)


def test_probability_of_improvement_is_the_mean_over_tasks_of_mann_whitney_u():
    rng = np.random.default_rng(5)
    x = [rng.normal(0.6, 0.1, 5), rng.normal(0.2, 0.1, 3), np.array([0.3, 0.3, 0.5])]
    y = [rng.normal(0.5, 0.1, 4), rng.normal(0.3, 0.1, 3), np.array([0.3, 0.1, 0.3])]
    expected = np.mean([scipy_stats.mannwhitneyu(a, b).statistic / (len(a) * len(b))
                        for a, b in zip(x, y, strict=True)])  # scipy's U counts a tie as half a win
    forward, backward = probability_of_improvement(x, y), probability_of_improvement(y, x)
    assert forward["probability"] == pytest.approx(expected)
    assert forward["probability"] + backward["probability"] == pytest.approx(1.0)
    low, high = forward["ci"]
    assert 0.0 < low < forward["probability"] < high < 1.0


def test_probability_of_improvement_of_a_dominating_and_an_identical_agent():
    x, y = [np.array([0.9, 0.8]), np.array([0.5])], [np.array([0.1, 0.2]), np.array([0.4])]
    assert probability_of_improvement(x, y) == {"probability": 1.0, "ci": [1.0, 1.0]}
    same = probability_of_improvement(x, x)
    assert same["probability"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same tasks"):
        probability_of_improvement(x, y[:1])


def test_pairwise_improvement_pairs_agents_in_name_order_over_common_tasks():
    scores = {"b": {"t1": np.array([0.2]), "t2": np.array([0.9])},
              "a": {"t1": np.array([0.5])},
              "c": {"t3": np.array([0.1])}}
    pairs = pairwise_improvement(scores, reps=50)
    assert list(pairs) == ["a > b"]  # c shares no task with a or b
    assert pairs["a > b"]["probability"] == 1.0 and pairs["a > b"]["tasks"] == ["t1"]
