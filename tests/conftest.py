"""Fixtures and hooks: the tiers every test belongs to, what a test needs, the corpus tests train on (PTB where
there is one, else the `markov` corpus of harness/synthetic.py, so a fresh clone passes offline), and one real
smoke-study run per session. Plain helpers are in helpers.py.
"""

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

from harness import synthetic
from helpers import PTB_DATA_DIR, SMOKE_STUDY, require, run_harness, study_for_tests

PTB = PTB_DATA_DIR / "ptb" if PTB_DATA_DIR else None  # the PTB folder, or None
TIERS = ("fast", "slow", "servers")  # pyproject.toml says what each holds


def tier(item) -> str | None:
    """A test's tier: its closest tier marker (a test's own overrides its module's `pytestmark`)."""
    return next((mark.name for mark in item.iter_markers() if mark.name in TIERS), None)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: it must see each test's one tier
def pytest_collection_modifyitems(config, items):
    """Every test belongs to one tier, its closest tier marker, so `-m fast` (make test-fast) selects exactly it:
    the tier moves onto the test, and a module's default tier (pytestmark) no longer applies where a test set its
    own."""
    tiers = {item: tier(item) for item in items}
    untiered = [item.nodeid for item, found in tiers.items() if found is None]
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {', '.join(untiered[:5])}"
                                + (f" and {len(untiered) - 5} more" if len(untiered) > 5 else ""))
    for item, found in tiers.items():
        for node in item.listchain():
            node.own_markers[:] = [m for m in node.own_markers if m.name not in TIERS]
        item.add_marker(found)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for name in mark.args:
            require(name)


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
    of the synthetic corpus (harness/synthetic.py), written once per session."""
    if PTB is not None:
        return "ptb"
    return str(synthetic.write_corpus(tmp_path_factory.mktemp("synthetic") / "synthetic"))


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


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, test_corpus) -> SmokeRun:
    """studies/smoke.toml run once, end to end, with two CPU workers (on the synthetic corpus without PTB)."""
    workdir = tmp_path_factory.mktemp("smoke")
    study = study_for_tests(SMOKE_STUDY, test_corpus, workdir)
    storage, uri = f"sqlite:///{workdir / 'optuna.db'}", f"sqlite:///{workdir / 'mlflow.db'}"
    proc = run_harness("ablate", study, "--storage", storage, "--tracking-uri", uri,
                       "--devices", "cpu", "--trials-per-device", 2, "--runs-dir", workdir / "runs", cwd=workdir)
    return SmokeRun(workdir, study, storage, uri, proc.stdout + proc.stderr)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The test in its own folder (the default stores and runs/ are relative), SIGTERM restored afterwards (the CLI
    installs its handler); for modules that run the CLI in-process: `pytest.mark.usefixtures("in_tmp")`."""
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)
