"""Shared fixtures: the corpus tests train on, and one real smoke-study run per test session.

The corpus is the Penn Treebank where there is one ($AWD_DATA_DIR/ptb if AWD_DATA_DIR is set, else the team
folder's ../shared/data/ptb, as CI has), else a synthetic corpus from a known Markov chain (tests/synthetic.py)
generated once per session, so a fresh clone passes offline. Tests that need PTB itself carry the `ptb`
marker: skipped without it, a failure when AWD_REQUIRE_PTB=1 (CI sets it).
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

import synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOKE_STUDY = REPO / "studies" / "smoke.toml"
REQUIRE_PTB_ENV = "AWD_REQUIRE_PTB"


def _ptb_data_dir() -> Path | None:
    """The folder holding ptb/: $AWD_DATA_DIR when set, else the team folder; None when PTB is not there."""
    user_dir = os.environ.get("AWD_DATA_DIR")
    data_dir = Path(user_dir).expanduser().absolute() if user_dir else SHARED_DATA
    return data_dir if (data_dir / "ptb" / "ptb.train.txt").is_file() else None


PTB_DATA_DIR = _ptb_data_dir()
PTB = PTB_DATA_DIR / "ptb" if PTB_DATA_DIR else None  # the PTB folder, or None
# Where PTB was looked for, for the skip message (read before the data_dir fixture changes AWD_DATA_DIR).
_PTB_SEARCHED = Path(os.environ.get("AWD_DATA_DIR") or SHARED_DATA).expanduser().absolute() / "ptb"


def pytest_runtest_setup(item):
    if PTB is None and item.get_closest_marker("ptb") is not None:
        if os.environ.get(REQUIRE_PTB_ENV) == "1":
            pytest.fail(f"Penn Treebank not found at {_PTB_SEARCHED}, and {REQUIRE_PTB_ENV}=1 requires it")
        pytest.skip(f"needs the Penn Treebank, not found at {_PTB_SEARCHED} "
                    "(set AWD_DATA_DIR to the folder holding ptb/)")


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory) -> Path:
    """The folder AWD_DATA_DIR points at for every test and subprocess: PTB's parent, or a temp folder."""
    if PTB_DATA_DIR is not None:
        os.environ["AWD_DATA_DIR"] = str(PTB_DATA_DIR)
        return PTB_DATA_DIR
    if os.environ.get("AWD_DATA_DIR"):  # the user's folder, without PTB: leave it, fetch nothing into it
        return Path(os.environ["AWD_DATA_DIR"])
    folder = tmp_path_factory.mktemp("data")
    os.environ["AWD_DATA_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def test_corpus(data_dir, tmp_path_factory) -> str:
    """What a study file's `corpus = "..."` names for tests: "ptb" where there is PTB, else the absolute path
    of the synthetic corpus (tests/synthetic.py), written once per session."""
    if PTB is not None:
        return "ptb"
    return str(synthetic.write_corpus(tmp_path_factory.mktemp("synthetic") / "synthetic"))


def with_corpus(study_text: str, corpus: str) -> str:
    """The study file text with its [study] corpus replaced by `corpus` (e.g. the test_corpus fixture)."""
    # A JSON string is a valid TOML basic string (quotes and backslashes escaped the same way).
    new, count = re.subn(r'(?m)^corpus\s*=\s*(["\']).*?\1\s*$', lambda m: f"corpus = {json.dumps(corpus)}",
                         study_text, count=1)
    if count != 1:
        raise ValueError("the study text has no `corpus = \"...\"` line to replace")
    return new


class KernelCall(NamedTuple):
    """One call into a fused recurrent kernel: which one, the weights it got, and a copy of the W_hh it got."""

    kernel: str  # its name in torch._VF: lstm, gru, rnn_tanh, rnn_relu
    weights: list  # [weight_ih, W_hh, bias_ih, bias_hh] as passed
    weight_hh: object  # a copy of the W_hh argument: it aliases the slot, which the next forward overwrites


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records a KernelCall for every call into the fused kernel of any cell in harness.dropout.CELL_TABLE
    (torch._VF.lstm, gru, rnn_tanh, rnn_relu), from the layers under test and from torch's own modules alike."""
    import torch  # here, not at the top: most test modules need no torch

    from harness.dropout import CELL_TABLE

    calls = []

    def spy_on(name):
        fused = getattr(torch._VF, name)

        def spy(*args):
            calls.append(KernelCall(name, list(args[2]), args[2][1].detach().clone()))
            return fused(*args)

        return spy

    for name in sorted({cell.kernel for cell in CELL_TABLE.values()}):
        monkeypatch.setattr(torch._VF, name, spy_on(name))
    return calls


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


def study_for_tests(study: Path, corpus: str, folder: Path) -> Path:
    """`study` itself when it already names `corpus`, else a copy in folder that names it instead."""
    text = study.read_text(encoding="utf-8")
    if re.search(rf'(?m)^corpus\s*=\s*"{re.escape(corpus)}"\s*$', text):
        return study
    copy = folder / study.name
    copy.write_text(with_corpus(text, corpus), encoding="utf-8")
    return copy


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, test_corpus) -> SmokeRun:
    """studies/smoke.toml run once, end to end, with two CPU workers (on the synthetic corpus without PTB)."""
    workdir = tmp_path_factory.mktemp("smoke")
    study = study_for_tests(SMOKE_STUDY, test_corpus, workdir)
    storage, uri = f"sqlite:///{workdir / 'optuna.db'}", f"sqlite:///{workdir / 'mlflow.db'}"
    proc = run_harness("ablate", study, "--storage", storage, "--tracking-uri", uri,
                       "--devices", "cpu", "--trials-per-device", 2, "--runs-dir", workdir / "runs", cwd=workdir)
    return SmokeRun(workdir, study, storage, uri, proc.stdout + proc.stderr)
