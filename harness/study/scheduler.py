"""Device slots and the process-per-trial scheduler: a slot (a GPU, or a share of the CPU cores) runs one trial at a
time in its own process (harness.study.processes); the next starts the moment any slot frees. Workers send each
epoch's EpochResult and wait for keep-going or prune; one that crashes or is killed fails only its own trial.
joblib gives the cgroup-aware core count; its process pools are not used (one dead worker breaks the pool).
"""

import dataclasses
import signal
import traceback
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import joblib

from harness.config import RunConfig
from harness.errors import UserError
from harness.study.processes import Child, ready
from harness.study.rules import RunState
from harness.study.spec import StudyIdentity

if TYPE_CHECKING:  # annotations only
    from harness.train import EpochResult, RunResult


@dataclass(frozen=True)
class Slot:
    """A place a trial can run: a device and the CPU threads the trial may use."""

    index: int
    device: str  # "cpu" or "cuda:N"
    threads: int


@dataclass(frozen=True)
class Task:
    """One training run to schedule."""

    key: str  # unique and readable, e.g. "awd/search/3"
    config: RunConfig
    checkpoint_dir: str
    prunable: bool = True  # a search trial: the coordinator may stop it after any epoch
    evaluate_test: bool = True  # only confirmation runs see the test split
    resume: bool = True  # False: the task is new, so checkpoints already in its folder are another run's
    identity: StudyIdentity | None = None  # the study's corpus MD5s: a trial loading other text stops the study
    # A retried trial: the checkpoint folders of the attempts it replaces, newest first. It continues from the
    # newest checkpoint there (its folder, empty until then, gets a copy), or starts over saying why.
    resume_from: tuple = ()


# The watchdog's automatic limit: no epoch for HUNG_FACTOR x the slowest epoch seen (or expected), at least
# HUNG_FLOOR seconds. Generous: killing a healthy trial costs its epoch in flight and an attempt.
HUNG_FACTOR, HUNG_FLOOR = 5.0, 600.0


def hung_limit(hung_after: float, slowest_epoch: float | None) -> float | None:
    """Seconds without an epoch after which a trial counts as hung: `hung_after` (budget.hung_after) when set, else
    HUNG_FACTOR x the slowest epoch (None while no epoch time is known: nothing is judged yet)."""
    if hung_after:
        return hung_after
    return None if slowest_epoch is None else max(HUNG_FLOOR, HUNG_FACTOR * slowest_epoch)


MAX_PER_DEVICE = 256  # trials at once per device (each is a process): more is a typo, not a plan

# Why a task failed: the trial itself (it diverged, crashed, ran out of memory: a retry may succeed), or
# something outside it that every trial here would meet (the corpus, the checkpoint folder, a full disk).
TRIAL, ENVIRONMENT = "trial", "environment"


@dataclass(frozen=True)
class Outcome:
    """How a task ended: FINISHED (with the run's RunResult), PRUNED, or FAILED (with the reason and its cause)."""

    state: RunState
    result: "RunResult | None" = None
    reason: str = ""
    cause: str = TRIAL  # of a failure: TRIAL or ENVIRONMENT


class TaskSource(Protocol):
    """What the scheduler asks of a study: the next task, and what to do with reports."""

    def next_task(self, slot: Slot) -> Task | None: ...

    def on_start(self, task: Task, slot: Slot) -> None: ...

    def on_begin(self, task: Task, restored: tuple, notes: list) -> None: ...  # epochs restored, why started over

    def on_epoch(self, task: Task, epoch: "EpochResult") -> bool: ...  # False = prune

    def on_done(self, task: Task, slot: Slot, outcome: Outcome) -> None: ...

    def on_tick(self) -> None: ...


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_name(device: str) -> str:
    """What a slot's device is, for the record: the GPU's name, or the CPU model."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "cpu"


def discover_slots(devices: str | None = None, per_device: int | None = None) -> list[Slot]:
    """GPUs visible to this process (CUDA_VISIBLE_DEVICES respected), else CPU workers sharing the cores.

    `devices` is "cpu", "cuda" or a comma list like "cuda:0,cuda:1"; `per_device` runs that many trials at
    once on each GPU, or sets the number of CPU workers.
    """
    cores = joblib.cpu_count()
    if per_device is not None and per_device < 1:
        raise UserError(f"--trials-per-device {per_device}: must be at least 1")
    if per_device is not None and per_device > MAX_PER_DEVICE:
        raise UserError(f"--trials-per-device {per_device}: must be at most {MAX_PER_DEVICE} (each trial is a process)")
    if devices in (None, "", "auto"):
        names = [f"cuda:{i}" for i in range(_cuda_count())] or ["cpu"]
    elif devices == "cuda":
        names = [f"cuda:{i}" for i in range(_cuda_count())]
        if not names:
            raise UserError("--devices cuda: no CUDA GPU is visible here; use --devices cpu")
    else:
        names = [d.strip() for d in devices.split(",") if d.strip()]
        if not names:
            raise UserError(f"--devices {devices!r}: names no device; use cpu, cuda or cuda:0,cuda:1")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"--devices {devices}: {', '.join(twice)} named twice; use --trials-per-device to run "
                            "several trials at once on one device")
    for name in names:
        if name != "cpu" and not (name.startswith("cuda:") and name[5:].isdigit()):
            raise UserError(f"--devices: {name!r} is not cpu, cuda or cuda:N")
        if name.startswith("cuda:") and int(name[5:]) >= _cuda_count():
            raise UserError(f"--devices: {name} is not visible here ({_cuda_count()} GPUs); see CUDA_VISIBLE_DEVICES")
    if names == ["cpu"]:
        workers = per_device or cores
        return [Slot(i, "cpu", max(1, cores // workers)) for i in range(workers)]
    per = per_device or 1
    threads = max(1, cores // (len(names) * per))
    return [Slot(i, name, threads) for i, name in enumerate(n for n in names for _ in range(per))]


def _worker(task: Task, slot: Slot, conn) -> None:
    """Entry point of a trial process: train, send each epoch's EpochResult, obey prune answers, send the end."""
    # The coordinator handles Ctrl-C for everyone and stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from harness.data import load_corpus
    from harness.train import TrainingDiverged, adopt_checkpoints, train_model

    class Pruned(Exception):
        pass

    def on_epoch(epoch):
        conn.send(("epoch", epoch))
        if not conn.recv():
            raise Pruned

    try:
        torch.set_num_threads(slot.threads)
        if slot.device.startswith("cuda"):
            torch.cuda.set_device(slot.device)
        corpus = load_corpus(task.config.corpus, fetch_missing=False, log=lambda *a: None)
        if task.identity is not None:  # the corpus edited since the study started: no run may train on it
            problem = dataclasses.replace(task.identity, corpus_md5=corpus.md5).mismatch(task.identity.as_attrs())
            if problem:
                raise UserError(problem)
        notes = []  # why a retried trial starts over rather than continuing (one line each)
        if task.resume_from:
            note = adopt_checkpoints(Path(task.checkpoint_dir), [Path(p) for p in task.resume_from])
            notes += [note] if note else []
        result = train_model(task.config, corpus, device=slot.device, checkpoint_dir=Path(task.checkpoint_dir),
                             on_epoch=on_epoch, progress=False, evaluate_test=task.evaluate_test,
                             resume=task.resume or bool(task.resume_from),
                             start_over=notes.append if task.resume_from else None,
                             on_begin=lambda restored: conn.send(("begin", (restored, notes))))
        conn.send((RunState.FINISHED, result.summary()))
    except Pruned:
        conn.send((RunState.PRUNED, None))
    except Exception as err:  # the trial fails with its reason; the other workers go on
        # A UserError here (the corpus, a checkpoint that cannot be written or is another run's) is not the
        # trial's doing: every other trial on this machine would meet it too.
        cause = ENVIRONMENT if isinstance(err, UserError) else TRIAL
        known = isinstance(err, (TrainingDiverged, UserError))
        conn.send((RunState.FAILED, {"reason": str(err) if known else traceback.format_exc(limit=6), "cause": cause}))
    finally:
        conn.close()


@dataclass
class RunningTask:
    """A task in its worker process on a slot, and how it ended once known."""

    task: Task
    slot: Slot
    child: Child
    outcome: Outcome | None = None
    progress: float = field(default_factory=time.monotonic)  # when it last started, began or ended an epoch


class Scheduler:
    """Runs the tasks a TaskSource hands out on the slots until it has no more and none is running."""

    def __init__(self, slots: list[Slot], tick_seconds: float = 1.0, *, hung_after: float = 0,
                 expected_epoch: float | None = None):
        self.slots = slots
        self.tick_seconds = tick_seconds
        self.running: dict[int, RunningTask] = {}  # slot index -> its task
        # The watchdog: budget.hung_after, else a multiple of the slowest epoch measured here (until one is, the
        # plan's estimate of the slowest, when there is one).
        self.hung_after, self.slowest_epoch = hung_after, expected_epoch

    def run(self, source: TaskSource) -> None:
        """Schedule until the source has no task left and nothing runs (Ctrl-C: the caller calls stop)."""
        while True:
            self._fill(source)
            if not self.running:
                return
            self._wait_and_handle(source)
            source.on_tick()

    def stop(self, source: TaskSource, reason: str) -> None:
        """Stop every running worker and report its task failed with the reason."""
        for run in self.running.values():
            if run.child.alive:
                run.child.process.terminate()  # all at once, then each gets its grace period below
        for index, run in list(self.running.items()):
            run.child.stop()
            del self.running[index]
            source.on_done(run.task, run.slot, Outcome(RunState.FAILED, reason=reason))

    def _fill(self, source: TaskSource) -> None:
        for slot in self.slots:
            if slot.index in self.running:
                continue
            task = source.next_task(slot)
            if task is None:
                continue
            self.running[slot.index] = RunningTask(task, slot, Child(_worker, (task, slot), f"slot{slot.index}"))
            source.on_start(task, slot)

    def _wait_and_handle(self, source: TaskSource) -> None:
        for run in ready([run.child for run in self.running.values()], self.tick_seconds):
            self._read(self._run_of(run), source)
        limit = hung_limit(self.hung_after, self.slowest_epoch)
        for index, run in list(self.running.items()):
            if run.child.alive and run.outcome is None and limit and time.monotonic() - run.progress > limit:
                self._kill_hung(run, limit)
            if run.child.alive and run.outcome is None:
                continue
            run.child.process.join(timeout=30)
            while run.outcome is None and self._read(run, source):
                pass  # a final message may trail the exit
            if run.outcome is None:
                run.outcome = Outcome(RunState.FAILED,
                                      reason=f"worker process died ({run.child.death()}) on {run.slot.device}")
            run.child.close()
            del self.running[index]
            source.on_done(run.task, run.slot, run.outcome)

    def _kill_hung(self, run: RunningTask, limit: float) -> None:
        """The watchdog's verdict: no epoch for `limit` seconds. SIGKILL, which also ends a stopped process."""
        why = (f"budget.hung_after = {self.hung_after:g}" if self.hung_after else
               f"{HUNG_FACTOR:g} x the slowest epoch here, {self.slowest_epoch:.0f} s, at least {HUNG_FLOOR:.0f} s")
        run.child.process.kill()
        run.outcome = Outcome(RunState.FAILED, reason=f"hung: no epoch for {time.monotonic() - run.progress:.0f} s "
                                                      f"(limit {limit:.0f} s: {why}) on {run.slot.device}; killed")

    def _run_of(self, child: Child) -> RunningTask:
        return next(run for run in self.running.values() if run.child is child)

    def _read(self, run: RunningTask, source: TaskSource) -> bool:
        """Handle one message if one waits; False when none does (or the pipe is closed)."""
        got, message = run.child.receive()
        if not got:
            return False
        kind, payload = message
        if kind in ("begin", "epoch"):
            now = time.monotonic()
            if kind == "epoch":  # a whole epoch since the run began or its last epoch
                self.slowest_epoch = max(self.slowest_epoch or 0.0, now - run.progress)
            run.progress = now
        if kind == "begin":
            source.on_begin(run.task, *payload)
        elif kind == "epoch":
            keep_going = source.on_epoch(run.task, payload)
            run.child.send(bool(keep_going) or not run.task.prunable)
        elif kind == RunState.FINISHED:
            run.outcome = Outcome(RunState.FINISHED, result=payload)
        elif kind == RunState.PRUNED:
            run.outcome = Outcome(RunState.PRUNED)
        else:
            run.outcome = Outcome(RunState.FAILED, reason=payload["reason"], cause=payload["cause"])
        return True


def describe_slots(slots: list[Slot]) -> str:
    """One line for the user: which slots the study will use."""
    each = ", ".join(f"{s.device} x{s.threads} thread{'s' * (s.threads > 1)}" for s in slots)
    return f"{len(slots)} slot{'s' * (len(slots) > 1)}: {each}"
