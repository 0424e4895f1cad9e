"""Plain helpers shared by the test modules (fixtures and hooks live in conftest.py): the harness as a user runs it,
study files and corpora made for tests, the tiny training setup, servers' ports, and the tiny ablation study.
"""

import asyncio
import contextlib
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pandas as pd
import pytest
import torch
from torch import nn
from mlflow import MlflowClient

from harness.config import DropoutConfig, ModelConfig, RunConfig, TrainConfig
from harness.data import Corpus
from harness.dropout import CELL_TABLE, WeightDropRNN
from harness.study.coordinator import Coordinator
from harness.study.ledger.storage import open_storage
from harness.study.ledger.writer import Ledger
from harness.study.live import LiveView
from harness.study.spec import load_study
from harness.study.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
SMOKE_STUDY = REPO / "studies" / "smoke.toml"
SHARED_DATA = REPO.parent / "shared" / "data"  # the team folder's corpora, as CI has them
PLAIN = {split: f"{split}.txt" for split in ("train", "valid", "test")}


# --- what a test needs beyond Python packages -------------------------------------------------------------
def ptb_data_dir() -> Path | None:
    """The folder holding ptb/: $AWD_DATA_DIR when set, else the team folder; None when PTB is not there."""
    user_dir = os.environ.get("AWD_DATA_DIR")
    data_dir = Path(user_dir).expanduser().absolute() if user_dir else SHARED_DATA
    return data_dir if (data_dir / "ptb" / "ptb.train.txt").is_file() else None


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (pg_ctl, initdb), or None when it is not installed."""
    found = shutil.which("pg_ctl") or (sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [None])[-1]
    return Path(found).parent if found else None


def latex_with_booktabs() -> Path | None:
    """pdflatex, when it is installed and its TeX tree has booktabs.sty (Debian: texlive-latex-recommended)."""
    found = shutil.which("pdflatex")
    kpsewhich = shutil.which("kpsewhich")
    if found is None or kpsewhich is None:
        return None
    probe = subprocess.run([kpsewhich, "booktabs.sty"], capture_output=True, text=True, timeout=30)
    return Path(found) if probe.returncode == 0 and probe.stdout.strip() else None


CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
PTB_DATA_DIR = ptb_data_dir()  # read at import, before the data_dir fixture points AWD_DATA_DIR elsewhere
_PTB_SEARCHED = Path(os.environ.get("AWD_DATA_DIR") or SHARED_DATA).expanduser().absolute() / "ptb"
# name -> (whether this machine has it, what it is and how to get it). A test needing one skips without it, in one
# line, unless AWD_REQUIRE_<NAME>=1 (CI sets each), which makes its absence a failure.
NEEDS = {
    "ptb": (lambda: PTB_DATA_DIR is not None,
            f"the Penn Treebank, not found at {_PTB_SEARCHED} (set AWD_DATA_DIR to the folder holding ptb/)"),
    "chromium": (lambda: CHROMIUM.exists(), "Chromium (Debian: apt-get install -y chromium)"),
    "postgresql": (lambda: postgres_bin() is not None, "PostgreSQL (Debian: apt-get install -y postgresql)"),
    "latex": (lambda: latex_with_booktabs() is not None,
              "pdflatex with booktabs (Debian: apt-get install -y texlive-latex-base texlive-latex-recommended)"),
}


def require(name: str) -> None:
    """Skip the calling test (or fixture) when this machine lacks `name` (a key of NEEDS); fail instead when
    AWD_REQUIRE_<NAME>=1."""
    present, what = NEEDS[name]
    if present():
        return
    flag = f"AWD_REQUIRE_{name.upper()}"
    if os.environ.get(flag) == "1":
        pytest.fail(f"needs {what}, and {flag}=1 requires it")
    pytest.skip(f"needs {what}; {flag}=1 makes this a failure")


# --- the harness as a user runs it ----------------------------------------------------------------------
def run_harness(*args, cwd, timeout=600, check=True):
    """`python -m harness ARGS` in a subprocess, as a user would type it."""
    proc = subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"harness {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def study_for_tests(study: Path, corpus: str, folder: Path) -> Path:
    """`study` itself when it already names `corpus`, else a copy in folder that names it instead."""
    text = study.read_text(encoding="utf-8")
    if re.search(rf'(?m)^corpus\s*=\s*"{re.escape(corpus)}"\s*$', text):
        return study
    copy = folder / study.name
    copy.write_text(with_corpus(text, corpus), encoding="utf-8")
    return copy


def with_corpus(study_text: str, corpus: str) -> str:
    """The study file text with its [study] corpus replaced by `corpus` (e.g. the test_corpus fixture)."""
    # A JSON string is a valid TOML basic string (quotes and backslashes escaped the same way).
    new, count = re.subn(r'(?m)^corpus\s*=\s*(["\']).*?\1\s*$', lambda m: f"corpus = {json.dumps(corpus)}",
                         study_text, count=1)
    if count != 1:
        raise ValueError("the study text has no `corpus = \"...\"` line to replace")
    return new


# --- servers --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    """Poll until condition() is truthy and return it; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


# --- a real browser -------------------------------------------------------------------------------------
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one websocket: commands, events, errors seen."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def _receive(self) -> dict:
        message = json.loads((await self.ws.receive(timeout=30)).data)
        if "method" in message:
            self.events.append(message)
        return message

    async def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params,
                                 **({"sessionId": session} if session else {})})
        while True:
            message = await self._receive()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def wait_for(self, method: str) -> None:
        while not any(e["method"] == method for e in self.events):
            await self._receive()

    def errors(self) -> list:
        """Console errors, uncaught exceptions and browser log errors (failed loads among them)."""
        found = []
        for e in self.events:
            params = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("text"))
            elif e["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(params["args"])
            elif e["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found


@contextlib.asynccontextmanager
async def headless_chromium(profile: Path, width: int = 1600, height: int = 1000):
    """Headless Chromium with a fresh profile, driven over DevTools: yields (DevTools, session id) of one blank
    page of width x height CSS pixels with Page, Runtime and Log enabled; the browser ends with the block."""
    browser = subprocess.Popen([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            assert browser.poll() is None, f"{CHROMIUM} exited with {browser.returncode}"
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port within 30 s"
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().split()
        async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}{path}",
                                                                     max_msg_size=0) as ws:
            tools = DevTools(ws)
            target = await tools.call("Target.createTarget", url="about:blank")
            attached = await tools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
            session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                await tools.call(f"{domain}.enable", session)
            await tools.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                             deviceScaleFactor=1, mobile=False)
            yield tools, session
    finally:
        browser.terminate()
        browser.wait(timeout=30)


# --- corpora and study files ----------------------------------------------------------------------------
def write_corpus(folder: Path, train="a b c\nb c d\n", valid="a b\n", test="c d\n", names=PLAIN) -> Path:
    """Write a tiny corpus (str is written as UTF-8, bytes as is) and return its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, content in (("train", train), ("valid", valid), ("test", test)):
        path = folder / names[split]
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return folder


VALID = """
[study]
name = "t"
[fixed.dropout]
embedding = 0.1
input = 0.4
hidden = 0.25
output = 0.4
weight = 0.5
[variants.awd]
[variants.locked_only]
[variants.mine]
sites = ["weight", "input"]
hidden_mode = "timestep"
[search]
input = [0.1, 0.6]
"""


# --- the tiny training setup ----------------------------------------------------------------------------
TINY_RATES = DropoutConfig(embedding=0.1, input=0.3, hidden=0.2, output=0.3, weight=0.4)


def tiny_corpus(n_train=3000, vocab=40) -> Corpus:
    """A synthetic corpus with structure to learn: a noisy cycle through the vocabulary."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        base = torch.arange(n) % vocab
        noise = torch.randint(vocab, (n,), generator=g)
        return torch.where(torch.rand(n, generator=g) < 0.2, noise, base)

    md5 = {"train": "t", "valid": "v", "test": "s"}
    return Corpus("tiny", Path("."), tuple(map(str, range(vocab))), split(n_train), split(600), split(600), md5, {})


def tiny_config(**train) -> RunConfig:
    """An awd run of a 2-layer 16/24 model on tiny_corpus, 3 epochs, one thread; `train` overrides the recipe."""
    settings = dict(epochs=3, batch_size=4, eval_batch_size=4, test_batch_size=4, bptt=10, lr=5.0, seed=3, threads=1)
    return RunConfig("tiny", "awd", ModelConfig(16, 24, 2), TINY_RATES, TrainConfig(**{**settings, **train}))


# --- recurrent layers against torch's own modules -------------------------------------------------------
def torch_like(layer: WeightDropRNN, weight_hh: torch.Tensor | None = None) -> nn.RNNBase:
    """The torch module of the layer's cell (nn.LSTM, nn.GRU, nn.RNN) on its device and dtype, holding its weights
    (or weight_hh instead of its raw W_hh)."""
    module = CELL_TABLE[layer.cell].module(layer.input_size, layer.hidden_size)
    module = module.to(layer.weight_ih.device, layer.weight_ih.dtype)
    with torch.no_grad():
        module.weight_ih_l0.copy_(layer.weight_ih)
        module.weight_hh_l0.copy_(layer.weight_hh_raw if weight_hh is None else weight_hh)
        module.bias_ih_l0.copy_(layer.bias_ih)
        module.bias_hh_l0.copy_(layer.bias_hh)
    return module


def random_state(layer: WeightDropRNN, batch: int, requires_grad: bool = False):
    """A random state of the layer's form: (h, c) for the LSTM, else h; each (1, B, H) in its dtype."""
    zeros = layer.init_state(batch)
    draw = lambda t: torch.randn_like(t).requires_grad_(requires_grad)  # noqa: E731
    return tuple(map(draw, zeros)) if isinstance(zeros, tuple) else draw(zeros)


def run(layer, x, state=None):
    """The layer's output and final state concatenated, for one-line comparisons."""
    out, final = layer(x, state)
    return torch.cat([out, *(final if isinstance(final, tuple) else (final,))])


# --- the tiny ablation study ----------------------------------------------------------------------------
TINY = """
[study]
name = "tiny"
corpus = "ptb"
[fixed.model]
emb_size = 16
hidden_size = 16
n_layers = 1
[fixed.dropout]
input = 0.3
weight = 0.3
[fixed.train]
epochs = 2
batch_size = 10
eval_batch_size = 10
test_batch_size = 80
bptt = 20
train_tokens = 3000
valid_tokens = 1000
threads = 1
[variants.locked_only]
[variants.weight_only]
[search]
input = [0.1, 0.5]
weight = [0.1, 0.5]
[budget]
trials = {trials}
pruner = "none"
confirm_seeds = {seeds}
max_retries = 1
"""


def tiny_study(tmp_path, corpus, trials=2, seeds="[]", edits=()):
    """TINY on `corpus` (the test_corpus fixture: PTB, or the synthetic corpus without it), with (old, new) text edits."""
    text = with_corpus(TINY.format(trials=trials, seeds=seeds), corpus)
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return load_study(path)


def open_coordinator(study, storage: str, uri: str, runs_dir, log=lambda *a: None, heartbeat=30) -> Coordinator:
    """A Coordinator on these stores, as run_study builds it (no corpus identity: the tests' corpus is fixed)."""
    identity = study.identity()
    ledger = Ledger(study, open_storage(storage, heartbeat), identity, log=log)
    tracker = Tracker(uri, study, identity, {"study": study.name})
    return Coordinator(study, ledger, tracker, runs_dir, LiveView(study, ledger, 1, log))


def child_runs(uri, study_name):
    """(client, child runs, parent runs) of a study's MLflow experiment."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study_name)
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'run'", max_results=1000)
    parents = client.search_runs([experiment.experiment_id], "tags.kind = 'variant'", max_results=1000)
    return client, runs, parents


# --- a study's logs written by hand, for the report's pure parts -------------------------------------------
def logged_run(variant: str, phase: str = "confirm", seed: int = 1, test_ppl=None, best_val_ppl=100.0, trial=0,
               state: str = "finished", params=None, **metrics) -> dict:
    """One MLflow run as harness.report.logs reads it (RUN_COLUMNS), finished unless said otherwise."""
    from harness.report.logs import RUN_COLUMNS

    run = dict.fromkeys(RUN_COLUMNS, "")
    run.update(run_id=f"{variant}-{phase}-{trial}-{seed}", name=f"{variant} {phase} #{trial}", variant=variant,
               phase=phase, trial=trial, seed=seed, attempt=0, state=state, end_time=1000 * (trial + 1) + seed,
               params={k: str(v) for k, v in (params or {}).items()}, best_val_ppl=best_val_ppl,
               test_ppl=test_ppl, best_epoch=metrics.pop("best_epoch", 2), epochs=metrics.pop("epochs", 4),
               seconds=metrics.pop("seconds", 36.0), test_loss=None, averaged_from_epoch=None, **metrics)
    return run


def study_log(study, runs=(), trials=(), importances=None):
    """A StudyLog of these runs (logged_run dicts) and search trials ((variant, params, value or None when pruned,
    best_seen) tuples), each trial also logged as a search run; tallies follow the trials, curves are each run's (4
    epochs, falling to its best_val_ppl)."""
    from harness.report.logs import CURVE_COLUMNS, RUN_COLUMNS, TRIAL_COLUMNS, StudyLog
    from harness.study.rules import SEARCH, Tally

    runs = [*runs, *(logged_run(variant, "search", seed=141, trial=number, best_val_ppl=value, params=params,
                                state="finished" if value is not None else "pruned")
                     for number, (variant, params, value, _) in enumerate(trials))]
    frame = pd.DataFrame(list(runs), columns=list(RUN_COLUMNS))
    for column in ("best_val_ppl", "test_ppl", "test_loss", "averaged_from_epoch", "seconds", "epochs", "best_epoch"):
        frame[column] = frame[column].astype(float)
    rows, tallies = [], {}
    for number, (variant, params, value, seen) in enumerate(trials):
        rows.append({"variant": variant, "number": number, "state": "finished" if value is not None else "pruned",
                     "value": value, "best_seen": seen if seen is not None else value, "params": params})
    table = pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
    for variant in study.variants:
        mine = table[table.variant == variant]
        if len(mine):
            tallies[variant] = {SEARCH: Tally.of(mine.state)}
    curves = pd.DataFrame([{"run_id": r["run_id"], "variant": r["variant"], "phase": r["phase"], "trial": r["trial"],
                            "seed": r["seed"], "state": r["state"], "epoch": e, "train_loss": 4.0, "train_ppl": 50.0,
                            "val_loss": 4.6, "val_ppl": r["best_val_ppl"] + 4 - e, "averaging": e > 2}
                           for r in runs for e in range(1, 5) if r["best_val_ppl"] is not None],
                          columns=list(CURVE_COLUMNS))
    return StudyLog(study, "sqlite:///mlflow.db", "sqlite:///optuna.db", frame, curves, table, tallies,
                    importances if importances is not None else {v: "too few." for v in tallies})


def refused(capsys, *argv) -> str:
    """The error line of a command run in-process (harness.cli.main) that must be refused: exit 2, one line on
    stderr, no traceback; what the test's own setup printed before is not the command's."""
    from harness.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse exits by itself
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
