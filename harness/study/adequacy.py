"""Whether each arm's search was adequate, judged from its trials alone: a best value at the edge of its range (the
tuning playbook's boundary check), an expected-best curve still falling at the last trial (Dodge et al. 2019), and a
searched parameter that cannot act. Pure functions: the live view, the report and `ablate`'s closing lines use them.
"""

import math
from dataclasses import dataclass

from harness import stats
from harness.study.rules import measured
from harness.study.spec import Range

EDGE_MARGIN = 0.05  # a best value within this fraction of its range's width from an edge sits at that edge
# Without seed noise to compare with, a last trial that lowered the expected best by more than this fraction of it
# means the search was still finding better values.
STILL_FALLING = 0.01
NATURAL_LIMITS = {"dropout": (0.0, 1.0)}  # a rate cannot go below 0: a best rate of 0 is an answer, not an edge


@dataclass(frozen=True)
class Flag:
    """One reason an arm's search may not have found its best: what, where, and the fix, in words."""

    kind: str  # "edge", "still_falling" or "inert"
    param: str  # the searched parameter ("dropout.weight"), or "" for the search as a whole
    text: str  # e.g. "best weight 0.494 sits at the top of its range [0.05, 0.5]"
    fix: str  # e.g. "widen search.weight above 0.5"


def _position(value: float, rng: Range) -> float:
    """Where value lies in the range, 0 at low and 1 at high (on the range's own scale)."""
    if rng.log:
        return (math.log(value) - math.log(rng.low)) / (math.log(rng.high) - math.log(rng.low))
    return (value - rng.low) / (rng.high - rng.low)


def edge_flags(space: dict, best: dict, margin: float = EDGE_MARGIN) -> list[Flag]:
    """A Flag per searched parameter whose best value lies within `margin` of an edge its range could move past (not
    a rate's lower edge at 0: dropout off is a real answer)."""
    flags = []
    for param, rng in space.items():
        if param not in best:
            continue
        value, where = best[param], _position(best[param], space[param])
        low_limit, high_limit = NATURAL_LIMITS.get(param.split(".")[0], (-math.inf, math.inf))
        name = param.split(".", 1)[1]
        if where <= margin and rng.low > low_limit:
            flags.append(Flag("edge", param, f"best {name} {value:.3g} sits at the bottom of its range "
                                             f"[{rng.low:g}, {rng.high:g}]",
                              f"widen search.{name} below {rng.low:g}"))
        elif where >= 1 - margin and rng.high < high_limit:
            flags.append(Flag("edge", param, f"best {name} {value:.3g} sits at the top of its range "
                                             f"[{rng.low:g}, {rng.high:g}]",
                              f"widen search.{name} above {rng.high:g}"))
    return flags


def last_trial_gain(values: list) -> float | None:
    """How much the last trial lowered the expected best of the search (Dodge et al.: E[min of n] against
    E[min of n-1] over the logged values), in the values' unit; None with fewer than two values."""
    finite = [v for v in values if measured(v)]
    if len(finite) < 2:
        return None
    return stats.expected_best(finite, len(finite) - 1)[0] - stats.expected_best(finite, len(finite))[0]


def still_falling_flag(values: list, noise: float | None = None) -> Flag | None:
    """A Flag when the expected-best curve was still falling at the last trial by more than the seed noise (the sd
    of the confirmation runs, when known) or, without it, by more than STILL_FALLING of its value."""
    gain = last_trial_gain(values)
    if gain is None:
        return None
    best = stats.expected_best([v for v in values if measured(v)], len(values))[0]
    threshold = noise if noise is not None and noise > 0 else STILL_FALLING * best
    if gain <= threshold:
        return None
    against = f"the seeds' sd {noise:.2f}" if noise is not None and noise > 0 else f"{STILL_FALLING:.0%} of it"
    return Flag("still_falling", "", f"its expected best was still falling at trial {len(values)} "
                                     f"(by {gain:.2f} ppl, more than {against})",
                f"add search trials (budget.trials = {2 * len(values)})")


def inert_flags(space: dict, trials: list) -> list[Flag]:
    """A Flag per searched parameter that took several values while every finished trial gave the same objective:
    whatever it did, it changed nothing (trials: (params, value) pairs of the finished ones)."""
    if len(trials) < 2 or len({value for _, value in trials}) > 1:
        return []
    return [Flag("inert", param, f"{param.split('.', 1)[1]} took {len({p[param] for p, _ in trials})} values and "
                                 "every finished trial gave the same validation perplexity: it cannot act here",
                 f"remove search.{param.split('.', 1)[1]} for this model, or check that the setting reaches it")
            for param in space if len({p.get(param) for p, _ in trials}) > 1]


def judge_search(space: dict, best: dict, values: list, finished: list, noise: float | None = None) -> list[Flag]:
    """Every flag of one arm's search: edges of the best trial's values, a still-falling expected best (`values`:
    the best value each trial reached, pruned ones included), parameters that cannot act (`finished`)."""
    flags = edge_flags(space, best)
    falling = still_falling_flag(values, noise)
    return flags + ([falling] if falling else []) + inert_flags(space, finished)


def judge_trials(space: dict, trials: list, noise: float | None = None) -> list[Flag]:
    """judge_search over a search's trials (records with .params, .value (None when pruned) and .best_seen, e.g. the
    ledger's SearchTrial), the best being the finished trial of lowest value; [] before any trial finished."""
    finished = [(t.params, t.value) for t in trials if t.value is not None]
    if not finished:
        return []
    best = min(finished, key=lambda pair: pair[1])[0]
    return judge_search(space, best, [t.best_seen for t in trials if t.best_seen is not None], finished, noise)
