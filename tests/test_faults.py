"""Faults during a study: a machine killed, the coordinator killed and restarted, a NaN loss, PostgreSQL
restarted, servers unreachable at start. Each study must still end with its full budget, nothing lost or
run twice (shared_stores.audit), and the session prints the figures.

The PostgreSQL ones need it installed (see shared_stores.py); about five minutes on two cores in all.
"""

import pytest
import dataclasses
import socket
import threading
import time

import optuna
from optuna.trial import TrialState

from helpers import TINY, free_port, open_coordinator, run_harness, wait_for, with_corpus
from harness.study.rules import SEARCH, optuna_name
from harness.study.scheduler import Scheduler, Slot
from harness.study.spec import load_study
from harness.study.stores import redact
from shared_stores import PG_PASSWORD, Audit, audit, running_trial

pytestmark = pytest.mark.servers


def fault_study(tmp_path, corpus, name: str, trials=2, seeds="[1]", epochs=4):
    """TINY on `corpus` (test_corpus) under its own name, with epochs long enough to be caught mid-trial."""
    path = tmp_path / f"{name}.toml"
    text = with_corpus(TINY.format(trials=trials, seeds=seeds), corpus)
    path.write_text(text.replace('name = "tiny"', f'name = "{name}"').replace("epochs = 2", f"epochs = {epochs}"))
    return load_study(path)


def test_killed_machine_goes_stale_and_its_trial_is_retried(tmp_path, postgres, mlflow_server, launch, figures,
                                                           test_corpus):
    study = fault_study(tmp_path, test_corpus, "killed-machine")
    storage = postgres.create_database("killed_machine")
    common = ["worker", study.path, "--storage", storage, "--tracking-uri", mlflow_server, "--devices", "cpu",
              "--trials-per-device", 1, "--heartbeat", 1]
    doomed = launch(*common, "--runs-dir", tmp_path / "doomed", name="doomed")
    survivor = launch(*common, "--runs-dir", tmp_path / "survivor", name="survivor")
    poll = optuna.storages.RDBStorage(storage)
    variant, victim = wait_for(lambda: running_trial(poll, study, doomed.pid), 120, "the doomed machine's trial")
    doomed.kill()  # kill -9 of its coordinator and trial processes: the machine is gone
    assert survivor.wait() == 0, survivor.output
    result = figures(audit(study, storage, mlflow_server), faults=1)
    assert result.lost == result.duplicates == result.open_runs == 0 and result.retries >= 1

    trials = optuna.load_study(study_name=optuna_name(study, variant, SEARCH), storage=storage).trials
    failed = trials[victim.number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith("stale: no heartbeat")
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.user_attrs["attempt"] == 2 and retry.user_attrs["coordinator"].endswith(f"/{survivor.pid}")
    assert f"retry  {variant}/search/{victim.number}" in survivor.output
    # Each machine has its own runs folder: the victim's checkpoint cannot be read here, and the log says so once.
    over = [line for line in survivor.output.splitlines() if "starting over at epoch 1" in line]
    assert len(over) == 1 and f"{variant}/search/{retry.number}: starting over at epoch 1: no checkpoint of its " \
        f"earlier attempt in {tmp_path / 'survivor' / study.name}" in over[0] and "not shared?" in over[0], over


@pytest.mark.slow
def test_killed_coordinator_resumes_with_nothing_lost_or_duplicated(tmp_path, launch, figures, test_corpus):
    study = fault_study(tmp_path, test_corpus, "killed-coordinator", seeds="[]")
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["ablate", study.path, "--storage", storage, "--tracking-uri", uri, "--devices", "cpu",
               "--trials-per-device", 2, "--runs-dir", tmp_path / "runs", "--reports-dir", tmp_path / "reports"]
    first = launch(*command, name="first")
    poll = optuna.storages.RDBStorage(storage)
    wait_for(lambda: running_trial(poll, study), 120, "a trial to run")
    first.kill(only_the_coordinator=True)  # its trial processes notice the broken pipe and exit
    resumed = run_harness(*command, cwd=tmp_path)
    assert "interrupted: the coordinator stopped while it ran" in resumed.stdout
    result = figures(audit(study, storage, uri), faults=1)
    assert result.lost == result.duplicates == result.open_runs == 0 and result.retries >= 1
    for variant in study.variants:
        trials = optuna.load_study(study_name=optuna_name(study, variant, SEARCH), storage=storage).trials
        for failed in (t for t in trials if t.state == TrialState.FAIL):
            retry = next(t for t in trials if t.user_attrs.get("retry_of") == failed.number)
            assert failed.user_attrs["fail_reason"].startswith("interrupted")
            # An interruption is not the trial's fault: its retry uses no attempt.
            assert retry.state == TrialState.COMPLETE and retry.user_attrs["attempt"] == failed.user_attrs["attempt"]


@pytest.mark.slow
def test_nan_loss_fails_its_trial_with_the_reason_and_the_others_go_on(tmp_path, figures, test_corpus):
    study = fault_study(tmp_path, test_corpus, "nan-loss", seeds="[]", epochs=2)
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    coordinator = open_coordinator(study, storage, uri, tmp_path / "runs")
    poisoned = []
    next_task = coordinator.next_task

    def poison_the_first_task(slot):
        task = next_task(slot)
        if task is not None and not poisoned:
            poisoned.append(task.key)
            task = dataclasses.replace(task, config=task.config.replace({"train.lr": 1e12, "train.clip": 0.0}))
        return task

    coordinator.next_task = poison_the_first_task
    Scheduler([Slot(0, "cpu", 1), Slot(1, "cpu", 1)], tick_seconds=0.2).run(coordinator)
    result = figures(audit(study, storage, uri), faults=1)
    assert result == Audit(trials_run=2 * 2 + 1, retries=1, lost=0, duplicates=0, open_runs=0)
    variant, _, number = poisoned[0].split("/")
    failed = coordinator.ledger.studies[(variant, SEARCH)].trials[int(number)]
    assert failed.state == TrialState.FAIL and "loss became nan" in failed.user_attrs["fail_reason"]
    run = coordinator.tracker.client.get_run(failed.user_attrs["mlflow_run_id"])
    assert run.data.tags["state"] == "failed" and "loss became nan" in run.data.tags["fail_reason"]


def test_postgres_restart_mid_study_loses_nothing(tmp_path, postgres, mlflow_server, launch, figures,
                                                  test_corpus):
    # Trials long enough (20 epochs) that the stop lands while both still train.
    study = fault_study(tmp_path, test_corpus, "postgres-restart", epochs=20)
    storage = postgres.create_database("postgres_restart")
    common = ["worker", study.path, "--storage", storage, "--tracking-uri", mlflow_server, "--devices", "cpu",
              "--trials-per-device", 1, "--heartbeat", 2]
    machines = [launch(*common, "--runs-dir", tmp_path / name, name=name) for name in ("a", "b")]
    poll = optuna.storages.RDBStorage(storage)
    wait_for(lambda: all(running_trial(poll, study, m.pid) for m in machines), 120, "both machines to run a trial")
    poll.engine.dispose()
    postgres.stop()
    # Back only once both coordinators have announced the outage (an event, not a guess at how long that takes):
    # one caught inside an MLflow call announces it too, MLflow's own HTTP retries being bounded (tracking.py).
    try:
        wait_for(lambda: all("does not answer" in m.output for m in machines), 120, "both machines to notice")
    finally:  # the cluster serves the session's other tests
        postgres.start()
    for machine in machines:
        assert machine.wait() == 0, machine.output
    result = figures(audit(study, storage, mlflow_server), faults=1)
    assert result.lost == result.duplicates == result.open_runs == 0
    assert not [m.output for m in machines if "Traceback" in m.output]


def test_coordinator_waits_out_a_storage_outage(tmp_path, postgres, test_corpus):
    study = fault_study(tmp_path, test_corpus, "outage", trials=1, seeds="[]")
    lines = []
    coordinator = open_coordinator(study, postgres.create_database("outage"), f"sqlite:///{tmp_path / 'mlflow.db'}",
                             tmp_path / "runs", log=lines.append, heartbeat=1)
    postgres.stop()

    def restart_once_noticed():
        wait_for(lambda: any("does not answer" in line for line in lines), 120, "the coordinator to notice")
        postgres.start()

    restart = threading.Thread(target=restart_once_noticed)
    restart.start()
    try:
        task = coordinator.next_task(Slot(0, "cpu", 1))  # needs the storage: waits for it to come back
    finally:
        restart.join()
    assert task is not None and task.key.endswith("/search/0")
    assert any("does not answer (StorageInternalError); retrying for up to" in line for line in lines)
    assert any("answers again" in line for line in lines)


@pytest.mark.slow
def test_unreachable_servers_fail_within_seconds_with_one_line(tmp_path, test_corpus):
    study = fault_study(tmp_path, test_corpus, "unreachable", epochs=1)
    closed = free_port()
    with socket.socket() as silent:  # accepts connections (the kernel does) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = silent.getsockname()[1]
        cases = [
            ("--storage", f"postgresql://harness:{PG_PASSWORD}@127.0.0.1:{closed}/optuna", "cannot reach the Optuna"),
            ("--storage", f"postgresql://harness:{PG_PASSWORD}@127.0.0.1:{mute}/optuna", "cannot reach the Optuna"),
            ("--tracking-uri", f"http://127.0.0.1:{closed}", "cannot reach the MLflow tracking server"),
            ("--tracking-uri", f"http://127.0.0.1:{mute}", "the MLflow tracking server"),
        ]
        for flag, url, expected in cases:
            stores = {"--storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                      "--tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}", flag: url}
            started = time.monotonic()
            proc = run_harness("worker", study.path, *[arg for pair in stores.items() for arg in pair], "--devices",
                               "cpu", cwd=tmp_path, check=False, timeout=60)
            seconds = time.monotonic() - started
            assert proc.returncode == 2 and seconds < 30, (url, seconds, proc.stderr)
            assert proc.stderr.startswith(f"error: {expected}") and len(proc.stderr.strip().splitlines()) == 1
            assert "Traceback" not in proc.stderr and PG_PASSWORD not in proc.stderr
            assert redact(url) in proc.stderr
