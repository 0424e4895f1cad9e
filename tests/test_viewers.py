"""The smoke study as users browse it: `make dashboard` (optuna-dashboard) and `make ui` (the MLflow UI), each
started as the README says, on 127.0.0.1, asked over its HTTP API what its pages show, and opened in headless
Chromium as a user would (screenshots: the test's tmp folder, screenshots/, kept by pytest for its last 3 runs).
"""

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from helpers import REPO, free_port, headless_chromium, wait_for

pytestmark = pytest.mark.servers


def serve(target: str, *variables: str, out: Path | None = None):
    """`make TARGET VAR=...` in the background, in its own process group, its output into `out` (when given); the
    caller stops it."""
    stdout = open(out, "w") if out else subprocess.DEVNULL  # noqa: SIM115 (the child holds it; closed on exit)
    return subprocess.Popen(["make", "-s", "-C", str(REPO), target, "UI_HOST=127.0.0.1", *variables],
                            stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)


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


# --- the pages, in headless Chromium ----------------------------------------------------------------
async def until(tools, session, expression: str, timeout: float, what: str):
    """Evaluate `expression` in the page until it is truthy; its value. Fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await tools.call("Runtime.evaluate", session, expression=expression, returnByValue=True,
                                 awaitPromise=True)
        value = found["result"].get("value")
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.5)


async def screenshot(tools, session, path: Path) -> None:
    shot = await tools.call("Page.captureScreenshot", session, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


# The runs table (ag-grid): each row's run id, name, status icon colour and Dataset cell, its left and centre parts
# joined by row id. A run's status is shown as an icon only: green check (finished) or red cross (killed, failed).
RUNS_TABLE = """(() => {
  const rows = {};
  for (const row of document.querySelectorAll('[role=row][row-id]')) {
    const id = row.getAttribute('row-id'), seen = rows[id] || (rows[id] = {id});
    const name = row.querySelector('[col-id="attributes.`Run Name`"] a');
    if (name) seen.name = name.innerText.trim();
    const icon = row.querySelector('[col-id=runDateAndNestInfo] .anticon');
    if (icon) seen.color = getComputedStyle(icon).color;
    const dataset = row.querySelector('[col-id="attributes.`Dataset`"]');
    if (dataset) seen.dataset = dataset.innerText;
    const expander = row.querySelector('[col-id="attributes.`Run Name`"] button');
    if (expander) seen.expander = true;
  }
  return Object.values(rows);
})()"""
EXPAND = """((id) => {
  const button = document.querySelector(`[role=row][row-id="${id}"] [col-id="attributes.\\`Run Name\\`"] button`);
  if (button) button.click();
  return Boolean(button);
})"""


# The GenAI / Model training switch marks the selected side only by its text colour (dark; the other is grey).
SELECTED_VIEW = """(() => {
  const sides = [...document.querySelectorAll('[role=button]')]
    .filter(b => /^(GenAI|Model training)$/.test(b.innerText.trim()));
  const darkness = b => getComputedStyle(b.firstElementChild).color.match(/\\d+/g).slice(0, 3)
    .reduce((a, c) => a + +c, 0);
  sides.sort((a, b) => darkness(a) - darkness(b));
  return sides.length === 2 && darkness(sides[0]) < darkness(sides[1]) ? sides[0].innerText.trim() : '';
})()"""


def status_of(color: str) -> str:
    """FINISHED for the runs table's green icon, KILLED or FAILED for its red one."""
    red, green, _ = map(int, re.findall(r"\d+", color)[:3])
    return "FINISHED" if green > red else "KILLED or FAILED"


async def browse_runs(link: str, parents: list, shots: Path) -> tuple[str, list, str]:
    """Open the link `make ui` printed; expand each parent run (a click on its row's expander); return the page's
    address, the runs table's rows and the selected view (GenAI or Model training)."""
    async with headless_chromium(shots / "profile") as (tools, session):
        await tools.call("Page.navigate", session, url=link)
        # The single-page app loads its bundle, then the runs: generous, as the machine may be loaded.
        await until(tools, session, f"{RUNS_TABLE}.filter(r => r.name).length >= {len(parents)}", 180,
                    "the runs table to list the parent runs")
        await screenshot(tools, session, shots / "mlflow-runs.png")
        for parent in parents:
            assert await until(tools, session, f"{EXPAND}({json.dumps(parent)})", 30, f"the expander of {parent}")
        total = len(parents) + 1  # wait for more than the parents: every expanded parent's children
        await until(tools, session, f"{RUNS_TABLE}.filter(r => r.name).length > {total}", 60, "the child runs")
        await asyncio.sleep(2)  # the last parents' children render in the same pass or the next
        rows = await until(tools, session, RUNS_TABLE, 10, "the rows")
        await screenshot(tools, session, shots / "mlflow-runs-expanded.png")
        address = await until(tools, session, "location.href", 10, "the address")
        view = await until(tools, session, SELECTED_VIEW, 10, "the GenAI / Model training switch")
        return address, rows, view


@pytest.mark.needs("chromium")
def test_make_ui_opens_the_runs_table_with_parents_children_states_and_datasets(smoke_run, tmp_path):
    port, printed = free_port(), tmp_path / "ui.out"
    server = serve("ui", f"TRACKING_URI={smoke_run.tracking_uri}", f"UI_PORT={port}", out=printed)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or answer(f"{base}/health"), 240, "the MLflow UI to answer")
        assert server.poll() is None, server.stderr.read().decode()
        client = MlflowClient(smoke_run.tracking_uri)
        experiment = client.get_experiment_by_name("smoke")
        link = re.search(r"^  smoke: (\S+)$", printed.read_text(), re.M).group(1)
        assert link == f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("kind") == "variant"]
        address, rows, view = asyncio.run(browse_runs(link, [p.info.run_id for p in parents], tmp_path / "screenshots"))
    finally:
        stop(server)
    assert f"/#/experiments/{experiment.experiment_id}/runs" in address  # not the GenAI overview
    assert view == "Model training"
    shown = {row["id"]: row for row in rows if row.get("name")}
    assert set(shown) == {r.info.run_id for r in runs}  # every parent and every child run
    md5 = dict(pair.split("=") for pair in experiment.tags["corpus_md5"].split(","))
    for run in runs:
        row = shown[run.info.run_id]
        assert row["name"] == run.info.run_name
        assert status_of(row["color"]) == (run.info.status if run.info.status == "FINISHED" else "KILLED or FAILED")
        splits = ("train", "valid", "test") if run.data.tags.get("phase") == "confirm" else ("train", "valid")
        if run.data.tags.get("kind") == "run":
            for split in splits:
                assert f"{run.data.tags['corpus']}.{split} ({md5[split]})" in row["dataset"], (run.info.run_name, row)
            if "test" not in splits:
                assert md5["test"] not in row["dataset"]  # a search run never reads the test split
    assert (tmp_path / "screenshots" / "mlflow-runs-expanded.png").stat().st_size > 10_000


async def browse_dashboard(base: str, studies: dict, shots: Path) -> dict:
    """Open optuna-dashboard's home page, then each study's page; name -> the study page's text."""
    texts = {}
    async with headless_chromium(shots / "profile") as (tools, session):
        await tools.call("Page.navigate", session, url=f"{base}/dashboard")
        listed = " && ".join(f"document.body.innerText.includes({json.dumps(name)})" for name in studies)
        await until(tools, session, listed, 120, "the home page to list every study")
        await screenshot(tools, session, shots / "dashboard-home.png")
        for name, study_id in studies.items():
            await tools.call("Page.navigate", session, url=f"{base}/dashboard/studies/{study_id}")
            texts[name] = await until(tools, session, f"document.body.innerText.includes({json.dumps(name)}) && "
                                      "document.body.innerText.includes('Best Trial') && document.body.innerText",
                                      120, f"the page of {name}")
            await screenshot(tools, session, shots / f"dashboard-{name.replace('/', '-')}.png")
    return texts


@pytest.mark.needs("chromium")
def test_make_dashboard_pages_show_every_study_with_its_objective_named(dashboard, tmp_path):
    summaries = requests.get(f"{dashboard}/api/studies", timeout=30).json()["study_summaries"]
    studies = {s["study_name"]: s["study_id"] for s in summaries}
    assert len(studies) == 6
    texts = asyncio.run(browse_dashboard(dashboard, studies, tmp_path / "screenshots"))
    for name, text in texts.items():
        assert "val_ppl" in text and "Objective 0" not in text, name
    assert len(list((tmp_path / "screenshots").glob("dashboard-*.png"))) == 7


@pytest.mark.slow
def test_each_run_logs_the_corpus_splits_it_reads_as_dataset_inputs(smoke_run):
    client = MlflowClient(smoke_run.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    md5 = dict(pair.split("=") for pair in experiment.tags["corpus_md5"].split(","))
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'run'", max_results=1000)
    assert runs
    for run in runs:
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        logged = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): (i.dataset.name, i.dataset.digest)
                  for i in inputs}
        splits = ("train", "valid", "test") if run.data.tags["phase"] == "confirm" else ("train", "valid")
        corpus = run.data.tags["corpus"]  # the corpus folder's name: ptb, or the synthetic corpus's
        assert logged == {split: (f"{corpus}.{split}", md5[split]) for split in splits}, run.info.run_name
