"""Known-value tests for harness.stats: bootstrap CIs, t-tests, Holm, attainable p-values, expected best.

Run: .venv/bin/python -m pytest -q tests/test_stats.py
"""

import math

import numpy as np
import pytest

from harness import stats


def test_bootstrap_ci_of_two_values_spans_them():
    # Resampled means of [a, b] are a, (a+b)/2, b with chances 1/4, 1/2, 1/4: the 95% interval is [a, b].
    assert stats.bootstrap_mean_ci([1.0, 2.0]) == (1.0, 2.0)


def test_bootstrap_ci_is_seeded_and_matches_the_normal_interval_for_large_samples():
    x = np.random.default_rng(1).normal(100.0, 10.0, 400)
    low, high = stats.bootstrap_mean_ci(x)
    assert stats.bootstrap_mean_ci(x) == (low, high)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_bootstrap_ci_of_a_constant_is_that_constant():
    assert stats.bootstrap_mean_ci([3.5] * 4) == (3.5, 3.5)


def test_paired_difference_ci_cancels_what_the_seeds_share():
    # Seeds move both arms together; the paired differences are all exactly 2.
    a, b = [10.0, 20.0, 30.0], [8.0, 18.0, 28.0]
    assert stats.bootstrap_diff_ci(a, b, paired=True) == (2.0, 2.0)
    low, high = stats.bootstrap_diff_ci(a, b, paired=False)
    assert low < -5 and high > 9  # unpaired, the seed-to-seed spread swamps the difference


def test_unpaired_difference_ci_of_constants():
    assert stats.bootstrap_diff_ci([5.0, 5.0], [2.0, 2.0, 2.0], paired=False) == (3.0, 3.0)


def test_bootstrap_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        stats.bootstrap_mean_ci([1.0])


def test_paired_t_test_known_value():
    # Differences 1, 2, 3: t = 2 / (1 / sqrt 3) with 2 df, where the two-sided p is 1 - t / sqrt(2 + t^2).
    t = 2 * math.sqrt(3)
    p = stats.t_test_p([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], paired=True)
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # 0.0742


def test_welch_t_test_known_value():
    # Equal n and sd: t = -2 / sqrt(2/3), Welch df = 4, whose t CDF has a closed form.
    t = 2 / math.sqrt(2 / 3)
    cdf = 0.5 + 0.75 * (t / math.sqrt(4 + t * t)) * (1 - t * t / (3 * (4 + t * t)))
    p = stats.t_test_p([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], paired=False)
    assert p == pytest.approx(2 * (1 - cdf), rel=1e-9)  # 0.0705


def test_paired_needs_equal_lengths():
    with pytest.raises(ValueError, match="same length"):
        stats.t_test_p([1.0, 2.0, 3.0], [1.0, 2.0], paired=True)


def test_holm_known_values_and_untested_entries():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04, made monotone -> 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.02, None, float("nan"), 0.5]) == [0.04, None, None, 0.5]
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert stats.holm([]) == []


@pytest.mark.parametrize("n_a, n_b, paired, smallest, reachable", [
    (3, 3, False, 0.1, False),  # 2 / C(6, 3): the rank test that can never reach 0.05
    (4, 4, False, 2 / 70, True),
    (3, 4, False, 2 / 35, False),
    (2, 2, True, 0.5, False),
    (5, 5, True, 0.0625, False),  # five paired seeds: all differences one way still gives p = 1/16
    (6, 6, True, 0.03125, True),
    (1, 1, True, 1.0, False),
])
def test_smallest_attainable_p(n_a, n_b, paired, smallest, reachable):
    assert stats.min_p_value(n_a, n_b, paired=paired) == pytest.approx(smallest)
    assert stats.can_reach_significance(n_a, n_b, paired=paired) is reachable


def test_significance_threshold_is_a_parameter():
    assert stats.can_reach_significance(5, 5, paired=True, alpha=0.1)


def test_expected_best_known_values():
    # Min of 2 draws from {1, 2} is 1 with chance 3/4: mean 1.25, variance 1.75 - 1.5625.
    assert stats.expected_best([2.0, 1.0], 1) == pytest.approx((1.5, 0.5))
    assert stats.expected_best([2.0, 1.0], 2) == pytest.approx((1.25, math.sqrt(0.1875)))
    assert stats.expected_best([4.0, 4.0, 4.0], 3) == pytest.approx((4.0, 0.0), abs=1e-12)


def test_expected_best_falls_towards_the_minimum():
    values = np.random.default_rng(0).uniform(100, 200, 12)
    means = [stats.expected_best(values, k)[0] for k in range(1, 60)]
    assert means[0] == pytest.approx(values.mean())
    assert all(later <= earlier for earlier, later in zip(means, means[1:]))
    assert means[-1] == pytest.approx(values.min(), abs=1.0)
