"""The study's plain rules, with no store behind them: phases, names, search spaces, budgets, tallies, run states,
what is due, and which queue a free slot tries next.

The ledger applies them to Optuna, the coordinator and the tracker to MLflow, `plan` to its simulated schedule and
the report to what was logged; each rule lives here once, with a fast test (tests/test_rules.py).
"""

import enum
from collections.abc import Iterable
from dataclasses import dataclass, fields

from harness.config import SITES
from harness.study.spec import Range, StudyConfig
from harness.train import measured  # noqa: F401 (the rule for results, the library's: a study applies it as is)

SEARCH, CONFIRM = "search", "confirm"
PHASES = (SEARCH, CONFIRM)
OBJECTIVE = "val_ppl"  # what every trial's value is: the best validation perplexity of its run


class RunState(enum.StrEnum):
    """How a run stands or ended: MLflow's `state` tag, the scheduler's outcome, the report's filters."""

    RUNNING = "running"
    FINISHED = "finished"
    PRUNED = "pruned"  # stopped early by the study's pruner: never finished, never best
    FAILED = "failed"  # with its reason; retried while attempts remain
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, a stopped coordinator: retried without using an attempt


def optuna_name(study: StudyConfig, variant: str, phase: str) -> str:
    """Name of the Optuna study of one variant and phase, e.g. "ablation/awd/search"."""
    return f"{study.name}/{variant}/{phase}"


def search_space(study: StudyConfig, variant: str) -> dict[str, Range]:
    """The variant's searched parameters, named like the config keys they set ("dropout.input", "train.lr"):
    the rates of its active sites (on, and able to act on its model) that [search] gives a range, and the learning
    rate if searched."""
    active = study.active_sites(variant)
    space = {f"dropout.{site}": rng for site, rng in study.search.rates.items() if site in active}
    if study.search.lr is not None:
        space["train.lr"] = study.search.lr
    return space


def trials_for(study: StudyConfig, variant: str) -> int:
    """The search budget of a variant; one trial when it has nothing to search, not N identical ones."""
    return study.budget.trials if search_space(study, variant) else 1


def default_params(study: StudyConfig, variant: str) -> dict:
    """The fixed (paper) values of the searched parameters, clipped into their ranges: each search's first trial."""
    values = {f"dropout.{s}": getattr(study.fixed.dropout, s) for s in SITES}
    values["train.lr"] = study.fixed.train.lr
    return {k: min(max(values[k], r.low), r.high) for k, r in search_space(study, variant).items()}


def count_runs(study: StudyConfig) -> dict:
    """(variant, phase) -> runs the budget holds: its search trials, then one confirmation run per seed."""
    runs = {}
    for variant in study.variants:
        runs[(variant, SEARCH)] = trials_for(study, variant)
        runs[(variant, CONFIRM)] = len(study.budget.confirm_seeds)
    return runs


# --- the tally ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tally:
    """Trials of one variant and phase by state; a trial that failed and was retried is counted apart."""

    finished: int = 0
    pruned: int = 0
    failed: int = 0  # failed for good: its attempts are used up
    retried: int = 0  # failed, used an attempt, and was enqueued again with the same parameters
    interrupted: int = 0  # stopped by Ctrl-C, SIGTERM or a coordinator that died: retried, no attempt used
    running: int = 0
    waiting: int = 0

    @classmethod
    def of(cls, kinds: Iterable[str]) -> "Tally":
        """Count trials given as their kinds (a field name each: "finished", "retried", ...)."""
        counts = dict.fromkeys((f.name for f in fields(cls)), 0)
        for kind in kinds:
            counts[kind] += 1
        return cls(**counts)

    @property
    def settled(self) -> int:
        """Trials that used up budget: finished, pruned, or failed for good."""
        return self.finished + self.pruned + self.failed

    @property
    def attempts(self) -> int:
        """Runs that ended and counted: settled ones and failures that were retried."""
        return self.settled + self.retried

    @property
    def total(self) -> int:
        """Every trial in the study, whatever its state."""
        return self.settled + self.retried + self.interrupted + self.running + self.waiting


def failure_kind(retried: bool, interrupted: bool) -> str:
    """How a failed trial counts: "interrupted" (retried, no attempt used), "retried" (an attempt used) or "failed"
    (for good)."""
    if not retried:
        return "failed"
    return "interrupted" if interrupted else "retried"


def retry_decision(attempt: int, max_retries: int, interrupted: bool) -> tuple[bool, int]:
    """(whether a failed trial is retried, the attempt number its retry gets): an interruption is not the trial's
    fault, so it is always retried on the same attempt; a failure uses one of `max_retries` further attempts."""
    if interrupted:
        return True, attempt
    return attempt <= max_retries, attempt + 1


# --- what is due ----------------------------------------------------------------------------------------
def search_settled(search: Tally, budget: int) -> bool:
    """Every search trial of the budget has settled and none runs or waits."""
    return search.settled >= budget and not search.running and not search.waiting


def confirmation_due(search: Tally, confirm: Tally, budget: int, seeds: int, has_best: bool) -> int:
    """Confirmation runs a variant still owes: all its seeds until its search has settled; once enqueued, those
    waiting or running; none when its search finished no trial (there is nothing to confirm)."""
    if not seeds:
        return 0
    if not search_settled(search, budget):
        return seeds
    if confirm.total == 0:  # not enqueued yet
        return seeds if has_best else 0
    return confirm.waiting + confirm.running


def parent_state(settled: bool, has_results: bool, running: bool, stopped: bool) -> RunState | None:
    """The state a variant's parent run should show, or None to leave it: ended once the variant settled (finished
    with results, failed without), interrupted once stopped with nothing of it running anywhere, else running."""
    if settled:
        return RunState.FINISHED if has_results else RunState.FAILED
    if stopped:
        return None if running else RunState.INTERRUPTED
    return RunState.RUNNING


# --- the scheduling policy ------------------------------------------------------------------------------
def pick_order(variants: list, waiting_search: dict) -> list[tuple[str, str]]:
    """The (variant, phase) queues a free slot tries, in order: search trials first, of the variant with the most
    waiting (file order breaks ties), then each variant's confirmation seeds in file order (a variant's
    confirmation is only ever queued once its search has settled). The coordinator claims in this order and
    `plan` simulates it."""
    searching = sorted((v for v in variants if waiting_search.get(v)), key=lambda v: waiting_search[v], reverse=True)
    return [(v, SEARCH) for v in searching] + [(v, CONFIRM) for v in variants]
