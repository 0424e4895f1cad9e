"""Benchmarks as ratios measured side by side in one process: training throughput of each arm against a plain
stack of the same cell's torch module (arms alternate every round; the median ratio, in wall-clock and CPU time),
peak memory, and the scheduler's speed-up of n equal trials on 2 CPU slots over 1.

    python -m harness bench [--sizes paper,cpu] [--cells lstm,gru,rnn_tanh,rnn_relu] [--rounds 8] [--steps 3]
    python -m harness bench --scheduler [--tasks 6]
"""

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import HIDDEN_MODES, DropoutConfig, ModelConfig, RunConfig
from harness.dropout import CELL_TABLE
from harness.model import AWDLSTM, LMOutput, detach_state
from harness.study.rules import RunState
from harness.study.scheduler import Scheduler, Slot, Task

# The paper's PTB model and the CPU-sized one of studies/cpu-ptb.toml; "tiny" is for tests and rehearsals.
SIZES = {"paper": ModelConfig(400, 1150, 3), "cpu": ModelConfig(200, 400, 3), "tiny": ModelConfig(32, 64, 2)}
PAPER_RATES = dict(embedding=0.1, input=0.4, hidden=0.25, output=0.4, weight=0.5)
ARMS = ("plain", *HIDDEN_MODES)
VOCAB, BATCH, BPTT = 10_000, 20, 70


def layer_sizes(model: ModelConfig) -> list[tuple[int, int]]:
    """(input_size, hidden_size) of each recurrent layer of AWD-LSTM (tied: the last is emb_size wide) and PlainRNN."""
    sizes = [model.emb_size] + [model.hidden_size] * (model.n_layers - 1) + [model.emb_size]
    return list(zip(sizes, sizes[1:]))


class PlainRNN(nn.Module):
    """Embedding, layers of model.cell's torch module (nn.LSTM, nn.GRU, nn.RNN) of AWD-LSTM's sizes, tied decoder;
    no dropout at all."""

    def __init__(self, vocab_size: int, model: ModelConfig):
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, model.emb_size)
        self.layers = nn.ModuleList(CELL_TABLE[model.cell].module(i, o) for i, o in layer_sizes(model))
        self.decoder = nn.Linear(model.emb_size, vocab_size)
        self.decoder.weight = self.encoder.weight
        self.cell_state = CELL_TABLE[model.cell].cell_state

    def init_state(self, batch_size: int):
        """Zeros per layer: (h, c) for nn.LSTM, h for nn.GRU and nn.RNN; each (1, B, H)."""
        w = self.encoder.weight
        zeros = [[w.new_zeros(1, batch_size, m.hidden_size) for _ in range(1 + self.cell_state)] for m in self.layers]
        return [tuple(z) if self.cell_state else z[0] for z in zeros]

    def forward(self, tokens, state):
        x, new_state = self.encoder(tokens), []
        for layer, layer_state in zip(self.layers, state):
            x, s = layer(x, layer_state)
            new_state.append(s)
        return LMOutput(self.decoder(x), new_state, x, x)


def build_arm(arm: str, size: str, device: str, cell: str = "lstm") -> nn.Module:
    """The plain stack of the cell, or AWD-LSTM on the cell with every technique on in one hidden mode."""
    model = dataclasses.replace(SIZES[size], cell=cell)
    if arm == "plain":
        return PlainRNN(VOCAB, model).to(device)
    return AWDLSTM(VOCAB, model, DropoutConfig(**PAPER_RATES, hidden_mode=arm)).to(device)


class _Trainer:
    """One arm's model, optimizer, data and carried state, ready to take timed steps."""

    def __init__(self, arm: str, size: str, device: str, batch_size: int = BATCH, cell: str = "lstm"):
        torch.manual_seed(0)
        self.model = build_arm(arm, size, device, cell).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.data = torch.randint(VOCAB, (BPTT + 1, batch_size), device=device)  # (T + 1, B)
        self.state = self.model.init_state(batch_size)

    def step(self):
        self.state = detach_state(self.state)
        out = self.model(self.data[:-1], self.state)
        self.state = out.state
        loss = F.cross_entropy(out.logits.flatten(0, 1), self.data[1:].flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.25)
        self.opt.step()


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_mb(arm: str, size: str, steps: int, batch_size: int = BATCH, cell: str = "lstm") -> float:
    """Runs in a fresh process: peak resident size above the imports (MB) while training one arm.

    A sampling thread reads the resident size every millisecond (torch releases the GIL in its kernels);
    ru_maxrss would not do, since the imports alone can peak above a small model's training.
    """
    baseline = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trainer = _Trainer(arm, size, "cpu", batch_size, cell)
    for _ in range(steps):
        trainer.step()
    done.set()
    sampler.join()
    return (max(peak, _rss_bytes()) - baseline) / 2**20


@dataclass(frozen=True)
class BenchRow:
    """One arm at one size, on one cell."""

    size: str
    arm: str
    tokens_per_s: float
    ratio: float  # median over rounds of this arm's tokens/s over the plain stack's (of the same cell)
    # The same in CPU time: unmoved by other processes on a shared machine. NaN on a GPU: there the host
    # mostly waits in synchronize(), spinning by default, so its CPU time only repeats the wall clock.
    cpu_ratio: float
    peak_memory_mb: float
    batch_size: int = BATCH
    cell: str = "lstm"


def run_bench(sizes=("paper", "cpu"), rounds: int = 5, steps: int = 3, device: str = "cpu",
              arms=ARMS, log=print, batch_size: int = BATCH, warmup: int = 1, cells=("lstm",)) -> list[BenchRow]:
    """Measure every arm at every size on every cell, against the plain stack of that cell; the arms alternate
    within each round, after `warmup` steps each."""
    rows = []
    for size, cell in ((size, cell) for size in sizes for cell in cells):
        trainers = {arm: _Trainer(arm, size, device, batch_size, cell) for arm in arms}
        for trainer in trainers.values():  # warm-up: allocator, kernels (cuDNN picks its algorithms), threads
            for _ in range(warmup):
                trainer.step()
        _sync(device)
        speeds = {arm: [] for arm in arms}  # tokens per wall-clock second, one entry per round
        cpu_speeds = {arm: [] for arm in arms}  # tokens per CPU second of this process
        for r in range(rounds):
            order = arms[r % len(arms):] + arms[: r % len(arms)]  # rotate so no arm always runs first
            for arm in order:
                # The previous stretch ended with a synchronize, so the clock starts on an idle device.
                started, cpu_started = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    trainers[arm].step()
                _sync(device)
                tokens = steps * BPTT * batch_size
                speeds[arm].append(tokens / (time.perf_counter() - started))
                cpu_speeds[arm].append(tokens / max(time.process_time() - cpu_started, 1e-9))
            log(f"  {size} {cell}: round {r + 1}/{rounds} " + "  ".join(f"{a} {speeds[a][-1]:,.0f}" for a in arms))
        del trainers
        memory = _peak_memory(arms, size, device, batch_size, cell)
        for arm in arms:
            ratio = statistics.median(s / p for s, p in zip(speeds[arm], speeds["plain"]))
            cpu_ratio = statistics.median(s / p for s, p in zip(cpu_speeds[arm], cpu_speeds["plain"]))
            if device.startswith("cuda"):
                cpu_ratio = math.nan
            rows.append(BenchRow(size, arm, statistics.median(speeds[arm]), ratio, cpu_ratio, memory[arm],
                                 batch_size, cell))
    return rows


def _peak_memory(arms, size: str, device: str, batch_size: int = BATCH, cell: str = "lstm") -> dict:
    if device.startswith("cuda"):
        peaks = {}
        for arm in arms:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            trainer = _Trainer(arm, size, device, batch_size, cell)
            for _ in range(2):
                trainer.step()
            _sync(device)
            peaks[arm] = torch.cuda.max_memory_allocated() / 2**20
            del trainer
        return peaks
    spawn = multiprocessing.get_context("spawn")
    peaks = {}
    for arm in arms:  # one fresh process per arm: the peak resident size only ever grows
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            peaks[arm] = pool.submit(_peak_rss_mb, arm, size, 2, batch_size, cell).result()
    return peaks


def format_table(rows: list[BenchRow], device: str) -> str:
    """Markdown table of the measurements."""
    batches = ", ".join(str(b) for b in sorted({row.batch_size for row in rows})) or str(BATCH)
    lines = [
        f"training throughput, {device}, {torch.get_num_threads()} threads, batch {batches}, bptt {BPTT}, "
        f"vocab {VOCAB}; AWD arms have every technique on ({', '.join(f'{k} {v}' for k, v in PAPER_RATES.items())}); "
        "plain: a stack of the cell's torch module (nn.LSTM, nn.GRU, nn.RNN) without dropout",
        "",
        "| size | cell | arm | tokens/s | vs plain | vs plain (CPU time) | peak memory (MB) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    several = len({row.batch_size for row in rows}) > 1
    for row in rows:
        m = SIZES[row.size]
        size = f"{row.size} ({m.emb_size}/{m.hidden_size}/{m.n_layers})" + (f", batch {row.batch_size}" * several)
        cpu_ratio = "n/a" if math.isnan(row.cpu_ratio) else f"{row.cpu_ratio:.3f}x"
        lines.append(
            f"| {size} | {row.cell} | {row.arm} | {row.tokens_per_s:,.0f} "
            f"| {row.ratio:.3f}x | {cpu_ratio} | {row.peak_memory_mb:,.0f} |"
        )
    return "\n".join(lines)


class EqualTrials:
    """The scheduler benchmark's TaskSource: n copies of one run, recording when each slot starts and ends one.

    Equal trials make the speed-up of k slots over one a clean ratio; tests use it to check slot exclusivity.
    """

    def __init__(self, config: RunConfig, n: int, workdir: Path):
        self.config, self.workdir = config, workdir
        self.todo = [f"task{i}" for i in range(n)]
        self.events = []  # (monotonic time, "start" | "done", slot index, task key, tasks not yet started)
        self.epochs = []  # (task key, the EpochResult the worker reported)

    def next_task(self, slot: Slot) -> Task | None:
        if not self.todo:
            return None
        key = self.todo.pop(0)
        return Task(key, self.config, str(self.workdir / key), prunable=False)

    def on_start(self, task: Task, slot: Slot) -> None:
        self.events.append((time.monotonic(), "start", slot.index, task.key, len(self.todo)))

    def on_begin(self, task: Task, restored: tuple, notes: list) -> None:
        pass  # every task is new: nothing is restored

    def on_epoch(self, task: Task, epoch) -> bool:
        self.epochs.append((task.key, epoch))
        return True

    def on_done(self, task: Task, slot: Slot, outcome) -> None:
        if outcome.state != RunState.FINISHED:
            raise RuntimeError(f"{task.key} {outcome.state}: {outcome.reason}")
        self.events.append((time.monotonic(), "done", slot.index, task.key, len(self.todo)))

    def on_tick(self) -> None:
        pass


def bench_slots(config: RunConfig, n_tasks: int, slot_counts=(1, 2), log=print) -> dict:
    """Wall time of n equal one-thread trials on 1 CPU slot, then on 2: slot count -> seconds."""
    seconds = {}
    for count in slot_counts:
        with tempfile.TemporaryDirectory() as workdir:
            source = EqualTrials(config, n_tasks, Path(workdir))
            started = time.perf_counter()
            Scheduler([Slot(i, "cpu", 1) for i in range(count)], tick_seconds=0.2).run(source)
            seconds[count] = time.perf_counter() - started
        log(f"  {n_tasks} equal trials on {count} slot{'s' * (count > 1)}: {seconds[count]:.1f} s")
    return seconds
