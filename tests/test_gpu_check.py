"""The GPU check's CPU-side logic: skipping without CUDA, budget shares, part processes that fail or overrun,
the table, the judges, packing tiny trials through the scheduler, the bundle, and an import chain that needs
nothing beyond torch, numpy, pytest and the bundled packages.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

import hashlib
import importlib.metadata
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from helpers import study_for_tests
from harness.bench import BenchRow
from harness.data import batchify, bptt_positions, load_corpus
from harness.errors import UserError
from harness.gpu_check import parts as gpu_parts
from harness.gpu_check.bundle import BUNDLE_PACKAGES, bundle_corpus, device_command
from harness.gpu_check.check import (
    ERROR, FAIL, INFO, OVERRAN, PASS, REHEARSED, SKIPPED, CheckRow, Part, exit_code, format_table, part_seconds,
    run_check,
)
from harness.gpu_check.parts import (
    epoch_tokens, judge_bench, judge_first_epoch, judge_memory, junit_rows, packing_tokens,
)
from harness.gpu_check import probes
from harness.gpu_check.probes import WeightDropMemory, pack_trials
from harness.study.scheduler import Slot
from harness.study.spec import load_study

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


# ---- parts for the runner tests: module-level, so a spawned part process can import them ------------


def _hang_part(ctx):
    """Emits a row, starts a grandchild, then outlives its deadline."""
    child = subprocess.Popen(["sleep", "60"])
    ctx.emit(CheckRow(ctx.part.title, "before the hang", PASS, numbers={"pid": os.getpid(), "child": child.pid}))
    time.sleep(60)


def _raise_part(ctx):
    raise RuntimeError("the kernel caught fire")


def _pass_part(ctx):
    ctx.row("fine", PASS, "1.0x", ">= 0.9x", hint=ctx.hints.get("tokens_per_s"))


def _part(name, run, cap=30.0, minimum=1.0, **kwargs):
    return Part(name, f"{name} part", f"what {name} checks", "its target", run, cap, minimum, **kwargs)


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


# ---- running the parts ----------------------------------------------------------------------------


def test_without_cuda_every_part_is_skipped_with_the_reason_and_the_exit_code_is_0(tmp_path, capsys):
    assert run_check(tmp_path, gpu_parts.PARTS, cuda=False) == 0
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["rows"]
    assert [r["part"] for r in rows] == [p.title for p in gpu_parts.PARTS]
    assert all(r["result"] == SKIPPED and "no CUDA device" in r["why"] for r in rows)
    printed = capsys.readouterr().out
    assert printed.count("skipped: no CUDA device") >= 2 * len(gpu_parts.PARTS)  # progress lines and table
    assert (tmp_path / "gpu-check.md").read_text().count("| skipped: no CUDA device") == len(gpu_parts.PARTS)


def test_a_failing_or_overrunning_part_gets_its_row_and_the_others_still_run(tmp_path):
    parts = [_part("hang", _hang_part, cap=8.0), _part("boom", _raise_part), _part("fine", _pass_part)]
    started = time.monotonic()
    code = run_check(tmp_path, budget=60, parts=parts, cuda=True, grace=1.0, log=lambda *a: None)
    assert time.monotonic() - started < 40  # the hanging part was cut at its deadline, not at its sleep's end
    assert code == 1
    rows = [CheckRow(**r) for r in json.loads((tmp_path / "gpu-check.json").read_text())["rows"]]
    assert [(r.part, r.result) for r in rows] == [
        ("hang part", PASS), ("hang part", OVERRAN), ("boom part", ERROR), ("fine part", PASS)]
    assert "RuntimeError: the kernel caught fire" in rows[2].why
    # The kill took the part's whole process group: the part and what it started.
    deadline = time.monotonic() + 5
    while (_alive(rows[0].numbers["pid"]) or _alive(rows[0].numbers["child"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(rows[0].numbers["pid"]) and not _alive(rows[0].numbers["child"])


@pytest.mark.fast
def test_each_part_gets_its_cap_less_what_the_later_parts_need():
    parts = [_part("a", None, cap=100, minimum=10), _part("b", None, cap=100, minimum=20),
             _part("c", None, cap=100, minimum=30)]
    assert part_seconds(parts, 1000, grace=5) == 100
    assert part_seconds(parts, 120, grace=5) == 120 - 5 - (20 + 5) - (30 + 5)
    assert part_seconds(parts[2:], 40, grace=5) == 35


def test_a_part_is_skipped_when_the_budget_left_is_below_its_minimum(tmp_path):
    parts = [_part("fine", _pass_part, minimum=50)]
    assert run_check(tmp_path, budget=30, parts=parts, cuda=True, grace=1.0, log=lambda *a: None) == 0
    (row,) = json.loads((tmp_path / "gpu-check.json").read_text())["rows"]
    assert row["result"] == SKIPPED and "needs 50 s" in row["why"]


def test_rehearsal_marks_judged_rows_and_skips_what_needs_a_gpu(tmp_path):
    parts = [_part("fine", _pass_part), _part("gpu only", _pass_part, rehearsable=False)]
    assert run_check(tmp_path, parts=parts, rehearse=True, cuda=False, grace=1.0, log=lambda *a: None) == 0
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["rows"]
    assert [r["result"] for r in rows] == [REHEARSED, SKIPPED]


# ---- table, exit code, judges ---------------------------------------------------------------------


@pytest.mark.fast
def test_table_has_one_row_per_check_and_keeps_cells_intact():
    rows = [CheckRow("2 bench", "AWD | plain", PASS, "0.95x", ">= 0.9x"),
            CheckRow("3 epoch", "one epoch", SKIPPED, why="no CUDA\ndevice")]
    lines = format_table(rows, ["header line"]).splitlines()
    assert lines[0] == "header line"
    assert lines[2] == "| part | what | result | measured | target |"
    assert lines[4] == "| 2 bench | AWD \\| plain | pass | 0.95x | >= 0.9x |"
    assert lines[5] == "| 3 epoch | one epoch | skipped: no CUDA device |  |  |"


@pytest.mark.fast
@pytest.mark.parametrize("results, code", [
    ((PASS, SKIPPED, INFO, REHEARSED), 0), ((PASS, FAIL), 1), ((PASS, ERROR), 1), ((SKIPPED, OVERRAN), 1), ((), 0)])
def test_exit_code_is_0_only_when_no_part_failed_errored_or_overran(results, code):
    assert exit_code([CheckRow("p", "w", r) for r in results]) == code


@pytest.mark.fast
@pytest.mark.parametrize("ratio, result", [(0.9, PASS), (1.2, PASS), (0.89, FAIL)])
def test_bench_passes_at_the_target_ratio(ratio, result):
    plain = BenchRow("paper", "plain", 1000.0, 1.0, float("nan"), 800.0, 80)
    awd = BenchRow("paper", "locked", 1000.0 * ratio, ratio, float("nan"), 900.0, 80)
    row = judge_bench(plain, awd)
    assert row["result"] == result and "batch 80" in row["what"] and row["ratio"] == ratio


@pytest.mark.fast
@pytest.mark.parametrize("val_ppl, result", [(308.03, PASS), (308.03 * 1.099, PASS), (308.03 * 0.901, PASS),
                                             (308.03 * 1.101, FAIL), (308.03 * 0.899, FAIL), (1000.0, FAIL)])
def test_the_first_epoch_passes_within_ten_percent_of_the_references_308(val_ppl, result):
    row = judge_first_epoch(val_ppl)
    assert row["result"] == result and row["reference_val_ppl"] == 308.03 and "308.03" in row["target"]
    assert f"{val_ppl:.2f}" in row["value"]


@pytest.mark.needs("ptb")
def test_the_epoch_part_rehearsed_trains_the_reference_command_and_reports_both_rows(tmp_path):
    (epoch_part,) = [p for p in gpu_parts.PARTS if p.name == "epoch"]
    assert run_check(tmp_path, [epoch_part], budget=300, rehearse=True, cuda=False, log=lambda *a: None) == 0
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["rows"]
    assert [r["result"] for r in rows] == [REHEARSED, REHEARSED]
    speed, first = rows
    assert "s/epoch" in speed["value"] and first["what"] == gpu_parts.FIRST_EPOCH_WHAT
    assert first["numbers"]["reference_val_ppl"] == 308.03 and first["numbers"]["val_ppl"] > 1


@pytest.mark.fast
@pytest.mark.parametrize("step, held, results", [
    (2.0, 1.0, [PASS, PASS]), (2.5, 1.01, [PASS, PASS]), (3.4, 1.0, [FAIL, PASS]), (1.0, 2.0, [PASS, FAIL])])
def test_memory_passes_with_mask_and_masked_gradient_and_fails_with_a_copy(step, held, results):
    w_hh = 4 * 2**20
    memory = WeightDropMemory(int(step * w_hh), int(held * w_hh), w_hh, int(1.35 * w_hh))
    assert [row.result for row in judge_memory(memory, "1 memory")] == results


@pytest.mark.fast
def test_epoch_tokens_are_the_tokens_an_epoch_trains_on():
    import torch

    for n, batch in [(1000, 20), (929_589, 20), (45, 7)]:
        data = batchify(torch.arange(n), batch)
        trained = sum(seq_len * batch for _, seq_len in bptt_positions(data, 70, None))
        assert epoch_tokens(n, batch) == trained


@pytest.mark.fast
def test_packing_trials_are_sized_from_the_measured_speed():
    assert packing_tokens(40_000, 2.0, 20, 70) == 57 * 1400 + 20  # 80k tokens: 57 whole windows
    assert packing_tokens(None, 2.0, 20, 70) == 71 * 1400 + 20  # unknown: about 100k
    assert packing_tokens(10.0, 2.0, 20, 70) == 20 * 1400 + 20  # at least 20 windows
    assert packing_tokens(1e9, 2.0, 20, 70) == 2000 * 1400 + 20  # at most 2000


def test_junit_rows_report_passes_failures_and_skips_from_a_real_pytest_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        def test_good(): pass
        def test_bad(): assert 1 == 2, "one is not two"
        @pytest.mark.skip(reason="no device")
        def test_later(): pass
    """))
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")], capture_output=True, cwd=tmp_path)
    rows = {row.what: row for row in junit_rows(junit, "1 gpu tests")}
    assert rows["good"].result == PASS
    assert rows["bad"].result == FAIL and "one is not two" in rows["bad"].why
    assert rows["later"].result == SKIPPED and rows["later"].why == "no device"


# ---- packing through the scheduler, with tiny trials on the CPU -----------------------------------


def test_pack_trials_runs_a_wave_at_once_and_counts_every_trained_token(tmp_path, test_corpus):
    config = load_study(study_for_tests(REPO / "studies" / "smoke.toml", test_corpus, tmp_path)).run_config(
        "awd", {"train.epochs": 2, "train.train_tokens": 2_000, "train.valid_tokens": 1_000})
    load_corpus(config.corpus, log=lambda *a: None)
    started = time.perf_counter()
    (result,) = pack_trials(config, [[Slot(0, "cpu", 1), Slot(1, "cpu", 1)]], log=lambda *a: None)
    assert result.trials == 2 and result.train_tokens == 2 * 2 * epoch_tokens(2_000, config.train.batch_size)
    assert 0 < result.wall_seconds <= time.perf_counter() - started
    assert result.wall_tokens_per_s == result.train_tokens / result.wall_seconds
    # The steady rate sums the trials' training rates, which exclude start-up: above the wall-clock rate.
    assert result.steady_tokens_per_s > result.wall_tokens_per_s


def test_a_failed_trial_stops_its_wave_and_leaves_no_worker_behind(tmp_path, test_corpus, monkeypatch):
    config = load_study(study_for_tests(REPO / "studies" / "smoke.toml", test_corpus, tmp_path)).run_config(
        "awd", {"train.epochs": 200, "train.train_tokens": 2_000, "train.valid_tokens": 1_000})
    load_corpus(config.corpus, log=lambda *a: None)

    class FirstDiverges(probes.EqualTrials):  # the wave's first trial diverges at once, its mate trains on
        def next_task(self, slot):
            task = super().next_task(slot)
            if task is not None and task.key == "task0":
                task = dataclasses.replace(task, config=task.config.replace({"train.lr": 1e12, "train.clip": 0.0}))
            return task

    monkeypatch.setattr(probes, "EqualTrials", FirstDiverges)
    with pytest.raises(RuntimeError, match="loss became"):
        probes.pack_trials(config, [[Slot(0, "cpu", 1), Slot(1, "cpu", 1)]], log=lambda *a: None)
    assert multiprocessing.active_children() == []  # the mate was stopped, not left to train 200 epochs


# ---- the bundle, and what a bare torch machine needs ----------------------------------------------


@pytest.mark.fast
@pytest.mark.needs("ptb")
def test_bundled_corpus_is_verified_against_the_published_md5s(tmp_path, data_dir):
    bundle_corpus(data_dir, tmp_path / "data")
    assert load_corpus("ptb", tmp_path / "data", fetch_missing=False, log=lambda *a: None).vocab_size == 10_000
    sums = dict(line.split()[::-1] for line in (tmp_path / "data" / "ptb" / "MD5SUMS").read_text().splitlines())
    for name, digest in sums.items():
        assert hashlib.md5((tmp_path / "data" / "ptb" / name).read_bytes()).hexdigest() == digest
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "data", broken)
    with open(broken / "ptb" / "ptb.valid.txt", "a") as f:
        f.write("one more line\n")
    with pytest.raises(UserError, match="ptb.valid.txt has MD5"):
        bundle_corpus(broken, tmp_path / "again")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_modules(dist) -> set:
    names = (dist.read_text("top_level.txt") or "").split()
    for path in dist.files or []:
        top = path.parts[0]
        if path.suffix == ".py" or (len(path.parts) > 1 and path.parts[1] == "__init__.py"):
            names.append(top.removesuffix(".py"))
    return {n for n in names if n and not n.endswith((".dist-info", ".egg-info")) and n not in ("..", "__pycache__")}


def _gpu_machine_modules() -> tuple[set, set]:
    """(allowed, blocked) top-level modules: a GPU machine has torch, numpy, pytest and what they require."""
    dists = {_normal(d.metadata["Name"]): d for d in importlib.metadata.distributions() if d.metadata["Name"]}
    dists.pop("awd-ablation", None)  # this repository: on PYTHONPATH there
    allowed, todo = set(), ["torch", "numpy", "pytest"]
    while todo:
        name = _normal(todo.pop())
        if name in allowed or name not in dists:
            continue
        allowed.add(name)
        for spec in dists[name].requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    allowed_modules = set().union(*(_top_level_modules(dists[n]) for n in allowed))
    blocked = set().union(*(_top_level_modules(d) for n, d in dists.items() if n not in allowed)) - allowed_modules
    return allowed_modules, blocked


def write_blocker(folder: Path, bundle_site: Path | None) -> Path:
    """A sitecustomize.py in folder that makes every other installed package absent in every process started
    with folder on PYTHONPATH; the bundle's packages are found only in bundle_site, if given."""
    _, blocked = _gpu_machine_modules()
    folder.mkdir(parents=True, exist_ok=True)
    # A replacement for sys.meta_path's PathFinder rather than a finder that raises: importlib.util.find_spec
    # must answer None for an absent package, as on the GPU machine (torch._dynamo probes optional ones so).
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.machinery, sys
        BLOCKED, BUNDLE, SITE = {sorted(blocked)!r}, {list(BUNDLE_PACKAGES)!r}, {str(bundle_site) if bundle_site else None!r}

        class GpuMachinePathFinder(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                top = name.partition(".")[0]
                if path is None and top in BUNDLE:
                    return super().find_spec(name, [SITE] if SITE else None, target)
                if path is None and top in BLOCKED:
                    return None
                return super().find_spec(name, path, target)

        sys.meta_path[:] = [GpuMachinePathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    """))
    return folder


def test_the_blocker_blocks_what_a_gpu_machine_lacks(tmp_path):
    allowed, blocked = _gpu_machine_modules()
    assert {"torch", "numpy", "pytest"} <= allowed
    assert {"optuna", "mlflow", "sqlalchemy", "requests", "seaborn", "pandas", "joblib", "tqdm"} <= blocked
    env = {**os.environ, "PYTHONPATH": str(write_blocker(tmp_path / "block", None))}
    probe = "import importlib.util, joblib; print(importlib.util.find_spec('pandas')); import optuna"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert proc.stdout == "None\n" and "No module named 'optuna'" in proc.stderr


def test_the_check_imports_only_torch_numpy_pytest_and_the_bundled_packages(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(write_blocker(tmp_path / "block", None)), "CUDA_VISIBLE_DEVICES": ""}
    script = textwrap.dedent(f"""
        import sys
        import harness.gpu_check.__main__, harness.bench, harness.train, harness.study.scheduler, harness.data
        import harness.model
        code = harness.gpu_check.__main__.main(["--out", {str(tmp_path / "out")!r}])
        print(sorted(m for m in {list(BUNDLE_PACKAGES)!r} if m in sys.modules), code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Every bundled package is needed: dropping one from BUNDLE_PACKAGES would break the GPU machine.
    assert proc.stdout.splitlines()[-1] == f"{sorted(BUNDLE_PACKAGES)} 0"


def test_the_device_command_runs_from_a_bare_tree_with_the_bundle(tmp_path):
    # The device's copy of the working tree: the repository's files, .gpu-bundle/site with the bundled
    # packages (linked here from this venv; only that copy may be imported), python3 the only interpreter.
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("harness", "studies", "tests", "pyproject.toml"):
        (tree / name).symlink_to(REPO / name)
    site = tree / ".gpu-bundle" / "site"
    site.mkdir(parents=True)
    for package in BUNDLE_PACKAGES:
        (site / package).symlink_to(Path(importlib.import_module(package).__file__).parent)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "PYTHONPATH": str(write_blocker(tmp_path / "block", site)), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "-c", device_command()], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no part ran here (exit code 0)" in proc.stdout
    assert (tmp_path / "out" / "gpu-check.md").exists() and len(device_command()) < 2000

