"""Small pure statistics for comparing ablation arms over seeds and trials (scipy's implementations): intervals of
a mean and of a difference (Student t / Welch below BCA_MIN_N per arm, BCa bootstrap from there), paired t / Welch p,
Holm's adjustment, the one rule that calls a difference supported, seeds needed for 80% power, and the expected best
of k trials (Dodge et al. 2019). Use: `adjust([compare(variant_ppl, baseline_ppl) for ...])`.
"""

import contextlib
import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

ALPHA = 0.05  # two-sided level of every test; the intervals are at confidence 1 - ALPHA
# From this many values per arm on, BCa's worst 95% coverage over normal, gamma (skewness 1) and exponential
# (skewness 2) data beats Student t's; measured by seeded simulation (BCa 4,000 repetitions, s.e. 0.0034):
# n = 30: BCa 0.918 vs t 0.928, n = 40: BCa 0.938 vs t 0.931 (both worst on the exponential). Below it the t
# interval is better everywhere (BCa covers 0.72 / 0.85 / 0.90 at n = 3 / 5 / 10 on normal data); on normal
# and skewness-1 data t stays slightly ahead even at n = 40 (0.950 / 0.946 vs 0.938 / 0.938).
BCA_MIN_N = 40
BOOTSTRAP_RESAMPLES = 9_999  # scipy's default; the endpoints' sd between bootstrap seeds is ~1% of the width
_BOOTSTRAP_BATCH = 500  # resamples per vectorized call: bounds memory (batch x values) without changing results
POWER = 0.8  # target power of the seeds-needed estimate
SEEDS_CAP = 100  # seeds-needed estimates above this are reported as "more than SEEDS_CAP"
# Values whose spread is below this fraction of their magnitude count as equal: float rounding (57.3 - 55.1 vs
# 61.7 - 59.5 differ by 7e-15), never seed-to-seed noise, which is ~1e-3 of a perplexity. scipy would otherwise
# give differences that are equal but for rounding a p-value of 1e-30 (at times with a precision-loss warning).
_EQUAL_UP_TO_ROUNDING = 1e-9

STUDENT_T = "Student t"
WELCH_T = "Welch t"
BCA = "BCa bootstrap"
NO_SPREAD = "no spread"  # every value (or paired difference) is the same: the interval is that one point


@dataclass(frozen=True)
class Interval:
    """Two-sided confidence interval of a mean or of a difference of means, and the method that made it."""

    low: float
    high: float
    method: str  # STUDENT_T, WELCH_T, BCA or NO_SPREAD
    confidence: float  # e.g. 0.95

    def excludes(self, value: float = 0.0) -> bool:
        """Whether `value` lies outside [low, high]."""
        return not self.low <= value <= self.high


@dataclass(frozen=True)
class SeedsNeeded:
    """Seeds per variant at which a two-sided t-test at level `alpha` would reach POWER for the observed effect."""

    per_variant: int | None  # None: no finite number, above the cap, or no variance to estimate from
    more: int | None  # per_variant minus the seeds the smaller arm has now (0 when it has enough)
    text: str  # for the report: "9 seeds per variant (4 more)", "more than 100 seeds per variant", ...
    alpha: float  # the level the estimate is for (Holm's first step, alpha / m, when made by adjust)


@dataclass(frozen=True)
class Comparison:
    """Variant minus baseline over confirmation seeds: compare() fills the per-comparison part, adjust() the rest.

    The interval and p are per comparison (unadjusted); p_holm and supported are adjusted across comparisons.
    """

    diff: float | None  # mean(variant) - mean(baseline), perplexity; None when one side has no seeds
    ci: Interval | None  # interval of diff at confidence 1 - alpha; None below 2 seeds a side
    test: str  # "paired t" or "Welch t"; "" when there is no test
    p: float | None  # two-sided, unadjusted; None when there is no test (see note)
    n_variant: int
    n_baseline: int
    paired: bool  # the two seed sets are the same, so values are paired by seed
    alpha: float
    note: str  # why there is no interval or test; "" when both exist
    variant_values: tuple  # by seed, in sorted seed order (aligned with baseline_values when paired)
    baseline_values: tuple
    variant: str = ""  # the arms' names, when compare() was given them
    baseline: str = ""
    p_holm: float | None = None  # from adjust(): Holm-adjusted p; None when untested
    supported: bool | None = None  # from adjust(): is_supported(p_holm, alpha)
    seeds_needed: SeedsNeeded | None = None  # from adjust(), for comparisons that are not supported


def _sample(values, name: str, at_least: int) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < at_least:
        raise ValueError(f"{name} needs at least {at_least} values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} needs finite values, got {x[~np.isfinite(x)][0]} at position "
                         f"{int(np.flatnonzero(~np.isfinite(x))[0])}; drop or fix diverged runs first")
    return x


def _pair(a, b, paired: bool, name: str, at_least: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _sample(a, name, at_least), _sample(b, name, at_least)
    if paired and x.size != y.size:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    return x, y


def _no_spread(x: np.ndarray, scale: float) -> bool:
    """All values equal up to float rounding relative to `scale` (the magnitude of the data they came from)."""
    return float(np.ptp(x)) <= _EQUAL_UP_TO_ROUNDING * scale


def _scale(*samples: np.ndarray) -> float:
    return max(float(np.max(np.abs(s))) for s in samples)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _diff_of_means(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _bca(samples: tuple, statistic, confidence: float, seed: int):
    return stats.bootstrap(samples, statistic, n_resamples=BOOTSTRAP_RESAMPLES, batch=_BOOTSTRAP_BATCH,
                           vectorized=True, axis=-1, confidence_level=confidence, method="BCa",
                           rng=np.random.default_rng(seed)).confidence_interval


def _mean_interval(x: np.ndarray, confidence: float, seed: int) -> tuple:
    """(low, high, method) for the mean along the last axis of x, shape (..., n); no degenerate-data handling.

    Works on a batch of samples at once (the coverage tests use that); mean_ci is this on one sample.
    """
    if x.shape[-1] < BCA_MIN_N:
        ci = stats.ttest_1samp(x, 0.0, axis=-1).confidence_interval(confidence)
        return ci.low, ci.high, STUDENT_T
    ci = _bca((x,), _mean, confidence, seed)
    return ci.low, ci.high, BCA


def _diff_interval(x: np.ndarray, y: np.ndarray, paired: bool, confidence: float, seed: int) -> tuple:
    """(low, high, method) for mean(x) - mean(y) along the last axis, batched like _mean_interval."""
    if paired:
        if x.shape[-1] < BCA_MIN_N:
            ci = stats.ttest_rel(x, y, axis=-1).confidence_interval(confidence)
            return ci.low, ci.high, STUDENT_T
        return _mean_interval(x - y, confidence, seed)
    if min(x.shape[-1], y.shape[-1]) < BCA_MIN_N:
        with _constant_arm_allowed():
            ci = stats.ttest_ind(x, y, axis=-1, equal_var=False).confidence_interval(confidence)
        return ci.low, ci.high, WELCH_T
    ci = _bca((x, y), _diff_of_means, confidence, seed)
    return ci.low, ci.high, BCA


@contextlib.contextmanager
def _constant_arm_allowed():
    """Silence scipy's precision-loss warning for an arm whose values are all equal (both equal is handled before)."""
    with warnings.catch_warnings():
        # Welch with one constant arm is well defined: its variance is 0 and the other arm's carries the test.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        yield


def mean_ci(values, confidence: float = 1 - ALPHA, *, seed: int = 0) -> Interval | None:
    """Confidence interval of the mean of `values` (perplexities, or paired differences); None below 2 values.

    Student t below BCA_MIN_N values, scipy's BCa bootstrap (seeded by `seed`) from there on; values that are
    all equal (up to float rounding) give the point interval [value, value] with method NO_SPREAD.
    Raises ValueError for non-finite values or a confidence outside (0, 1).
    """
    _check_confidence(confidence)
    x = _sample(values, "a confidence interval", 0)
    if x.size < 2:
        return None
    if _no_spread(x, _scale(x)):
        point = float(np.median(x))  # one of the (equal) values, free of the mean's rounding
        return Interval(point, point, NO_SPREAD, confidence)
    low, high, method = _mean_interval(x, confidence, seed)
    return Interval(float(low), float(high), method, confidence)


def diff_ci(a, b, *, paired: bool, confidence: float = 1 - ALPHA, seed: int = 0) -> Interval | None:
    """Confidence interval of mean(a) - mean(b); None when a side has fewer than 2 values.

    Paired (a[i] and b[i] share seed i): mean_ci of a - b, with the paired differences' rounding judged
    against the magnitude of a and b. Unpaired: Welch's interval while either side has fewer than BCA_MIN_N
    values, else scipy's two-sample BCa bootstrap of the difference of means. Per comparison: not adjusted
    for multiplicity. Raises ValueError for unequal lengths when paired, or non-finite values.
    """
    _check_confidence(confidence)
    x, y = _pair(a, b, paired, "a confidence interval", 0)
    if min(x.size, y.size) < 2:
        return None
    if _untestable(x, y, paired):
        point = float(np.median(x - y) if paired else np.median(x) - np.median(y))
        return Interval(point, point, NO_SPREAD, confidence)
    low, high, method = _diff_interval(x, y, paired, confidence, seed)
    return Interval(float(low), float(high), method, confidence)


def _untestable(x: np.ndarray, y: np.ndarray, paired: bool) -> bool:
    """No variance to test against: the paired differences, or both arms, are constant up to rounding."""
    scale = _scale(x, y)
    if paired:
        return _no_spread(x - y, scale)
    return _no_spread(x, scale) and _no_spread(y, scale)


def p_value(a, b, *, paired: bool) -> float | None:
    """Two-sided p of mean(a) == mean(b): scipy's paired t-test (ttest_rel) or Welch's (ttest_ind, unequal var).

    None when there is no variance to test against (every paired difference, or every value on both sides,
    is the same). Unadjusted. Raises ValueError below 2 values a side or for unequal lengths when paired.
    """
    x, y = _pair(a, b, paired, "a t-test", 2)
    if _untestable(x, y, paired):
        return None
    if paired:
        return float(stats.ttest_rel(x, y).pvalue)
    with _constant_arm_allowed():
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def is_supported(p_holm: float | None, alpha: float = ALPHA) -> bool:
    """The one rule for calling a difference supported: its Holm-adjusted two-sided p is below alpha."""
    return p_holm is not None and p_holm < alpha


def compare(variant: dict, baseline: dict, *, alpha: float = ALPHA, seed: int = 0, names: tuple = ("", "")
            ) -> Comparison:
    """Seed -> test perplexity of a variant against a baseline's, per comparison (adjust() does the rest); `names`
    are the two arms' names, kept on the record.

    Paired t and the t interval of the paired differences when the seed sets are the same, Welch otherwise
    (BCa intervals from BCA_MIN_N seeds on). The interval is at confidence 1 - alpha, so with fewer than
    BCA_MIN_N seeds it excludes 0 exactly when p < alpha (from BCA_MIN_N on the two can differ near the
    boundary; the verdict follows p). With no spread the interval is a point and there is no test (p None).
    Raises ValueError naming the seed of a non-finite value.
    """
    for side, values in (("variant", variant), ("baseline", baseline)):
        bad = {s: v for s, v in values.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"{side} seed {next(iter(bad))} has test perplexity {next(iter(bad.values()))}: "
                             "compare needs finite values; leave diverged runs out and report them separately")
    paired = bool(variant) and set(variant) == set(baseline)
    a = tuple(float(variant[s]) for s in sorted(variant))
    b = tuple(float(baseline[s]) for s in sorted(baseline))
    base = dict(n_variant=len(a), n_baseline=len(b), paired=paired, alpha=alpha, variant_values=a,
                baseline_values=b, variant=names[0], baseline=names[1])
    if not a or not b:
        return Comparison(None, None, "", None, note="no confirmation seeds on one side", **base)
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff, None, "", None, note=f"{len(a)} vs {len(b)} seeds: an interval or a test needs "
                          "at least 2 on each side", **base)
    ci = diff_ci(a, b, paired=paired, confidence=1 - alpha, seed=seed)
    p = p_value(a, b, paired=paired)
    if p is None:
        what = "the paired differences are" if paired else "both variants' values are"
        return Comparison(diff, ci, "", None, note=f"no test: {what} the same on every seed, so there is no "
                          "seed-to-seed variance to test against (check that the seeds are applied)", **base)
    return Comparison(diff, ci, "paired t" if paired else "Welch t", p, note="", **base)


def adjust(comparisons, *, alpha: float = ALPHA, power: float = POWER, cap: int = SEEDS_CAP) -> list[Comparison]:
    """The comparisons (one family, e.g. every variant against its baseline) with p_holm, supported and seeds_needed.

    Holm's step-down adjustment over the tested comparisons, then is_supported. For each comparison that is
    not supported, seeds_for_power at level alpha / m, m = all comparisons: Holm's first step, the level at
    which it is supported whatever the other comparisons show once every one is tested (conservative).
    Raises ValueError when a comparison was made at another alpha (its interval would not match the verdict).
    """
    comparisons = list(comparisons)
    other = [c.alpha for c in comparisons if c.alpha != alpha]
    if other:
        raise ValueError(f"comparisons made with alpha {other[0]} cannot be adjusted at alpha {alpha}: pass the "
                         "same alpha to compare() and adjust()")
    level = alpha / max(len(comparisons), 1)
    out = []
    for c, p_holm in zip(comparisons, holm([c.p for c in comparisons])):
        supported = is_supported(p_holm, alpha)
        needed = None if supported else seeds_for_power(c.variant_values, c.baseline_values, paired=c.paired,
                                                        alpha=level, power=power, cap=cap)
        out.append(replace(c, p_holm=p_holm, supported=supported, seeds_needed=needed))
    return out


def seeds_for_power(a, b, *, paired: bool, alpha: float = ALPHA, power: float = POWER,
                    cap: int = SEEDS_CAP) -> SeedsNeeded:
    """Seeds per variant at which a two-sided t-test at `alpha` reaches `power`, taking the observed effect as true.

    Paired: the one-sample t-test of the differences, effect mean(d) / sd(d); unpaired: Welch's test with the
    same number of seeds per arm and the observed variances. Power from the noncentral t (scipy.stats.nct), as
    in G*Power (Faul et al. 2007). The observed effect is itself noisy, so this is a planning figure, not a
    promise. per_variant is None above `cap`, for no observed effect, and below 2 values or no spread.
    """
    x, y = _pair(a, b, paired, "a power estimate", 0)
    n_now = min(x.size, y.size)
    if n_now < 2:
        return SeedsNeeded(None, None, "unknown: at least 2 seeds per variant are needed to estimate the "
                           "seed-to-seed spread", alpha)
    if _untestable(x, y, paired):
        return SeedsNeeded(None, None, "unknown: no seed-to-seed spread observed", alpha)
    effect = float(x.mean() - y.mean())
    if abs(effect) <= _EQUAL_UP_TO_ROUNDING * _scale(x, y):
        return SeedsNeeded(None, None, "no effect seen: no finite number", alpha)
    n = np.arange(2, max(cap, 2) + 1)
    if paired:
        var, df = float(np.var(x - y, ddof=1)), n - 1.0
    else:
        va, vb = float(np.var(x, ddof=1)), float(np.var(y, ddof=1))
        # Welch-Satterthwaite degrees of freedom with n values in each arm.
        var, df = va + vb, (va + vb) ** 2 * (n - 1.0) / (va**2 + vb**2)
    noncentrality = effect / np.sqrt(var / n)
    critical = stats.t.ppf(1 - alpha / 2, df)
    reached = (stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality)) >= power
    if not reached.any():
        return SeedsNeeded(None, None, f"more than {cap} seeds per variant", alpha)
    per_variant = int(n[np.argmax(reached)])
    more = max(per_variant - n_now, 0)
    return SeedsNeeded(per_variant, more, f"{per_variant} seeds per variant ({more} more)", alpha)


def holm(p_values) -> list:
    """Holm's step-down adjusted p-values, in the input order; None or NaN entries stay None, uncounted."""
    # Kept here: scipy has no Holm (stats.false_discovery_control does Benjamini-Hochberg/Yekutieli only).
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted: list = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        # Monotone: an adjusted p is never below the one of a smaller raw p.
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def expected_best(values, k: int) -> tuple[float, float]:
    """Mean and sd of the lowest of k draws (with replacement) from `values`: Dodge et al.'s expected best."""
    x = np.sort(_sample(values, "an expected best", 1))
    n = x.size
    # P(min of k draws >= x[i]) = ((n - i) / n)^k, so P(min == x[i]) is the difference of two such terms.
    survive = ((n - np.arange(n + 1)) / n) ** k
    weights = survive[:-1] - survive[1:]
    mean = float(weights @ x)
    return mean, math.sqrt(float(weights @ (x - mean) ** 2))
