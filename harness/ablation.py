"""Runs an ablation study end to end: search each variant's rates, then confirm the best over seeds.

    python -m harness ablate studies/ablation.toml [--storage URL] [--tracking-uri URL] [--devices ...]
    python -m harness worker studies/ablation.toml --storage postgresql://... --tracking-uri http://...

Every variant gets the same trial budget. A coordinator hands trials to its free device slots (search trials
first, a variant's confirmation seeds as soon as its search is settled), records what happened in the ledger
(Optuna: harness.ledger) and the tracker (MLflow: harness.tracking), and prints a live view. The rules about
the study's state live in the ledger; this module keeps the scheduling policy and maps each outcome to both
records. On a shared PostgreSQL storage one coordinator per machine (`worker`) works on the same study until
nothing is left anywhere. Re-running the same command resumes: finished trials are kept, interrupted or stale
ones are retried, nothing is logged twice.
"""

import os
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import StudyConfig
from harness.data import find_split_files, load_corpus
from harness.errors import UserError
from harness.ledger import (
    CONFIRM, PHASES, SEARCH, Claim, Ledger, TrialLost, open_storage, optuna_name, trials_for,
)
from harness.plan import CALIBRATION_SECONDS, PlanResult, plan_study
from harness.scheduler import ENVIRONMENT, Outcome, Scheduler, Slot, Task, describe_slots, device_name
from harness.stores import HEARTBEAT, LocalLock, check_tracking, redact
from harness.tracking import Tracker, package_versions
from harness.train import check_splits

SUMMARY_EVERY = 120.0  # seconds between live-view tables
POLL_SECONDS = 5  # how often an idle coordinator looks for retries and confirmation seeds left by other machines


def git_commit() -> str:
    """HEAD of the checkout the harness runs from, '-dirty' if it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@dataclass
class _Live:
    """A trial in flight on this machine."""

    claim: Claim
    run_id: str
    started: float = field(default_factory=time.monotonic)
    lost: bool = False  # another machine failed it as stale; its retry counts, not this run
    epochs: int = 0  # epochs it has reported: prices its work against the estimate


class Ablation:
    """The TaskSource of a study on this machine: decides what runs next and records what happened."""

    def __init__(self, study: StudyConfig, ledger: Ledger, tracker: Tracker, runs_dir: Path, log=print):
        self.study, self.ledger, self.tracker, self.runs_dir, self.log = study, ledger, tracker, runs_dir, log
        self.variants = list(study.variants)
        with ledger.lock():  # parent runs made once, however many machines start at the same moment
            for v in self.variants:
                tracker.parent_run(v)
        self.coordinator = f"{socket.gethostname()}/{os.getpid()}"
        self.live: dict[str, _Live] = {}
        self.device_names: dict[str, str] = {}
        self.durations: list[float] = []
        self.estimate: PlanResult | None = None  # harness.plan's, when run_ablation made one
        self.work: list[tuple[float, float]] = []  # (seconds taken, seconds estimated) of each run that ended
        self.stopping = False
        self.n_slots = 1
        self.started = self.last_summary = self.last_sweep = time.monotonic()
        self.waiting_for: int | None = None
        self.halted: str | None = None  # why no trial can succeed here (a failure outside the trial): start none

    # --- what runs next -------------------------------------------------------------------------------
    def next_task(self, slot: Slot) -> Task | None:
        """Search trials first (the variant with the most waiting), then confirmation seeds; none once halted."""
        if self.halted:
            return None
        waiting = {v: self.ledger.waiting(v, SEARCH) for v in self.variants}
        for variant in sorted((v for v in self.variants if waiting[v]), key=waiting.get, reverse=True):
            claim = self.ledger.claim(variant, SEARCH)
            if claim is not None:
                return self._start(claim, slot)
        for variant in self.variants:
            best = self.ledger.enqueue_confirmation(variant)
            if best is not None:
                params, value, number = best
                self.tracker.summarize_variant(variant, {"search_best_val_ppl": value},
                                               {"best_trial": number, **{f"best.{k}": f"{v:.4g}"
                                                                         for k, v in params.items()}})
                self.log(f"{self._clock()} {variant}: search settled, best val ppl {value:.2f} (trial {number})"
                         f"{self._params(params)}; confirming over {len(self.study.budget.confirm_seeds)} seeds")
            claim = self.ledger.claim(variant, CONFIRM)
            if claim is not None:
                return self._start(claim, slot)
        return None

    def _start(self, claim: Claim, slot: Slot) -> Task:
        seed = claim.seed if claim.phase == CONFIRM else self.study.fixed.train.seed
        overrides = {**claim.params, "train.seed": seed, "train.epochs": self.study.max_epochs}
        config = self.study.run_config(claim.variant, overrides)
        name = f"{claim.variant} {claim.phase} #{claim.number}" + (f" seed {seed}" if claim.phase == CONFIRM else "")
        run_id = self.tracker.start_run(config, name, {
            "phase": claim.phase, "trial": claim.number, "seed": seed, "device": slot.device,
            "device_name": self.device_names.setdefault(slot.device, device_name(slot.device)),
            "coordinator": self.coordinator, "attempt": claim.attempt,
            "optuna_study": optuna_name(self.study, claim.variant, claim.phase),
            **({"retry_of": claim.retry_of} if claim.retry_of is not None else {}),
        })
        self.ledger.annotate(claim, {"device": slot.device, "coordinator": self.coordinator, "mlflow_run_id": run_id,
                                     "attempt": claim.attempt})
        self.live[claim.key] = _Live(claim, run_id)
        checkpoints = self.runs_dir / self.study.name / claim.variant / claim.phase / f"trial-{claim.number}"
        # A claimed trial is always new (a retry gets a new number): what its folder holds is another run's.
        return Task(claim.key, config.to_dict(), str(checkpoints), prunable=claim.phase == SEARCH,
                    evaluate_test=claim.phase == CONFIRM, resume=False)

    # --- what happened --------------------------------------------------------------------------------
    def on_start(self, task: Task, slot: Slot) -> None:
        live = self.live[task.key]
        self.log(f"{self._clock()} start  {task.key} on {slot.device}{self._params(live.claim.params)}")

    def on_epoch(self, task: Task, epoch: dict) -> bool:
        live = self.live[task.key]
        if live.lost:
            return False
        live.epochs = int(epoch["epoch"])
        # Optuna first: its verdict decides whether the trial goes on, and the ledger says so when the storage
        # is away and waits for it (an MLflow server on the same database would only retry in silence).
        try:
            keep_going = self.ledger.report_epoch(live.claim, int(epoch["epoch"]), epoch["val_ppl"])
        except TrialLost:
            live.lost = True  # failed as stale elsewhere while this machine could not beat: stop it
            keep_going = False
        self.tracker.log_epoch(live.run_id, epoch)
        return keep_going

    def on_done(self, task: Task, slot: Slot, outcome: Outcome) -> None:
        live = self.live.pop(task.key)
        claim, seconds = live.claim, time.monotonic() - live.started
        if outcome.status in ("finished", "pruned") and not live.lost:
            if outcome.status == "finished":
                result = outcome.result
                attrs = {key: result[key] for key in ("best_epoch", "seconds") if result.get(key) is not None}
                if claim.phase == CONFIRM:
                    attrs["test_ppl"] = result["test_ppl"]
                told = self.ledger.finish(claim, result["best_val_ppl"], attrs)
                what = f"val ppl {result['best_val_ppl']:.2f} (epoch {result['best_epoch']})" + (
                    f", test ppl {result['test_ppl']:.2f}" if claim.phase == CONFIRM else "")
            else:
                result = {"seconds": seconds}
                told = self.ledger.prune(claim)
                what = "pruned"
            live.lost = not told
            if told:
                self.tracker.finish(live.run_id, outcome.status, result=result)
                self.durations.append(seconds)
                if self.estimate is not None:
                    self.work.append((seconds, self.estimate.run_seconds(claim.variant, claim.phase, live.epochs)))
        if live.lost:
            what = "discarded: another machine failed this trial as stale while it ran here; its retry counts"
            self.tracker.finish(live.run_id, "failed", reason=what, result={"seconds": seconds})
        elif outcome.status not in ("finished", "pruned"):
            outside = outcome.cause == ENVIRONMENT
            if outside and not self.halted:
                self.halted = outcome.reason.strip().splitlines()[-1] if outcome.reason.strip() else "no reason"
            # Not the trial's fault either way: retried without using an attempt, like an interruption.
            interrupted = self.stopping or outside
            retried = self.ledger.fail(claim, outcome.reason, interrupted=interrupted)
            self.tracker.finish(live.run_id, "interrupted" if interrupted else "failed", reason=outcome.reason,
                                result={"seconds": seconds})
            last_line = outcome.reason.strip().splitlines()[-1] if outcome.reason.strip() else "no reason"
            what = f"{'FAILED outside the trial' if outside else 'interrupted' if interrupted else 'FAILED'}: " \
                   f"{last_line}" + (" (will be retried)" if retried else " (retries used up)" if retried is False
                                     else "") + ("; starting no more trials here" if outside else "")
        self.log(f"{self._clock()} {outcome.status:<8} {task.key} on {slot.device} after {seconds:.0f} s: {what}")
        if not self.stopping:
            self.settle(claim.variant)

    def settle(self, variant: str) -> None:
        """Once a variant has settled: its confirmation summary on the parent run, and the parent run ended."""
        if not self.ledger.variant_settled(variant):
            return
        tests = self.ledger.confirmation_results(variant)
        if tests:
            values = list(tests.values())
            self.tracker.summarize_variant(variant, {
                "confirm_test_ppl_mean": statistics.fmean(values),
                "confirm_test_ppl_sd": statistics.stdev(values) if len(values) > 1 else None,
                "confirm_seeds": len(values),
            }, {})
        finished = tests or self.ledger.tally(variant, SEARCH).finished
        self.tracker.set_parent_state(variant, "finished" if finished else "failed")

    def open_parents(self) -> None:
        """At start: the parent runs of unsettled variants are RUNNING (again, on resume); settled ones ended."""
        for variant in self.variants:
            if self.ledger.variant_settled(variant):
                self.settle(variant)
            else:
                self.tracker.set_parent_state(variant, "running")

    def interrupt(self) -> None:
        """After Ctrl-C or SIGTERM: parent runs of the variants nobody works on any more end as interrupted."""
        for variant in self.variants:
            if not self.ledger.variant_settled(variant) and not any(
                    self.ledger.tally(variant, phase).running for phase in PHASES):
                self.tracker.set_parent_state(variant, "interrupted")

    def on_tick(self) -> None:
        if self.ledger.shared and time.monotonic() - self.last_sweep >= self.ledger.heartbeat.interval:
            self.sweep()
        if time.monotonic() - self.last_summary >= SUMMARY_EVERY:
            self.log(self.summary())

    # --- machines that go away --------------------------------------------------------------------------
    def sweep(self) -> None:
        """Fail and retry the trials no coordinator runs any more (see Ledger.sweep), and close their MLflow runs."""
        self.last_sweep = time.monotonic()
        running_here = {live.claim.trial_id for live in self.live.values()}
        state = "failed" if self.ledger.shared else "interrupted"
        for swept in self.ledger.sweep(running_here):
            reason = ("stale: its machine stopped sending heartbeats" if self.ledger.shared
                      else "interrupted: the coordinator stopped while it ran")
            closed = self.tracker.close_trial_runs(optuna_name(self.study, swept.variant, swept.phase), swept.number,
                                                   state, reason)
            self.log(f"{self._clock()} retry  {swept.variant}/{swept.phase}/{swept.number} (it ran on "
                     f"{swept.coordinator}): {reason}" + (f"; {closed} MLflow run closed" if closed else "")
                     + ("" if swept.retried else "; retries used up"))

    def wait_for_others(self) -> None:
        """Nothing to start here: wait a heartbeat while other machines run the last trials, then sweep."""
        running = sum(self.ledger.tally(v, p).running for v in self.variants for p in PHASES)
        if running and running != self.waiting_for:
            self.log(f"{self._clock()} waiting for {running} trial{'s' * (running > 1)} running on other machines "
                     "(any whose machine stops is retried here)")
        self.waiting_for = running
        time.sleep(min(self.ledger.heartbeat.interval or 1, POLL_SECONDS))
        self.sweep()

    # --- the live view --------------------------------------------------------------------------------
    def _clock(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"[{elapsed // 3600:d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}]"

    @staticmethod
    def _params(params: dict) -> str:
        return (" with " + ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in params.items())) if params else ""

    def summary(self) -> str:
        """Trials done, pruned, failed, interrupted and running per variant, best so far, time left."""
        self.last_summary = time.monotonic()
        seeds = len(self.study.budget.confirm_seeds)
        lines = [f"{self._clock()} {self.study.name}: {len(self.live)} running here",
                 f"  {'variant':<18} {'search: done / pruned / failed / interrupted / running of N':<58} "
                 f"{'best val ppl':>12}   confirm"]
        for v in self.variants:
            s, c = self.ledger.tally(v, SEARCH), self.ledger.tally(v, CONFIRM)
            best = self.ledger.best(v)
            lines.append(
                f"  {v:<18} {s.finished:>4} / {s.pruned:>6} / {s.failed + s.retried:>6} / {s.interrupted:>11} / "
                f"{s.running:>7} of {trials_for(self.study, v):<5} {f'{best[1]:.2f}' if best else 'none yet':>12}   "
                f"{c.finished}/{seeds}" + (f" ({c.running} running)" if c.running else ""))
        left = self.ledger.remaining()
        if self.durations:
            eta = statistics.fmean(self.durations) * (left + len(self.live) / 2) / self.n_slots
            lines.append(f"  {left} trials to start; about {eta / 60:.0f} min left at this machine's pace")
        else:
            lines.append(f"  {left} trials to start")
        if self.estimate is not None:
            lines.append(self._progress())
        return "\n".join(lines)

    def _progress(self) -> str:
        """The estimate against reality: time taken, and the end projected from the runs that ended."""
        left = {}
        for v in self.variants:
            left[(v, SEARCH)] = self.ledger.tally(v, SEARCH).waiting
            left[(v, CONFIRM)] = max(0, self.ledger.confirmation_due(v) - self.ledger.tally(v, CONFIRM).running)
        running = [(live.claim.variant, live.claim.phase, live.epochs) for live in self.live.values()]
        return self.estimate.progress(time.monotonic() - self.started, self.work, left, running)


def claim_runs_dir(folder: Path, uid: str) -> None:
    """Record in a study's checkpoint folder which storage's study it holds (Ledger.uid); UserError when another's.

    Trial numbers restart at 0 in every storage: two storages on one folder would write each other's
    trial-N checkpoints (at the same time, or one after the other).
    """
    marker = folder / "STUDY_UID"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(marker, "x", encoding="utf-8") as out:  # of coordinators starting at once, one writes it
            out.write(f"{uid}\n")
    except FileExistsError:
        pass
    except OSError as err:
        raise UserError(f"cannot write {marker} ({err.strerror}); pass a writable --runs-dir") from None
    recorded = marker.read_text(encoding="utf-8").strip()
    if not recorded:  # another coordinator's, between its creating and writing the file
        time.sleep(1)
        recorded = marker.read_text(encoding="utf-8").strip()
    if recorded != uid:
        raise UserError(f"{folder} holds the checkpoints of this study run on another Optuna storage (its "
                        f"{marker.name} is {recorded}, this storage's study is {uid}); pass another --runs-dir, "
                        f"or delete {folder} if those checkpoints are no longer needed")


def run_ablation(study: StudyConfig, *, storage: str, tracking_uri: str, slots: list[Slot], runs_dir: Path,
                 heartbeat: int = HEARTBEAT, log=print, plan: bool = True) -> Ablation:
    """Run (or resume) the study on this machine's slots until nothing is left on any machine.

    With `plan`, a short calibration on the slots first prices the study (harness.plan); the estimate is
    printed with the study's first line and the live view compares it with the time taken.
    """
    corpus = load_corpus(study.corpus, log=log)  # a corpus problem is reported before any server is contacted
    for variant in study.variants:  # a batch size or bptt the corpus cannot serve would fail every trial
        check_splits(study.run_config(variant), corpus)
    check_tracking(tracking_uri)
    identity = study.identity(corpus.md5, find_split_files(corpus.path))
    with LocalLock(storage, tracking_uri):
        ledger = Ledger(study, open_storage(storage, heartbeat), identity, log=log)
        tracker = Tracker(tracking_uri, study, identity, {
            "study": study.name, "git_commit": git_commit(), "corpus": corpus.name, "versions": package_versions(),
            **identity.as_attrs(),
        })
        claim_runs_dir(runs_dir / study.name, ledger.uid)  # once both stores took this study as theirs
        ablation = Ablation(study, ledger, tracker, runs_dir, log)
        if not ledger.shared:
            ablation.sweep()  # the previous coordinator's trials, interrupted when it stopped
            closed = tracker.close_stale_runs()  # and MLflow runs it started before their trial was recorded
            if closed:
                log(f"resuming: {closed} more MLflow runs marked interrupted")
        estimate = ""  # before the parent runs are marked running: Ctrl-C here leaves them as they were
        if plan and not ledger.complete():
            log(f"{study.name}: pricing the study: a short calibration run on {describe_slots(slots)} "
                f"(at most about {CALIBRATION_SECONDS:.0f} s)")
            try:
                ablation.estimate = plan_study(study, slots, corpus=corpus, log=lambda *a: None)
                estimate = "\n" + ablation.estimate.format()
            except (UserError, RuntimeError) as err:  # a study runs without its estimate
                estimate = f"\nno estimate of its cost: {err}"
        ablation.open_parents()
        log(f"{study.name}: {len(ablation.variants)} variants, {study.budget.trials} trials each "
            f"(max {study.max_epochs} epochs), {len(study.budget.confirm_seeds)} confirmation seeds; "
            f"{describe_slots(slots)}" + (f"; shared with other machines through {redact(storage)}"
                                          if ledger.shared else "") + estimate)
        scheduler = Scheduler(slots)
        ablation.n_slots = len(slots)
        with ledger.heartbeat:
            try:
                while True:
                    scheduler.run(ablation)  # once halted: until the trials running here have ended
                    if ablation.halted or ledger.complete():
                        break
                    ablation.wait_for_others()
            except KeyboardInterrupt:
                ablation.stopping = True
                scheduler.stop(ablation, "interrupted (Ctrl-C)")
                ablation.interrupt()
                raise
        if ablation.halted:
            ablation.interrupt()
            raise UserError(f"stopped: a trial failed for a reason outside it, which every trial here would meet: "
                            f"{ablation.halted}; fix that and run the same command again to resume (the trials it "
                            "stopped are retried without using an attempt)")
        for variant in ablation.variants:
            ablation.settle(variant)
        log(ablation.summary())
        return ablation
