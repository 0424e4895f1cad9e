"""Tests for harness.stats: seeded coverage simulations of the intervals (t, Welch, BCa; normal, skewed and
paired data), known values, interval/test agreement, Holm and the verdict, seeds needed for power, degenerate
inputs, expected best.

Run: .venv/bin/python -m pytest -q tests/test_stats.py
"""

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import stats

pytestmark = pytest.mark.fast


# --- coverage: the 95% intervals cover the true mean in 93-97% of seeded repetitions -----------------------
# The simulations run the batched interval functions that mean_ci / diff_ci call on one sample (a few rows are
# checked against the public functions): 200,000 public calls would take minutes.
# Monte-Carlo standard error of a coverage near 0.95: sqrt(0.95 * 0.05 / reps) = 0.0005 for the t intervals,
# 0.0034 for BCa (its resampling costs reps x 9,999 x n).
REPS_T = 200_000
REPS_BCA = 4_000
COVERAGE = (0.93, 0.97)
# Skewed data: gamma with shape 4, skewness 2 / sqrt(4) = 1. No skewness of this project's seed-to-seed test
# perplexity has been measured; reruns of one configuration differ by training randomness and look roughly
# symmetric with an occasional worse seed, for which 1 is a generous allowance. More skew is beyond the t
# interval at these n (100,000 reps): exponential (skewness 2) covers 0.884 / 0.883 / 0.900 and lognormal
# sigma 0.5 (skewness 1.75) 0.922 / 0.916 / 0.922 at n = 3 / 5 / 10.
GAMMA_SHAPE = 4.0


def _draw(kind: str, rng: np.random.Generator, shape: tuple) -> tuple[np.ndarray, float]:
    """Samples of the given shape and their true mean."""
    if kind == "normal":
        return rng.normal(58.0, 1.5, shape), 58.0
    return 56.0 + rng.gamma(GAMMA_SHAPE, 0.5, shape), 56.0 + GAMMA_SHAPE * 0.5


def _coverage(low, high, truth) -> float:
    return float(np.mean((low <= truth) & (truth <= high)))


def test_skewed_distribution_has_skewness_one():
    x, _ = _draw("gamma", np.random.default_rng(0), (1_000_000,))
    assert scipy_stats.skew(x) == pytest.approx(2 / math.sqrt(GAMMA_SHAPE), abs=0.02)


@pytest.mark.parametrize("kind", ["normal", "gamma"])
@pytest.mark.parametrize("n", [3, 5, 10])
def test_mean_interval_covers_the_true_mean(n, kind):
    x, truth = _draw(kind, np.random.default_rng(n), (REPS_T, n))
    low, high, method = stats._mean_interval(x, 0.95, seed=0)
    for i in range(3):  # the batched path is the public one
        assert stats.mean_ci(x[i]) == stats.Interval(pytest.approx(low[i]), pytest.approx(high[i]), method, 0.95)
    assert COVERAGE[0] <= _coverage(low, high, truth) <= COVERAGE[1]


def _correlated_pairs(rng: np.random.Generator, reps: int, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Variant and reference perplexities sharing a per-seed effect; the variant's noise is skewed.

    Differences: gamma(3) minus normal(0, 0.5), sd 1.8, skewness 6 / 3.25^1.5 = 1.02; the shared seed effect
    (sd 3) dominates each arm, so only pairing keeps the interval narrow. True mean difference 5.
    """
    seed_effect = rng.normal(0.0, 3.0, (reps, n))
    variant = 60.0 + seed_effect + rng.gamma(3.0, 1.0, (reps, n))
    reference = 58.0 + seed_effect + rng.normal(0.0, 0.5, (reps, n))
    return variant, reference, 5.0


@pytest.mark.parametrize("n", [3, 5, 10])
def test_paired_difference_interval_covers_the_true_difference(n):
    a, b, truth = _correlated_pairs(np.random.default_rng(100 + n), REPS_T, n)
    low, high, method = stats._diff_interval(a, b, True, 0.95, seed=0)
    for i in range(3):
        assert stats.diff_ci(a[i], b[i], paired=True) == stats.Interval(
            pytest.approx(low[i]), pytest.approx(high[i]), method, 0.95)
    assert COVERAGE[0] <= _coverage(low, high, truth) <= COVERAGE[1]
    unpaired_low, unpaired_high, _ = stats._diff_interval(a[:1000], b[:1000], False, 0.95, seed=0)
    assert np.median(unpaired_high - unpaired_low) > 1.5 * np.median(high[:1000] - low[:1000])


# Welch with seed sets that differ by a failed seed or two. Measured but not tested: very unbalanced arms
# with the larger spread in the smaller one fall short, e.g. 3 vs 10 seeds, sd 2 vs 1: 0.929 (normal),
# 0.909 (gamma variant).
@pytest.mark.parametrize("n_variant, n_reference", [(3, 3), (5, 6), (8, 7)])
def test_welch_interval_covers_the_true_difference(n_variant, n_reference):
    rng = np.random.default_rng(200 + n_variant)
    a, mean_a = _draw("gamma", rng, (REPS_T, n_variant))
    b, mean_b = _draw("normal", rng, (REPS_T, n_reference))
    low, high, method = stats._diff_interval(a, b, False, 0.95, seed=0)
    assert stats.diff_ci(a[0], b[0], paired=False) == stats.Interval(
        pytest.approx(low[0]), pytest.approx(high[0]), method, 0.95)
    assert COVERAGE[0] <= _coverage(low, high, mean_a - mean_b) <= COVERAGE[1]


@pytest.mark.slow
def test_bca_interval_covers_the_true_mean_at_the_threshold():
    # Skewed data, where BCa earns its place. With 16,000 reps it covers 0.938 on these data and on normal data
    # (t: 0.946 and 0.950); these 4,000 give 0.932.
    covered = []
    for chunk in range(REPS_BCA // 250):  # 250 samples a call: scipy's resampled array stays at 40 MB, in cache
        x, truth = _draw("gamma", np.random.default_rng(300 + chunk), (250, stats.BCA_MIN_N))
        low, high, method = stats._mean_interval(x, 0.95, seed=chunk)
        covered.append(_coverage(low, high, truth))
    assert method == stats.BCA
    assert stats.mean_ci(x[0], seed=chunk) == stats.Interval(pytest.approx(low[0]), pytest.approx(high[0]), method,
                                                             0.95)
    assert COVERAGE[0] <= np.mean(covered) <= COVERAGE[1]


# --- intervals: known values, methods, thresholds ------------------------------------------------------------
def test_t_interval_known_value():
    # Mean 2, sd 1, n 3: t(0.975, 2 df) solves t / sqrt(2 + t^2) = 0.95, so t = 0.95 sqrt(2 / (1 - 0.95^2)).
    half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) / math.sqrt(3)  # 2.484
    assert stats.mean_ci([1.0, 2.0, 3.0]) == stats.Interval(pytest.approx(2 - half), pytest.approx(2 + half),
                                                           stats.STUDENT_T, 0.95)


def test_welch_interval_known_value():
    # Equal n and sd: difference -2, standard error sqrt(2/3), Welch df 4, t(0.975, 4) = 2.776445 (tables).
    ci = stats.diff_ci([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], paired=False)
    half = 2.7764451 * math.sqrt(2 / 3)
    assert (ci.low, ci.high, ci.method) == (pytest.approx(-2 - half), pytest.approx(-2 + half), stats.WELCH_T)


def test_two_seeds_no_longer_give_min_to_max():
    # Two paired seeds, both differences negative. The old percentile bootstrap gave
    # [-1.0, -0.5], excluding 0 beside "not tested"; the t interval (1 df) is wide and agrees with p = 0.205.
    c = stats.compare({1: 57.0, 2: 58.5}, {1: 58.0, 2: 59.0})
    assert c.ci.method == stats.STUDENT_T and c.ci.low < -3 and c.ci.high > 2 and not c.ci.excludes(0)
    assert c.test == "paired t" and c.p == pytest.approx(1 - 2 / math.pi * math.atan(3), rel=1e-9)


def test_method_switches_to_bca_at_the_threshold():
    rng = np.random.default_rng(5)
    below, at = rng.normal(60, 1, stats.BCA_MIN_N - 1), rng.normal(60, 1, stats.BCA_MIN_N)
    assert stats.mean_ci(below).method == stats.STUDENT_T
    assert stats.mean_ci(at).method == stats.BCA
    assert stats.diff_ci(at, at[::-1] + 1, paired=True).method == stats.BCA
    assert stats.diff_ci(at, below, paired=False).method == stats.WELCH_T  # the smaller arm decides
    assert stats.diff_ci(at, at + rng.normal(0, 1, at.size), paired=False).method == stats.BCA


def test_bca_is_seeded_and_near_the_normal_interval_for_large_samples():
    x = np.random.default_rng(1).normal(100.0, 10.0, 400)
    ci = stats.mean_ci(x)
    assert ci.method == stats.BCA and stats.mean_ci(x) == ci and stats.mean_ci(x, seed=1) != ci
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci.low == pytest.approx(x.mean() - half, abs=0.05 * half)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.05 * half)


def test_bca_follows_the_skew_of_the_data():
    # Right-skewed data: BCa puts more of the interval above the mean; t is symmetric by construction.
    x = np.random.default_rng(2).lognormal(0.0, 1.0, 200)
    ci = stats.mean_ci(x)
    assert ci.high - x.mean() > 1.2 * (x.mean() - ci.low)


def test_fewer_than_two_values_give_no_interval():
    assert stats.mean_ci([]) is None and stats.mean_ci([3.0]) is None
    assert stats.diff_ci([1.0, 2.0], [3.0], paired=False) is None


@pytest.mark.parametrize("bad, match", [
    (dict(values=[1.0, float("nan")]), "finite values, got nan at position 1"),
    (dict(values=[1.0, 2.0], confidence=95), "between 0 and 1"),
])
def test_interval_input_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        stats.mean_ci(**bad)


def test_paired_needs_equal_lengths():
    with pytest.raises(ValueError, match="same length"):
        stats.diff_ci([1.0, 2.0, 3.0], [1.0, 2.0], paired=True)
    with pytest.raises(ValueError, match="same length"):
        stats.p_value([1.0, 2.0, 3.0], [1.0, 2.0], paired=True)


# --- degenerate data: point intervals, no test, no warnings ----------------------------------------------------
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("n", [3, stats.BCA_MIN_N])
def test_constant_values_give_a_point_interval(n):
    assert stats.mean_ci([57.3] * n) == stats.Interval(57.3, 57.3, stats.NO_SPREAD, 0.95)


@pytest.mark.filterwarnings("error")
def test_differences_equal_up_to_rounding_are_not_tested():
    # 57.3 - 55.1 and 61.7 - 59.5 differ in the last bits (2.2 - 4e-15, 2.2 + 3e-15): scipy's paired t-test
    # alone gives these p = 1e-30.
    a, b = [57.3, 60.4, 61.7], [55.1, 58.2, 59.5]
    assert stats.diff_ci(a, b, paired=True) == stats.Interval(pytest.approx(2.2), pytest.approx(2.2),
                                                             stats.NO_SPREAD, 0.95)
    assert stats.p_value(a, b, paired=True) is None
    c = stats.compare(dict(enumerate(a)), dict(enumerate(b)))
    assert c.p is None and c.test == "" and c.note.startswith("no test: the paired differences are the same")
    assert stats.p_value([5.0, 5.0], [2.0, 2.0, 2.0], paired=False) is None
    assert stats.diff_ci([5.0, 5.0], [2.0, 2.0, 2.0], paired=False).method == stats.NO_SPREAD


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("n", [3, stats.BCA_MIN_N])
def test_one_constant_arm_is_still_tested(n):
    # Welch's variance comes from the other arm, so the test is the one-sample t-test of that arm against the
    # constant (df = its n - 1); scipy would warn about the constant arm.
    other = np.random.default_rng(3).normal(55.0, 1.0, n)
    ci = stats.diff_ci([57.3] * n, other, paired=False)
    assert ci.low < 57.3 - other.mean() < ci.high and ci.method != stats.NO_SPREAD
    expected = scipy_stats.ttest_1samp(other, 57.3).pvalue
    assert stats.p_value([57.3] * n, other, paired=False) == pytest.approx(expected, rel=1e-6)


# --- tests and the verdict --------------------------------------------------------------------------------------
def test_paired_t_test_known_value():
    # Differences 1, 2, 3: t = 2 / (1 / sqrt 3) with 2 df, where the two-sided p is 1 - t / sqrt(2 + t^2).
    t = 2 * math.sqrt(3)
    p = stats.p_value([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], paired=True)
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # 0.0742


def test_welch_t_test_known_value():
    # Equal n and sd: t = -2 / sqrt(2/3), Welch df = 4, whose t CDF has a closed form.
    t = 2 / math.sqrt(2 / 3)
    cdf = 0.5 + 0.75 * (t / math.sqrt(4 + t * t)) * (1 - t * t / (3 * (4 + t * t)))
    p = stats.p_value([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], paired=False)
    assert p == pytest.approx(2 * (1 - cdf), rel=1e-9)  # 0.0705


@pytest.mark.parametrize("paired", [True, False])
def test_t_interval_excludes_zero_exactly_when_p_is_below_alpha(paired):
    rng = np.random.default_rng(11)
    outcomes = []
    for i in range(300):
        n = 2 + i % 9
        shift = rng.uniform(0, 3) / math.sqrt(n)  # effects from none to clear, so p falls on both sides of 0.05
        seed_effect = rng.normal(0, 2, n) if paired else 0.0
        variant = dict(enumerate(60 + shift + seed_effect + rng.gamma(4, 0.25, n)))
        reference = dict(enumerate(61 + seed_effect + rng.normal(0, 0.5, n), start=0 if paired else 1))
        c = stats.compare(variant, reference)
        assert c.paired is paired and c.ci.method == (stats.STUDENT_T if paired else stats.WELCH_T)
        if abs(c.p - stats.ALPHA) > 1e-9:  # exactly at the boundary rounding decides
            assert c.ci.excludes(0) == (c.p < stats.ALPHA), (n, c)
        outcomes.append(c.p < stats.ALPHA)
    assert 50 < sum(outcomes) < 250


def test_holm_known_values_and_untested_entries():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04, made monotone -> 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.02, None, float("nan"), 0.5]) == [0.04, None, None, 0.5]
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert stats.holm([]) == []


def test_supported_means_holm_adjusted_p_below_alpha():
    assert stats.is_supported(0.049) and not stats.is_supported(0.05) and not stats.is_supported(None)
    assert stats.is_supported(0.09, alpha=0.1)


# --- compare and adjust -------------------------------------------------------------------------------------------
def test_compare_pairs_matching_seeds_and_uses_welch_otherwise():
    a = {s: 100.0 + s + 0.1 * (s % 2) for s in range(1, 7)}
    b = {s: 101.0 + s for s in range(1, 7)}
    paired = stats.compare(a, b)
    assert paired.test == "paired t" and paired.paired and paired.p < 1e-4 and paired.diff == pytest.approx(-0.95)
    assert paired.ci.low <= paired.diff <= paired.ci.high < 0 and (paired.n_variant, paired.n_baseline) == (6, 6)
    welch = stats.compare(a, {s: v for s, v in b.items() if s != 6} | {7: 108.0})
    assert welch.test == "Welch t" and not welch.paired and 0.05 < welch.p < 1  # the seeds' spread hides it
    assert welch.ci.method == stats.WELCH_T and welch.ci.low < 0 < welch.ci.high


def test_compare_aligns_values_by_seed():
    c = stats.compare({3: 30.0, 1: 10.0, 2: 20.0}, {2: 19.0, 3: 28.0, 1: 10.0})
    assert c.variant_values == (10.0, 20.0, 30.0) and c.baseline_values == (10.0, 19.0, 28.0)
    assert c.p == pytest.approx(stats.p_value([10.0, 20.0, 30.0], [10.0, 19.0, 28.0], paired=True))


def test_compare_without_enough_seeds():
    empty = stats.compare({}, {1: 5.0})
    assert (empty.diff, empty.ci, empty.p, empty.note) == (None, None, None, "no confirmation seeds on one side")
    one = stats.compare({1: 5.0}, {1: 4.0, 2: 6.0})
    assert one.diff == 0.0 and one.ci is None and one.p is None and not one.paired
    assert one.note == "1 vs 2 seeds: an interval or a test needs at least 2 on each side"
    with pytest.raises(ValueError, match="variant seed 2 has test perplexity inf"):
        stats.compare({1: 5.0, 2: float("inf")}, {1: 4.0, 2: 6.0})


def _comparison(p, n=5, effect=1.0):
    """A paired comparison whose differences have the given effect and sd 1, with p overridden."""
    z = np.random.default_rng(n).normal(size=n)
    d = effect + (z - z.mean()) / z.std(ddof=1)
    c = stats.compare(dict(enumerate(60 + d)), dict(enumerate(np.full(n, 60.0))))
    return dataclasses.replace(c, p=p)


def test_adjust_applies_holm_and_the_one_rule():
    comparisons = [_comparison(0.01), _comparison(0.04), _comparison(0.03), _comparison(0.005),
                   stats.compare({1: 5.0}, {1: 4.0, 2: 6.0})]
    adjusted = stats.adjust(comparisons)
    assert [c.p_holm for c in adjusted] == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert [c.supported for c in adjusted] == [True, False, False, True, False]
    assert [c.seeds_needed is None for c in adjusted] == [True, False, False, True, False]
    # The estimate is at Holm's first step over all five comparisons.
    level = stats.ALPHA / 5
    assert adjusted[1].seeds_needed == stats.seeds_for_power(
        comparisons[1].variant_values, comparisons[1].baseline_values, paired=True, alpha=level)
    assert adjusted[4].seeds_needed.text.startswith("unknown: at least 2 seeds")
    assert comparisons[1].p_holm is None  # the inputs are left alone


def test_adjust_refuses_comparisons_made_at_another_alpha():
    with pytest.raises(ValueError, match="alpha 0.1 cannot be adjusted at alpha 0.05"):
        stats.adjust([stats.compare({1: 1.0, 2: 2.0}, {1: 1.5, 2: 2.0}, alpha=0.1)])


# --- seeds needed for 80% power -----------------------------------------------------------------------------------
def _standardized(n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=n)
    return (z - z.mean()) / z.std(ddof=1)


@pytest.mark.parametrize("effect, paired, expected", [
    (0.5, True, 34),  # G*Power 3.1, one-sample t, dz = 0.5, two-sided 0.05, power 0.8: n = 34
    (1.0, True, 10),  # dz = 1: n = 10 (power 0.803)
    (0.5, False, 64),  # two-sample t, d = 0.5: 64 per group (Welch df = 2n - 2 with equal variances)
])
def test_seeds_for_power_textbook_values(effect, paired, expected):
    a = effect + _standardized(5, 1)
    b = np.zeros(5) if paired else _standardized(5, 2)  # observed effect size exactly `effect`
    needed = stats.seeds_for_power(a, b, paired=paired)
    assert (needed.per_variant, needed.more, needed.text) == (expected, expected - 5,
                                                              f"{expected} seeds per variant ({expected - 5} more)")


@pytest.mark.parametrize("effect, alpha", [(1.2, 0.05), (1.2, 0.05 / 4), (3.0, 0.05)])
def test_seeds_for_power_matches_a_simulated_t_test(effect, alpha):
    # Brute force: draw normal differences with the observed effect size and count how often ttest_1samp rejects.
    # At effect 3 a normal approximation of the power would say 3 seeds; the noncentral t says 4.
    n = stats.seeds_for_power(effect + _standardized(4, 3), np.zeros(4), paired=True, alpha=alpha).per_variant
    rng = np.random.default_rng(4)
    simulated = [float(np.mean(scipy_stats.ttest_1samp(rng.normal(effect, 1.0, (40_000, k)), 0.0, axis=1).pvalue
                               < alpha)) for k in (n - 1, n)]
    # Power rises with n, so this pins n from both sides (Monte-Carlo standard error 0.002, margin 3 of them).
    assert simulated[0] < stats.POWER - 0.006 < simulated[1]


def test_seeds_for_power_edge_cases():
    for a, b, paired in (([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], True), ([1.0, 2.0, 3.0], [2.0, 3.0, 1.0], False)):
        no_effect = stats.seeds_for_power(a, b, paired=paired)
        assert (no_effect.per_variant, no_effect.text) == (None, "no effect seen: no finite number")
    tiny = stats.seeds_for_power(0.05 + _standardized(6, 6), np.zeros(6), paired=True)
    assert (tiny.per_variant, tiny.text) == (None, "more than 100 seeds per variant")
    assert stats.seeds_for_power(0.05 + _standardized(6, 6), np.zeros(6), paired=True, cap=5000).per_variant > 100
    assert stats.seeds_for_power([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], paired=True).text == (
        "unknown: no seed-to-seed spread observed")
    assert stats.seeds_for_power([1.0], [0.0], paired=True).per_variant is None


# --- expected best ----------------------------------------------------------------------------------------------
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
