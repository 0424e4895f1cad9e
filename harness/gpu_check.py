"""The GPU check (issue #12): one command that checks and measures the CUDA path and writes one table.

    python -m harness.gpu_check --out DIR        # on a CUDA machine; without one it says what it skipped
    python -m harness.gpu_check --rehearse       # every part on this CPU at toy sizes: the plumbing only
    python -m harness.gpu_check --bundle .gpu-bundle --print-command   # what a bare torch machine lacks

Parts, each in its own process under a share of one time budget (default 7 min): 1 the gpu-marked tests
and weight drop's memory per step, 2 the throughput bench on CUDA, 3 one epoch of studies/paper-ptb.toml,
4 several trials packed onto one GPU. A part that fails or overruns gets a row saying so and the others
still run; DIR gets gpu-check.md (the table), gpu-check.json (the numbers) and gpu-check.log. Exit code 0
when every part that ran passed. Imports nothing beyond torch, numpy, pytest and BUNDLE_PACKAGES.
"""

import sys

if sys.version_info < (3, 11):  # before the harness imports: config needs tomllib (Python 3.11)
    sys.exit(f"the GPU check needs Python >= 3.11 (harness.config reads TOML with tomllib); this is {sys.version}")

import argparse
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy
import torch

from harness.bench import (BPTT, PAPER_RATES, SIZES, BenchRow, PackingResult, WeightDropMemory, layer_sizes,
                           pack_trials, run_bench, weight_drop_memory)
from harness.config import StudyConfig, load_study
from harness.data import KNOWN_CORPORA, default_data_dir, find_split_files, load_corpus
from harness.errors import UserError
from harness.scheduler import discover_slots
from harness.train import train_model

REPO = Path(__file__).resolve().parent.parent
PAPER_STUDY = REPO / "studies" / "paper-ptb.toml"
TOTAL_SECONDS = 420.0  # the issue allows 8 minutes on one H200, start-up included
GRACE_SECONDS = 10.0  # between a part's deadline and the kill of its process group
# Pure-Python packages the harness imports at start-up that a machine with only torch, numpy and pytest lacks:
# harness.scheduler imports joblib (1.6 imports the separate cloudpickle package), harness.train tqdm.
# `--bundle` installs them, without their other dependencies, for PYTHONPATH.
BUNDLE_PACKAGES = ("joblib", "cloudpickle", "tqdm")
# salesforce/awd-lstm-lm README, "Speed": PTB, batch 20, LSTM, NVIDIA Quadro GP100 (train + validation).
REFERENCE_EPOCH_SECONDS = 65.0
BENCH_TARGET = 0.9  # AWD with every technique on, at least this fraction of the plain cuDNN stack's tokens/s
BENCH_BATCHES = (20, 80)
PACKING_TRIALS = (1, 2, 4)
# Weight drop may add, per layer and step, its (4H, H) mask and the masked gradient of the raw W_hh (2 x W_hh);
# cuDNN compacting scattered weights at every call would add a whole flat buffer on top (>= 1.35 x W_hh at
# the paper's sizes), so 2.5 x W_hh separates the two at every layer shape.
MEMORY_STEP_LIMIT = 2.5

PASS, FAIL, SKIPPED, ERROR, OVERRAN, INFO, REHEARSED = "pass", "fail", "skipped", "error", "overran", "info", "rehearsed"
FAILED = frozenset({FAIL, ERROR, OVERRAN})


@dataclass(frozen=True)
class CheckRow:
    """One line of the table: a check or a measurement, its result, the measured value and the target."""

    part: str  # e.g. "2 bench"
    what: str
    result: str  # PASS, FAIL, SKIPPED, ERROR, OVERRAN, INFO (measured, no target) or REHEARSED (not judged)
    value: str = ""
    target: str = ""
    why: str = ""  # why it was skipped or failed, or how the value was obtained
    numbers: dict = field(default_factory=dict)  # the raw numbers, for gpu-check.json


@dataclass
class PartContext:
    """What a part's function gets: its deadline, the run's mode, and where its rows and progress go."""

    part: "Part"
    deadline: float  # time.monotonic() by which the part must be done
    rehearse: bool  # CPU and toy sizes: exercise the plumbing, judge nothing
    hints: dict  # numbers from earlier parts (the epoch's tokens/s sizes the packing trials)
    out: Path
    emit: Callable[[CheckRow], None]
    log: Callable[[str], None]

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, what: str, result: str, value: str = "", target: str = "", why: str = "", **numbers) -> None:
        """Emit a row of this part; under --rehearse a judged result becomes REHEARSED."""
        if self.rehearse and result in (PASS, FAIL):
            result, why = REHEARSED, "toy size on CPU: the number means nothing" + (f"; {why}" if why else "")
        self.emit(CheckRow(self.part.title, what, result, value, target, why, numbers))


@dataclass(frozen=True)
class Part:
    """One part of the check: its function (run in a fresh process) and its share of the time budget."""

    name: str
    title: str  # the table's part column
    what: str  # what it checks, for its row when it does not run
    target: str  # likewise
    run: Callable[[PartContext], None]
    cap_seconds: float  # the most it may take
    min_seconds: float  # below this it is skipped rather than started
    needs_cuda: bool = True
    rehearsable: bool = True  # has a CPU toy version under --rehearse


# ---- the parts ------------------------------------------------------------------------------------


def part_tests(ctx: PartContext) -> None:
    """1: the gpu-marked tests, in pytest, one row per test."""
    junit = ctx.out / "gpu-tests.xml"
    # -o addopts= drops `-p shared_stores` (it imports optuna, mlflow, psycopg) and --noconftest the session
    # fixture that insists on ../shared/data: the GPU tests need neither.
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-o", "addopts=", "--noconftest",
               "-p", "no:cacheprovider", f"--junitxml={junit}", "tests/test_gpu.py"]
    ctx.log(" ".join(command[1:]))
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=max(1.0, ctx.seconds_left() - 2))
    for line in (proc.stdout + proc.stderr).splitlines():
        ctx.log(f"  {line}")
    rows = junit_rows(junit, ctx.part.title) if junit.exists() else []
    if not rows:
        ctx.emit(CheckRow(ctx.part.title, "tests/test_gpu.py", ERROR,
                          why=f"pytest exited with code {proc.returncode} and reported no gpu tests; see the log"))
    for row in rows:
        ctx.emit(row)


def junit_rows(path: Path, part: str) -> list[CheckRow]:
    """One row per test case of a pytest JUnit XML report: pass, fail (with the message) or skipped (why)."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        what = name.removeprefix("test_").replace("_", " ")
        seconds = float(case.get("time") or 0)
        problem = next((case.find(tag) for tag in ("failure", "error") if case.find(tag) is not None), None)
        skipped = case.find("skipped")
        if problem is not None:
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            rows.append(CheckRow(part, what, FAIL, f"{seconds:.2f} s", "passes", (message or ["?"])[0][:300],
                                 {"test": name, "seconds": seconds}))
        elif skipped is not None:
            why = (skipped.get("message") or "").strip()
            rows.append(CheckRow(part, what, SKIPPED, "", "passes", why.removeprefix("Skipped: "), {"test": name}))
        else:
            rows.append(CheckRow(part, what, PASS, f"{seconds:.2f} s", "passes", "", {"test": name, "seconds": seconds}))
    return rows


def part_memory(ctx: PartContext) -> None:
    """1: weight drop's memory per training step against plain cuDNN layers, at the paper's sizes."""
    sizes = layer_sizes(SIZES["paper"])
    ctx.log(f"layers {sizes}, batch 20, bptt {BPTT}, weight_p {PAPER_RATES['weight']}; warnings are errors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN's "not part of single contiguous chunk" warning fails the part
        memory = weight_drop_memory(sizes, 20, BPTT, weight_p=PAPER_RATES["weight"], device="cuda")
    for row in judge_memory(memory, ctx.part.title):
        ctx.emit(row)


def judge_memory(memory: WeightDropMemory, part: str) -> list[CheckRow]:
    """Rows for the weight-drop memory probe: bytes per step within MEMORY_STEP_LIMIT x W_hh; held = raw W_hh."""
    mb = 2**20
    step = memory.step_extra / memory.w_hh_bytes
    held = memory.held_extra / memory.w_hh_bytes
    numbers = dataclasses.asdict(memory)
    return [
        CheckRow(part, "no weight copy per call: peak memory of a training step, weight drop minus nn.LSTM "
                       "(paper size, 3 layers, batch 20, bptt 70)",
                 PASS if step <= MEMORY_STEP_LIMIT else FAIL,
                 f"+{step:.2f} x W_hh ({memory.step_extra / mb:,.1f} MB; W_hh {memory.w_hh_bytes / mb:,.1f} MB, "
                 f"flat buffers {memory.flat_bytes / mb:,.1f} MB)",
                 f"<= {MEMORY_STEP_LIMIT} x W_hh: the mask and the masked gradient; a per-call copy adds "
                 f"{memory.flat_bytes / memory.w_hh_bytes:.2f} x W_hh more", "", numbers),
        CheckRow(part, "memory the layers hold, weight drop minus nn.LSTM",
                 PASS if abs(held - 1) <= 0.02 else FAIL,
                 f"+{held:.2f} x W_hh ({memory.held_extra / mb:,.1f} MB)", "1 x W_hh: the raw W_hh beside the buffer",
                 "", numbers),
    ]


def part_bench(ctx: PartContext) -> None:
    """2: AWD-LSTM with every technique on (locked) against a plain cuDNN nn.LSTM stack, batch 20 and 80."""
    size, device = ("tiny", "cpu") if ctx.rehearse else ("paper", "cuda")
    rounds, steps, warmup = (2, 1, 1) if ctx.rehearse else (10, 10, 3)
    for i, batch in enumerate(BENCH_BATCHES):
        started = time.monotonic()
        try:
            rows = run_bench((size,), rounds=rounds, steps=steps, device=device, arms=("plain", "locked"),
                             log=ctx.log, batch_size=batch, warmup=warmup)
        except Exception as err:  # one batch size failing leaves the other to measure
            traceback.print_exc()
            ctx.emit(CheckRow(ctx.part.title, f"bench, batch {batch}", ERROR, why=f"{type(err).__name__}: {err}"))
            continue
        plain, awd = rows
        ctx.row(**judge_bench(plain, awd))
        took = time.monotonic() - started
        if i + 1 < len(BENCH_BATCHES) and ctx.seconds_left() < 2 * took:
            ctx.emit(CheckRow(ctx.part.title, f"bench, batch {BENCH_BATCHES[i + 1]}", SKIPPED,
                              why=f"{ctx.seconds_left():.0f} s left of the part's budget; batch {batch} took {took:.0f} s"))
            return


def judge_bench(plain: BenchRow, awd: BenchRow) -> dict:
    """The row (as PartContext.row arguments) for one bench pair: pass at BENCH_TARGET x the plain stack or more."""
    m = SIZES[awd.size]
    return dict(
        what=f"AWD (locked, every technique on) vs plain cuDNN nn.LSTM stack, {m.emb_size}/{m.hidden_size}/"
             f"{m.n_layers}, batch {awd.batch_size}, bptt {BPTT}, alternating, median of rounds",
        result=PASS if awd.ratio >= BENCH_TARGET else FAIL,
        value=f"{awd.ratio:.3f}x ({awd.tokens_per_s:,.0f} vs {plain.tokens_per_s:,.0f} tokens/s; "
              f"peak {awd.peak_memory_mb:,.0f} vs {plain.peak_memory_mb:,.0f} MB)",
        target=f">= {BENCH_TARGET}x",
        ratio=awd.ratio, awd_tokens_per_s=awd.tokens_per_s, plain_tokens_per_s=plain.tokens_per_s,
        awd_peak_mb=awd.peak_memory_mb, plain_peak_mb=plain.peak_memory_mb, batch_size=awd.batch_size,
    )


def _paper_config(variant_overrides: dict, rehearse: bool):
    """studies/paper-ptb.toml's awd run with overrides; under --rehearse a toy model on a slice of PTB."""
    overrides = dict(variant_overrides)
    if rehearse:
        overrides |= {"model.emb_size": 16, "model.hidden_size": 32, "model.n_layers": 2, "train.threads": 1,
                      "train.train_tokens": min(overrides.get("train.train_tokens") or 20_000, 20_000),
                      "train.valid_tokens": 2_000}
    study: StudyConfig = load_study(PAPER_STUDY)
    return study.run_config("awd", overrides)


def epoch_tokens(n_tokens: int, batch_size: int) -> int:
    """Tokens one epoch trains on: batchify drops the tail and the last row is only ever a target."""
    return (n_tokens // batch_size - 1) * batch_size


def part_epoch(ctx: PartContext) -> None:
    """3: one epoch of the paper's configuration (awd) on PTB, against the reference's seconds per epoch."""
    device = "cpu" if ctx.rehearse else "cuda"
    config = _paper_config({"train.epochs": 1}, ctx.rehearse)
    corpus = load_corpus(config.corpus, fetch_missing=False, log=ctx.log)
    recipe = config.train
    train_tokens = epoch_tokens(recipe.train_tokens or len(corpus.train), recipe.batch_size)
    valid_tokens = recipe.valid_tokens or len(corpus.valid)
    # A probe on a tenth of the split warms up cuDNN and the allocator and forecasts the full epoch.
    probe_tokens = min(train_tokens, max(recipe.batch_size * recipe.bptt * 20, train_tokens // 10))
    probe = train_model(config.replace({"train.train_tokens": probe_tokens, "train.valid_tokens": 5_000}), corpus,
                        device=device, progress=False, evaluate_test=False)
    probe_rate = probe.epochs[0].tokens_per_s
    # Validation runs forward only, so charging its tokens at the training rate overestimates: safe.
    forecast = (train_tokens + valid_tokens) / probe_rate
    ctx.log(f"probe: {probe_rate:,.0f} tokens/s over {probe_tokens:,} tokens; forecast {forecast:.0f} s for "
            f"{train_tokens:,} training + {valid_tokens:,} validation tokens; {ctx.seconds_left():.0f} s left")
    what = (f"one epoch of {PAPER_STUDY.relative_to(REPO)} (awd, {config.model.emb_size}/{config.model.hidden_size}/"
            f"{config.model.n_layers}, batch {recipe.batch_size}, bptt {recipe.bptt}) on {train_tokens:,} PTB "
            f"training tokens, then validation")
    target = f"<= {REFERENCE_EPOCH_SECONDS:.0f} s/epoch (awd-lstm-lm README: PTB, batch 20, Quadro GP100)"
    if 1.3 * forecast + 5 > ctx.seconds_left():
        ctx.row(what, PASS if forecast <= REFERENCE_EPOCH_SECONDS else FAIL,
                f"~{forecast:.0f} s/epoch, extrapolated ({probe_rate:,.0f} tokens/s over {probe_tokens:,} tokens)",
                target, why=f"extrapolated: a full epoch would not fit the part's {ctx.seconds_left():.0f} s left",
                tokens_per_s=probe_rate, tokens=probe_tokens, epoch_seconds=forecast, extrapolated=True)
        return
    started = time.perf_counter()
    result = train_model(config, corpus, device=device, progress=False, evaluate_test=False)
    seconds = time.perf_counter() - started
    epoch = result.epochs[0]
    ctx.row(what, PASS if seconds <= REFERENCE_EPOCH_SECONDS else FAIL,
            f"{seconds:.1f} s/epoch: training {epoch.epoch_seconds:.1f} s at {epoch.tokens_per_s:,.0f} tokens/s, "
            f"validation and set-up {seconds - epoch.epoch_seconds:.1f} s; val ppl {epoch.val_ppl:.1f} "
            f"({REFERENCE_EPOCH_SECONDS / seconds:.1f}x the reference's speed)", target,
            tokens_per_s=epoch.tokens_per_s, tokens=train_tokens, epoch_seconds=seconds,
            train_seconds=epoch.epoch_seconds, val_ppl=epoch.val_ppl, extrapolated=False)


def packing_tokens(tokens_per_s: float | None, seconds: float, batch_size: int, bptt: int) -> int:
    """Training tokens for a trial whose epoch takes about `seconds` alone (100k when the speed is unknown)."""
    window = batch_size * bptt
    wanted = tokens_per_s * seconds if tokens_per_s else 100_000
    return int(max(20, min(2_000, round(wanted / window)))) * window + batch_size  # + the last target row


def part_packing(ctx: PartContext) -> None:
    """4: 1, 2 and 4 equal trials at once on one GPU through the scheduler, aggregate tokens/s."""
    trials = (1, 2) if ctx.rehearse else PACKING_TRIALS
    epochs = 3  # the first epoch of each trial overlaps the others' start-up; epochs 2-3 measure the sharing
    tokens = packing_tokens(ctx.hints.get("tokens_per_s"), 2.0, 20, 70)
    config = _paper_config({"train.epochs": epochs, "train.train_tokens": tokens, "train.valid_tokens": 5_000},
                           ctx.rehearse)
    load_corpus(config.corpus, fetch_missing=False, log=ctx.log)  # tokenised and cached before any clock runs
    device = "cpu" if ctx.rehearse else "cuda:0"
    first = None
    for i, k in enumerate(trials):
        started = time.monotonic()
        slots = discover_slots(device, per_device=k)  # what `--trials-per-device k` gives a study
        (result,) = pack_trials(config, [slots], log=ctx.log)
        first = first or result
        ctx.row(**judge_packing(result, first, config, slots[0].threads))
        took = time.monotonic() - started
        if i + 1 < len(trials) and ctx.seconds_left() < 2.5 * took:
            ctx.emit(CheckRow(ctx.part.title, f"{trials[i + 1]} trials at once", SKIPPED,
                              why=f"{ctx.seconds_left():.0f} s left of the part's budget; {k} took {took:.0f} s"))
            return


def judge_packing(result: PackingResult, alone: PackingResult, config, threads: int) -> dict:
    """The row (as PartContext.row arguments) for one packing wave, relative to one trial alone."""
    tokens = config.train.train_tokens
    k = result.trials
    return dict(
        what=f"{k} trial{'s' * (k > 1)} at once on one GPU ({threads} CPU threads each): paper-ptb awd, "
             f"{tokens:,} tokens x {config.train.epochs} epochs each, through the scheduler",
        result=INFO,
        value=f"{result.steady_tokens_per_s:,.0f} tokens/s together while training "
              f"({result.steady_tokens_per_s / alone.steady_tokens_per_s:.2f}x one trial alone); "
              f"{result.wall_tokens_per_s:,.0f} tokens/s over {result.wall_seconds:.1f} s wall, start-up included",
        target="(measured: what packing gains)",
        trials=k, steady_tokens_per_s=result.steady_tokens_per_s, wall_tokens_per_s=result.wall_tokens_per_s,
        wall_seconds=result.wall_seconds, train_tokens=result.train_tokens,
        gain=result.steady_tokens_per_s / alone.steady_tokens_per_s,
    )


PARTS = (
    Part("tests", "1 gpu tests", "the gpu-marked tests (tests/test_gpu.py): cuDNN path, flat buffer, gradients",
         "pass", part_tests, cap_seconds=120, min_seconds=30),
    Part("memory", "1 memory", "weight drop's memory per training step vs nn.LSTM, paper size",
         f"<= {MEMORY_STEP_LIMIT} x W_hh per step", part_memory, cap_seconds=60, min_seconds=20, rehearsable=False),
    Part("bench", "2 bench", f"AWD (locked) vs plain cuDNN stack, paper size, batch {' and '.join(map(str, BENCH_BATCHES))}",
         f">= {BENCH_TARGET}x", part_bench, cap_seconds=120, min_seconds=40),
    Part("epoch", "3 epoch", "one epoch of studies/paper-ptb.toml (awd) on PTB",
         f"<= {REFERENCE_EPOCH_SECONDS:.0f} s/epoch (reference, GP100)", part_epoch, cap_seconds=180, min_seconds=45),
    Part("packing", "4 packing", "1, 2, 4 equal trials on one GPU through the scheduler: aggregate tokens/s",
         "(measured)", part_packing, cap_seconds=150, min_seconds=40),
)


# ---- running the parts ----------------------------------------------------------------------------


def part_seconds(parts: list[Part], seconds_left: float, grace: float = GRACE_SECONDS) -> float:
    """Seconds the first of `parts` may take: its cap, less what the later ones need at least (and each kill grace)."""
    later = sum(p.min_seconds + grace for p in parts[1:])
    return min(parts[0].cap_seconds, seconds_left - grace - later)


def skip_reason(part: Part, cuda: bool, rehearse: bool) -> str:
    """Why a part does not run here, or "" when it does."""
    if rehearse:
        return "" if part.rehearsable else "needs the CUDA allocator's statistics: not rehearsed on a CPU"
    if part.needs_cuda and not cuda:
        return (f"no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}: "
                "torch.cuda.is_available() is False)")
    return ""


def _part_process(part: Part, rows_file: str, seconds: float, rehearse: bool, hints: dict, out: str,
                  log_file: str) -> None:
    """A part's own process: a new session (so the parent can kill it with every process it starts), rows to a file."""
    os.setsid()
    started = time.monotonic()

    def log(message: str) -> None:
        line = f"[{part.name} {time.monotonic() - started:5.1f}s] {message}"
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    def emit(row: CheckRow) -> None:
        with open(rows_file, "a") as f:  # one line per row, flushed at once: a killed part keeps its rows
            f.write(json.dumps(dataclasses.asdict(row)) + "\n")
        log(f"-> {row.result}: {row.what}: {row.value} {row.why}".rstrip())

    ctx = PartContext(part, started + seconds, rehearse, hints, Path(out), emit, log)
    try:
        part.run(ctx)
    except Exception as err:
        if not isinstance(err, UserError):  # a user error's message says it all
            log(traceback.format_exc())
        emit(CheckRow(part.title, part.what, ERROR, why=f"{type(err).__name__}: {err}"))


def run_part(part: Part, seconds: float, rehearse: bool, hints: dict, out: Path, log, grace: float) -> list[CheckRow]:
    """Run one part in a fresh process; kill its process group `grace` seconds after its deadline."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.touch()
        # spawn: no CUDA state is forked, and the child gets this process's sys.path (tests, PYTHONPATH).
        process = multiprocessing.get_context("spawn").Process(
            target=_part_process, name=f"gpu-check-{part.name}",
            args=(part, str(rows_file), seconds, rehearse, hints, str(out), str(out / "gpu-check.log")))
        process.start()
        process.join(seconds + grace)
        overran = process.is_alive()
        if overran:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the part and whatever it started (pytest, trial workers)
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # in case it had not yet made its own session
            process.join()
        rows = [CheckRow(**json.loads(line)) for line in rows_file.read_text().splitlines() if line.strip()]
    if overran:
        rows.append(CheckRow(part.title, part.what, OVERRAN, f"killed after {seconds + grace:.0f} s",
                             f"<= {seconds:.0f} s (its share of the budget)",
                             "ran past its deadline; the rows above it are what it finished"))
    elif process.exitcode != 0 and not any(row.result == ERROR for row in rows):
        code = process.exitcode
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        rows.append(CheckRow(part.title, part.what, ERROR, target=part.target,
                             why=f"its process died ({how}); see the log"))
    return rows


def run_check(out: Path, budget: float = TOTAL_SECONDS, parts=PARTS, rehearse: bool = False,
              cuda: bool | None = None, grace: float = GRACE_SECONDS, log=print) -> int:
    """Run the parts in order within `budget` seconds, write the table and the numbers; 0 if all that ran passed."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.log").write_text("")

    def say(message: str) -> None:
        line = f"[gpu-check {time.monotonic() - started:5.1f}s] {message}"
        log(line)
        with open(out / "gpu-check.log", "a") as f:
            f.write(line + "\n")

    environment = describe_environment()
    cuda = environment["device"] is not None if cuda is None else cuda
    for line in environment["lines"]:
        say(line)
    if rehearse:
        say("REHEARSAL on the CPU at toy sizes: checks the plumbing; no number below means anything")
    rows, hints = [], {}
    runnable = []
    for part in parts:
        why = skip_reason(part, cuda, rehearse)
        if why:
            rows.append(CheckRow(part.title, part.what, SKIPPED, target=part.target, why=why))
            say(f"part {part.title}: skipped: {why}")
        else:
            runnable.append(part)
    for i, part in enumerate(runnable):
        seconds = part_seconds(runnable[i:], budget - (time.monotonic() - started), grace)
        if seconds < part.min_seconds:
            why = f"only {max(seconds, 0):.0f} s of the {budget:.0f} s budget left for it; it needs {part.min_seconds:.0f} s"
            rows.append(CheckRow(part.title, part.what, SKIPPED, target=part.target, why=why))
            say(f"part {part.title}: skipped: {why}")
            continue
        say(f"part {part.title}: {part.what} (up to {seconds:.0f} s)")
        part_rows = run_part(part, seconds, rehearse, hints, out, say, grace)
        rows += part_rows
        for row in part_rows:
            if "tokens_per_s" in row.numbers and row.result in (PASS, FAIL, REHEARSED):
                hints["tokens_per_s"] = row.numbers["tokens_per_s"]  # sizes the packing trials
    order = {part.title: i for i, part in enumerate(parts)}
    rows.sort(key=lambda row: order.get(row.part, len(order)))  # stable: a part's rows keep their order
    elapsed = time.monotonic() - started
    table = format_table(rows, environment["lines"] + [f"{elapsed:.0f} s of a {budget:.0f} s budget"
                                                       + (", REHEARSAL (CPU, toy sizes)" if rehearse else "")])
    (out / "gpu-check.md").write_text(table + "\n")
    (out / "gpu-check.json").write_text(json.dumps({
        "environment": environment, "rehearsal": rehearse, "budget_seconds": budget, "elapsed_seconds": elapsed,
        "rows": [dataclasses.asdict(row) for row in rows],
    }, indent=1) + "\n")
    log("")
    log(table)
    code = exit_code(rows)
    ran = any(row.result != SKIPPED for row in rows)
    verdict = "something failed" if code else ("every part that ran passed" if ran else "no part ran here")
    log(f"\n{out / 'gpu-check.md'}: {verdict} (exit code {code})")
    return code


def exit_code(rows: list[CheckRow]) -> int:
    """0 when no row failed, errored or overran (skipped, informational and rehearsed rows pass)."""
    return int(any(row.result in FAILED for row in rows))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_table(rows: list[CheckRow], header: list[str]) -> str:
    """The markdown table: part, what, result (with why), measured, target; header lines above it."""
    lines = [*header, "", "| part | what | result | measured | target |", "|---|---|---|---|---|"]
    for row in rows:
        result = row.result + (f": {row.why}" if row.why else "")
        lines.append(f"| {_cell(row.part)} | {_cell(row.what)} | {_cell(result)} | {_cell(row.value)} "
                     f"| {_cell(row.target)} |")
    return "\n".join(lines)


def describe_environment() -> dict:
    """Versions and the device, for the record (lines for the table's header, and the fields)."""
    cuda = torch.cuda.is_available()
    fields = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "numpy": numpy.__version__,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if cuda else None,
    }
    lines = [f"python {fields['python']}, torch {fields['torch']} (CUDA build {fields['cuda_build'] or 'none'}, "
             f"cuDNN {fields['cudnn'] or 'n/a'}), numpy {fields['numpy']}, {fields['cpus']} CPUs"]
    if cuda:
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        lines.append(f"device: {fields['device']} ({memory:.0f} GiB), {torch.cuda.device_count()} visible")
    return {**fields, "lines": lines}


# ---- the bundle for a machine with only torch, numpy and pytest ------------------------------------


def bundle_corpus(data_dir: Path, dest: Path) -> None:
    """Copy PTB's three files from data_dir/ptb to dest/ptb, verified against the published MD5s (MD5SUMS beside)."""
    source = KNOWN_CORPORA["ptb"]
    files = find_split_files(data_dir / "ptb")
    target = dest / "ptb"
    target.mkdir(parents=True, exist_ok=True)
    sums = []
    for split, path in files.items():
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != source.md5[split]:
            raise UserError(f"{path} has MD5 {digest}, not PTB's published {source.md5[split]}: "
                            f"restore it (`python -m harness data fetch ptb`) before bundling")
        shutil.copyfile(path, target / path.name)
        sums.append(f"{digest}  {path.name}\n")
    (target / "MD5SUMS").write_text("".join(sums))


def build_bundle(folder: Path, data_dir: Path, log=print) -> None:
    """folder/site: BUNDLE_PACKAGES at the versions of constraints.txt; folder/data: PTB. Carry it to the GPU."""
    site = folder / "site"
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--only-binary=:all:", "--target", str(site), "-c", str(REPO / "constraints.txt"),
                    *BUNDLE_PACKAGES], check=True)
    bundle_corpus(data_dir, folder / "data")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    log(f"{folder}: {', '.join(BUNDLE_PACKAGES)} and PTB, {size / 2**20:.1f} MB")


def device_command(bundle: str = ".gpu-bundle") -> str:
    """The one shell line that runs the check on a GPU machine from the repository root, writing to $OUT."""
    # The first of python3/python that has torch: the GPU machine's own interpreter, not a bare system one.
    return (f'PY=$(for p in python3 python; do $p -c "import torch" 2>/dev/null && echo $p && break; done); '
            f'PYTHONPATH="$PWD:$PWD/{bundle}/site${{PYTHONPATH:+:$PYTHONPATH}}" AWD_DATA_DIR="$PWD/{bundle}/data" '
            f'"${{PY:?no python3 or python with torch on PATH}}" -m harness.gpu_check --out "$OUT"')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check", help="folder for gpu-check.md, .json and .log")
    parser.add_argument("--budget", type=float, default=TOTAL_SECONDS, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma list of parts to run")
    parser.add_argument("--rehearse", action="store_true", help="run the parts on this CPU at toy sizes")
    parser.add_argument("--bundle", metavar="DIR", help="instead: build the carry bundle in DIR (needs pip)")
    parser.add_argument("--print-command", action="store_true", help="instead: print the GPU machine's command")
    args = parser.parse_args(argv)
    if args.bundle or args.print_command:
        bundle = args.bundle or ".gpu-bundle"
        if args.bundle:
            build_bundle(Path(args.bundle), default_data_dir())
        if args.print_command:
            print(f"carry: [\"{bundle}\"]\ncommand:\n{device_command(bundle)}")
        return 0
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - {p.name for p in PARTS})
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(p.name for p in PARTS)}")
    return run_check(Path(args.out), args.budget, [p for p in PARTS if p.name in names], args.rehearse)


if __name__ == "__main__":
    sys.exit(main())
