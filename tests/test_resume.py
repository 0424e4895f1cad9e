"""A study interrupted mid-trial and resumed records exactly what an uninterrupted one does: the retried trial
continues from its earlier attempt's last checkpoint (bit-exact on the CPU), every epoch once in Optuna and MLflow.

Each interruption (kill -9 of the coordinator's process group, SIGTERM, a killed worker) lands at a chosen epoch;
the epochs trained again are printed (`-s`) as the measurement of what an interruption costs.
"""

import contextlib
import os
import sqlite3
import signal
import time
from pathlib import Path

import optuna
import sqlalchemy
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from helpers import run_harness, tiny_study, wait_for
from harness.study.rules import PHASES, optuna_name, search_space
from harness.study.scheduler import HUNG_FACTOR, HUNG_FLOOR, hung_limit
from harness.study.tracking import Tracker

pytestmark = pytest.mark.slow

EPOCHS, CUT = 4, 2  # trials of 4 epochs, interrupted once a trial has reported epoch 2
# Timing metrics differ between any two runs; every other metric of every epoch must be identical.
TIMING = ("epoch_seconds", "tokens_per_s")


def resume_study(tmp_path, corpus):
    return tiny_study(tmp_path, corpus, trials=2, seeds="[1]", edits=[("epochs = 2", f"epochs = {EPOCHS}")])


def ablate_command(study, folder: Path) -> list:
    return ["ablate", study.path, "--storage", f"sqlite:///{folder / 'optuna.db'}",
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--devices", "cpu", "--trials-per-device", 2,
            "--runs-dir", folder / "runs", "--reports-dir", folder / "reports"]


def stores(folder: Path) -> tuple:
    """(Optuna storage, MLflow tracking URI) of a study run by ablate_command in folder."""
    return f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"


def record(study, storage: str, uri: str) -> dict:
    """What the stores hold, keyed by what a trial trains (variant, phase, parameters, seed): Optuna's value and
    intermediate values of each finished trial, MLflow's per-epoch metrics of each finished run (step -> value,
    failing on any step logged twice)."""
    out = {}
    for variant in study.variants:
        for phase in PHASES:
            ostudy = optuna.load_study(study_name=optuna_name(study, variant, phase), storage=storage)
            for t in ostudy.get_trials(states=(TrialState.COMPLETE,)):
                key = (variant, phase, tuple(sorted(t.params.items())), t.user_attrs.get("seed"))
                assert key not in out, f"{key} finished twice"
                out[key] = {"optuna": (t.value, dict(t.intermediate_values))}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study.name)
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'run' and tags.state = 'finished'")
    for run in runs:
        space = search_space(study, run.data.tags["variant"])
        params = tuple(sorted((k, float(run.data.params[k])) for k in space))
        seed = int(run.data.tags["seed"]) if run.data.tags["phase"] == "confirm" else None
        key = (run.data.tags["variant"], run.data.tags["phase"], params, seed)
        assert key in out and "mlflow" not in out[key], f"{key}: a finished run of no trial, or two runs"
        metrics = {}
        for name in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, name)
            steps = [m.step for m in history]
            # `seconds` (step 0) is the run's total, rewritten when an attempt that continues it ends.
            assert name == "seconds" or len(steps) == len(set(steps)), \
                f"{run.info.run_name}: {name} logged twice at some step: {steps}"
            if name not in TIMING and name != "seconds":
                metrics[name] = {m.step: m.value for m in history}
        assert sorted(metrics["val_ppl"]) == list(range(1, EPOCHS + 1)), run.info.run_name
        out[key]["mlflow"] = metrics
    assert all("mlflow" in v for v in out.values()), "a finished trial without its finished MLflow run"
    return out


def continued_runs(study, uri: str) -> list:
    """(run name, epochs it restored) of each run that a retry continued."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study.name)
    return [(r.info.run_name, int(r.data.tags["continued_after_epoch"]))
            for r in client.search_runs([experiment.experiment_id], "tags.kind = 'run'")
            if "continued_after_epoch" in r.data.tags]


def epochs_at_cut(study, folder: Path) -> dict:
    """trial number -> epochs reported, of each search trial running now (variant/number keys)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    done = {}
    for variant in study.variants:
        ostudy = optuna.load_study(study_name=optuna_name(study, variant, "search"), storage=storage)
        for t in ostudy.get_trials(states=(TrialState.RUNNING,)):
            done[f"{variant}/{t.number}"] = max(t.intermediate_values, default=0)
    storage.engine.dispose()
    return done


def cut_reached(study, folder: Path) -> bool:
    if not (folder / "optuna.db").exists():
        return False
    try:  # read-only first: opening RDBStorage on a half-made file would race the coordinator making its tables
        with contextlib.closing(sqlite3.connect(f"file:{folder / 'optuna.db'}?mode=ro", uri=True)) as db:
            if not db.execute("SELECT count(*) FROM alembic_version").fetchone()[0]:
                return False
    except sqlite3.Error:
        return False
    try:
        return any(e >= CUT for e in epochs_at_cut(study, folder).values())
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the studies, or the storage's own tables, not made yet
        return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, test_corpus):
    folder = tmp_path_factory.mktemp("uninterrupted")
    study = resume_study(folder, test_corpus)
    run_harness(*ablate_command(study, folder), cwd=folder)
    return record(study, *stores(folder))


def worker_pids(coordinator: int) -> list:
    """The trial processes of a coordinator: its spawned children other than multiprocessing's resource tracker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == coordinator and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return pids


def signal_all(pids: list, signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def freeze_at_cut(study, folder: Path, coordinator: int) -> tuple:
    """Stop (SIGSTOP) every trial process of the coordinator at a moment when a running trial has reported epoch
    CUT; returns (their pids, epochs_at_cut then). Reading the cut and then interrupting raced the trials: on a
    loaded machine the trial at the cut could finish its last epochs in between, leaving nothing to continue."""
    while True:
        wait_for(lambda: cut_reached(study, folder), 300, f"a trial to report epoch {CUT}")
        pids = worker_pids(coordinator)
        signal_all(pids, signal.SIGSTOP)
        cut = epochs_at_cut(study, folder)
        if pids and any(e >= CUT for e in cut.values()):
            return pids, cut
        signal_all(pids, signal.SIGCONT)


@pytest.mark.parametrize("interruption", ["kill -9 of the coordinator group", "SIGTERM", "a killed worker"])
def test_interrupted_study_resumes_to_the_uninterrupted_result(tmp_path, launch, test_corpus, uninterrupted,
                                                               interruption):
    study = resume_study(tmp_path, test_corpus)
    command = ablate_command(study, tmp_path)
    first = launch(*command, name="first")
    frozen, cut = freeze_at_cut(study, tmp_path, first.pid)
    if interruption == "kill -9 of the coordinator group":
        first.kill()
    elif interruption == "SIGTERM":
        os.kill(first.pid, signal.SIGTERM)
        signal_all(frozen, signal.SIGCONT)  # the coordinator stops its workers itself
        assert first.wait() == 130, first.output
    else:
        signal_all(frozen, signal.SIGKILL)  # every trial running: at least the one at the cut
    if interruption != "a killed worker":  # the killed worker's trial is retried by the same command
        assert first.proc.poll() is not None
        resumed = run_harness(*command, cwd=tmp_path)
        # What is left is priced at the start, the epochs the retries continue counted done.
        assert "no run has ended yet; about" in resumed.stdout and "to go without pruning" in resumed.stdout
    else:
        assert first.wait() == 0, first.output
    assert record(study, *stores(tmp_path)) == uninterrupted
    continued = continued_runs(study, stores(tmp_path)[1])
    assert continued, "no retry continued its earlier attempt"
    # The first epoch a retry trained is the one after its checkpoint, and no checkpoint lagged the cut.
    redone = {name: max(0, cut.get(f"{name.split()[0]}/{name.split('#')[1].split()[0]}", 0) - after)
              for name, after in continued}
    print(f"\n{interruption}: epochs reported at the cut {cut}; continued {continued}; completed epochs trained "
          f"again: {sum(redone.values())}")
    assert all(after >= 1 for _, after in continued)
    assert sum(redone.values()) == 0


@pytest.mark.fast
def test_the_watchdogs_limit_is_the_study_files_or_a_generous_multiple_of_the_slowest_epoch():
    assert hung_limit(30, None) == hung_limit(30, 1000.0) == 30
    assert hung_limit(0, None) is None  # no epoch time known yet: nothing is judged
    assert hung_limit(0, 10.0) == HUNG_FLOOR
    assert hung_limit(0, 1000.0) == HUNG_FACTOR * 1000.0


def test_a_stopped_worker_is_killed_by_the_watchdog_and_its_trial_continues(tmp_path, launch, test_corpus,
                                                                            uninterrupted):
    study = tiny_study(tmp_path, test_corpus, trials=2, seeds="[1]", edits=[
        ("epochs = 2", f"epochs = {EPOCHS}"), ("max_retries = 1", "max_retries = 1\nhung_after = 20")])
    first = launch(*ablate_command(study, tmp_path), name="first")
    stopped, _ = freeze_at_cut(study, tmp_path, first.pid)  # as a stuck kernel or a dead mount leaves them
    assert first.wait() == 0, first.output
    assert first.output.count("FAILED: hung: no epoch for") == len(stopped), first.output
    assert "(limit 20 s: budget.hung_after = 20)" in first.output
    assert record(study, *stores(tmp_path)) == uninterrupted
    assert continued_runs(study, stores(tmp_path)[1])


@pytest.mark.fast
def test_the_tracker_waits_out_an_mlflow_outage_saying_so_once(tmp_path, test_corpus, monkeypatch):
    study = tiny_study(tmp_path, test_corpus)
    lines = []
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", study, study.identity(), {}, log=lines.append)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []
    log_batch = tracker.client.log_batch

    def away_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise MlflowException("API request to http://db:5000/api/2.0/mlflow/runs/log-batch failed with "
                                  "exception HTTPConnectionPool: Max retries exceeded (Connection refused)")
        return log_batch(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", away_twice)
    tracker.summarize_variant("locked_only", {"search_best_val_ppl": 1.0}, {})
    assert len(calls) == 3 and len(lines) == 2
    assert lines[0].startswith("the MLflow tracking store sqlite:///")
    assert "does not answer (MlflowException)" in lines[0]
    assert lines[1].startswith("the MLflow tracking store answers again after")
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(MlflowException("bad")))
    with pytest.raises(MlflowException):  # a real error is not an outage: raised at once
        tracker.summarize_variant("locked_only", {"search_best_val_ppl": 1.0}, {})
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # MLflow's own silent retries are bounded


def trial_at_cut(storage, study, coordinator_pid: int):
    """(variant, trial) of a search trial that the given coordinator runs and that has reported epoch CUT, or None.

    `storage` is an optuna.storages.RDBStorage opened once by the caller."""
    for variant in study.variants:
        try:
            ostudy = optuna.load_study(study_name=optuna_name(study, variant, "search"), storage=storage)
        except KeyError:  # not created yet
            return None
        for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("coordinator", "").endswith(f"/{coordinator_pid}") and \
                    max(t.intermediate_values, default=0) >= CUT:
                return variant, t.number
    return None


@pytest.mark.servers
def test_a_machine_killed_mid_trial_is_continued_by_another_on_a_shared_runs_folder(tmp_path, postgres, mlflow_server,
                                                                                     launch, test_corpus,
                                                                                     uninterrupted):
    # Its own experiment name on the session's MLflow server; the sampler's seeds do not depend on the name.
    study = tiny_study(tmp_path, test_corpus, trials=2, seeds="[1]", edits=[
        ("epochs = 2", f"epochs = {EPOCHS}"), ('name = "tiny"', 'name = "two-machines-resume"')])
    storage = postgres.create_database("two_machines_resume")
    common = ["worker", study.path, "--storage", storage, "--tracking-uri", mlflow_server, "--devices", "cpu",
              "--trials-per-device", 1, "--heartbeat", 1, "--runs-dir", tmp_path / "runs"]  # one runs folder: NFS
    doomed = launch(*common, name="doomed")
    survivor = launch(*common, name="survivor")
    poll = optuna.storages.RDBStorage(storage)
    variant, victim = wait_for(lambda: trial_at_cut(poll, study, doomed.pid), 300,
                               f"a trial of the doomed machine to report epoch {CUT}")
    doomed.kill()  # kill -9 of its process group: coordinator and trial processes, the machine is gone
    trials = optuna.load_study(study_name=optuna_name(study, variant, "search"), storage=poll).trials
    reported = max(trials[victim].intermediate_values)  # nothing reports for it any more
    assert survivor.wait() == 0, survivor.output
    poll.engine.dispose()

    assert record(study, storage, mlflow_server) == uninterrupted
    trials = optuna.load_study(study_name=optuna_name(study, variant, "search"), storage=storage).trials
    assert trials[victim].user_attrs["fail_reason"].startswith("stale: no heartbeat")
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == victim)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["coordinator"].endswith(f"/{survivor.pid}")
    run = MlflowClient(mlflow_server).get_run(retry.user_attrs["mlflow_run_id"])
    after = int(run.data.tags["continued_after_epoch"])  # the doomed machine's run, continued
    # Its first trained epoch is the one after the cut: the checkpoint holds every epoch the doomed machine reported
    # (one more when it died between writing a checkpoint and reporting it).
    assert reported <= after <= reported + 1, (reported, after)
    assert f"continue {variant}/search/{retry.number} after epoch {after}" in survivor.output
    assert "starting over" not in survivor.output
    print(f"\nmachine killed at epoch {reported} of {variant}/search/{victim}; continued after epoch {after} on the "
          f"other; completed epochs trained again: {max(0, reported - after)}")
