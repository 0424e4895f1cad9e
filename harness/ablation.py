"""Runs an ablation study end to end: search each variant's rates, then confirm the best over seeds.

    python -m harness ablate studies/ablation.toml [--storage URL] [--tracking-uri URL] [--devices ...]

Every variant gets the same trial budget. The coordinator hands trials to free device slots (search trials
first, a variant's confirmation seeds as soon as its search is settled), writes Optuna and MLflow alone,
and prints a live view. Re-running the same command resumes: finished trials are kept, interrupted ones
are retried, nothing is logged twice.
"""

import fcntl
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import TrialState

from harness.config import StudyConfig
from harness.data import load_corpus
from harness.errors import UserError
from harness.scheduler import Outcome, Scheduler, Slot, Task, describe_slots, device_name
from harness.search import (
    CONFIRM, SEARCH, best_params, counts, fail_interrupted, fail_trial, open_study, optuna_name, search_space,
    settled, trials_for,
)
from harness.tracking import Tracker, package_versions

SUMMARY_EVERY = 120.0  # seconds between live-view tables


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
    """A trial in flight."""

    variant: str
    phase: str
    trial: object  # optuna.trial.Trial
    run_id: str
    started: float


class Ablation:
    """The TaskSource of a study: decides what runs next and records what happened."""

    def __init__(self, study: StudyConfig, storage, tracker: Tracker, runs_dir: Path, log=print):
        self.study, self.tracker, self.runs_dir, self.log = study, tracker, runs_dir, log
        self.max_epochs = study.budget.epochs or study.fixed.train.epochs
        self.variants = list(study.variants)
        self.studies = {
            v: {phase: open_study(storage, study, v, phase, self.max_epochs) for phase in (SEARCH, CONFIRM)}
            for v in self.variants
        }
        self.live: dict[str, _Live] = {}
        self.device_names: dict[str, str] = {}
        self.durations: list[float] = []
        self.stopping = False
        self.n_slots = 1
        self.started = time.monotonic()
        self.last_summary = time.monotonic()

    # --- what runs next -------------------------------------------------------------------------------
    def _search_left(self, variant: str) -> int:
        c = counts(self.studies[variant][SEARCH])
        return trials_for(self.study, variant) - settled(c) - c["running"]

    def search_settled(self, variant: str) -> bool:
        c = counts(self.studies[variant][SEARCH])
        return settled(c) >= trials_for(self.study, variant) and c["running"] == 0

    def _enqueue_confirmation(self, variant: str) -> None:
        confirm = self.studies[variant][CONFIRM]
        if confirm.get_trials(deepcopy=False) or not self.study.budget.confirm_seeds:
            return
        best = best_params(self.studies[variant][SEARCH])
        if best is None:
            self.log(f"{variant}: no search trial finished, so there is nothing to confirm")
            return
        params, value = best
        for seed in self.study.budget.confirm_seeds:
            confirm.enqueue_trial(params, user_attrs={"seed": seed, "attempt": 1, "search_best_val_ppl": value})
        self.tracker.summarize_variant(variant, {"search_best_val_ppl": value},
                                       {f"best.{k}": f"{v:.4g}" for k, v in params.items()})

    def next_task(self, slot: Slot) -> Task | None:
        """Search trials first (the variant with the fewest started), then confirmation seeds."""
        needing = [v for v in self.variants if self._search_left(v) > 0]
        if needing:
            variant = max(needing, key=self._search_left)
            return self._ask(variant, SEARCH, slot)
        for variant in self.variants:
            if self.search_settled(variant):
                self._enqueue_confirmation(variant)
                if counts(self.studies[variant][CONFIRM])["waiting"]:
                    return self._ask(variant, CONFIRM, slot)
        return None

    def _ask(self, variant: str, phase: str, slot: Slot) -> Task:
        ostudy = self.studies[variant][phase]
        trial = ostudy.ask(fixed_distributions=search_space(self.study, variant))
        attrs = trial.user_attrs
        if "attempt" not in attrs:
            trial.set_user_attr("attempt", 1)
        seed = int(attrs.get("seed", self.study.fixed.train.seed))
        overrides = {**trial.params, "train.seed": seed, "train.epochs": self.max_epochs}
        config = self.study.run_config(variant, overrides)
        name = f"{variant} {phase} #{trial.number}" + (f" seed {seed}" if phase == CONFIRM else "")
        run_id = self.tracker.start_run(config, name, {
            "phase": phase, "trial": trial.number, "seed": seed, "device": slot.device,
            "device_name": self.device_names.setdefault(slot.device, device_name(slot.device)),
            "attempt": attrs.get("attempt", 1), "optuna_study": optuna_name(self.study, variant, phase),
            **({"retry_of": attrs["retry_of"]} if "retry_of" in attrs else {}),
        })
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("device", slot.device)
        key = f"{variant}/{phase}/{trial.number}"
        self.live[key] = _Live(variant, phase, trial, run_id, time.monotonic())
        checkpoints = self.runs_dir / self.study.name / variant / phase / f"trial-{trial.number}"
        return Task(key, config.to_dict(), str(checkpoints), prunable=phase == SEARCH)

    # --- what happened --------------------------------------------------------------------------------
    def on_start(self, task: Task, slot: Slot) -> None:
        live = self.live[task.key]
        self.log(f"{self._clock()} start  {task.key} on {slot.device}{self._params(live.trial.params)}")

    def on_epoch(self, task: Task, epoch: dict) -> bool:
        live = self.live[task.key]
        self.tracker.log_epoch(live.run_id, epoch)
        if live.phase != SEARCH:
            return True
        live.trial.report(epoch["val_ppl"], int(epoch["epoch"]))
        return not live.trial.should_prune()

    def on_done(self, task: Task, slot: Slot, outcome: Outcome) -> None:
        live = self.live.pop(task.key)
        ostudy = self.studies[live.variant][live.phase]
        seconds = time.monotonic() - live.started
        if outcome.status == "finished":
            result = outcome.result
            for key in ("test_ppl", "best_epoch", "seconds"):
                live.trial.set_user_attr(key, result[key])
            ostudy.tell(live.trial, result["best_val_ppl"])
            self.tracker.finish(live.run_id, "finished", result=result)
            self.durations.append(seconds)
            what = f"val ppl {result['best_val_ppl']:.2f} (epoch {result['best_epoch']}), test ppl {result['test_ppl']:.2f}"
        elif outcome.status == "pruned":
            ostudy.tell(live.trial, state=TrialState.PRUNED)
            self.tracker.finish(live.run_id, "pruned", result={"seconds": seconds})
            self.durations.append(seconds)
            what = "pruned"
        else:
            interrupted = self.stopping
            retried = fail_trial(ostudy, live.trial._trial_id, outcome.reason, self.study.budget.max_retries,
                                 counts=not interrupted)
            self.tracker.finish(live.run_id, "interrupted" if interrupted else "failed", reason=outcome.reason,
                                result={"seconds": seconds})
            last_line = outcome.reason.strip().splitlines()[-1] if outcome.reason.strip() else "no reason"
            what = f"{'interrupted' if interrupted else 'FAILED'}: {last_line}" + (
                " (will be retried)" if retried else " (retries used up)")
        self.log(f"{self._clock()} {outcome.status:<8} {task.key} on {slot.device} after {seconds:.0f} s: {what}")
        if live.phase == CONFIRM and not self.stopping:
            self._summarize_confirmation(live.variant)

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
        if time.monotonic() - self.last_summary >= SUMMARY_EVERY:
            self.log(self.summary())

    # --- the live view --------------------------------------------------------------------------------
    def _clock(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"[{elapsed // 3600:d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}]"

    @staticmethod
    def _params(params: dict) -> str:
        return (" with " + ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in params.items())) if params else ""

    def remaining(self) -> int:
        """Trials still to run (not counting those in flight)."""
        left = 0
        for v in self.variants:
            left += max(0, self._search_left(v))
            confirm = self.studies[v][CONFIRM]
            if confirm.get_trials(deepcopy=False):
                left += counts(confirm)["waiting"]
            else:
                left += len(self.study.budget.confirm_seeds)
        return left

    def summary(self) -> str:
        """Trials done, running, pruned and failed per variant, best so far, time left."""
        self.last_summary = time.monotonic()
        lines = [f"{self._clock()} {self.study.name}: {len(self.live)} running"]
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
            lines.append(f"  {left} trials to start; about {eta / 60:.0f} min left at the pace so far")
        else:
            lines.append(f"  {left} trials to start")
        return "\n".join(lines)


class _StorageLock:
    """One coordinator per local SQLite storage: a second one would double-run trials."""

    def __init__(self, storage: str):
        self.path = Path(storage[len("sqlite:///"):] + ".lock") if storage.startswith("sqlite:///") else None

    def __enter__(self):
        if self.path is None:
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another ablation is already running on {self.path.with_suffix('')}; wait for it, or give this "
                "one its own --storage and --tracking-uri"
            ) from None
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.file.close()
        return False


def run_ablation(study: StudyConfig, *, storage: str, tracking_uri: str, slots: list[Slot], runs_dir: Path,
                 log=print) -> Ablation:
    """Run (or resume) the whole study on the slots; returns the finished Ablation."""
    with _StorageLock(storage):
        corpus = load_corpus(study.corpus, log=log)
        md5 = ",".join(f"{split}={digest}" for split, digest in sorted(corpus.md5.items()))
        tracker = Tracker(tracking_uri, study, {
            "study": study.name, "study_digest": study.digest, "git_commit": git_commit(), "corpus": corpus.name,
            "corpus_md5": md5, "versions": package_versions(),
        })
        ablation = Ablation(study, storage, tracker, runs_dir, log)
        stale = sum(len(fail_interrupted(ablation.studies[v][p], study.budget.max_retries))
                    for v in ablation.variants for p in (SEARCH, CONFIRM))
        closed = tracker.close_stale_runs()
        if stale or closed:
            log(f"resuming: {stale} interrupted trials will be retried ({closed} MLflow runs marked interrupted)")
        log(f"{study.name}: {len(ablation.variants)} variants, {study.budget.trials} trials each "
            f"(max {ablation.max_epochs} epochs), {len(study.budget.confirm_seeds)} confirmation seeds; "
            f"{describe_slots(slots)}")
        scheduler = Scheduler(slots)
        ablation.n_slots = len(slots)
        try:
            scheduler.run(ablation)
        except KeyboardInterrupt:
            ablation.stopping = True
            scheduler.stop(ablation, "interrupted (Ctrl-C)")
            raise
        log(ablation.summary())
        return ablation
