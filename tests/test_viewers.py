"""The smoke study as users browse it: `make dashboard` (optuna-dashboard) and `make ui` (the MLflow UI), each
started as the README says, on 127.0.0.1, and asked over its HTTP API what its pages show.
"""

import os
import signal
import subprocess

import pytest
import requests

from helpers import REPO, free_port, wait_for

pytestmark = pytest.mark.servers


def serve(target: str, *variables: str):
    """`make TARGET VAR=...` in the background, in its own process group; the caller stops it."""
    return subprocess.Popen(["make", "-s", "-C", str(REPO), target, "UI_HOST=127.0.0.1", *variables],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def stop(server: subprocess.Popen) -> None:
    """End a server started by serve(): its make and the server under it."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def answer(url: str):
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return None
    return response if response.status_code == 200 else None


@pytest.fixture
def dashboard(smoke_run):
    port = free_port()
    server = serve("dashboard", f"STORAGE={smoke_run.storage}", f"DASHBOARD_PORT={port}")
    try:
        # Starting it loads optuna and the SQLite store: generous, since other tests may load the machine.
        wait_for(lambda: server.poll() is not None or answer(f"http://127.0.0.1:{port}/api/studies"), 180,
                 "optuna-dashboard to answer")
        assert server.poll() is None, server.stderr.read().decode()
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def test_make_dashboard_shows_every_study_with_its_objective_and_confirmation_params(dashboard, smoke_run):
    studies = {s["study_name"]: s for s in requests.get(f"{dashboard}/api/studies", timeout=30).json()["study_summaries"]}
    assert set(studies) == {f"smoke/{v}/{p}" for v in ("no_dropout", "locked_only", "awd") for p in ("search", "confirm")}
    search = requests.get(f"{dashboard}/api/studies/{studies['smoke/awd/search']['study_id']}", timeout=30).json()
    confirm = requests.get(f"{dashboard}/api/studies/{studies['smoke/awd/confirm']['study_id']}", timeout=30).json()
    assert search["objective_names"] == confirm["objective_names"] == ["val_ppl"]  # not "Objective 0"
    best = search["best_trials"][0]
    best_params = {p["name"]: p["param_external_value"] for p in best["params"]}
    assert len(best_params) == 5 and len(confirm["trials"]) == 2
    for trial in confirm["trials"]:  # the confirmation runs list the rates they trained
        assert {p["name"]: p["param_external_value"] for p in trial["params"]} == best_params
        assert trial["state"] == "Complete"
    pruned = [t for t in search["trials"] if t["state"] == "Pruned"]
    assert all("test_ppl" not in {a["key"] for a in t["user_attrs"]} for t in search["trials"])
    assert len(search["trials"]) == 3 and len(pruned) <= 1


def test_make_ui_opens_the_experiment_in_the_model_training_view(smoke_run):
    port = free_port()
    server = serve("ui", f"TRACKING_URI={smoke_run.tracking_uri}", f"UI_PORT={port}")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or answer(f"{base}/health"), 240, "the MLflow UI to answer")
        assert server.poll() is None, server.stderr.read().decode()
        experiment = requests.get(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name",
                                  params={"experiment_name": "smoke"}, timeout=30).json()["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI (traces) view
        runs = requests.post(f"{base}/ajax-api/2.0/mlflow/runs/search", json={
            "experiment_ids": [experiment["experiment_id"]], "max_results": 1000}, timeout=30).json()["runs"]
        assert [r["info"]["run_name"] for r in runs if r["info"]["status"] == "RUNNING"] == []
        # A pruned run is told apart in the runs table by its status and name, without opening its tags.
        states = {r["info"]["run_name"]: r["info"]["status"] for r in runs}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            if tags.get("state") == "pruned":
                assert states[run["info"]["run_name"]] == "KILLED" and run["info"]["run_name"].endswith("[pruned]")
    finally:
        stop(server)
