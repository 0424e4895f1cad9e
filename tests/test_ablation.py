"""Ablation studies with real worker processes: scheduling, retries, MLflow/Optuna records, resume."""

import json
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from harness.bench import EqualTrials
from harness.study.coordinator import run_study
from harness.study.rules import SEARCH
from harness.study.scheduler import Scheduler, Slot, discover_slots
from harness.study.spec import load_study

from helpers import child_runs, open_coordinator, run_harness, tiny_study

pytestmark = pytest.mark.slow

@pytest.mark.fast
def test_cpu_slots_divide_the_cores(monkeypatch):
    monkeypatch.setattr("harness.study.scheduler.joblib.cpu_count", lambda: 8)
    assert [(s.device, s.threads) for s in discover_slots("cpu", 2)] == [("cpu", 4)] * 2
    assert [s.threads for s in discover_slots("cpu", 3)] == [2, 2, 2]  # 8 // 3: never more threads than cores
    assert [s.threads for s in discover_slots("cpu")] == [1] * 8  # one one-thread worker per core by default
    assert [s.threads for s in discover_slots("cpu", 16)] == [1] * 16


class TickingTrials(EqualTrials):
    """EqualTrials that also records each scheduler tick (one per pass of waiting and handling)."""

    def on_tick(self) -> None:
        self.events.append((time.monotonic(), "tick", None, None, len(self.todo)))


def test_slots_are_exclusive_and_never_idle_while_work_remains(tmp_path, test_corpus):
    source = TickingTrials(tiny_study(tmp_path, test_corpus).run_config("locked_only"), 5, tmp_path)
    Scheduler([Slot(0, "cpu", 1), Slot(1, "cpu", 1)], tick_seconds=0.2).run(source)
    events = [e for e in source.events if e[1] != "tick"]
    running = {}
    for t, kind, slot, key, left in events:
        if kind == "start":
            assert slot not in running, f"slot {slot} got {key} while running {running.get(slot)}"
            running[slot] = (key, t)
        else:
            assert running.pop(slot)[0] == key
    assert not running and sum(e[1] == "done" for e in events) == 5
    # No slot stays free for more than the one tick that ends the pass in which it freed while a task waits to
    # start. Counted in passes, not seconds, so load cannot fail it; and per slot set, not per slot, because two
    # slots may free in one pass with a single task left for them (one of them then rightly stays idle).
    free, idle_ticks = set(), 0
    for t, kind, slot, key, left in source.events:
        if kind == "start":
            free.discard(slot)
            idle_ticks = 0
        elif kind == "done":
            free.add(slot)
        elif free and left:
            idle_ticks += 1
            assert idle_ticks <= 1, f"slots {sorted(free)} stayed free for {idle_ticks} passes with {left} tasks waiting"


def test_killed_worker_fails_only_its_trial_and_is_retried(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=2)
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    coordinator = open_coordinator(study, storage, uri, tmp_path / "runs")
    scheduler = Scheduler([Slot(0, "cpu", 1), Slot(1, "cpu", 1)], tick_seconds=0.2)
    killed = []
    on_epoch = coordinator.on_epoch

    def kill_first_worker(task, epoch):
        if not killed:
            victim = next(r for r in scheduler.running.values() if r.task.key == task.key)
            os.kill(victim.child.process.pid, signal.SIGKILL)
            killed.append(task.key)
        return on_epoch(task, epoch)

    coordinator.on_epoch = kill_first_worker
    scheduler.run(coordinator)
    assert killed
    variant = killed[0].split("/")[0]
    trials = coordinator.ledger.studies[(variant, "search")].get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "killed by signal 9" in failed[0].user_attrs["fail_reason"]
    assert failed[0].user_attrs["retried"] is True
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == failed[0].number)
    assert retry.state == TrialState.COMPLETE and retry.params == failed[0].params
    for v in study.variants:  # the full budget, for the other variant too
        done = [t for t in coordinator.ledger.studies[(v, "search")].get_trials() if t.state == TrialState.COMPLETE]
        assert len(done) == 2
    # The retry continued the killed attempt: from its checkpoint, in its MLflow run, every epoch logged once.
    client, runs, _ = child_runs(uri, study.name)
    assert sorted(r.data.tags["state"] for r in runs) == ["finished"] * 4
    (run,) = [r for r in runs if r.info.run_id == failed[0].user_attrs["mlflow_run_id"]]
    assert run.data.tags["trial"] == str(retry.number) and run.data.tags["continued_after_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")] == [1, 2]
    assert sorted(retry.intermediate_values) == [1, 2]
    assert retry.intermediate_values[1] == failed[0].intermediate_values[1]


def test_a_prune_verdict_stops_the_worker_and_is_recorded_everywhere(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=2, seeds="[1]")
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    coordinator = open_coordinator(study, storage, uri, tmp_path / "runs")
    report_epoch, victims = coordinator.ledger.report_epoch, []

    def prune_the_first_search_trial(claim, epoch, val_ppl):
        keep_going = report_epoch(claim, epoch, val_ppl)
        if claim.phase == "search" and (not victims or victims == [claim.key]):
            victims[:] = [claim.key]
            return False
        return keep_going

    coordinator.ledger.report_epoch = prune_the_first_search_trial
    Scheduler([Slot(0, "cpu", 1)], tick_seconds=0.2).run(coordinator)
    variant, _, number = victims[0].split("/")
    trial = coordinator.ledger.studies[(variant, "search")].trials[int(number)]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    run = coordinator.tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    history = coordinator.tracker.client.get_metric_history(run.info.run_id, "val_ppl")
    assert [m.step for m in history] == [1], "the worker trained on after the prune verdict"
    assert run.info.status == "KILLED" and run.info.run_name.endswith("[pruned]")
    assert run.data.tags["state"] == "pruned" and "test_ppl" not in run.data.metrics
    tally = coordinator.ledger.tally(variant, "search")
    assert (tally.pruned, tally.finished, tally.settled) == (1, 1, 2)
    # The confirmation retrains the finished trial, not the pruned one.
    confirm = coordinator.ledger.studies[(variant, "confirm")].trials
    finished = next(t for t in coordinator.ledger.studies[(variant, "search")].trials if t.state == TrialState.COMPLETE)
    assert [t.params for t in confirm] == [finished.params] and confirm[0].state == TrialState.COMPLETE


def test_smoke_study_records_every_run(smoke_run):
    study = load_study(smoke_run.study)
    client, runs, parents = child_runs(smoke_run.tracking_uri, study.name)
    assert sorted(p.data.tags["variant"] for p in parents) == sorted(study.variants)
    parent_ids = {p.info.run_id: p.data.tags["variant"] for p in parents}
    seeds = list(study.budget.confirm_seeds)
    for variant in study.variants:
        mine = [r for r in runs if r.data.tags["variant"] == variant]
        assert all(parent_ids[r.data.tags["mlflow.parentRunId"]] == variant for r in mine)
        search = [r for r in mine if r.data.tags["phase"] == "search" and r.data.tags["state"] in ("finished", "pruned")]
        expected = 1 if variant == "no_dropout" else study.budget.trials
        assert len(search) == expected, variant
        confirm = [r for r in mine if r.data.tags["phase"] == "confirm" and r.data.tags["state"] == "finished"]
        assert sorted(int(r.data.tags["seed"]) for r in confirm) == seeds
        for run in confirm:
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
            assert {"git_commit", "corpus_md5", "device", "trial", "study_digest"} <= set(tags)
            assert params["variant"] == variant and params["train.seed"] == tags["seed"]
            history = client.get_metric_history(run.info.run_id, "val_ppl")
            assert [m.step for m in history] == list(range(1, int(metrics["epochs"]) + 1))
            assert metrics["best_val_ppl"] == pytest.approx(min(m.value for m in history))
            assert "test_ppl" in metrics
    # Confirmation retrains the best search trial's parameters: in MLflow's params, config.json and Optuna.
    for variant in study.variants:
        search = optuna.load_study(study_name=f"smoke/{variant}/search", storage=smoke_run.storage)
        confirm = optuna.load_study(study_name=f"smoke/{variant}/confirm", storage=smoke_run.storage)
        best = search.best_trial
        assert [t.params for t in confirm.trials] == [best.params] * len(seeds)
        for run in runs:
            tags = run.data.tags
            if tags["variant"] != variant or tags["phase"] != "confirm":
                continue
            assert {k: float(run.data.params[k]) for k in best.params} == best.params
            folder = smoke_run.workdir / "artifacts" / run.info.run_id
            folder.mkdir(parents=True, exist_ok=True)
            config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(folder))).read_text())
            assert {k: config[k.split(".")[0]][k.split(".")[1]] for k in best.params} == best.params
            checkpoint = smoke_run.workdir / "runs" / "smoke" / variant / "confirm" / f"trial-{tags['trial']}" / "best.pt"
            saved = torch.load(checkpoint, weights_only=True)["config"]
            assert {k: saved[k.split(".")[0]][k.split(".")[1]] for k in best.params} == best.params
            assert saved["train"]["seed"] == int(tags["seed"])
    # Test perplexity is only ever evaluated in confirmation runs.
    for run in runs:
        assert ("test_ppl" in run.data.metrics) == (run.data.tags["phase"] == "confirm" and
                                                    run.data.tags["state"] == "finished"), run.info.run_name
    for variant in study.variants:
        search = optuna.load_study(study_name=f"smoke/{variant}/search", storage=smoke_run.storage)
        assert not any("test_ppl" in t.user_attrs for t in search.trials)
        assert search.metric_names == ["val_ppl"]
        first = search.trials[0]
        if variant != "no_dropout":  # the paper's rates go first
            assert first.params == {f"dropout.{s}": getattr(study.fixed.dropout, s)
                                    for s in study.variants[variant].sites if s in study.search.rates}
        for trial in search.trials:
            if trial.state == TrialState.PRUNED:
                run = client.get_run(trial.user_attrs["mlflow_run_id"])
                assert run.data.tags["state"] == "pruned" and run.info.status == "KILLED"
                assert min(trial.intermediate_values) == 1 and max(trial.intermediate_values) > study.budget.warmup_epochs
    # The study's true state: nothing RUNNING, every variant's parent run ended, the classic runs view.
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    assert {p.data.tags["variant"]: p.info.status for p in parents} == dict.fromkeys(study.variants, "FINISHED")
    experiment = client.get_experiment_by_name(study.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_resuming_a_finished_study_duplicates_nothing(smoke_run):
    study = load_study(smoke_run.study)
    _, before, _ = child_runs(smoke_run.tracking_uri, study.name)
    proc = run_harness("ablate", smoke_run.study, "--storage", smoke_run.storage, "--tracking-uri",
                       smoke_run.tracking_uri, "--devices", "cpu", "--trials-per-device", "2",
                       "--runs-dir", smoke_run.workdir / "runs", cwd=smoke_run.workdir)
    assert "start " not in proc.stdout
    _, after, _ = child_runs(smoke_run.tracking_uri, study.name)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)


def test_interrupted_study_resumes_without_duplicates(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=2, seeds="[1]")
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    slots = [Slot(0, "cpu", 1), Slot(1, "cpu", 1)]
    calls = []

    def interrupt(line):  # Ctrl-C once, when both slots have started a trial
        if " start  " in line:
            calls.append(line)
            if len(calls) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(study, storage=storage, tracking_uri=uri, slots=slots, runs_dir=tmp_path / "runs", log=interrupt)
    _, runs, parents = child_runs(uri, study.name)
    assert [r.info.status for r in runs + parents if r.info.status == "RUNNING"] == []
    assert "KILLED" in {p.info.status for p in parents}
    assert any(r.info.run_name.endswith("[interrupted]") for r in runs)
    run_study(study, storage=storage, tracking_uri=uri, slots=slots, runs_dir=tmp_path / "runs",
                 log=lambda *a: None)
    _, runs, _ = child_runs(uri, study.name)
    finished = [(r.data.tags["variant"], r.data.tags["phase"], r.data.tags["trial"]) for r in runs
                if r.data.tags["state"] == "finished"]
    assert len(finished) == len(set(finished)) == 2 * 2 + 2 * 1
    assert all(r.data.tags["state"] in ("finished", "interrupted") for r in runs)
    assert all(r.info.status != "RUNNING" for r in runs)
    _, _, parents = child_runs(uri, study.name)
    assert sorted(p.info.status for p in parents) == ["FINISHED", "FINISHED"]


def test_other_study_file_under_the_same_name_is_refused(tmp_path, smoke_run):
    changed = tmp_path / "smoke.toml"
    changed.write_text(smoke_run.study.read_text().replace("trials = 3", "trials = 4"))
    proc = run_harness("ablate", changed, "--storage", smoke_run.storage, "--tracking-uri", smoke_run.tracking_uri,
                       "--devices", "cpu", cwd=smoke_run.workdir, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "different version of" in proc.stderr and "new study.name" in proc.stderr


@pytest.mark.fast
def test_live_view_counts_interrupted_trials_apart_from_failed_ones(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=2)
    coordinator = open_coordinator(study, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             tmp_path / "runs")
    ledger = coordinator.ledger
    ledger.fail(ledger.claim("locked_only", SEARCH), "interrupted (Ctrl-C)", interrupted=True)
    ledger.fail(ledger.claim("locked_only", SEARCH), "RuntimeError: boom")
    (row,) = [line for line in coordinator.view.summary().splitlines() if line.split()[:1] == ["locked_only"]]
    done, pruned, failed, interrupted = (int(n) for n in row.split()[1:8:2])
    assert (done, pruned, failed, interrupted) == (0, 0, 1, 1)
    assert row.split()[-3:-1] == ["none", "yet"]  # no finished trial: no best value, and no "nan"


@pytest.mark.fast
def test_live_view_columns_hold_for_arm_names_longer_than_a_variants(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=2, edits=[
        ("[search]", '[axes]\n"model.cell" = ["lstm", "rnn_tanh"]\n[search]')])
    coordinator = open_coordinator(study, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                   tmp_path / "runs")
    ledger = coordinator.ledger
    ledger.fail(ledger.claim("weight_only@cell=rnn_tanh", SEARCH), "RuntimeError: boom")
    lines = coordinator.view.summary().splitlines()
    header = lines[1]
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in study.variants]
    assert len(rows) == len(study.variants) and any(len(arm) > 18 for arm in study.variants)
    # Every row's counts sit under the header's: the column after the arm name starts at the same place.
    start = header.index("search:")
    assert all(row[start - 1] == " " and row[:start].rstrip() == "  " + row.split()[0] for row in rows)
    assert {row.index(" of ") for row in rows} == {rows[0].index(" of ")}
