"""The GPU check's parts: 1 the gpu-marked tests and weight drop's memory per step, 2 the throughput bench on CUDA,
3 one epoch of studies/paper-ptb.toml, 4 several trials packed onto one GPU; each judged against its target.
"""

import dataclasses
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.bench import BPTT, PAPER_RATES, SIZES, BenchRow, layer_sizes, run_bench
from harness.data import load_corpus
from harness.gpu_check.check import (
    ERROR, FAIL, INFO, PASS, SKIPPED, CheckRow, Part, PartContext,
)
from harness.gpu_check.probes import PackingResult, WeightDropMemory, pack_trials, weight_drop_memory
from harness.study.scheduler import discover_slots
from harness.study.spec import StudyConfig, load_study
from harness.train import train_model

REPO = Path(__file__).resolve().parents[2]
PAPER_STUDY = REPO / "studies" / "paper-ptb.toml"
# salesforce/awd-lstm-lm README, "Speed": PTB, batch 20, LSTM, NVIDIA Quadro GP100 (train + validation).
REFERENCE_EPOCH_SECONDS = 65.0
# The same README at commit 28683b2 (2017-09-07): `python main.py --batch_size 20 --data data/penn --dropouti 0.4
# --seed 28 --epoch 300` "should result in a validation perplexity of 308.03" after its first epoch; main.py's defaults
# then were --dropouth 0.3, --dropout 0.4, --dropoute 0.1, --wdrop 0.5, lr 30, bptt 70, 400/1150/3 tied, the rest
# as studies/paper-ptb.toml. Part 3 trains its epoch with that command's settings and compares.
REFERENCE_FIRST_EPOCH_VAL_PPL = 308.03
REFERENCE_COMMAND = {"dropout.hidden": 0.3, "train.seed": 28}
# Another implementation, framework version and random stream move a first epoch's perplexity by some percent; a
# recipe that is wrong (a technique missing, another learning rate, dropout left on at validation) moves it by more.
FIRST_EPOCH_TOLERANCE = 0.10
BENCH_TARGET = 0.9  # AWD with every technique on, at least this fraction of the plain cuDNN stack's tokens/s
BENCH_BATCHES = (20, 80)
PACKING_TRIALS = (1, 2, 4)
# Weight drop may add, per layer and step, its (4H, H) mask and the masked gradient of the raw W_hh (2 x W_hh);
# cuDNN compacting scattered weights at every call would add a whole flat buffer on top (>= 1.35 x W_hh at
# the paper's sizes), so 2.5 x W_hh separates the two at every layer shape.
MEMORY_STEP_LIMIT = 2.5


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
            rows.append(CheckRow(part, what, PASS, f"{seconds:.2f} s", "passes", "",
                                 {"test": name, "seconds": seconds}))
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
                              why=f"{ctx.seconds_left():.0f} s left of the part's budget; batch {batch} took "
                                  f"{took:.0f} s"))
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
    """3: one epoch of the paper's configuration (awd, the reference README's command) on PTB, against the reference's
    seconds per epoch and its first epoch's validation perplexity."""
    device = "cpu" if ctx.rehearse else "cuda"
    config = _paper_config({"train.epochs": 1, **REFERENCE_COMMAND}, ctx.rehearse)
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
        ctx.emit(CheckRow(ctx.part.title, FIRST_EPOCH_WHAT, SKIPPED, target=FIRST_EPOCH_TARGET,
                          why="no full epoch fitted the part's time left"))
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
    ctx.row(**judge_first_epoch(epoch.val_ppl))


FIRST_EPOCH_WHAT = ("validation perplexity after the first epoch of the reference README's PTB command (seed 28, "
                    "dropouth 0.3, the paper's other rates)")
FIRST_EPOCH_TARGET = (f"{REFERENCE_FIRST_EPOCH_VAL_PPL} +- {FIRST_EPOCH_TOLERANCE:.0%} (awd-lstm-lm README at "
                      "28683b2: the recipe learns as the reference does)")


def judge_first_epoch(val_ppl: float) -> dict:
    """The row (PartContext.row arguments) of the GPU answer key: the first epoch's validation perplexity within
    FIRST_EPOCH_TOLERANCE of the reference's 308.03."""
    off = val_ppl / REFERENCE_FIRST_EPOCH_VAL_PPL - 1
    return dict(what=FIRST_EPOCH_WHAT, result=PASS if abs(off) <= FIRST_EPOCH_TOLERANCE else FAIL,
                value=f"{val_ppl:.2f} ({off:+.1%} from the reference's {REFERENCE_FIRST_EPOCH_VAL_PPL})",
                target=FIRST_EPOCH_TARGET, val_ppl=val_ppl, reference_val_ppl=REFERENCE_FIRST_EPOCH_VAL_PPL)


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
    Part("bench", "2 bench",
         f"AWD (locked) vs plain cuDNN stack, paper size, batch {' and '.join(map(str, BENCH_BATCHES))}",
         f">= {BENCH_TARGET}x", part_bench, cap_seconds=120, min_seconds=40),
    Part("epoch", "3 epoch", "one epoch of studies/paper-ptb.toml (awd) on PTB",
         f"<= {REFERENCE_EPOCH_SECONDS:.0f} s/epoch (reference, GP100)", part_epoch, cap_seconds=180, min_seconds=45),
    Part("packing", "4 packing", "1, 2, 4 equal trials on one GPU through the scheduler: aggregate tokens/s",
         "(measured)", part_packing, cap_seconds=150, min_seconds=40),
)
