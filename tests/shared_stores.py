"""Real servers for the multi-machine tests, and the exactly-once audit of a study's records.

A throwaway PostgreSQL cluster and an MLflow tracking server on it, both on 127.0.0.1 only, one of each per
test session. PostgreSQL must be installed (Debian: `apt-get install -y postgresql`, as .ci/run does); without
it these tests skip, unless AWD_REQUIRE_POSTGRESQL=1 (CI) makes that a failure. pyproject.toml loads this file as a
plugin (-p shared_stores), so the fixtures are shared by every test module; the audit figures of every
test that recorded some are printed at the end of the session.
"""

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import pytest
import requests
from mlflow import MlflowClient
from optuna.trial import TrialState

from harness.study.rules import CONFIRM, SEARCH, optuna_name, trials_for
from helpers import free_port, postgres_bin, require, wait_for

PG_USER = "harness"
PG_PASSWORD = "not-a-real-secret-7f3a"  # tests check that it never shows up in output, tags, params or reports


class Postgres:
    """A PostgreSQL cluster in a temp folder, on 127.0.0.1:port, password-protected over TCP."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="awd-pg-"))
        self.data, self.port = self.root / "data", free_port()
        # initdb refuses to run as root: as root, the cluster belongs to the postgres user.
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        password_file = self.root / "password"
        password_file.write_text(PG_PASSWORD)
        password_file.chmod(0o644)
        self._run("initdb", "-D", self.data, "-U", PG_USER, f"--pwfile={password_file}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        password_file.unlink()
        self.start()

    def _run(self, tool, *args):
        proc = subprocess.run([*self.as_owner, str(self.bin_dir / tool), *map(str, args)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            log = self.root / "server.log"
            pytest.fail(f"{tool} failed: {proc.stdout}{proc.stderr}\n{log.read_text() if log.exists() else ''}")

    def start(self):
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-o", options, "-w", "start")

    def stop(self):
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def url(self, database: str, password: bool = True) -> str:
        secret = f":{PG_PASSWORD}" if password else ""
        return f"postgresql://{PG_USER}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL (with the password)."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self):
        subprocess.run([*self.as_owner, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster for this session (skipped without PostgreSQL, unless AWD_REQUIRE_POSTGRESQL=1)."""
    require("postgresql")
    cluster = Postgres(postgres_bin())
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` on a PostgreSQL database, bound to 127.0.0.1, as the README starts it; yields its URI."""
    postgres.create_database("mlflow")
    folder, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    # The password reaches the server through PGPASSWORD, never on its command line.
    env = {**os.environ, "PGPASSWORD": PG_PASSWORD, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.url("mlflow", password=False),
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited {server.returncode}:\n{(folder / 'server.log').read_text()[-3000:]}")
        try:
            return requests.get(f"{uri}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, 120, "the MLflow server to answer", every=0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:  # it waits for idle keep-alive connections; nothing is left to save
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log.close()


class Worker:
    """`python -m harness ARGS` running in the background in its own process group (a machine of its own)."""

    def __init__(self, *args, cwd: Path, env: dict | None = None, name: str = "worker"):
        self.log_path = Path(cwd) / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)
        self.pid = self.proc.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 600) -> int:
        """Its exit code; fails the test (and kills it) when it runs past timeout seconds."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{' '.join(self.proc.args[2:])} ran past {timeout} s:\n{self.output[-4000:]}")
        self.log.close()
        return code

    def kill(self, only_the_coordinator: bool = False):
        """SIGKILL the coordinator, or the whole machine: the coordinator and its trial processes."""
        try:
            if only_the_coordinator:
                os.kill(self.pid, signal.SIGKILL)
            else:
                os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


@pytest.fixture
def launch(tmp_path):
    """launch(*args, name=..., env=...): a Worker in tmp_path; whatever is left of it is killed after the test."""
    started = []

    def start(*args, name: str, env: dict | None = None) -> Worker:
        started.append(Worker(*args, cwd=tmp_path, env=env, name=name))
        return started[-1]

    yield start
    for worker in started:
        worker.kill()


def running_trial(storage, study, coordinator_pid: int | None = None):
    """(variant, trial) of a search trial running with an epoch reported (on the given coordinator), or None.

    `storage` is an optuna.storages.RDBStorage, opened once by the caller: polling opens no new connections.
    """
    for variant in study.variants:
        try:
            ostudy = optuna.load_study(study_name=optuna_name(study, variant, SEARCH), storage=storage)
        except KeyError:  # not created yet
            return None
        for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            mine = coordinator_pid is None or t.user_attrs.get("coordinator", "").endswith(f"/{coordinator_pid}")
            if t.intermediate_values and mine:
                return variant, t
    return None


@dataclass(frozen=True)
class Audit:
    """What a finished study holds, checked against its budget."""

    trials_run: int  # MLflow child runs: every trial that started, retries included
    retries: int  # failed trials enqueued again
    lost: int  # budget places or confirmation seeds without a result, or results without their MLflow run
    duplicates: int  # results beyond the budget, a seed confirmed twice, or a trial with two results or runs
    open_runs: int  # MLflow runs still RUNNING


def audit(study, storage: str, tracking_uri: str) -> Audit:
    """Count every trial and run of a finished study: each budget place and seed must hold exactly one result."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study.name)
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'run'", max_results=5000)
    ran = Counter((r.data.tags["optuna_study"], int(r.data.tags["trial"])) for r in runs
                  if r.data.tags["state"] in ("finished", "pruned"))
    retries = lost = duplicates = 0
    for variant in study.variants:
        search = optuna.load_study(study_name=optuna_name(study, variant, SEARCH), storage=storage)
        for phase in (SEARCH, CONFIRM):
            name = optuna_name(study, variant, phase)
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            results = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            given_up = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("retried")]
            retries += sum(t.state == TrialState.FAIL and bool(t.user_attrs.get("retried")) for t in trials)
            lost += sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
            result_numbers = {t.number for t in results}
            for t in trials:
                runs_of_result = ran[(name, t.number)]
                if t.number in result_numbers:
                    lost += runs_of_result == 0
                    duplicates += max(0, runs_of_result - 1)
                else:
                    duplicates += runs_of_result  # a run recorded as a result for a trial Optuna failed
            if phase == SEARCH:
                expected = trials_for(study, variant)
            else:
                expected = len(study.budget.confirm_seeds) if search.get_trials(states=(TrialState.COMPLETE,)) else 0
                seeds = Counter(t.user_attrs["seed"] for t in results + given_up)
                duplicates += sum(n - 1 for n in seeds.values())
            ended = len(results) + len(given_up)
            lost += max(0, expected - ended)
            duplicates += max(0, ended - expected)
    open_runs = sum(r.info.status == "RUNNING" for r in runs)
    return Audit(len(runs), retries, lost, duplicates, open_runs)


FIGURES = []  # (test name, faults injected, Audit)


@pytest.fixture
def figures(request):
    """record(audit, faults): keep a test's audit for the session's figures table."""

    def record(result: Audit, faults: int) -> Audit:
        FIGURES.append((request.node.name, faults, result))
        return result

    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    write = terminalreporter.write_line
    write("")
    write(f"{'exactly-once audit':<58} {'trials run':>10} {'faults':>7} {'retries':>8} {'lost':>5} {'duplicates':>10}")
    for name, faults, a in FIGURES:
        write(f"{name[:58]:<58} {a.trials_run:>10} {faults:>7} {a.retries:>8} {a.lost:>5} {a.duplicates:>10}")
    totals = [sum(x) for x in zip(*[(a.trials_run, f, a.retries, a.lost, a.duplicates) for _, f, a in FIGURES])]
    write(f"{'total':<58} {totals[0]:>10} {totals[1]:>7} {totals[2]:>8} {totals[3]:>5} {totals[4]:>10}")
