"""The GPU check's runner: each part in its own process under a share of one time budget; a part that fails or
overruns gets a row saying so while the others still run; one table (gpu-check.md), the numbers (gpu-check.json)
and the log. The parts themselves are in harness.gpu_check.parts.
"""

import dataclasses
import json
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy
import torch

from harness.errors import UserError
from harness.study.processes import Child, ready

TOTAL_SECONDS = 420.0  # the issue allows 8 minutes on one H200, start-up included
GRACE_SECONDS = 10.0  # between a part's deadline and the kill of its process group

PASS, FAIL, SKIPPED, ERROR, OVERRAN = "pass", "fail", "skipped", "error", "overran"
INFO, REHEARSED = "info", "rehearsed"
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


def _part_process(part: Part, seconds: float, rehearse: bool, hints: dict, out: str, log_file: str, conn) -> None:
    """A part's own process: a new session (so the parent can kill it with every process it starts); each row goes
    to the parent over the pipe as soon as it is made, so a part killed later keeps the rows it finished."""
    os.setsid()
    started = time.monotonic()

    def log(message: str) -> None:
        line = f"[{part.name} {time.monotonic() - started:5.1f}s] {message}"
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    def emit(row: CheckRow) -> None:
        conn.send(dataclasses.asdict(row))
        log(f"-> {row.result}: {row.what}: {row.value} {row.why}".rstrip())

    ctx = PartContext(part, started + seconds, rehearse, hints, Path(out), emit, log)
    try:
        part.run(ctx)
    except Exception as err:
        if not isinstance(err, UserError):  # a user error's message says it all
            log(traceback.format_exc())
        emit(CheckRow(part.title, part.what, ERROR, why=f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def run_part(part: Part, seconds: float, rehearse: bool, hints: dict, out: Path, log, grace: float) -> list[CheckRow]:
    """Run one part in a fresh process (harness.study.processes); kill it and everything it started `grace` seconds
    after its deadline."""
    child = Child(_part_process, (part, seconds, rehearse, hints, str(out), str(out / "gpu-check.log")),
                  f"gpu-check-{part.name}", new_session=True)
    deadline, rows = child.started + seconds + grace, []
    while child.alive and time.monotonic() < deadline:
        for _ in ready([child], timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
            got, row = child.receive()
            if got:
                rows.append(CheckRow(**row))
    overran = child.alive
    child.stop(grace=0)
    while (message := child.receive())[0]:  # rows sent just before it ended
        rows.append(CheckRow(**message[1]))
    child.close()
    if overran:
        rows.append(CheckRow(part.title, part.what, OVERRAN, f"killed after {seconds + grace:.0f} s",
                             f"<= {seconds:.0f} s (its share of the budget)",
                             "ran past its deadline; the rows above it are what it finished"))
    elif child.process.exitcode != 0 and not any(row.result == ERROR for row in rows):
        rows.append(CheckRow(part.title, part.what, ERROR, target=part.target,
                             why=f"its process died ({child.death()}); see the log"))
    return rows


def run_check(out: Path, parts, budget: float = TOTAL_SECONDS, rehearse: bool = False,
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
            why = (f"only {max(seconds, 0):.0f} s of the {budget:.0f} s budget left for it; it needs "
                   f"{part.min_seconds:.0f} s")
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


