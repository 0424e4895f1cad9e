"""What the GPU check measures beyond the library's bench: trials packed onto one device through the scheduler, and
weight drop's memory per training step against nn.LSTM on the CUDA allocator.
"""

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.bench import EqualTrials
from harness.config import RunConfig
from harness.dropout import WeightDropLSTM
from harness.study.scheduler import Scheduler, Slot


@dataclass(frozen=True)
class PackingResult:
    """One wave of equal trials started together, one per slot, all slots on one device."""

    trials: int
    wall_seconds: float  # scheduler start to last trial done: start-up, data, training, validation, checkpoints
    train_tokens: int  # training tokens of all the trials together
    # Sum over the trials of each one's median training tokens/s over its epochs after the first (its only
    # epoch if it has one): the device's aggregate throughput while the trials share it, start-up excluded.
    steady_tokens_per_s: float

    @property
    def wall_tokens_per_s(self) -> float:
        """Training tokens of all trials over the wall time, start-up included."""
        return self.train_tokens / self.wall_seconds


def pack_trials(config: RunConfig, waves: list[list[Slot]], log=print) -> list[PackingResult]:
    """Run one wave of equal trials per slot list (len(slots) trials at once) through the Scheduler.

    A study packs k trials onto one GPU with k slots naming it (`--trials-per-device k`); comparing the
    aggregate throughput of waves of 1, 2, 4 slots shows what packing gains. Raises RuntimeError if a trial
    does not finish (the other trials of its wave are killed).
    """
    results = []
    for slots in waves:
        with tempfile.TemporaryDirectory() as workdir:
            source = EqualTrials(config, len(slots), Path(workdir))
            scheduler = Scheduler(slots, tick_seconds=0.1)
            started = time.perf_counter()
            try:
                scheduler.run(source)
            finally:  # a failed trial raises out of run(); its wave mates must not outlive it
                for run in scheduler.running.values():
                    run.child.stop(grace=0)
            wall = time.perf_counter() - started
        per_trial = {}
        for key, epoch in source.epochs:
            per_trial.setdefault(key, []).append(epoch)
        train_tokens = sum(round(e.tokens_per_s * e.epoch_seconds) for es in per_trial.values() for e in es)
        steady = sum(statistics.median(e.tokens_per_s for e in (es[1:] or es)) for es in per_trial.values())
        results.append(PackingResult(len(slots), wall, train_tokens, steady))
        log(f"  {len(slots)} trial{'s' * (len(slots) > 1)} on {', '.join(sorted({s.device for s in slots}))}: "
            f"{wall:.1f} s, {steady:,.0f} tokens/s together while training")
    return results


@dataclass(frozen=True)
class WeightDropMemory:
    """CUDA allocator bytes of WeightDropLSTM layers against nn.LSTM layers of the same sizes (float32)."""

    step_extra: int  # peak bytes allocated during one forward + backward, above the plain layers' peak
    held_extra: int  # bytes the layers themselves hold, above the plain layers' (expected: the raw W_hh)
    w_hh_bytes: int  # one (4H, H) matrix per layer, summed
    flat_bytes: int  # the plain layers' flat weight buffers, summed: what a per-call weight copy would add


def peak_step_bytes(layers: nn.Module, x: torch.Tensor) -> int:
    """Peak CUDA bytes allocated above the starting point while x (T, B, I) goes forward and back through layers."""
    layers.zero_grad(set_to_none=True)  # a step's own gradients count; the previous step's do not
    torch.cuda.synchronize(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    h = x
    for layer in layers:
        h, _ = layer(h)
    h.sum().backward()
    del h
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - before


def weight_drop_memory(sizes: list[tuple[int, int]], batch_size: int, bptt: int, weight_p: float = 0.5,
                       device: str = "cuda", repeats: int = 3) -> WeightDropMemory:
    """Measure what weight drop costs in memory on cuDNN, per training step and held, against nn.LSTM layers.

    Per layer and step weight drop should add its (4H, H) mask and the masked gradient of the raw W_hh, and hold
    the raw W_hh; cuDNN compacting non-contiguous weights at every call would add a whole flat buffer per layer.
    The two stacks alternate over `repeats` steps after one warm-up step each; medians are compared.
    """
    torch.manual_seed(0)
    x = torch.randn(bptt, batch_size, sizes[0][0], device=device)  # (T, B, I)
    builders = {"plain": lambda i, o: nn.LSTM(i, o),
                "weight_drop": lambda i, o: WeightDropLSTM(i, o, weight_p=weight_p)}
    stacks, held = {}, {}
    for name, build in builders.items():
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        stacks[name] = nn.ModuleList(build(i, o) for i, o in sizes).to(device).train()
        torch.cuda.synchronize(device)
        held[name] = torch.cuda.memory_allocated(device) - before
    for stack in stacks.values():  # warm-up: cuDNN's algorithm choice and workspace, the allocator's pools
        peak_step_bytes(stack, x)
    peaks = {name: [] for name in stacks}
    for r in range(repeats):
        for name in (list(stacks) if r % 2 == 0 else list(stacks)[::-1]):
            peaks[name].append(peak_step_bytes(stacks[name], x))
    element = x.element_size()
    return WeightDropMemory(
        step_extra=statistics.median(peaks["weight_drop"]) - statistics.median(peaks["plain"]),
        held_extra=held["weight_drop"] - held["plain"],
        w_hh_bytes=sum(4 * o * o for _, o in sizes) * element,
        flat_bytes=sum(4 * o * (i + o + 2) for i, o in sizes) * element,
    )
