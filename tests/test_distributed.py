"""Two machines on one study: `worker` commands sharing a PostgreSQL storage and an MLflow tracking server.

Needs PostgreSQL installed (see shared_stores.py); about two minutes on two cores.
"""

import pytest
from mlflow import MlflowClient

from helpers import SMOKE_STUDY, TINY, run_harness, study_for_tests, with_corpus
from harness.study.rules import trials_for
from harness.study.spec import load_study
from harness.study.stores import redact
from shared_stores import PG_PASSWORD, Audit, audit

pytestmark = pytest.mark.servers


@pytest.mark.fast
def test_redact_masks_passwords_and_leaves_the_rest():
    assert redact("postgresql://harness:p%40ss:w@db:5432/optuna") == "postgresql://harness:***@db:5432/optuna"
    assert redact("postgresql://u:pw@[::1]/db?sslmode=require&password=pw") == \
        "postgresql://u:***@[::1]/db?sslmode=require&password=***"
    assert redact("http://user:token@mlflow:5000") == "http://user:***@mlflow:5000"
    for url in ("postgresql://harness@db/optuna", "sqlite:///optuna.db", "http://127.0.0.1:5000"):
        assert redact(url) == url


def test_two_workers_run_every_trial_once_and_ablate_writes_the_report(tmp_path, postgres, mlflow_server, launch,
                                                                      figures, test_corpus):
    study_path = study_for_tests(SMOKE_STUDY, test_corpus, tmp_path)
    study = load_study(study_path)
    storage = postgres.create_database("two_workers")
    common = ["worker", study_path, "--tracking-uri", mlflow_server, "--devices", "cpu", "--trials-per-device", 1,
              "--heartbeat", 2]
    # One machine has the password in the URL, the other in PGPASSWORD, which libpq reads.
    first = launch(*common, "--storage", storage, "--runs-dir", tmp_path / "first", name="first")
    second = launch(*common, "--storage", postgres.url("two_workers", password=False), "--runs-dir",
                    tmp_path / "second", name="second", env={"PGPASSWORD": PG_PASSWORD})
    assert first.wait() == 0, first.output
    assert second.wait() == 0, second.output
    budget = sum(trials_for(study, v) + len(study.budget.confirm_seeds) for v in study.variants)
    result = figures(audit(study, storage, mlflow_server), faults=0)
    assert result == Audit(trials_run=budget, retries=0, lost=0, duplicates=0, open_runs=0)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(study.name)
    runs = client.search_runs([experiment.experiment_id], "", max_results=1000)
    coordinators = {r.data.tags["coordinator"].rsplit("/", 1)[1] for r in runs if r.data.tags["kind"] == "run"}
    assert coordinators == {str(first.pid), str(second.pid)}  # both machines took work

    # Once the budget is met, `ablate` with the same URLs starts nothing and writes the report.
    proc = run_harness("ablate", study_path, "--storage", storage, "--tracking-uri", mlflow_server, "--devices",
                       "cpu", "--heartbeat", 2, "--runs-dir", tmp_path / "runs", "--reports-dir",
                       tmp_path / "reports", cwd=tmp_path)
    assert "start " not in proc.stdout
    page = tmp_path / "reports" / study.name / "index.html"
    assert "postgresql://harness:***@127.0.0.1" in page.read_text()

    recorded = [first.output, second.output, proc.stdout, proc.stderr, page.read_text(),
                (page.parent / "results.csv").read_text(), str(experiment.tags)]
    recorded += [f"{r.data.params} {r.data.tags}" for r in runs]
    assert not [text for text in recorded if PG_PASSWORD in text]


def test_another_study_file_or_heartbeat_on_the_same_study_is_refused(tmp_path, postgres, mlflow_server, test_corpus):
    storage = postgres.create_database("refuse_mixing")
    path = tmp_path / "tiny.toml"
    path.write_text(with_corpus(TINY.format(trials=1, seeds="[]"), test_corpus).replace('name = "tiny"',
                                                                                       'name = "tiny-changed"'))
    common = ["--storage", storage, "--tracking-uri", mlflow_server, "--devices", "cpu",
              "--runs-dir", tmp_path / "runs"]
    run_harness("worker", path, *common, "--heartbeat", 2, cwd=tmp_path)

    proc = run_harness("worker", path, *common, "--heartbeat", 1, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "--heartbeat 1: the machines on this study beat every 2 s; pass --heartbeat 2" in proc.stderr

    path.write_text(path.read_text().replace("epochs = 2", "epochs = 3"))
    proc = run_harness("worker", path, *common, "--heartbeat", 2, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "different version of" in proc.stderr and "refusing to mix" in proc.stderr
    assert "run the file it was made from" in proc.stderr and "new study.name" in proc.stderr
