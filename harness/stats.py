"""Small pure statistics for comparing ablation arms over seeds and trials.

Seeded percentile-bootstrap CIs of a mean and of a difference of means, paired t / Welch p-values,
Holm's step-down adjustment, the smallest p-value any distribution-free test can reach with so few seeds,
and the expected best of k trials (Dodge et al. 2019, "Show Your Work"). Plain sequences in, floats out.
"""

import math

import numpy as np
from scipy import stats

N_RESAMPLES = 10_000


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def _sample(values, name: str, at_least: int) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < at_least:
        raise ValueError(f"{name} needs at least {at_least} values, got {x.size}")
    return x


def bootstrap_mean_ci(values, confidence: float = 0.95, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of `values` (at least 2), seeded."""
    x = _sample(values, "a bootstrap CI", 2)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n_resamples, x.size))].mean(axis=1)
    return _percentile_interval(means, confidence)


def bootstrap_diff_ci(a, b, *, paired: bool, confidence: float = 0.95, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of mean(a) - mean(b); paired resamples a[i] and b[i] together."""
    x, y = _sample(a, "a bootstrap CI", 2), _sample(b, "a bootstrap CI", 2)
    if paired:
        if x.size != y.size:
            raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
        return bootstrap_mean_ci(x - y, confidence, n_resamples, seed)
    rng = np.random.default_rng(seed)
    diffs = (x[rng.integers(0, x.size, (n_resamples, x.size))].mean(axis=1)
             - y[rng.integers(0, y.size, (n_resamples, y.size))].mean(axis=1))
    return _percentile_interval(diffs, confidence)


def t_test_p(a, b, *, paired: bool) -> float:
    """Two-sided p-value of mean(a) == mean(b): paired t-test, or Welch's t-test when unpaired."""
    x, y = _sample(a, "a t-test", 2), _sample(b, "a t-test", 2)
    if paired:
        if x.size != y.size:
            raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
        return float(stats.ttest_rel(x, y).pvalue)
    return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def holm(p_values) -> list:
    """Holm's step-down adjusted p-values, in the input order; None or NaN entries stay None, uncounted."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted: list = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        # Monotone: an adjusted p is never below the one of a smaller raw p.
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def min_p_value(n_a: int, n_b: int, *, paired: bool) -> float:
    """Smallest two-sided p an exact permutation (or rank) test can give with these sample sizes.

    Paired: 2 / 2^n sign flips; unpaired: 2 / C(n_a + n_b, n_a) relabellings.
    """
    if paired:
        if n_a != n_b:
            raise ValueError(f"paired samples must have the same size, got {n_a} and {n_b}")
        return min(1.0, 2 / 2 ** n_a)
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))


def can_reach_significance(n_a: int, n_b: int, *, paired: bool, alpha: float = 0.05) -> bool:
    """Whether a test that does not assume normal errors could reach p < alpha with these many seeds at all."""
    return min_p_value(n_a, n_b, paired=paired) < alpha


def expected_best(values, k: int) -> tuple[float, float]:
    """Mean and sd of the lowest of k draws (with replacement) from `values`: Dodge et al.'s expected best."""
    x = np.sort(_sample(values, "an expected best", 1))
    n = x.size
    # P(min of k draws >= x[i]) = ((n - i) / n)^k, so P(min == x[i]) is the difference of two such terms.
    survive = ((n - np.arange(n + 1)) / n) ** k
    weights = survive[:-1] - survive[1:]
    mean = float(weights @ x)
    return mean, math.sqrt(float(weights @ (x - mean) ** 2))
