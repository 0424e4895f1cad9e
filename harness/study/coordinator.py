"""Runs a study on this machine's device slots: `run_study` opens the stores and loops until nothing is left on
any machine; its `Coordinator` turns the ledger's claims into tasks for the scheduler and each epoch and outcome
into the records of both stores (Optuna through the ledger, MLflow through the tracker).

    python -m harness ablate studies/ablation.toml       # or `worker` on each machine of a shared study
"""

import dataclasses
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import RunConfig
from harness.data import find_split_files, load_corpus
from harness.errors import UserError
from harness.study import rules
from harness.study.adequacy import judge_trials
from harness.study.ledger.storage import open_storage
from harness.study.ledger.studies import study_names
from harness.study.ledger.writer import Claim, Ledger, TrialLost
from harness.study.live import LiveView, format_params
from harness.study.plan import CALIBRATION_SECONDS, plan_study
from harness.study.rules import CONFIRM, PHASES, SEARCH, RunState, optuna_name
from harness.study.scheduler import ENVIRONMENT, Outcome, Scheduler, Slot, Task, describe_slots, device_name
from harness.study.spec import StudyConfig
from harness.study.stores import HEARTBEAT, LocalLock, check_tracking, redact
from harness.study.tracking import Tracker, check_experiment, git_commit, package_versions
from harness.train import EpochResult, check_splits, divergence

POLL_SECONDS = 5  # how often an idle coordinator looks for retries and confirmation seeds left by other machines
LOST = "discarded: another machine failed this trial as stale while it ran here; its retry counts"


@dataclass
class Attempt:
    """A trial this coordinator runs: its claim, its MLflow run, and whether another machine took it over."""

    claim: Claim
    run_id: str | None  # None until a retry's worker says whether it continues its earlier attempt's run
    config: RunConfig
    slot: Slot
    started: float = field(default_factory=time.monotonic)
    earlier_seconds: float = 0.0  # of the attempts whose run this one continues: `seconds` is the run's total
    lost: bool = False  # another machine failed it as stale; its retry counts, not this run

    @property
    def seconds(self) -> float:
        return self.earlier_seconds + time.monotonic() - self.started


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "no reason"


class Coordinator:
    """The scheduler's TaskSource for a study on this machine: claims in the order of rules.pick_order, and every
    report of a worker recorded once in the ledger and the tracker."""

    def __init__(self, study: StudyConfig, ledger: Ledger, tracker: Tracker, runs_dir: Path, view: LiveView):
        self.study, self.ledger, self.tracker, self.runs_dir, self.view = study, ledger, tracker, runs_dir, view
        self.variants = list(study.variants)
        with ledger.lock():  # parent runs made once, however many machines start at the same moment
            for v in self.variants:
                tracker.parent_run(v)
        self.coordinator = f"{socket.gethostname()}/{os.getpid()}"
        self.attempts: dict[str, Attempt] = {}
        self.device_names: dict[str, str] = {}
        self.stopping = False
        self.last_sweep = time.monotonic()
        self.halted: str | None = None  # why no trial can succeed here (a failure outside the trial): start none

    # --- what runs next -------------------------------------------------------------------------------
    def next_task(self, slot: Slot) -> Task | None:
        """The next trial in rules.pick_order's order that can be claimed; a settled search's confirmation is
        enqueued on the way. None when nothing can be claimed, or once halted."""
        if self.halted:
            return None
        waiting = {v: self.ledger.waiting(v, SEARCH) for v in self.variants}
        for variant, phase in rules.pick_order(self.variants, waiting):
            if phase == CONFIRM:
                self._enqueue_confirmation(variant)
            claim = self.ledger.claim(variant, phase)
            if claim is not None:
                return self._start(claim, slot)
        return None

    def _enqueue_confirmation(self, variant: str) -> None:
        best = self.ledger.enqueue_confirmation(variant)
        if best is None:
            return
        params, value, number = best
        self.tracker.summarize_variant(variant, {"search_best_val_ppl": value},
                                       {"best_trial": number, **{f"best.{k}": f"{v:.4g}" for k, v in params.items()}})
        self.view.say(f"{variant}: search settled, best val ppl {value:.2f} (trial {number}){format_params(params)}; "
                      f"confirming over {len(self.study.budget.confirm_seeds)} seeds")
        for flag in judge_trials(rules.search_space(self.study, variant), self.ledger.search_trials(variant)):
            self.view.say(f"{variant}: search-limited? {flag.text}; fix: {flag.fix}")

    def _start(self, claim: Claim, slot: Slot) -> Task:
        seed = claim.seed if claim.phase == CONFIRM else self.study.fixed.train.seed
        config = self.study.run_config(claim.variant, {**claim.params, "train.seed": seed,
                                                       "train.epochs": self.study.max_epochs})
        attempt = self.attempts[claim.key] = Attempt(claim, None, config, slot)
        if not claim.lineage:  # a retry's run waits for its worker: the run it continues, or a new one
            self._open_run(attempt, set())
        folder = self._checkpoints(claim)
        # A claimed trial is always new (a retry gets a new number): what its folder holds is another run's. A retry
        # continues the newest checkpoint of the attempts it replaces (each kept its own folder).
        return Task(claim.key, config, str(folder(claim.number)), prunable=claim.phase == SEARCH,
                    evaluate_test=claim.phase == CONFIRM, resume=False,
                    resume_from=tuple(str(folder(n)) for n in claim.lineage), identity=self.ledger.identity)

    def _checkpoints(self, claim: Claim):
        base = self.runs_dir / self.study.name / claim.variant / claim.phase
        return lambda number: base / f"trial-{number}"

    def _run_tags(self, attempt: Attempt) -> dict:
        claim, slot = attempt.claim, attempt.slot
        return {
            "phase": claim.phase, "trial": claim.number, "seed": attempt.config.train.seed, "device": slot.device,
            "device_name": self.device_names.setdefault(slot.device, device_name(slot.device)),
            "coordinator": self.coordinator, "attempt": claim.attempt,
            "optuna_study": optuna_name(self.study, claim.variant, claim.phase),
            **({"retry_of": claim.retry_of} if claim.retry_of is not None else {}),
        }

    def _open_run(self, attempt: Attempt, logged: set | None) -> set:
        """The attempt's MLflow run: the one its earlier attempts logged to when `logged` (their epochs) is given
        by Tracker.continue_run, else a new one. Returns the epochs it already holds."""
        claim = attempt.claim
        if logged is None or not attempt.run_id:
            name = f"{claim.variant} {claim.phase} #{claim.number}" + (
                f" seed {attempt.config.train.seed}" if claim.phase == CONFIRM else "")
            attempt.run_id, logged = self.tracker.start_run(attempt.config, name, self._run_tags(attempt)), set()
        self.ledger.annotate(claim, {"device": attempt.slot.device, "coordinator": self.coordinator,
                                     "mlflow_run_id": attempt.run_id, "attempt": claim.attempt})
        return logged

    # --- what happened --------------------------------------------------------------------------------
    def on_start(self, task: Task, slot: Slot) -> None:
        claim = self.attempts[task.key].claim
        self.view.run_started(task.key, claim.variant, claim.phase, slot.device, claim.params)

    def on_begin(self, task: Task, restored: tuple, notes: list) -> None:
        """The worker has loaded what it continues: a retry restored the epochs of its earlier attempt (recorded now
        as its own, in both stores, each once) or starts over, saying why in one line."""
        attempt = self.attempts[task.key]
        claim = attempt.claim
        for note in notes:
            self.view.say(f"{claim.key}: starting over at epoch 1: {note}")
        if not claim.lineage:
            return
        logged = None
        if restored and claim.continues_run:
            attempt.run_id = claim.continues_run
            earlier = self.tracker.run_seconds(claim.continues_run)
            logged = self.tracker.continue_run(claim.continues_run, len(restored), {
                **self._run_tags(attempt), "earlier_trials": ",".join(map(str, claim.lineage)),
                "continued_after_epoch": len(restored)})
            attempt.earlier_seconds = earlier if logged is not None else 0.0
        logged = self._open_run(attempt, logged)
        self.ledger.restore_epochs(claim, {e.epoch: e.val_ppl for e in restored})
        for epoch in restored:
            if epoch.epoch not in logged:
                self.tracker.log_epoch(attempt.run_id, epoch)
        if restored:
            self.view.resumed(task.key, len(restored))
            self.view.say(f"continue {claim.key} after epoch {len(restored)} (trial {claim.lineage[0]}'s checkpoint)")

    def on_epoch(self, task: Task, epoch: EpochResult) -> bool:
        """Record the epoch, Optuna first: its verdict decides whether the trial goes on, and the ledger says so
        when the storage is away and waits for it (an MLflow server on the same database would retry in silence)."""
        attempt = self.attempts[task.key]
        if attempt.lost:
            return False
        self.view.epoch_done(task.key, epoch.epoch)
        try:
            keep_going = self.ledger.report_epoch(attempt.claim, epoch.epoch, epoch.val_ppl)
        except TrialLost:
            attempt.lost = True  # failed as stale elsewhere while this machine could not beat: stop it
            return False  # its run is the retry's to continue: nothing more is logged there from here
        self.tracker.log_epoch(attempt.run_id, epoch)
        return keep_going

    def on_done(self, task: Task, slot: Slot, outcome: Outcome) -> None:
        attempt = self.attempts.pop(task.key)
        diverged = divergence(outcome.result) if outcome.state == RunState.FINISHED else None
        if diverged:  # whatever sent it: a result that is no measurement is recorded in neither store
            outcome = Outcome(RunState.FAILED, reason=diverged)
        record = {RunState.FINISHED: self._finished, RunState.PRUNED: self._pruned}.get(outcome.state, self._failed)
        what = "" if attempt.lost else record(attempt, outcome)
        if attempt.lost:  # found out during its epochs, or while telling the ledger
            what = LOST
            # Unless its retry has taken the run over already (a continued run changes hands).
            if attempt.run_id and self.tracker.run_trial(attempt.run_id) == str(attempt.claim.number):
                self.tracker.finish(attempt.run_id, RunState.FAILED, reason=LOST, seconds=attempt.seconds)
        self.view.run_ended(task.key, outcome.state, slot.device, attempt.seconds, what,
                            counted=outcome.state in (RunState.FINISHED, RunState.PRUNED) and not attempt.lost)
        if not self.stopping:
            self.sync_parent(attempt.claim.variant)

    def _finished(self, attempt: Attempt, outcome: Outcome) -> str:
        result, claim = outcome.result, attempt.claim
        attrs = {"best_epoch": result.best_epoch, "seconds": result.seconds}
        if claim.phase == CONFIRM:
            attrs["test_ppl"] = result.test_ppl
        attempt.lost = not self.ledger.finish(claim, result.best_val_ppl, attrs)
        if not attempt.lost:
            self.tracker.finish(attempt.run_id, RunState.FINISHED,
                                result=dataclasses.replace(result, seconds=result.seconds + attempt.earlier_seconds))
        return f"val ppl {result.best_val_ppl:.2f} (epoch {result.best_epoch})" + (
            f", test ppl {result.test_ppl:.2f}" if claim.phase == CONFIRM else "")

    def _pruned(self, attempt: Attempt, outcome: Outcome) -> str:
        attempt.lost = not self.ledger.prune(attempt.claim)
        if not attempt.lost:
            self.tracker.finish(attempt.run_id, RunState.PRUNED, seconds=attempt.seconds)
        return "pruned"

    def _failed(self, attempt: Attempt, outcome: Outcome) -> str:
        outside = outcome.cause == ENVIRONMENT
        if outside and not self.halted:
            self.halted = _last_line(outcome.reason)
        # Not the trial's fault either way: retried without using an attempt, like an interruption.
        interrupted = self.stopping or outside
        retried = self.ledger.fail(attempt.claim, outcome.reason, interrupted=interrupted)
        if attempt.run_id is not None:  # else its retry continues the earlier attempt's run as it was
            self.tracker.finish(attempt.run_id, RunState.INTERRUPTED if interrupted else RunState.FAILED,
                                reason=outcome.reason, seconds=attempt.seconds)
        head = "FAILED outside the trial" if outside else "interrupted" if interrupted else "FAILED"
        fate = {True: " (will be retried)", False: " (retries used up)", None: ""}[retried]
        return f"{head}: {_last_line(outcome.reason)}{fate}" + ("; starting no more trials here" if outside else "")

    def on_tick(self) -> None:
        if self.ledger.shared and time.monotonic() - self.last_sweep >= self.ledger.heartbeat.interval:
            self.sweep()
        self.view.tick()

    # --- the variants' parent runs ------------------------------------------------------------------------
    def sync_parent(self, variant: str, stopped: bool = False) -> None:
        """The variant's parent run in the state rules.parent_state gives it; once settled, with the confirmation's
        summary (mean and sd of test perplexity over the seeds)."""
        settled = self.ledger.variant_settled(variant)
        tests = self.ledger.confirmation_results(variant) if settled else {}
        if tests:
            values = list(tests.values())
            self.tracker.summarize_variant(variant, {
                "confirm_test_ppl_mean": statistics.fmean(values),
                "confirm_test_ppl_sd": statistics.stdev(values) if len(values) > 1 else None,
                "confirm_seeds": len(values),
            }, {})
        has_results = bool(tests) or (settled and self.ledger.tally(variant, SEARCH).finished > 0)
        running = stopped and not settled and any(self.ledger.tally(variant, p).running for p in PHASES)
        state = rules.parent_state(settled, has_results, running, stopped)
        if state is not None:
            self.tracker.set_parent_state(variant, state)

    # --- machines that go away --------------------------------------------------------------------------
    def sweep(self) -> None:
        """Fail and retry the trials no coordinator runs any more (Ledger.sweep), and close their MLflow runs."""
        self.last_sweep = time.monotonic()
        running_here = {attempt.claim.trial_id for attempt in self.attempts.values()}
        state = RunState.FAILED if self.ledger.shared else RunState.INTERRUPTED
        reason = ("stale: its machine stopped sending heartbeats" if self.ledger.shared
                  else "interrupted: the coordinator stopped while it ran")
        for swept in self.ledger.sweep(running_here):
            closed = self.tracker.close_trial_runs(optuna_name(self.study, swept.variant, swept.phase), swept.number,
                                                   state, reason)
            self.view.say(f"retry  {swept.variant}/{swept.phase}/{swept.number} (it ran on {swept.coordinator}): "
                          f"{reason}" + (f"; {closed} MLflow run closed" if closed else "")
                          + ("" if swept.retried else "; retries used up"))


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


def _halted_message(reason: str) -> str:
    return (f"stopped: a trial failed for a reason outside it, which every trial here would meet: {reason}; fix that "
            "and run the same command again to resume (the trials it stopped are retried without using an attempt)")


def _wait_for_other_machines(coordinator: Coordinator, waiting_for: int | None) -> int:
    """Nothing to start here: wait a heartbeat while other machines run the last trials, then sweep; returns the
    number running elsewhere (said once per change)."""
    running = coordinator.ledger.running()
    if running and running != waiting_for:
        coordinator.view.say(f"waiting for {running} trial{'s' * (running > 1)} running on other machines (any whose "
                             "machine stops is retried here)")
    time.sleep(min(coordinator.ledger.heartbeat.interval or 1, POLL_SECONDS))
    coordinator.sweep()
    return running


def run_study(study: StudyConfig, *, storage: str, tracking_uri: str, slots: list[Slot], runs_dir: Path,
              heartbeat: int = HEARTBEAT, log=print, plan: bool = True) -> Coordinator:
    """Run (or resume) the study on this machine's slots until nothing is left on any machine.

    With `plan`, a short calibration on the slots first prices the study (harness.study.plan); the estimate is
    printed with the study's first line and the live view compares it with the time taken.
    """
    corpus = load_corpus(study.corpus, log=log)  # a corpus problem is reported before any server is contacted
    for variant in study.variants:  # a batch size or bptt the corpus cannot serve would fail every trial
        check_splits(study.run_config(variant), corpus)
    check_tracking(tracking_uri)
    identity = study.identity(corpus.md5, find_split_files(corpus.path))
    with LocalLock(storage, tracking_uri):
        optuna_storage = open_storage(storage, heartbeat)
        # Before the ledger writes: a refusal leaves both stores as they were.
        check_experiment(tracking_uri, study, identity, study_names(optuna_storage), redact(storage))
        ledger = Ledger(study, optuna_storage, identity, log=log)
        tracker = Tracker(tracking_uri, study, identity, {
            "study": study.name, "git_commit": git_commit(), "corpus": corpus.name, "versions": package_versions(),
            **identity.as_attrs(),
        }, log=log)
        claim_runs_dir(runs_dir / study.name, ledger.uid)  # once both stores took this study as theirs
        view = LiveView(study, ledger, len(slots), log)
        coordinator = Coordinator(study, ledger, tracker, runs_dir, view)
        if not ledger.shared:
            coordinator.sweep()  # the previous coordinator's trials, interrupted when it stopped
            closed = tracker.close_stale_runs()  # and MLflow runs it started before their trial was recorded
            if closed:
                log(f"resuming: {closed} more MLflow runs marked interrupted")
        estimate = ""  # before the parent runs are marked running: Ctrl-C here leaves them as they were
        if plan and not ledger.complete():
            log(f"{study.name}: pricing the study: a short calibration run on {describe_slots(slots)} "
                f"(at most about {CALIBRATION_SECONDS:.0f} s)")
            try:
                view.estimate = plan_study(study, slots, corpus=corpus, log=lambda *a: None)
                estimate = "\n" + view.estimate.format()
                if ledger.started():  # a resumed study: what is left, the epochs its retries continue counted done
                    estimate += "\n" + view.progress()
            except (UserError, RuntimeError) as err:  # a study runs without its estimate
                estimate = f"\nno estimate of its cost: {err}"
        for variant in coordinator.variants:
            coordinator.sync_parent(variant)
        log(f"{study.name}: {len(study.variants)} variants, {study.budget.trials} trials each "
            f"(max {study.max_epochs} epochs), {len(study.budget.confirm_seeds)} confirmation seeds; "
            f"{describe_slots(slots)}" + (f"; shared with other machines through {redact(storage)}"
                                          if ledger.shared else "") + estimate)
        expected = max((r.epoch_seconds for r in view.estimate.rows), default=None) if view.estimate else None
        scheduler = Scheduler(slots, hung_after=study.budget.hung_after, expected_epoch=expected)
        waiting_for = None
        with ledger.heartbeat:
            try:
                while True:
                    scheduler.run(coordinator)  # once halted: until the trials running here have ended
                    if coordinator.halted or ledger.complete():
                        break
                    waiting_for = _wait_for_other_machines(coordinator, waiting_for)
            except KeyboardInterrupt:
                coordinator.stopping = True
                scheduler.stop(coordinator, "interrupted (Ctrl-C)")
                for variant in coordinator.variants:
                    coordinator.sync_parent(variant, stopped=True)
                raise
        for variant in coordinator.variants:
            coordinator.sync_parent(variant, stopped=bool(coordinator.halted))
        if coordinator.halted:
            raise UserError(_halted_message(coordinator.halted))
        log(view.summary())
        return coordinator
