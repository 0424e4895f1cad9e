"""Integrity of a study's stores and data against what happens outside the harness (issue #20, items 1-4, 9, 10):
one local store however its URL is spelled, stores the study did not make, a corpus edited while a study runs,
secrets in any text the harness prints, stores edited by people, and summaries written once.

Most cases run in-process through `harness.cli.main` or the store classes; the corpus edit and the secret in a
library's exception run the real command (those tests are `slow`).
"""

import hashlib
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from harness.cli import main
from helpers import refused, with_corpus
from harness.errors import UserError
from harness.study.stores import LocalLock, check_sqlite, sqlite_path

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("in_tmp")]  # in_tmp: conftest.py


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. one store, many spellings ------------------------------------------------------------------------
# Class: every spelling of one database file that SQLite opens as that file (relative or absolute, dot segments,
# symlinked file or folder, percent-encoding, SQLAlchemy's query options, SQLite URI filenames with and without an
# authority, harmless URI parameters) is that file for the one-writer lock and the "same file" check.
def spellings(folder: Path) -> list[str]:
    """URLs that all open folder/optuna.db (the working folder is `folder`)."""
    absolute = folder / "optuna.db"
    return [
        "sqlite:///optuna.db", f"sqlite:///{absolute}", "sqlite:///./optuna.db", "sqlite:///sub/../optuna.db",
        "sqlite:///link.db", "sqlite:///linked-folder/optuna.db", "sqlite:///opt%75na.db", "sqlite:///optuna.db?timeout=9",
        "sqlite:///file:optuna.db?uri=true", f"sqlite:///file:{absolute}?uri=true", f"sqlite:///file://{absolute}?uri=true",
        f"sqlite:///file://localhost{absolute}?uri=true", "sqlite:///file:opt%2575na.db?uri=true",
        "sqlite:///file:optuna.db?mode=rwc&uri=true", "sqlite:///file:optuna.db?cache=shared&uri=true",
        "sqlite:///optuna.db?uri=true", f"sqlite:///file:{quote(str(absolute))}?uri=true",
    ]


def make_aliases(folder: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "link.db").symlink_to(folder / "optuna.db")
    (folder / "linked-folder").symlink_to(folder)


def test_every_spelling_of_a_store_names_its_real_file(tmp_path):
    make_aliases(tmp_path)
    for url in spellings(tmp_path):
        assert sqlite_path(url, "--storage").resolve() == tmp_path / "optuna.db", url


@pytest.mark.parametrize("index", range(17))
def test_a_second_coordinator_is_refused_whatever_the_spelling(tmp_path, index):
    make_aliases(tmp_path)
    url = spellings(tmp_path)[index]
    with LocalLock("sqlite:///optuna.db", "sqlite:///mlflow.db"):  # the first coordinator, running
        with pytest.raises(UserError, match="another ablation is already using"):
            with LocalLock(url, "sqlite:///other-mlflow.db"):
                pass
        # and as MLflow's store: the same file for both stores is refused before any lock
        with pytest.raises(UserError, match="name the same file"):
            with LocalLock("sqlite:///optuna.db", url):
                pass


def test_the_issues_example_leaves_the_locked_store_untouched(tmp_path, capsys, test_corpus):
    from harness.study.ledger.storage import open_storage

    open_storage("sqlite:///optuna.db").engine.dispose()
    before = digest(tmp_path / "optuna.db")
    study = tmp_path / "s.toml"
    study.write_text(with_corpus((Path(__file__).parents[1] / "studies" / "smoke.toml").read_text(), test_corpus))
    with LocalLock("sqlite:///optuna.db", "sqlite:///mlflow.db"):
        message = refused(capsys, "ablate", study, "--storage", "sqlite:///file:optuna.db?uri=true", "--devices",
                          "cpu", "--tracking-uri", "sqlite:///m2.db")
    assert f"another ablation is already using {tmp_path / 'optuna.db'}" in message
    assert digest(tmp_path / "optuna.db") == before and not (tmp_path / "file:optuna.db").exists()


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///file:optuna.db?mode=ro&uri=true", "mode=ro would make SQLite open the store read-only"),
    ("sqlite:///file:optuna.db?immutable=1&uri=true", "immutable=1 would make"),
    ("sqlite:///file:optuna.db?nolock=1&uri=true", "nolock=1 would make"),
    ("sqlite:///file:optuna.db?vfs=unix-none&uri=true", "vfs=unix-none would make"),
    ("sqlite:///file://otherhost/x/optuna.db?uri=true", "SQLite opens no file on another host (otherhost)"),
    ("sqlite:///optuna.db?uri=maybe", "not a SQLite URL SQLAlchemy can read"),
    ("sqlite:///file::memory:?uri=true", "an in-memory database vanishes"),
    ("sqlite:///file:x?vfs=memdb&uri=true", "an in-memory database vanishes"),
])
def test_spellings_that_open_no_safe_file_are_refused(url, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        sqlite_path(url, "--storage")


def test_a_store_with_two_hard_links_is_refused(tmp_path):
    from harness.study.ledger.storage import open_storage

    open_storage("sqlite:///optuna.db").engine.dispose()
    os.link(tmp_path / "optuna.db", tmp_path / "other-name.db")
    for url in ("sqlite:///optuna.db", "sqlite:///other-name.db"):
        with pytest.raises(UserError, match="has 2 hard links"):
            check_sqlite(url, "--storage")


# --- 4. secrets in any text the harness prints ------------------------------------------------------------
# Class: a secret the harness was given (a URL's password on its command line or in MLFLOW_TRACKING_URI, libpq's
# ?password=, PGPASSWORD, MLflow's credentials, ~/.pgpass), in any spelling (percent-encoded or not), printed by
# any path: a print, a logging handler made before the command started, a warning, a traceback of the main thread
# or another one, a write split in two, a child process.
SECRET = "Sup3r-Secr3t"


def guarded_output(capsys, emit, argv=(), environ=None) -> str:
    from harness.redaction import guard

    with guard(list(argv), environ or {}):
        emit()
    out, err = capsys.readouterr()
    return out + err


@pytest.mark.parametrize("secret, argv, environ", [
    (SECRET, ["--tracking-uri", f"http://alice:{SECRET}@db-host:5000"], {}),
    (SECRET + "@/#", ["--storage", f"postgresql://u:{quote(SECRET + '@/#', safe='')}@h/db"], {}),
    (SECRET, ["--storage", f"postgresql://u@h/db?sslmode=require&password={SECRET}"], {}),
    (SECRET, [], {"PGPASSWORD": SECRET}),
    (SECRET, [], {"MLFLOW_TRACKING_PASSWORD": SECRET}),
    (SECRET, [], {"MLFLOW_TRACKING_URI": f"https://bob:{SECRET}@mlflow.example"}),
])
def test_every_secret_given_is_masked_on_every_output_path(capsys, secret, argv, environ):
    import logging
    import sys
    import threading
    import traceback
    import warnings

    handler = logging.StreamHandler(sys.stderr)  # made before the command: keeps the stream it was given
    logger = logging.getLogger("some.library")
    logger.addHandler(handler)
    secret_forms = [secret, quote(secret, safe="")]

    def emit():
        print(f"a message naming {secret} and {quote(secret, safe='')}")
        sys.stderr.write(secret[:5])
        sys.stderr.write(secret[5:] + " split over two writes\n")
        logger.warning("the library's log: %s", secret)
        warnings.warn(f"a warning holding {secret}", stacklevel=1)
        try:
            raise RuntimeError(f"a library's error: connect to http://alice:{secret}@db-host failed")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())  # what the interpreter does with an uncaught one
        thread = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError(secret)))
        thread.start()
        thread.join()
        print(traceback.format_exc())

    try:
        text = guarded_output(capsys, emit, argv, environ)
    finally:
        logger.removeHandler(handler)
    assert "split over two writes" in text and "a library's error" in text and "ValueError" in text
    assert not [form for form in secret_forms if form in text], text


def test_a_password_in_the_pgpass_file_is_masked(capsys, tmp_path):
    (tmp_path / "pgpass").write_text(f"db-host:5432:*:harness:{SECRET}\n")
    text = guarded_output(capsys, lambda: print(f"driver said: password {SECRET} rejected"),
                          environ={"PGPASSFILE": str(tmp_path / "pgpass")})
    assert SECRET not in text and "rejected" in text


def print_secret_from_argv(conn):
    """A child process's target: prints the password of the URL in its (inherited) sys.argv."""
    import sys

    url = next(a for a in sys.argv if "@" in a)
    print(f"child stdout: {url}", flush=True)
    print(f"child stderr: {url.split(':')[2].split('@')[0]}", file=sys.stderr, flush=True)
    conn.close()


@pytest.mark.slow  # it spawns a real process: not the fast tier's (in-process; mutmut's runner is its parent there)
def test_a_child_process_masks_its_parents_secrets(capfd, monkeypatch):
    import sys

    from harness.study.processes import Child

    monkeypatch.setattr(sys, "argv", [*sys.argv, f"--tracking-uri=http://alice:{SECRET}@db-host"])
    child = Child(print_secret_from_argv, (), "printer")
    child.process.join(60)
    out, err = capfd.readouterr()
    assert "child stdout: --tracking-uri=http://alice:***@db-host" in out and "child stderr: ***" in err, (out, err)
    assert SECRET not in out + err


@pytest.mark.slow
def test_a_secret_in_mlflows_own_exception_never_reaches_the_terminal(tmp_path, monkeypatch, test_corpus):
    """End to end: `harness ablate` on a tracking server that answers /health and drops every API request, so
    MLflow raises with the URL (and its password) in its message."""
    import socket
    import threading

    from helpers import run_harness, tiny_study

    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                if conn.recv(65536).startswith(b"GET /health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("PGPASSWORD", SECRET + "-pg")
    study = tiny_study(tmp_path, test_corpus)
    uri = f"http://alice:{SECRET}@127.0.0.1:{server.getsockname()[1]}"
    try:
        proc = run_harness("ablate", study.path, "--devices", "cpu", "--tracking-uri", uri, cwd=tmp_path, check=False,
                           timeout=300)
    finally:
        server.close()
    assert proc.returncode != 0 and "alice:***@127.0.0.1" in proc.stdout + proc.stderr, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


# --- 2. another's experiment or Optuna study of the same name ----------------------------------------------
# Class: a store object that has the study's name but was not made by the harness: an MLflow experiment without
# the study's tags (MLflow's own "Default" included), an Optuna study with trials or attributes of its own, or one
# that maximizes. Refused in one line before either store is written.
def stores(folder: Path) -> tuple[str, str]:
    """Absolute store URLs (MLflow caches a store per URL text within a process, and tests change folders)."""
    return f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"


def study_refused(capsys, command, study) -> str:
    storage, uri = stores(study.path.parent)
    extra = ["--devices", "cpu"] if command == "ablate" else []
    return refused(capsys, command, study.path, "--storage", storage, "--tracking-uri", uri, *extra)


def optuna_names(path: Path) -> list:
    import optuna

    return optuna.get_all_study_names(f"sqlite:///{path}") if path.exists() else []


@pytest.mark.parametrize("name", ["tiny", "Default"])
def test_an_mlflow_experiment_the_harness_did_not_make_is_refused(tmp_path, capsys, test_corpus, name):
    from mlflow import MlflowClient

    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus, edits=[('name = "tiny"', f'name = "{name}"')])
    client = MlflowClient(stores(tmp_path)[1])
    if name != "Default":  # MLflow makes "Default" in every store
        client.create_experiment(name, tags={"owner": "someone else"})
    message = study_refused(capsys, "ablate", study)
    assert "a study of this name exists that this harness did not make" in message
    assert f"(the MLflow experiment {name!r} at {stores(tmp_path)[1]})" in message and "another study.name" in message
    experiment = client.get_experiment_by_name(name)
    assert "study_digest" not in experiment.tags and not client.search_runs([experiment.experiment_id])
    assert optuna_names(tmp_path / "optuna.db") == []


@pytest.mark.parametrize("foreign", ["with a trial", "with attributes", "maximizing"])
def test_an_optuna_study_the_harness_did_not_make_is_refused(tmp_path, capsys, test_corpus, foreign):
    import optuna

    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus)
    name = "tiny/weight_only/confirm"  # the last of the study's names: nothing may be written before it is seen
    theirs = optuna.create_study(storage=stores(tmp_path)[0], study_name=name,
                                 direction="maximize" if foreign == "maximizing" else "minimize")
    if foreign == "with a trial":
        theirs.add_trial(optuna.trial.create_trial(value=1.0))
    if foreign == "with attributes":
        theirs.set_user_attr("owner", "someone else")
    message = study_refused(capsys, "ablate", study)
    assert "this harness did not make" in message and f"(the Optuna study {name!r} in {stores(tmp_path)[0]})" in message
    assert optuna_names(tmp_path / "optuna.db") == [name]


def test_an_empty_unmarked_optuna_study_is_the_harness_own_after_a_crash(tmp_path, test_corpus):
    """Optuna's create_study and the harness's first attribute are two writes: a crash between them leaves an
    empty minimizing study, which is taken as the harness's own."""
    import optuna

    from harness.study.ledger.storage import open_storage
    from harness.study.ledger.writer import Ledger
    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus)
    optuna.create_study(storage=stores(tmp_path)[0], study_name="tiny/locked_only/search")
    ledger = Ledger(study, open_storage(stores(tmp_path)[0]), study.identity(), log=lambda *a: None)
    assert ledger.tally("locked_only", "search").waiting == 2


# --- 9. stores edited by people -----------------------------------------------------------------------------
# Class: the study's MLflow experiment deleted or renamed in the UI, a run's tags edited: one line naming what was
# changed and how to restore it, from `ablate` and `report` alike.
def made_experiment(study) -> str:
    from harness.study.tracking import Tracker

    return Tracker(stores(study.path.parent)[1], study, study.identity(), {"study": study.name}).experiment_id


@pytest.mark.parametrize("command", ["ablate", "report"])
def test_a_deleted_experiment_is_one_line_with_the_restore_command(tmp_path, capsys, test_corpus, command):
    from mlflow import MlflowClient

    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus)
    experiment_id = made_experiment(study)
    uri = stores(tmp_path)[1]
    MlflowClient(uri).delete_experiment(experiment_id)
    message = study_refused(capsys, command, study)
    assert (f"the MLflow experiment 'tiny' at {uri} is deleted (experiment {experiment_id}, with its runs); restore "
            f"it: MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}") in message
    assert optuna_names(tmp_path / "optuna.db") == []


@pytest.mark.parametrize("command", ["ablate", "report"])
def test_a_renamed_experiment_is_one_line_with_the_rename_back(tmp_path, capsys, test_corpus, command):
    from mlflow import MlflowClient

    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus)
    experiment_id = made_experiment(study)
    uri = stores(tmp_path)[1]
    MlflowClient(uri).rename_experiment(experiment_id, "my tiny study")
    message = study_refused(capsys, command, study)
    assert (f"the MLflow experiment 'tiny' at {uri} was renamed to 'my tiny study' (experiment {experiment_id}); "
            f"rename it back: MLFLOW_TRACKING_URI={uri} mlflow experiments rename --experiment-id {experiment_id} "
            "--new-name tiny") in message
    assert sorted(e.name for e in MlflowClient(uri).search_experiments()) == ["Default", "my tiny study"]


# --- 3. the corpus edited while a study runs; 10. summaries written once ------------------------------------
def copied_corpus(test_corpus: str, folder: Path) -> Path:
    """The test corpus's split files copied into folder (without MD5SUMS: the study's identity is the check)."""
    import shutil

    from harness.data import find_split_files, load_corpus

    folder.mkdir()
    for split, path in find_split_files(load_corpus(test_corpus, log=lambda *a: None).path).items():
        shutil.copy(path, folder / path.name)
    return folder


def summary_histories(uri: str) -> dict:
    """(parent run, metric) -> [(step, value)] of the tiny study's parent runs."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    parents = client.search_runs([experiment.experiment_id], "tags.kind = 'variant'")
    return {(run.info.run_name, key): sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for run in parents for key in run.data.metrics}


@pytest.mark.slow
def test_a_corpus_edited_during_a_study_stops_it_and_loses_nothing(tmp_path, test_corpus):
    """End to end: the train file is edited after the first trial ends; the next trial to load it stops the study
    with one line, the finished trial is kept, and once the file is restored the same command completes the study.
    Run again, it writes no summary twice (item 10)."""
    import subprocess
    import sys

    import optuna
    from mlflow import MlflowClient

    from helpers import run_harness, tiny_study

    corpus = copied_corpus(test_corpus, tmp_path / "corpus")
    train = next(p for p in corpus.iterdir() if "train" in p.name)
    original = train.read_bytes()
    study = tiny_study(tmp_path, str(corpus), seeds="[1]")
    storage, uri = stores(tmp_path)
    argv = [sys.executable, "-m", "harness", "ablate", str(study.path), "--devices", "cpu", "--trials-per-device", "1",
            "--storage", storage, "--tracking-uri", uri]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the live view's lines: "[00:00:12] finished locked_only/search/0 on cpu ..."
        if " finished " in line:
            train.write_bytes(original + b" an edited line\n")
            break
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: stopped: a trial failed for a reason outside it"), err
    assert f"the corpus changed since this study started: {train} (MD5 " in err and "restore the file" in err
    trials = [t for name in optuna.get_all_study_names(storage)
              for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # kept
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert stopped and all(t.user_attrs["interrupted"] and t.user_attrs["retried"] for t in stopped)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.kind = 'run'")
    recorded = study.identity(load_md5(corpus, original)).as_attrs()["corpus_md5"]
    assert {r.data.tags["corpus_md5"] for r in runs} == {recorded}  # every run trained on the study's text

    train.write_bytes(original)
    run_harness(*argv[3:], cwd=tmp_path, timeout=600)
    done = [t for name in optuna.get_all_study_names(storage)
            for t in optuna.load_study(study_name=name, storage=storage).trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 * 2 + 2  # both variants' search budgets and their confirmation seed
    first = summary_histories(uri)
    assert first and all(len({step for step, _ in h}) == len(h) for h in first.values()), first
    run_harness(*argv[3:], cwd=tmp_path, timeout=600)
    assert summary_histories(uri) == first

    # Item 9's example: a seed tag edited in the MLflow UI; the report is written, reading the run's params.
    confirm = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                 "tags.kind = 'run' and tags.phase = 'confirm' and attributes.status = 'FINISHED'")
    client.set_tag(confirm[0].info.run_id, "seed", "1 (rerun)")
    report = run_harness("report", study.path, "--storage", storage, "--tracking-uri", uri, "--out", "reports",
                         cwd=tmp_path, check=False)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert "tag seed = '1 (rerun)' was edited (the run's params say 1); using 1" in report.stdout


def load_md5(corpus: Path, train_bytes: bytes) -> dict:
    """split -> MD5 of the corpus with this train file content."""
    from harness.data import find_split_files

    files = find_split_files(corpus)
    return {split: hashlib.md5(train_bytes if split == "train" else path.read_bytes()).hexdigest()
            for split, path in files.items()}


# Class (continued): a child run edited in the MLflow UI: a tag that duplicates a param (seed, variant), a state that
# contradicts the run's status, a tag that no longer parses (trial, attempt), an edited phase or kind, a deleted run.
# The report reads what the run's unchangeable parts say (a deleted run is left out, as MLflow shows it) and names
# each change with its restore.
def test_edited_or_deleted_child_runs_are_read_from_what_cannot_change(tmp_path, test_corpus):
    from mlflow import MlflowClient

    from harness.study.rules import RunState
    from harness.study.tracking import Tracker, read_child_runs
    from harness.train import RunResult
    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus)
    uri = stores(tmp_path)[1]
    tracker = Tracker(uri, study, study.identity(), {"study": study.name})
    result = RunResult(150.0, 2, 140.0, 4.9, None, 3.0, 2)
    ids = []
    for number, seed in enumerate((1, 2, 3, 4)):
        config = study.run_config("locked_only", {"train.seed": seed})
        run_id = tracker.start_run(config, f"locked_only confirm #{number} seed {seed}", {
            "phase": "confirm", "trial": number, "seed": seed, "attempt": 1,
            "optuna_study": "tiny/locked_only/confirm"})
        tracker.finish(run_id, RunState.FINISHED if number != 3 else RunState.FAILED, result=result, reason="")
        ids.append(run_id)
    client = MlflowClient(uri)
    client.set_tag(ids[0], "seed", "1 (rerun)")
    client.set_tag(ids[1], "trial", "one")
    client.set_tag(ids[1], "phase", "confirmation")
    client.delete_run(ids[2])
    client.set_tag(ids[3], "state", "finished")  # a failed run passed off as finished
    client.set_tag(ids[3], "kind", "mine")
    said = []
    rows = {row["run_id"]: row for row in read_child_runs(uri, tracker.experiment_id, log=said.append)}
    assert set(rows) == {ids[0], ids[1], ids[3]}  # the one whose kind was edited is still read; the deleted one not
    assert rows[ids[0]]["seed"] == 1 and rows[ids[1]]["trial"] is None and rows[ids[1]]["phase"] == "confirm"
    assert rows[ids[3]]["state"] == RunState.FAILED
    text = "\n".join(said)
    assert f"MLflow run {ids[0]} (locked_only confirm #0 seed 1): tag seed = '1 (rerun)' was edited (the run's " \
           "params say 1); using 1; set it back to 1 in the MLflow UI" in text
    assert "tag trial = 'one' was edited and is not a number" in text
    assert "tag phase = 'confirmation' was edited; using confirm" in text
    assert f"is deleted, so the report leaves it out; restore it: MLFLOW_TRACKING_URI={uri} mlflow runs restore " \
           f"--run-id {ids[2]}" in text
    assert "tag state = 'finished' was edited (its MLflow status is FAILED); using failed" in text
    assert "tag kind = 'mine' was edited" in text
    assert len(said) == 6


@pytest.mark.parametrize("command", ["ui", "dashboard"])
def test_a_tool_the_harness_starts_has_its_output_masked(tmp_path, capsys, monkeypatch, command):
    """`harness ui` and `dashboard` run MLflow's UI and optuna-dashboard with the store URL and the environment
    (PGPASSWORD): whatever they print passes through the same redaction."""
    import harness.cli

    tool = tmp_path / "tool"
    tool.write_text('#!/bin/sh\necho "connecting with password $PGPASSWORD: refused" >&2\nexit 0\n')
    tool.chmod(0o755)
    monkeypatch.setattr(harness.cli, "_tool", lambda name: str(tool))
    monkeypatch.setenv("PGPASSWORD", SECRET)
    from harness.study.ledger.storage import open_storage

    open_storage(f"sqlite:///{tmp_path / 'optuna.db'}").engine.dispose()
    flag = {"ui": "--tracking-uri", "dashboard": "--storage"}[command]
    assert main([command, flag, f"sqlite:///{tmp_path / ('optuna.db' if command == 'dashboard' else 'm.db')}"]) == 0
    out, err = capsys.readouterr()
    assert "connecting with password ***: refused" in out and SECRET not in out + err


def test_runs_of_a_deleted_optuna_study_are_one_line_before_anything_is_run_again(tmp_path, capsys, test_corpus):
    import optuna

    from harness.study.ledger.storage import open_storage
    from harness.study.ledger.writer import Ledger
    from harness.study.tracking import Tracker
    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus)
    storage, uri = stores(tmp_path)
    Ledger(study, open_storage(storage), study.identity(), log=lambda *a: None)
    tracker = Tracker(uri, study, study.identity(), {"study": study.name})
    tracker.start_run(study.run_config("weight_only"), "weight_only search #0", {
        "phase": "search", "trial": 0, "seed": 1, "optuna_study": "tiny/weight_only/search"})
    optuna.delete_study(study_name="tiny/weight_only/search", storage=storage)
    before = sorted(optuna.get_all_study_names(storage))
    message = study_refused(capsys, "ablate", study)
    assert (f"the MLflow experiment 'tiny' at {uri} holds runs of the Optuna study tiny/weight_only/search, which "
            f"{storage} does not hold: deleted (optuna delete-study)") in message
    assert sorted(optuna.get_all_study_names(storage)) == before


# --- 10. summaries written once ------------------------------------------------------------------------------
# Class: every summary the tracker writes (a parent's headline metrics and tags, a child's result metrics and
# state): written again with the same values, nothing is added; a changed value gets the next step.
def test_summaries_are_written_once_and_a_change_at_the_next_step(tmp_path, test_corpus):
    from mlflow import MlflowClient

    from harness.study.rules import RunState
    from harness.study.tracking import Tracker
    from harness.train import RunResult
    from helpers import tiny_study

    study = tiny_study(tmp_path, test_corpus)
    uri = stores(tmp_path)[1]
    tracker = Tracker(uri, study, study.identity(), {"study": study.name})
    client = MlflowClient(uri)
    for _ in range(3):
        tracker.summarize_variant("weight_only", {"confirm_test_ppl_mean": 140.5, "confirm_test_ppl_sd": float("nan"),
                                                  "confirm_seeds": 2, "absent": None}, {"best_trial": 3})
    parent = tracker.parent_run("weight_only")
    histories = {k: [(m.step, m.value) for m in client.get_metric_history(parent, k)]
                 for k in ("confirm_test_ppl_mean", "confirm_test_ppl_sd", "confirm_seeds", "absent")}
    assert [len(h) for h in histories.values()] == [1, 1, 1, 0], histories
    tracker.summarize_variant("weight_only", {"confirm_test_ppl_mean": 139.0}, {"best_trial": 4})
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "confirm_test_ppl_mean")] == [
        (0, 140.5), (1, 139.0)]
    assert client.get_run(parent).data.tags["best_trial"] == "4"

    run_id = tracker.start_run(study.run_config("weight_only"), "weight_only search #0", {"phase": "search"})
    for _ in range(2):
        tracker.finish(run_id, RunState.FINISHED, result=RunResult(150.0, 2, None, None, None, 3.0, 2))
    assert len(client.get_metric_history(run_id, "best_val_ppl")) == 1
