"""Runs an ablation study end to end: search each variant's rates, then confirm the best over seeds.

    python -m harness ablate studies/ablation.toml [--storage URL] [--tracking-uri URL] [--devices ...]
    python -m harness worker studies/ablation.toml --storage postgresql://... --tracking-uri http://...

Every variant gets the same trial budget. A coordinator hands trials to its free device slots (search trials
first, a variant's confirmation seeds as soon as its search is settled), writes Optuna and MLflow for them,
and prints a live view. On a shared PostgreSQL storage one coordinator per machine (`worker`) works on the
same study until nothing is left anywhere. Re-running the same command resumes: finished trials are kept,
interrupted or stale ones are retried, nothing is logged twice.
"""

import os
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from harness.config import StudyConfig
from harness.data import load_corpus
from harness.errors import UserError
from harness.scheduler import Outcome, Scheduler, Slot, Task, describe_slots, device_name
from harness.search import (
    CONFIRM, SEARCH, best_params, counts, fail_stale, fail_trial, open_study, optuna_name, pop_trial, search_space,
    settled, tell_result, trials_for,
)
from harness.stores import (
    HEARTBEAT, STORAGE_ERRORS, Heartbeat, LocalLock, check_tracking, is_shared, open_storage, redact, study_lock,
)
from harness.tracking import Tracker, package_versions

SUMMARY_EVERY = 120.0  # seconds between live-view tables
RECONNECT_SECONDS = 300  # how long a coordinator keeps retrying a storage that went away before it gives up
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

    variant: str
    phase: str
    trial: object  # optuna.trial.Trial
    run_id: str
    started: float
    lost: bool = False  # another machine failed it as stale; its retry counts, not this run


class Ablation:
    """The TaskSource of a study on this machine: decides what runs next and records what happened.

    `storage` is an Optuna storage URL or one opened by harness.stores.open_storage.
    """

    def __init__(self, study: StudyConfig, storage, tracker: Tracker, runs_dir: Path, log=print):
        self.study, self.tracker, self.runs_dir, self.log = study, tracker, runs_dir, log
        self.storage = open_storage(storage) if isinstance(storage, str) else storage
        self.shared = is_shared(self.storage)
        self.heartbeat = Heartbeat(self.storage)
        self.max_epochs = study.budget.epochs or study.fixed.train.epochs
        self.variants = list(study.variants)
        with self.lock():
            self.studies = {
                v: {phase: open_study(self.storage, study, v, phase, self.max_epochs) for phase in (SEARCH, CONFIRM)}
                for v in self.variants
            }
            for v in self.variants:  # parent runs made once, however many machines start at the same moment
                tracker.parent_run(v)
            if self.shared:
                self._check_heartbeat(self.studies[self.variants[0]][SEARCH])
        self.coordinator = f"{socket.gethostname()}/{os.getpid()}"
        self.live: dict[str, _Live] = {}
        self.device_names: dict[str, str] = {}
        self.durations: list[float] = []
        self.nothing_to_confirm: set[str] = set()
        self.stopping = False
        self.n_slots = 1
        self.started = time.monotonic()
        self.last_summary = time.monotonic()
        self.last_sweep = time.monotonic()
        self.outage_since: float | None = None
        self.no_verdicts_until = 0.0
        self.waiting_for: int | None = None

    def lock(self):
        """Serializes this study's check-then-write steps across machines."""
        return study_lock(self.storage, self.study.name)

    def _check_heartbeat(self, ostudy) -> None:
        # A machine beating more often than the others would judge their healthy trials stale.
        recorded = ostudy.user_attrs.get("heartbeat_seconds")
        if recorded is None:
            ostudy.set_user_attr("heartbeat_seconds", self.heartbeat.interval)
        elif recorded != self.heartbeat.interval:
            raise UserError(f"--heartbeat {self.heartbeat.interval}: the machines on this study beat every {recorded} "
                            f"s; pass --heartbeat {recorded}")

    # --- what runs next -------------------------------------------------------------------------------
    def search_settled(self, variant: str) -> bool:
        c = counts(self.studies[variant][SEARCH])
        return settled(c) >= trials_for(self.study, variant) and not c["running"] and not c["waiting"]

    def _enqueue_confirmation(self, variant: str) -> None:
        confirm = self.studies[variant][CONFIRM]
        if variant in self.nothing_to_confirm or not self.study.budget.confirm_seeds:
            return
        if confirm.get_trials(deepcopy=False):
            return
        with self.lock():
            if confirm.get_trials(deepcopy=False):
                return  # another machine enqueued them a moment ago
            best = best_params(self.studies[variant][SEARCH])
            if best is None:
                self.nothing_to_confirm.add(variant)
                self.log(f"{variant}: no search trial finished, so there is nothing to confirm")
                return
            params, value = best
            for seed in self.study.budget.confirm_seeds:
                confirm.enqueue_trial(params, user_attrs={"seed": seed, "attempt": 1, "search_best_val_ppl": value})
        self.tracker.summarize_variant(variant, {"search_best_val_ppl": value},
                                       {f"best.{k}": f"{v:.4g}" for k, v in params.items()})

    def next_task(self, slot: Slot) -> Task | None:
        """Search trials first (the variant with the most waiting), then confirmation seeds."""
        # Retrying after a storage error may leave a trial popped but never started: without heartbeats it
        # goes stale and is retried.
        return self._patiently(lambda: self._next_task(slot))

    def _next_task(self, slot: Slot) -> Task | None:
        waiting = {v: counts(self.studies[v][SEARCH])["waiting"] for v in self.variants}
        for variant in sorted((v for v in self.variants if waiting[v]), key=waiting.get, reverse=True):
            trial = pop_trial(self.studies[variant][SEARCH], search_space(self.study, variant), self.heartbeat.beat)
            if trial is not None:
                return self._start(variant, SEARCH, trial, slot)
        for variant in self.variants:
            if self.search_settled(variant):
                self._enqueue_confirmation(variant)
                trial = pop_trial(self.studies[variant][CONFIRM], {}, self.heartbeat.beat)
                if trial is not None:
                    return self._start(variant, CONFIRM, trial, slot)
        return None

    def _start(self, variant: str, phase: str, trial, slot: Slot) -> Task:
        attrs = trial.user_attrs
        if "attempt" not in attrs:
            trial.set_user_attr("attempt", 1)
        seed = int(attrs.get("seed", self.study.fixed.train.seed))
        overrides = {**trial.params, "train.seed": seed, "train.epochs": self.max_epochs}
        config = self.study.run_config(variant, overrides)
        name = f"{variant} {phase} #{trial.number}" + (f" seed {seed}" if phase == CONFIRM else "")
        trial.set_user_attr("device", slot.device)
        trial.set_user_attr("coordinator", self.coordinator)
        run_id = self.tracker.start_run(config, name, {
            "phase": phase, "trial": trial.number, "seed": seed, "device": slot.device,
            "device_name": self.device_names.setdefault(slot.device, device_name(slot.device)),
            "coordinator": self.coordinator,
            "attempt": attrs.get("attempt", 1), "optuna_study": optuna_name(self.study, variant, phase),
            **({"retry_of": attrs["retry_of"]} if "retry_of" in attrs else {}),
        })
        trial.set_user_attr("mlflow_run_id", run_id)
        key = f"{variant}/{phase}/{trial.number}"
        self.live[key] = _Live(variant, phase, trial, run_id, time.monotonic())
        self.heartbeat.add(trial._trial_id)
        checkpoints = self.runs_dir / self.study.name / variant / phase / f"trial-{trial.number}"
        return Task(key, config.to_dict(), str(checkpoints), prunable=phase == SEARCH)

    # --- what happened --------------------------------------------------------------------------------
    def on_start(self, task: Task, slot: Slot) -> None:
        live = self.live[task.key]
        self.log(f"{self._clock()} start  {task.key} on {slot.device}{self._params(live.trial.params)}")

    def on_epoch(self, task: Task, epoch: dict) -> bool:
        live = self.live[task.key]
        if live.lost:
            return False
        self.tracker.log_epoch(live.run_id, epoch)
        if live.phase != SEARCH:
            return True

        def report() -> bool:
            try:
                live.trial.report(epoch["val_ppl"], int(epoch["epoch"]))
            except UpdateFinishedTrialError:
                live.lost = True  # failed as stale elsewhere while this machine could not beat: stop it
                return False
            return not live.trial.should_prune()

        return self._patiently(report)

    def on_done(self, task: Task, slot: Slot, outcome: Outcome) -> None:
        live = self.live.pop(task.key)
        self.heartbeat.discard(live.trial._trial_id)
        ostudy = self.studies[live.variant][live.phase]
        seconds = time.monotonic() - live.started
        if outcome.status in ("finished", "pruned") and not live.lost:
            result = outcome.result if outcome.status == "finished" else {"seconds": seconds}
            if outcome.status == "finished":
                attrs = {key: result[key] for key in ("test_ppl", "best_epoch", "seconds")}
                told = self._patiently(lambda: tell_result(ostudy, live.trial, result["best_val_ppl"],
                                                           TrialState.COMPLETE, attrs))
                what = (f"val ppl {result['best_val_ppl']:.2f} (epoch {result['best_epoch']}), "
                        f"test ppl {result['test_ppl']:.2f}")
            else:
                told = self._patiently(lambda: tell_result(ostudy, live.trial, None, TrialState.PRUNED, {}))
                what = "pruned"
            live.lost = not told
            if told:
                self.tracker.finish(live.run_id, outcome.status, result=result)
                self.durations.append(seconds)
        if live.lost:
            what = "discarded: another machine failed this trial as stale while it ran here; its retry counts"
            self.tracker.finish(live.run_id, "failed", reason=what, result={"seconds": seconds})
        elif outcome.status not in ("finished", "pruned"):
            interrupted = self.stopping

            def fail():
                with self.lock():
                    return fail_trial(ostudy, live.trial._trial_id, outcome.reason, self.study.budget.max_retries,
                                      counts=not interrupted)

            retried = self._patiently(fail)
            self.tracker.finish(live.run_id, "interrupted" if interrupted else "failed", reason=outcome.reason,
                                result={"seconds": seconds})
            last_line = outcome.reason.strip().splitlines()[-1] if outcome.reason.strip() else "no reason"
            what = f"{'interrupted' if interrupted else 'FAILED'}: {last_line}" + (
                " (will be retried)" if retried else " (retries used up)" if retried is False else "")
        self.log(f"{self._clock()} {outcome.status:<8} {task.key} on {slot.device} after {seconds:.0f} s: {what}")
        if live.phase == CONFIRM and not self.stopping:
            self._patiently(lambda: self._summarize_confirmation(live.variant))

    def _summarize_confirmation(self, variant: str) -> None:
        confirm = self.studies[variant][CONFIRM]
        c = counts(confirm)
        if c["waiting"] or c["running"]:
            return
        tests = [t.user_attrs["test_ppl"] for t in confirm.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if tests:
            self.tracker.summarize_variant(variant, {
                "confirm_test_ppl_mean": statistics.fmean(tests),
                "confirm_test_ppl_sd": statistics.stdev(tests) if len(tests) > 1 else None,
                "confirm_seeds": len(tests),
            }, {})

    def on_tick(self) -> None:
        if self.shared and time.monotonic() - self.last_sweep >= self.heartbeat.interval:
            self._patiently(self.sweep)
        if time.monotonic() - self.last_summary >= SUMMARY_EVERY:
            self.log(self.summary())

    # --- machines and servers that go away ------------------------------------------------------------
    def sweep(self) -> None:
        """Fail and retry the trials that no coordinator runs any more, and close their MLflow runs.

        On SQLite this coordinator is the only one, so every running trial not in flight here was interrupted
        (counts no attempt). On PostgreSQL a trial belongs to another machine until its heartbeats stop.
        """
        self.last_sweep = time.monotonic()
        if time.monotonic() < self.no_verdicts_until:
            return
        # Our own trials are fresh even if the heartbeat thread could not reach the storage for a while.
        self.heartbeat.beat_all()
        retries = self.study.budget.max_retries
        if self.shared:
            reason = f"stale: no heartbeat for {self.heartbeat.grace} s; the machine or coordinator running it stopped"
        else:
            reason = "interrupted: the coordinator stopped while it ran"
        running_here = {live.trial._trial_id for live in self.live.values()}
        for variant in self.variants:
            for phase in (SEARCH, CONFIRM):
                ostudy = self.studies[variant][phase]
                with self.lock():
                    if self.shared:
                        ended = fail_stale(ostudy, reason, retries)
                    else:
                        ended = []
                        for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                            if t._trial_id not in running_here:
                                fail_trial(ostudy, t._trial_id, reason, retries, counts=False)
                                ended.append(t)
                for frozen in ended:
                    closed = self.tracker.close_trial_runs(optuna_name(self.study, variant, phase), frozen.number,
                                                           "failed" if self.shared else "interrupted", reason)
                    self.log(f"{self._clock()} retry  {variant}/{phase}/{frozen.number} (it ran on "
                             f"{frozen.user_attrs.get('coordinator', 'an unknown coordinator')}): {reason}"
                             + (f"; {closed} MLflow run closed" if closed else ""))

    def _outage(self, err: Exception) -> None:
        """Note that the storage is away; give up once it has been for RECONNECT_SECONDS."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
            self.log(f"{self._clock()} the Optuna storage {redact(self.storage.url)} does not answer "
                     f"({type(err).__name__}); retrying for up to {RECONNECT_SECONDS} s")
        elif now - self.outage_since > RECONNECT_SECONDS:
            raise UserError(
                f"the Optuna storage {redact(self.storage.url)} did not answer for {RECONNECT_SECONDS} s; the trials "
                "running here will be retried by the other machines, or when this command is run again"
            ) from None

    def _patiently(self, step):
        """step(), retried while the storage is away (a server restart), for up to RECONNECT_SECONDS."""
        delay = 1.0
        while True:
            try:
                result = step()
            except STORAGE_ERRORS as err:
                self._outage(err)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
                continue
            if self.outage_since is not None:
                self.log(f"{self._clock()} the Optuna storage answers again after "
                         f"{time.monotonic() - self.outage_since:.0f} s")
                self.outage_since = None
                # Every machine's heartbeats were blocked too: let them beat again before judging any stale.
                self.no_verdicts_until = time.monotonic() + (self.heartbeat.grace or 0)
            return result

    def complete(self) -> bool:
        """Nothing waits or runs anywhere and every confirmation is enqueued (or has nothing to confirm)."""
        return self._patiently(self._complete)

    def _complete(self) -> bool:
        for variant in self.variants:
            if not self.search_settled(variant):
                return False
            confirm = self.studies[variant][CONFIRM]
            c = counts(confirm)
            if c["waiting"] or c["running"]:
                return False
            seeds = self.study.budget.confirm_seeds
            if seeds and not confirm.get_trials(deepcopy=False) and best_params(self.studies[variant][SEARCH]):
                return False
        return True

    def wait_for_others(self) -> None:
        """Nothing to start here: wait a heartbeat while other machines run the last trials, then sweep."""
        running = self._patiently(lambda: sum(counts(self.studies[v][p])["running"]
                                              for v in self.variants for p in (SEARCH, CONFIRM)))
        if running and running != self.waiting_for:
            self.log(f"{self._clock()} waiting for {running} trial{'s' * (running > 1)} running on other machines "
                     "(any whose machine stops is retried here)")
        self.waiting_for = running
        time.sleep(min(self.heartbeat.interval or 1, POLL_SECONDS))
        self._patiently(self.sweep)

    # --- the live view --------------------------------------------------------------------------------
    def _clock(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"[{elapsed // 3600:d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}]"

    @staticmethod
    def _params(params: dict) -> str:
        return (" with " + ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in params.items())) if params else ""

    def remaining(self) -> int:
        """Trials still to start, on any machine."""
        left = 0
        for v in self.variants:
            left += counts(self.studies[v][SEARCH])["waiting"]
            confirm = self.studies[v][CONFIRM]
            if confirm.get_trials(deepcopy=False):
                left += counts(confirm)["waiting"]
            elif v not in self.nothing_to_confirm:
                left += len(self.study.budget.confirm_seeds)
        return left

    def summary(self) -> str:
        """Trials done, running, pruned and failed per variant, best so far, time left."""
        return self._patiently(self._summary)

    def _summary(self) -> str:
        self.last_summary = time.monotonic()
        lines = [f"{self._clock()} {self.study.name}: {len(self.live)} running here"]
        lines.append(f"  {'variant':<18} {'search: done/pruned/failed/running of N':<40} {'best val ppl':>12}   confirm")
        for v in self.variants:
            s, c = counts(self.studies[v][SEARCH]), counts(self.studies[v][CONFIRM])
            best = best_params(self.studies[v][SEARCH])
            seeds = len(self.study.budget.confirm_seeds)
            lines.append(
                f"  {v:<18} {s['finished']:>3} / {s['pruned']:>3} / {s['failed'] + s['retried']:>3} / {s['running']:>2}"
                f" of {trials_for(self.study, v):<17} {best[1] if best else float('nan'):>12.2f}   "
                f"{c['finished']}/{seeds}" + (f" ({c['running']} running)" if c["running"] else "")
            )
        left = self.remaining()
        if self.durations:
            eta = statistics.fmean(self.durations) * (left + len(self.live) / 2) / self.n_slots
            lines.append(f"  {left} trials to start; about {eta / 60:.0f} min left at this machine's pace")
        else:
            lines.append(f"  {left} trials to start")
        return "\n".join(lines)


def run_ablation(study: StudyConfig, *, storage: str, tracking_uri: str, slots: list[Slot], runs_dir: Path,
                 heartbeat: int = HEARTBEAT, log=print) -> Ablation:
    """Run (or resume) the study on this machine's slots until nothing is left on any machine."""
    corpus = load_corpus(study.corpus, log=log)  # a corpus problem is reported before any server is contacted
    check_tracking(tracking_uri)
    with LocalLock(storage):
        optuna_storage = open_storage(storage, heartbeat)
        md5 = ",".join(f"{split}={digest}" for split, digest in sorted(corpus.md5.items()))
        tracker = Tracker(tracking_uri, study, {
            "study": study.name, "study_digest": study.digest, "git_commit": git_commit(), "corpus": corpus.name,
            "corpus_md5": md5, "versions": package_versions(),
        })
        ablation = Ablation(study, optuna_storage, tracker, runs_dir, log)
        if not ablation.shared:
            ablation.sweep()  # the previous coordinator's trials, interrupted when it stopped
            closed = tracker.close_stale_runs()  # and MLflow runs it started before their trial was recorded
            if closed:
                log(f"resuming: {closed} more MLflow runs marked interrupted")
        log(f"{study.name}: {len(ablation.variants)} variants, {study.budget.trials} trials each "
            f"(max {ablation.max_epochs} epochs), {len(study.budget.confirm_seeds)} confirmation seeds; "
            f"{describe_slots(slots)}" + (f"; shared with other machines through {redact(storage)}"
                                          if ablation.shared else ""))
        scheduler = Scheduler(slots)
        ablation.n_slots = len(slots)
        with ablation.heartbeat:
            try:
                while True:
                    scheduler.run(ablation)
                    if ablation.complete():
                        break
                    ablation.wait_for_others()
            except KeyboardInterrupt:
                ablation.stopping = True
                scheduler.stop(ablation, "interrupted (Ctrl-C)")
                raise
        log(ablation.summary())
        return ablation
