"""Cost before running: the runs, epochs, device-hours and wall time of a study on the slots at hand, from a short
calibration (one process per slot, all at once, each timing a few real training steps, a validation and a test
pass), list-scheduled with the coordinator's policy. Pruning's saving is a stated assumption, never folded in.

    python -m harness plan studies/paper-ptb.toml --seconds-per-epoch awd=65 --slots 32
"""

import json
import math
import shutil
import signal
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from harness.config import RunConfig
from harness.errors import UserError
from harness.study.processes import Child, ready
from harness.study.rules import CONFIRM, SEARCH, count_runs, pick_order
from harness.study.scheduler import Slot, describe_slots
from harness.study.spec import StudyConfig

CALIBRATION_SECONDS = 60.0  # calibration stops here once some variant is measured (the rest: their mean)
FIRST_WINDOWS = 3  # BPTT windows per probe epoch before a process knows its speed
MAX_WINDOWS = 24
PROBE_SECONDS = 1.0  # training seconds per probe epoch aimed at, once the speed is known
SAMPLES_PER_VARIANT = 3  # a calibration process exits after this many rounds, whatever happens to its parent
REDUCTION_FACTOR = 3  # optuna.pruners.HyperbandPruner's default, which harness.study.ledger.writer.make_pruner keeps


# --- pruning: an assumption, stated ---------------------------------------------------------------------
@dataclass(frozen=True)
class PruningAssumption:
    """What the estimate assumes the pruner saves: the first `full_trials` search trials of each variant run
    every epoch, each later one `expected_epochs` on average."""

    text: str
    full_trials: int
    expected_epochs: float

    def search_epochs(self, trials: int, epochs: int) -> list[float]:
        """Expected epochs of each search trial of a variant with this many trials, in trial order."""
        return [float(epochs) if i < self.full_trials else self.expected_epochs for i in range(trials)]


def _halving_epochs(first_rung: int, epochs: int) -> float:
    """Expected epochs of a trial whose rungs are first_rung * 3^k, when each rung keeps a third of the trials."""
    spent, survivors, previous, rung = 0.0, 1.0, 0, first_rung
    while rung < epochs:
        spent += survivors * (rung - previous)
        survivors, previous, rung = survivors / REDUCTION_FACTOR, rung, rung * REDUCTION_FACTOR
    return spent + survivors * (epochs - previous)


def pruning_assumption(study: StudyConfig) -> PruningAssumption:
    """The saving assumed from the study's pruner and warm-up (harness.study.ledger.writer.make_pruner builds the
    pruner)."""
    epochs, budget = study.max_epochs, study.budget
    first = budget.warmup_epochs + 1  # the first epoch at which a trial can be pruned
    if budget.pruner == "none":
        return PruningAssumption("pruner = none: every search trial runs all its epochs", 0, float(epochs))
    if first >= epochs:
        return PruningAssumption(f"the {budget.warmup_epochs}-epoch warm-up covers the runs' {epochs} epochs: "
                                 "nothing can be pruned", 0, float(epochs))
    if budget.pruner == "median":
        expected = (first + epochs) / 2
        return PruningAssumption(
            f"median pruner: the first {budget.pruner_startup_trials} search trials of each variant run all {epochs} "
            f"epochs; each later one is assumed stopped at epoch {first} (the first after the {budget.warmup_epochs}-"
            f"epoch warm-up) with probability 1/2, {expected:.1f} epochs on average",
            budget.pruner_startup_trials, expected)
    # Hyperband as Optuna runs it: floor(log_3(max / min)) + 1 brackets, bracket b's rungs at min * 3^(b + k); the
    # brackets are sized as in Li et al. 2018 (Hyperband, Algorithm 1): n_s = ceil(brackets / (s + 1) * 3^s).
    brackets = math.floor(math.log(epochs / first, REDUCTION_FACTOR)) + 1
    sizes = [math.ceil(brackets * REDUCTION_FACTOR ** s / (s + 1)) for s in reversed(range(brackets))]
    expected = sum(n * _halving_epochs(first * REDUCTION_FACTOR ** b, epochs) for b, n in enumerate(sizes)) / sum(sizes)
    return PruningAssumption(
        f"Hyperband: {brackets} brackets (trials in the ratio {':'.join(map(str, sizes))}) with rungs from epoch "
        f"{first}, each rung assumed to keep a third of the trials: {expected:.0f} of {epochs} epochs per search "
        "trial on average", 0, expected)


# --- the schedule ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScheduledRun:
    """One run placed on a slot by simulate_schedule (seconds from the study's start)."""

    variant: str
    phase: str
    slot: int
    start: float
    end: float


@dataclass(frozen=True)
class Schedule:
    """The runs of a study as list scheduling places them."""

    runs: tuple

    @property
    def wall_seconds(self) -> float:
        return max((run.end for run in self.runs), default=0.0)

    @property
    def busy_seconds(self) -> float:
        """Device time: the sum of the runs' durations."""
        return sum(run.end - run.start for run in self.runs)


def simulate_schedule(search: dict, confirm: dict, n_slots: int) -> Schedule:
    """List-schedule runs of known durations (variant -> seconds of each run) on n identical slots.

    The coordinator's policy, rules.pick_order: whenever slots are free, each (in index order) takes the first
    run it offers, a confirmation run only once its variant's search has settled (none waiting or running); a
    slot with nothing to take idles until the next run ends.
    """
    if n_slots < 1:
        raise ValueError(f"n_slots = {n_slots}: need at least one slot")
    variants = list(dict.fromkeys([*search, *confirm]))
    waiting = {v: list(search.get(v, ())) for v in variants}
    confirming = {v: list(confirm.get(v, ())) for v in variants}
    searching = dict.fromkeys(variants, 0)  # search runs in flight per variant
    busy: dict[int, ScheduledRun] = {}
    done, now = [], 0.0

    def next_run():
        for v, phase in pick_order(variants, {v: len(runs) for v, runs in waiting.items()}):
            if phase == SEARCH and waiting[v]:
                return v, SEARCH, waiting[v].pop(0)
            if phase == CONFIRM and not waiting[v] and not searching[v] and confirming[v]:
                return v, CONFIRM, confirming[v].pop(0)
        return None

    while True:
        for slot in range(n_slots):
            if slot in busy or (taken := next_run()) is None:
                continue
            variant, phase, seconds = taken
            busy[slot] = ScheduledRun(variant, phase, slot, now, now + seconds)
            searching[variant] += phase == SEARCH
        if not busy:
            break
        now = min(run.end for run in busy.values())
        for slot in [s for s, run in busy.items() if run.end <= now]:
            run = busy.pop(slot)
            done.append(run)
            searching[run.variant] -= run.phase == SEARCH
    return Schedule(tuple(done))


# --- calibration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Rates measured on the slots at hand, all of them busy at once; seconds throughout."""

    slots: str  # what was measured, e.g. "2 slots: cpu x1 thread, cpu x1 thread"
    device: str  # "cpu" or "cuda"
    train_seconds_per_token: dict  # variant -> seconds per training token (forward, backward, clip, step)
    measured: tuple  # the variants timed; any other is set to their mean
    valid_seconds_per_token: float  # evaluate() at eval_batch_size
    test_seconds_per_token: float  # evaluate() at test_batch_size
    epoch_extra_seconds: float  # per epoch, beyond training and validation: checkpoints, bookkeeping
    startup_seconds: float  # per run: the trial process's start and imports
    corpus_seconds: float  # per run: the corpus from its cache
    setup_seconds: float  # per run: model and data onto the device, first-epoch warm-up
    seconds: float  # how long the calibration took

    @property
    def overhead_seconds(self) -> float:
        """What every run pays whatever its epochs."""
        return self.startup_seconds + self.corpus_seconds + self.setup_seconds


def _eval_windows(windows: int) -> int:
    """BPTT windows of the validation and test slices a probe times, beside `windows` of training."""
    return max(1, windows // 2)


def _windows_config(study: StudyConfig, variant: str, windows: int, corpus) -> RunConfig:
    """The variant's run for 2 epochs on `windows` BPTT windows of training and half as many of validation
    (fewer where the study's slice or the corpus is shorter)."""
    recipe = study.fixed.train
    train_tokens = recipe.batch_size * (windows * recipe.bptt + 1)  # + the row that is only a target
    valid_tokens = recipe.eval_batch_size * (_eval_windows(windows) * recipe.bptt + 1)
    return study.run_config(variant, {
        "train.epochs": 2,
        "train.train_tokens": min(train_tokens, recipe.train_tokens or train_tokens, len(corpus.train)),
        "train.valid_tokens": min(valid_tokens, recipe.valid_tokens or valid_tokens, len(corpus.valid)),
    })


def _timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _probe(study: StudyConfig, variant: str, corpus, device: str, folder: Path, windows: int) -> dict:
    """Two epochs of the variant on a slice (the first warms up), then a timed validation and test pass."""
    from harness.data import batchify
    from harness.model import AWDLSTM
    from harness.train import evaluate, train_model

    config = _windows_config(study, variant, windows, corpus)
    recipe = config.train
    stamps = []
    started = time.perf_counter()
    result = train_model(config, corpus, device=device, checkpoint_dir=folder, progress=False, evaluate_test=False,
                         on_epoch=lambda epoch: stamps.append(time.perf_counter()))
    ended = time.perf_counter()
    warm = result.epochs[1]
    epoch_wall = stamps[1] - stamps[0]  # training, validation, checkpoints of the warm epoch
    # Validation and test cost the same whatever the weights, so a fresh model of the variant stands in.
    model = AWDLSTM(corpus.vocab_size, config.model, config.dropout).to(device)
    valid = batchify(corpus.valid[: recipe.valid_tokens], recipe.eval_batch_size).to(device)  # (L, B)
    valid_seconds = _timed(lambda: evaluate(model, valid, recipe.bptt), device)
    test_tokens = recipe.test_batch_size * (_eval_windows(windows) * recipe.bptt + 1)
    test = batchify(corpus.test[:test_tokens], recipe.test_batch_size).to(device)
    evaluate(model, test[: recipe.bptt + 1], recipe.bptt)  # warm-up: the test batch size is a new shape
    test_seconds = _timed(lambda: evaluate(model, test, recipe.bptt), device)
    tokens = warm.tokens_per_s * warm.epoch_seconds
    return {
        "variant": variant,
        "train_seconds_per_token": 1 / warm.tokens_per_s,
        "window_seconds": warm.epoch_seconds * recipe.batch_size * recipe.bptt / tokens,
        "valid_seconds_per_token": valid_seconds / ((valid.size(0) - 1) * valid.size(1)),
        "test_seconds_per_token": test_seconds / ((test.size(0) - 1) * test.size(1)),
        "epoch_extra": max(0.0, epoch_wall - warm.epoch_seconds - valid_seconds),
        # The first epoch did the warm epoch's work plus the run's set-up; what follows the last epoch too.
        "setup": max(0.0, stamps[0] - started - epoch_wall) + (ended - stamps[1]),
    }


def _exit(signum, frame):
    raise SystemExit(0)


def _calibration_worker(study: StudyConfig, variants: list, slot: Slot, folder: str, conn) -> None:
    """A calibration process on one slot: starts like a trial process, then probes its variants in turn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends its processes
    signal.signal(signal.SIGTERM, _exit)  # how the parent ends it: exit cleanly, releasing tqdm's lock
    try:
        import torch

        from harness.data import load_corpus
        import harness.train  # noqa: F401 -- what a trial process imports before it trains

        torch.set_num_threads(slot.threads)
        if slot.device.startswith("cuda"):
            torch.cuda.set_device(slot.device)
        conn.send(("ready", None))
        started = time.perf_counter()
        corpus = load_corpus(study.corpus, fetch_missing=False, log=lambda *a: None)
        conn.send(("corpus", time.perf_counter() - started))
        windows = FIRST_WINDOWS
        for i in range(SAMPLES_PER_VARIANT * len(variants)):
            probe_dir = Path(folder) / f"probe{i}"
            sample = _probe(study, variants[i % len(variants)], corpus, slot.device, probe_dir, windows)
            shutil.rmtree(probe_dir, ignore_errors=True)  # a paper-sized probe leaves 200 MB of checkpoints
            conn.send(("sample", {**sample, "cold": i == 0}))
            windows = max(FIRST_WINDOWS, min(MAX_WINDOWS, round(PROBE_SECONDS / sample["window_seconds"])))
    except (BrokenPipeError, EOFError):
        pass  # the parent has what it needs, or is gone
    except Exception as err:  # the parent reports it; a failed calibration must say why
        from harness.train import TrainingDiverged

        if isinstance(err, (TrainingDiverged, UserError)):  # the study's settings: one line for the user
            conn.send(("refused", str(err)))
        else:
            conn.send(("failed", traceback.format_exc(limit=8)))
    finally:
        conn.close()


def calibrate(study: StudyConfig, slots: list, *, budget_seconds: float = CALIBRATION_SECONDS) -> Calibration:
    """Time every variant of the study on these slots, one process per slot, all at once.

    Each process starts like a trial process (the parent times it up to its first message), loads the corpus,
    then probes variants in turn, each process from another one, until every variant has a probe; a probe is
    two epochs of `train_model` on a slice (the second timed: the warm training rate; the first: the run's
    set-up and warm-up) plus a timed `evaluate` at the validation and at the test batch size. After
    `budget_seconds`, the first probe to end stops it; variants not probed get the mean rate of those that
    were. Raises UserError for slots that mix CPU and GPU or a recipe that diverges, RuntimeError when a process
    fails.
    """
    devices = {slot.device.split(":")[0] for slot in slots}
    if len(devices) != 1:
        raise UserError(f"--devices: the slots mix {' and '.join(sorted(devices))}; plan each kind on its own")
    variants = list(study.variants)
    started = time.perf_counter()
    samples, startup, corpus_seconds = [], [], []
    with tempfile.TemporaryDirectory(prefix="awd-plan-") as workdir:
        children = {}  # Child -> (its slot, when it was spawned)
        try:
            for i, slot in enumerate(slots):
                first = i * len(variants) // len(slots)  # each process starts on another variant
                spawned = time.perf_counter()
                child = Child(_calibration_worker, (study, variants[first:] + variants[:first], slot,
                                                    f"{workdir}/slot{i}"), f"plan-slot{slot.index}")
                children[child] = (slot, spawned)
            talking = set(children)
            while not all(any(s["variant"] == v for s in samples) for v in variants):
                if samples and time.perf_counter() - started > budget_seconds:
                    break
                if not talking:
                    if samples:
                        break
                    raise RuntimeError("every calibration process ended before measuring a variant")
                for child in ready(list(talking), timeout=1.0):
                    got, message = child.receive()
                    if not got:
                        if not child.alive:
                            talking.discard(child)
                        continue
                    (kind, payload), (slot, spawned) = message, children[child]
                    if kind == "ready":
                        startup.append(time.perf_counter() - spawned)
                    elif kind == "corpus":
                        corpus_seconds.append(payload)
                    elif kind == "sample":
                        samples.append(payload)
                    elif kind == "refused":
                        raise UserError(f"calibrating the study on {slot.device}: {payload}")
                    else:
                        raise RuntimeError(f"calibration on {slot.device} failed:\n{payload}")
        finally:
            for child in children:
                child.process.terminate()  # all at once; each exits cleanly on SIGTERM
            for child in children:
                child.stop()
    measured = {v: statistics.median(s["train_seconds_per_token"] for s in samples if s["variant"] == v)
                for v in variants if any(s["variant"] == v for s in samples)}
    mean_rate = statistics.fmean(measured.values())
    cold = [s["setup"] for s in samples if s["cold"]]
    return Calibration(
        slots=describe_slots(slots), device=devices.pop(),
        train_seconds_per_token={v: measured.get(v, mean_rate) for v in variants},
        measured=tuple(v for v in variants if v in measured),
        valid_seconds_per_token=statistics.median(s["valid_seconds_per_token"] for s in samples),
        test_seconds_per_token=statistics.median(s["test_seconds_per_token"] for s in samples),
        epoch_extra_seconds=statistics.median(s["epoch_extra"] for s in samples),
        startup_seconds=statistics.fmean(startup), corpus_seconds=statistics.fmean(corpus_seconds),
        setup_seconds=statistics.median(cold), seconds=time.perf_counter() - started,
    )


# --- rates measured elsewhere ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EpochTimes:
    """Seconds per epoch (training and validation) of some variants, measured on other hardware."""

    seconds: dict  # variant -> seconds; "*" stands for every variant not named
    source: str  # where they come from, in words
    study: str | None = None  # the study they were measured on, when the source says


def read_epoch_times(values: list) -> EpochTimes:
    """`--seconds-per-epoch` values: VARIANT=SECONDS ("*=SECONDS" for all), or a JSON file.

    The JSON is {"seconds_per_epoch": {"awd": 63.5, ...}, "device": "NVIDIA H200", "study": "paper-ptb"} (device
    and study optional), or the gpu-check.json of `make gpu-check`, whose one-epoch row times paper-ptb's awd.
    """
    seconds, sources, study = {}, [], None
    for value in values:
        name, sep, number = str(value).partition("=")
        if sep:
            try:
                seconds[name.strip()] = float(number)
            except ValueError:
                raise UserError(f"--seconds-per-epoch {value}: {number!r} is not a number of seconds") from None
            sources.append(f"{name.strip()} {float(number):g} s (given)")
            continue
        path = Path(value)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"--seconds-per-epoch {value}: not VARIANT=SECONDS, nor a readable JSON file "
                            f"({err})") from None
        given, device, study = _json_epoch_times(path, data)
        seconds.update(given)
        sources.append(", ".join(f"{v} {s:g} s" for v, s in given.items()) + f" measured on {device} ({path})")
    for name, value in seconds.items():
        _check_seconds(value, f"--seconds-per-epoch {name}={value:g}")
    return EpochTimes(seconds, "; ".join(sources), study)


MAX_EPOCH_SECONDS = 7 * 24 * 3600.0  # an epoch time beyond a week is a typo or a damaged file, not a measurement


def _check_seconds(value, where: str) -> float:
    """value as seconds per epoch if it is a number in (0, MAX_EPOCH_SECONDS]; else a UserError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_EPOCH_SECONDS:
        raise UserError(f"{where}: {value!r} is not seconds per epoch; give a number in (0, {MAX_EPOCH_SECONDS:g}]")
    return float(value)


def _only_strings(path: Path, data: dict, keys: tuple) -> None:
    for key in keys:
        if key in data and not isinstance(data[key], str):
            raise UserError(f"{path}: {key} = {data[key]!r} should be a string")


def _json_epoch_times(path: Path, data) -> tuple:
    """(variant -> seconds, device, study) from one of the two JSON layouts read_epoch_times accepts."""
    if isinstance(data, dict) and isinstance(data.get("seconds_per_epoch"), dict):
        given = data["seconds_per_epoch"]
        _only_strings(path, data, ("device", "study"))
        device = data.get("device", "another machine")
        return ({v: _check_seconds(s, f"{path}: seconds_per_epoch.{v}") for v, s in given.items()}, device,
                data.get("study"))
    if isinstance(data, dict) and isinstance(data.get("rows"), list):  # gpu-check.json (harness.gpu_check)
        if data.get("rehearsal"):
            raise UserError(f"{path} is a rehearsal on toy sizes: its epoch time means nothing; run make gpu-check "
                            "on a GPU")
        epochs = [row["numbers"]["epoch_seconds"] for row in data["rows"]
                  if isinstance(row, dict) and isinstance(row.get("numbers"), dict)
                  and "epoch_seconds" in row["numbers"]]
        if len(epochs) != 1:
            raise UserError(f"{path}: expected one row with an epoch time (part 3 of the GPU check), found "
                            f"{len(epochs)}")
        environment = data.get("environment") or {}
        if not isinstance(environment, dict):
            raise UserError(f"{path}: environment = {environment!r} should be an object")
        _only_strings(path, environment, ("device",))
        seconds = {"awd": _check_seconds(epochs[0], f"{path}: epoch_seconds")}
        return seconds, environment.get("device") or "a GPU", "paper-ptb"
    raise UserError(f'{path}: expected {{"seconds_per_epoch": {{"VARIANT": SECONDS}}}} or a gpu-check.json')


# --- the estimate ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseEstimate:
    """The runs of one variant in one phase, each priced in seconds."""

    variant: str
    phase: str
    runs: int
    epochs: int
    epoch_seconds: float  # training and validation, checkpoints
    run_seconds: float  # one run, every epoch (a confirmation run includes its test pass)


@dataclass(frozen=True)
class PlanResult:
    """What a study will cost on some slots: per-run prices, totals, and the assumptions they rest on."""

    study: str
    n_slots: int
    slots: str  # the slots in words
    rows: tuple  # PhaseEstimate per variant and phase with runs
    overhead_seconds: float  # per run, whatever its epochs
    test_seconds: float  # the test pass that ends a confirmation run
    device_seconds: float  # every run to its last epoch
    wall_seconds: float  # the same, list-scheduled on the slots: an upper bound (no pruning)
    pruned_device_seconds: float  # with the pruning assumption
    pruned_wall_seconds: float
    pruning: str  # the assumption, in words
    source: str  # where the rates come from, in words

    def row(self, variant: str, phase: str) -> PhaseEstimate:
        """The estimate of one variant and phase; KeyError when the plan holds no such runs."""
        for r in self.rows:
            if (r.variant, r.phase) == (variant, phase):
                return r
        raise KeyError(f"the plan of {self.study} holds no {phase} runs of {variant!r}")

    def run_seconds(self, variant: str, phase: str, epochs: int | None = None) -> float:
        """Expected seconds of one run that trains `epochs` epochs (default: all; a pruned run fewer)."""
        row = self.row(variant, phase)
        if epochs is None or epochs >= row.epochs:
            return row.run_seconds
        return self.overhead_seconds + epochs * row.epoch_seconds

    def format(self) -> str:
        """The table (variants x phases: runs, epochs, minutes per run, device-hours), totals and assumptions."""
        width = max([18, *(len(r.variant) for r in self.rows)])  # arm names with axes run longer than variants'
        lines = [f"{self.study}: {sum(r.runs for r in self.rows)} runs on {self.slots}",
                 f"  {'variant':<{width}} {'phase':<13} {'runs':>4} {'epochs':>6} {'s/epoch':>8} {'min/run':>8} "
                 f"{'device-h':>9}"]
        for r in self.rows:
            lines.append(f"  {r.variant:<{width}} {'search' if r.phase == SEARCH else 'confirmation':<13} {r.runs:>4} "
                         f"{r.epochs:>6} {r.epoch_seconds:>8.1f} {r.run_seconds / 60:>8.1f} "
                         f"{r.runs * r.run_seconds / 3600:>9.2f}")
        lines += [
            f"  {'total':<{width + 14}} {sum(r.runs for r in self.rows):>4} {'':>24} "
            f"{self.device_seconds / 3600:>9.2f}",
            f"wall time: {format_duration(self.wall_seconds)} on {self.n_slots} slot{'s' * (self.n_slots > 1)}, "
            f"{self.device_seconds / 3600:.2f} device-hours (list-scheduled as the ablation runs them: search trials "
            "first, a variant's confirmation once its search has settled)",
            (f"pruning: the figures above assume none (an upper bound); {self.pruning}; then about "
             f"{format_duration(self.pruned_wall_seconds)} wall, {self.pruned_device_seconds / 3600:.2f} device-hours"
             if self.pruned_device_seconds < self.device_seconds else f"pruning: none expected ({self.pruning})"),
            f"rates: {self.source}",
            f"per run: {self.overhead_seconds:.1f} s whatever its epochs; a confirmation run's test pass "
            f"{self.test_seconds:.1f} s",
        ]
        return "\n".join(lines)

    def left_seconds(self, variant: str, phase: str, done: int, started: bool) -> float:
        """Expected seconds still to go of one run with `done` epochs behind it (trained, or restored from its earlier
        attempt's checkpoint); a run not yet `started` still pays its start-up (overhead_seconds)."""
        row = self.row(variant, phase)
        left = row.run_seconds - min(done, row.epochs) * row.epoch_seconds
        return max(0.0, left - self.overhead_seconds if started else left)

    def projected_seconds(self, ended: list, left: dict, running: list) -> float:
        """Wall seconds still to go: the work left (no pruning) at the pace of the runs that ended, over the slots.

        `ended`: (seconds taken, seconds estimated) of each run that ended; `left`: (variant, phase) -> the epochs
        each run not yet started will not train (0 for a new run, the checkpoint's epoch for a retry that continues
        one); `running`: (variant, phase, epochs done) of each run in flight.
        """
        pace = sum(taken for taken, _ in ended) / sum(est for _, est in ended) if ended else 1.0
        known = {(r.variant, r.phase) for r in self.rows}
        work = sum(self.left_seconds(v, p, done, started=False)
                   for (v, p), runs in left.items() if (v, p) in known for done in runs)
        work += sum(self.left_seconds(v, p, epochs, started=True) for v, p, epochs in running if (v, p) in known)
        # Runs of unequal length leave slots idle at the end: the estimate's own wall/device ratio says how much.
        packing = self.wall_seconds * self.n_slots / self.device_seconds if self.device_seconds else 1.0
        return pace * work * packing / self.n_slots

    def left(self, left: dict, running: list) -> str:
        """What is left of a study already under way, in one line (arguments as for projected_seconds, running on any
        machine): the runs still to start and the epochs kept from earlier attempts' checkpoints count as done."""
        kept = sum(done for runs in left.values() for done in runs)
        to_start = sum(len(runs) for runs in left.values())
        return (f"left of it: {to_start} run{'s' * (to_start != 1)} to start"
                + (f" (retries keeping {kept} epoch{'s' * (kept != 1)} of their earlier attempts)" if kept else "")
                + f", {len(running)} running: about {format_duration(self.projected_seconds([], left, running))} "
                f"on {self.n_slots} slot{'s' * (self.n_slots > 1)} without pruning")

    def progress(self, elapsed: float, ended: list, left: dict, running: list) -> str:
        """One line for the live view: the estimate against the time taken so far, and the projected end
        (arguments as for projected_seconds)."""
        head = (f"estimate {format_duration(self.wall_seconds)} on {self.n_slots} slot{'s' * (self.n_slots > 1)} "
                f"({format_duration(self.pruned_wall_seconds)} with the assumed pruning)")
        if not running and not any(left.values()):
            return f"  {head}; this session took {format_duration(elapsed)}"
        to_go = self.projected_seconds(ended, left, running)
        pace = (f"runs so far took {sum(t for t, _ in ended) / sum(e for _, e in ended):.2f}x their estimate"
                if ended else "no run has ended yet")
        return (f"  {head}; {format_duration(elapsed)} elapsed; {pace}; about {format_duration(to_go)} to go "
                f"without pruning, {format_duration(elapsed + to_go)} in all")


def format_duration(seconds: float) -> str:
    """Seconds in the unit a person reads best: '45 s', '4.5 min', '72 min', '5.3 h', '3.4 days (82 h)'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 10 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 120 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days ({seconds / 3600:.0f} h)"


def epoch_tokens(study: StudyConfig, corpus) -> tuple:
    """(training, validation, test) tokens of one epoch and of the test pass: batchify drops each split's tail,
    and the last row is only ever a target."""
    t = study.fixed.train

    def used(n, limit, batch):
        return (min(n, limit or n) // batch - 1) * batch

    return (used(len(corpus.train), t.train_tokens, t.batch_size), used(len(corpus.valid), t.valid_tokens,
            t.eval_batch_size), used(len(corpus.test), 0, t.test_batch_size))


def estimate(study: StudyConfig, calibration: Calibration, corpus, *, n_slots: int, slots: str = "",
             epoch_times: EpochTimes | None = None) -> PlanResult:
    """Price every run of the study from the calibration and the corpus sizes, and list-schedule them on n_slots.

    With `epoch_times`, the variants it names take its seconds per epoch; the others their measured ratio to
    those, and the test pass the same factor (start-up, corpus and set-up stay as measured: the host's work).
    """
    if n_slots < 1:
        raise UserError(f"--slots {n_slots}: must be at least 1")
    epochs = study.max_epochs
    train, valid, test = epoch_tokens(study, corpus)
    local = {v: rate * train + calibration.valid_seconds_per_token * valid + calibration.epoch_extra_seconds
             for v, rate in calibration.train_seconds_per_token.items()}
    test_seconds = calibration.test_seconds_per_token * test
    partial = ("" if len(calibration.measured) == len(local) else
               f"; {len(calibration.measured)} of {len(local)} variants probed in the time allowed "
               f"({', '.join(calibration.measured)}), the others set to their mean")
    per_epoch = dict(local)
    source = f"measured here in {calibration.seconds:.0f} s on {calibration.slots}, all at once{partial}"
    if epoch_times is not None:
        if epoch_times.study not in (None, study.name):
            raise UserError(f"--seconds-per-epoch: those times were measured on study {epoch_times.study!r}, "
                            f"not {study.name!r}; measure this study's configuration")
        unknown = sorted(set(epoch_times.seconds) - set(local) - {"*"})
        if unknown:
            raise UserError(f"--seconds-per-epoch: no variant {', '.join(unknown)} in {study.path}; "
                            f"its variants: {', '.join(local)} (or * for all)")
        given = {v: epoch_times.seconds.get(v, epoch_times.seconds.get("*")) for v in local}
        given = {v: s for v, s in given.items() if s is not None}
        factor = math.exp(statistics.fmean(math.log(s / local[v]) for v, s in given.items()))
        per_epoch = {v: given.get(v, local[v] * factor) for v in local}
        test_seconds *= factor
        source = epoch_times.source + ("" if len(given) == len(local) else
                                       f"; the other variants at their ratio to those as measured here "
                                       f"({calibration.slots}, {calibration.seconds:.0f} s{partial})")
    overhead = calibration.overhead_seconds
    counts, assumption = count_runs(study), pruning_assumption(study)
    rows, search, pruned, confirm = [], {}, {}, {}
    for (variant, phase), runs in counts.items():
        seconds = overhead + epochs * per_epoch[variant] + (test_seconds if phase == CONFIRM else 0.0)
        if runs:
            rows.append(PhaseEstimate(variant, phase, runs, epochs, per_epoch[variant], seconds))
        if phase == SEARCH:
            search[variant] = [seconds] * runs
            pruned[variant] = [overhead + e * per_epoch[variant] for e in assumption.search_epochs(runs, epochs)]
        else:
            confirm[variant] = [seconds] * runs
    full, lean = simulate_schedule(search, confirm, n_slots), simulate_schedule(pruned, confirm, n_slots)
    return PlanResult(
        study=study.name, n_slots=n_slots, slots=slots or f"{n_slots} slots", rows=tuple(rows),
        overhead_seconds=overhead, test_seconds=test_seconds, device_seconds=full.busy_seconds,
        wall_seconds=full.wall_seconds, pruned_device_seconds=lean.busy_seconds, pruned_wall_seconds=lean.wall_seconds,
        pruning=assumption.text, source=source,
    )


def left_of(study: StudyConfig, storage: str) -> tuple[dict, list] | None:
    """(runs to start, runs in flight) of the study a storage holds, as PlanResult.left reads them; None when it
    holds no trial of it yet."""
    from harness.study.ledger.reader import LedgerReader
    from harness.study.ledger.storage import open_storage
    from harness.study.ledger.studies import holds_study
    from harness.study.stores import sqlite_path

    path = sqlite_path(storage, "--storage")
    if path is not None and not path.exists():
        return None
    optuna_storage = open_storage(storage)
    if not holds_study(optuna_storage, study):
        return None
    ledger = LedgerReader(study, optuna_storage, study.identity())
    phases = [(v, p) for v in study.variants for p in (SEARCH, CONFIRM)]  # seeds owed before their study exists
    left = {(v, p): ledger.to_start(v, p) for v, p in phases}
    running = [(v, p, epochs) for v, p in phases for epochs in ledger.running_epochs(v, p)]
    optuna_storage.engine.dispose()
    return left, running


def plan_study(study: StudyConfig, slots: list, *, corpus=None, epoch_times: EpochTimes | None = None,
               n_slots: int | None = None, budget_seconds: float = CALIBRATION_SECONDS, log=print) -> PlanResult:
    """Calibrate on the slots, then estimate the study on them (or on n_slots like them, e.g. other machines)."""
    from harness.data import load_corpus

    if n_slots is not None and n_slots < 1:
        raise UserError(f"--slots {n_slots}: must be at least 1")
    if corpus is None:
        corpus = load_corpus(study.corpus, log=log)
    calibration = calibrate(study, slots, budget_seconds=budget_seconds)
    described = describe_slots(slots) if n_slots is None else f"{n_slots} slots (given)"
    return estimate(study, calibration, corpus, n_slots=n_slots or len(slots), slots=described,
                    epoch_times=epoch_times)
