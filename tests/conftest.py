"""Shared fixtures: the team's Penn Treebank copy and one real smoke-study run per test session."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOKE_STUDY = REPO / "studies" / "smoke.toml"


@pytest.fixture(scope="session", autouse=True)
def data_dir():
    """Point AWD_DATA_DIR at ../shared/data (read-only there in CI) for every test and subprocess."""
    if not (SHARED_DATA / "ptb" / "ptb.train.txt").exists():
        pytest.fail(f"Penn Treebank not found at {SHARED_DATA / 'ptb'}: tests need the team's shared data")
    os.environ["AWD_DATA_DIR"] = str(SHARED_DATA)
    return SHARED_DATA


@dataclass(frozen=True)
class SmokeRun:
    """Where a finished smoke study left its results."""

    workdir: Path
    study: Path
    storage: str
    tracking_uri: str
    output: str


def run_harness(*args, cwd, timeout=600, check=True):
    """`python -m harness ARGS` in a subprocess, as a user would type it."""
    proc = subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir) -> SmokeRun:
    """studies/smoke.toml run once, end to end, with two CPU workers."""
    workdir = tmp_path_factory.mktemp("smoke")
    storage, uri = f"sqlite:///{workdir / 'optuna.db'}", f"sqlite:///{workdir / 'mlflow.db'}"
    proc = run_harness("ablate", SMOKE_STUDY, "--storage", storage, "--tracking-uri", uri,
                       "--devices", "cpu", "--trials-per-device", 2, "--runs-dir", workdir / "runs", cwd=workdir)
    return SmokeRun(workdir, SMOKE_STUDY, storage, uri, proc.stdout + proc.stderr)
