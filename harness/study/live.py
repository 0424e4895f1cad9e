"""The live view of a study on this machine: one line per start and end, and every SUMMARY_EVERY seconds a table of
trials per variant with the best so far and the time left, set against the `plan` estimate when there is one.
"""

import statistics
import time

from harness.study.ledger.writer import Ledger
from harness.study.plan import PlanResult
from harness.study.rules import CONFIRM, SEARCH, trials_for

SUMMARY_EVERY = 120.0  # seconds between live-view tables


def format_params(params: dict) -> str:
    """' with input 0.2, weight 0.35' for a trial's searched parameters, '' when it has none."""
    return (" with " + ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in params.items())) if params else ""


class LiveView:
    """What this machine's coordinator prints while it works: it hears of every run that starts and ends."""

    def __init__(self, study, ledger: Ledger, n_slots: int, log=print):
        self.study, self.ledger, self.n_slots, self.log = study, ledger, n_slots, log
        self.estimate: PlanResult | None = None  # harness.study.plan's, when the study was priced
        self.started = self.last_summary = time.monotonic()
        self.durations: list[float] = []  # seconds of each run that ended with a result here
        self.work: list[tuple[float, float]] = []  # (seconds taken, seconds estimated) of each such run
        self.running: dict[str, tuple[str, str, int]] = {}  # task key -> (variant, phase, epochs done)

    def clock(self) -> str:
        """'[h:mm:ss]' since this coordinator started."""
        elapsed = int(time.monotonic() - self.started)
        return f"[{elapsed // 3600:d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}]"

    def say(self, line: str) -> None:
        """One line, stamped with the clock."""
        self.log(f"{self.clock()} {line}")

    def run_started(self, key: str, variant: str, phase: str, device: str, params: dict) -> None:
        self.running[key] = (variant, phase, 0)
        self.say(f"start  {key} on {device}{format_params(params)}")

    def resumed(self, key: str, epochs: int) -> None:
        """A retry continued its earlier attempt's checkpoint: those epochs are done (the estimate of what is left)."""
        self.epoch_done(key, epochs)

    def epoch_done(self, key: str, epoch: int) -> None:
        variant, phase, _ = self.running[key]
        self.running[key] = (variant, phase, epoch)

    def run_ended(self, key: str, state: str, device: str, seconds: float, what: str, counted: bool) -> None:
        """A run ended here; `counted`: it ended with a result (finished or pruned), which prices what is left."""
        variant, phase, epochs = self.running.pop(key)
        if counted:
            self.durations.append(seconds)
            if self.estimate is not None:
                self.work.append((seconds, self.estimate.run_seconds(variant, phase, epochs)))
        self.say(f"{state:<8} {key} on {device} after {seconds:.0f} s: {what}")

    def tick(self) -> None:
        if time.monotonic() - self.last_summary >= SUMMARY_EVERY:
            self.log(self.summary())

    def summary(self) -> str:
        """Trials done, pruned, failed, interrupted and running per variant, best so far, time left."""
        self.last_summary = time.monotonic()
        seeds = len(self.study.budget.confirm_seeds)
        width = max([18, *map(len, self.ledger.variants)])  # arm names with axes run longer than variants'
        lines = [f"{self.clock()} {self.study.name}: {len(self.running)} running here",
                 f"  {'variant':<{width}} {'search: done / pruned / failed / interrupted / running of N':<58} "
                 f"{'best val ppl':>12}   confirm"]
        for v in self.ledger.variants:
            s, c = self.ledger.tally(v, SEARCH), self.ledger.tally(v, CONFIRM)
            best = self.ledger.best(v)
            lines.append(
                f"  {v:<{width}} {s.finished:>4} / {s.pruned:>6} / {s.failed + s.retried:>6} / {s.interrupted:>11} / "
                f"{s.running:>7} of {trials_for(self.study, v):<5} {f'{best[1]:.2f}' if best else 'none yet':>12}   "
                f"{c.finished}/{seeds}" + (f" ({c.running} running)" if c.running else ""))
        left = self.ledger.remaining()
        to_start = self.to_start()  # read once: both lines below price it
        if self.durations:
            eta = statistics.fmean(self.durations) * self.runs_left(to_start) / self.n_slots
            lines.append(f"  {left} trials to start; about {eta / 60:.0f} min left at this machine's pace")
        else:
            lines.append(f"  {left} trials to start")
        if self.estimate is not None:
            lines.append(self.progress(to_start))
        return "\n".join(lines)

    def to_start(self) -> dict:
        """(variant, phase) -> the epochs each run still to start will not train (Ledger.to_start), on any machine."""
        return {(v, p): self.ledger.to_start(v, p) for v in self.ledger.variants for p in (SEARCH, CONFIRM)}

    def runs_left(self, to_start: dict | None = None) -> float:
        """The work left, in whole runs: the epochs still to train of the runs to start on any machine (a retry
        that continues a checkpoint owes only those after it) and of those running here, over the epochs of one."""
        epochs = self.study.max_epochs
        done = [d for runs in (to_start or self.to_start()).values() for d in runs]
        done += [e for _, _, e in self.running.values()]
        return sum(epochs - min(d, epochs) for d in done) / epochs

    def progress(self, to_start: dict | None = None) -> str:
        """The estimate against reality: time taken, and the end projected from the runs that ended and the epochs
        left (a retry that continues a checkpoint owes only the epochs after it)."""
        return self.estimate.progress(time.monotonic() - self.started, self.work, to_start or self.to_start(),
                                      list(self.running.values()))
