"""Published results against measured ones, for a study file's [expect]: per arm and metric the difference and
whether the published value agrees (inside the measured 95% interval, or within the key's tolerance), then whether
the published ordering and the sign of every published difference hold, and a one-line verdict.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np

from harness import stats
from harness.study.spec import ExpectConfig

METRICS = {"test_ppl": "test", "val_ppl": "validation"}


@dataclass(frozen=True)
class KeyRow:
    """One published number against the measured mean over the confirmation seeds."""

    arm: str
    metric: str  # "test_ppl" or "val_ppl"
    published: float
    measured: float | None  # mean over the seeds; None when nothing was measured
    ci: stats.Interval | None  # 95% interval of the measured mean (None below 2 seeds)
    seeds: int
    values_compared: bool  # False for an ordering-only arm: its value comes from another recipe

    @property
    def diff(self) -> float | None:
        """measured minus published, perplexity."""
        return None if self.measured is None else self.measured - self.published

    def agrees(self, tolerance: float) -> bool | None:
        """Published inside the measured interval, or within `tolerance` of the measured mean; None when not
        compared (ordering only, or nothing measured)."""
        if not self.values_compared or self.measured is None:
            return None
        inside = self.ci is not None and self.ci.low <= self.published <= self.ci.high
        return inside or abs(self.measured / self.published - 1) <= tolerance


@dataclass(frozen=True)
class SignCheck:
    """A published difference between two arms (first minus second) against the measured one."""

    metric: str
    first: str
    second: str
    published: float
    measured: float | None

    @property
    def holds(self) -> bool | None:
        if self.measured is None or self.published == 0:
            return None
        return math.copysign(1, self.published) == math.copysign(1, self.measured)


@dataclass(frozen=True)
class KeyResult:
    """The whole answer key: rows, sign checks and the verdict."""

    expect: ExpectConfig
    rows: list
    signs: list
    verdict: str


def _mean(values: dict) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def check_key(expect: ExpectConfig, measured: dict) -> KeyResult:
    """measured: metric ("test_ppl", "val_ppl") -> arm -> {seed: value} of the finished confirmation runs."""
    rows, signs = [], []
    for metric in METRICS:
        published = getattr(expect, metric)
        for arm, value in published.items():
            values = measured.get(metric, {}).get(arm, {})
            ci = stats.mean_ci(list(values.values())) if len(values) > 1 else None
            rows.append(KeyRow(arm, metric, value, _mean(values), ci, len(values), arm not in expect.ordering_only))
        for first, second in itertools.combinations(published, 2):
            a, b = (_mean(measured.get(metric, {}).get(arm, {})) for arm in (first, second))
            signs.append(SignCheck(metric, first, second, published[first] - published[second],
                                   None if a is None or b is None else a - b))
    return KeyResult(expect, rows, signs, _verdict(expect, rows, signs))


def _verdict(expect: ExpectConfig, rows: list, signs: list) -> str:
    if all(row.measured is None for row in rows):
        return "Not checked yet: no confirmation run of a keyed arm has finished."
    compared = [row for row in rows if row.agrees(expect.tolerance) is not None]
    off = [row for row in compared if not row.agrees(expect.tolerance)]
    flipped = [s for s in signs if s.holds is False]
    parts = []
    if compared:
        parts.append(f"{len(compared) - len(off)} of {len(compared)} published values agree with the measured ones"
                     + (f" (within the measured 95% interval or {expect.tolerance:.0%})" if expect.tolerance else
                        " (within the measured 95% interval)"))
    judged = [s for s in signs if s.holds is not None]
    if judged:
        parts.append("the published ordering holds" if not flipped else
                     "the published ordering is violated: " + "; ".join(
                         f"published {s.first} {'<' if s.published < 0 else '>'} {s.second} "
                         f"({METRICS[s.metric]}), measured the other way by {abs(s.measured):.2f}" for s in flipped))
    head = "Reproduced" if not off and not flipped else "Not reproduced"
    if off:
        parts.append("off: " + ", ".join(f"{r.arm} {METRICS[r.metric]} {r.measured:.2f} vs {r.published:g}"
                                         for r in off))
    return f"{head}: " + "; ".join(parts) + "."
