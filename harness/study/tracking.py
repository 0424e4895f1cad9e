"""MLflow, and the only code that touches it: one experiment per study, a parent run per variant, a child run per
trial and seed, written by coordinators only (MlflowClient, no global active run) and read back for the report.
Child runs carry the resolved config as params, each EpochResult as metrics (step = epoch), the RunResult as
summary metrics, and tags that make every report number traceable (variant, phase, trial, seed, device, git
commit, corpus MD5, state).
"""

import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import requests
import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, LifecycleStage, Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from harness.config import RunConfig
from harness.errors import UserError
from harness.study.ledger.storage import Patient, patient
from harness.study.rules import CONFIRM, PHASES, RunState
from harness.study.spec import StudyConfig, StudyIdentity
from harness.study.stores import DEFAULT_TRACKING_URI, redact, sqlite_path
from harness.train import EpochResult, RunResult

# The metric names are the records' field names: a new metric is a new field of EpochResult or RunResult.
EPOCH_METRICS = tuple(f.name for f in dataclasses.fields(EpochResult) if f.name != "epoch")  # epoch is the step
RESULT_METRICS = tuple(f.name for f in dataclasses.fields(RunResult))
# A run's state (tag `state`) -> MLflow status. Pruned runs stopped early by the study's choice: KILLED, not a
# green FINISHED, and their name says why, so the runs table tells them apart without opening tags.
MLFLOW_STATUS = {RunState.RUNNING: "RUNNING", RunState.FINISHED: "FINISHED", RunState.PRUNED: "KILLED",
                 RunState.FAILED: "FAILED", RunState.INTERRUPTED: "KILLED"}
NAME_SUFFIX = {RunState.PRUNED: " [pruned]", RunState.INTERRUPTED: " [interrupted]", RunState.FAILED: " [failed]"}
# MLflow 3 opens an experiment without this tag in its GenAI (traces) view; this is model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The input tag MLflow's runs table reads a dataset's role from (mlflow.log_input writes the same key).
DATASET_CONTEXT = "mlflow.data.context"


VERSIONED_PACKAGES = ("torch", "optuna", "mlflow", "numpy", "scipy", "pandas", "matplotlib", "seaborn")


def package_versions() -> str:
    """'python 3.11.7, torch 2.13.0, ...' of this environment, logged as a tag on every run."""
    found = []
    for name in VERSIONED_PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join([f"python {platform.python_version()}", *found])


def git_commit() -> str:
    """HEAD of the checkout the harness runs from, '-dirty' if it has uncommitted changes (a tag on every run)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _same(logged: float | None, value: float) -> bool:
    """Whether a metric already logged holds this value (NaN holds NaN)."""
    return logged is not None and (logged == float(value) or math.isnan(logged) and math.isnan(float(value)))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _artifact_location(uri: str, study: StudyConfig) -> str | None:
    # Keep a local SQLite store's artifacts beside its database, not wherever the command ran.
    path = sqlite_path(uri, "--tracking-uri")
    return None if path is None else (path.resolve().parent / "mlartifacts" / study.name).as_uri()


def runs_table_links(uri: str, base_url: str) -> dict:
    """study (experiment) name -> the address of its runs table in the MLflow UI at base_url, for every experiment
    of the store but MLflow's empty Default. MLflow 3.17 opens an experiment in its GenAI overview whatever its
    experimentKind tag says; #/experiments/ID/runs is the runs table's own route (experimentPageTabRuns in
    mlflow/server/js) and workflowType=machine_learning selects the UI's "Model training" side."""
    client, links, token = MlflowClient(tracking_uri=uri), {}, None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        for experiment in page:
            if experiment.name != "Default":
                links[experiment.name] = (f"{base_url.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs"
                                          "?workflowType=machine_learning")
        token = page.token
        if not token:
            return links


def ui_command(uri: str) -> str:
    """How to browse this tracking store: the MLflow UI on a local store, the server's address otherwise."""
    if urlsplit(uri).scheme in ("http", "https"):
        return f"open {redact(uri).rstrip('/')}/#/experiments in a browser"
    make = "make ui" + ("" if uri == DEFAULT_TRACKING_URI else f" TRACKING_URI={shlex.quote(redact(uri))}")
    return f"{make}  (or: mlflow ui --backend-store-uri {shlex.quote(redact(uri))})"


def _study_experiment(client: MlflowClient, uri: str, study: StudyConfig, identity: StudyIdentity):
    """The study's MLflow experiment (None when there is none yet); UserError when this study may not write it or
    read it: made by someone else or by another version of the study file (StudyIdentity.mismatch), deleted, or
    renamed (its study_name and study_digest tags found under another name)."""
    where = f"the MLflow experiment {study.name!r} at {redact(uri)}"
    env = f"MLFLOW_TRACKING_URI={shlex.quote(redact(uri))}"
    experiment = client.get_experiment_by_name(study.name)
    if experiment is None:
        # Made for this study (its name and file's digest among its tags) yet named otherwise: renamed.
        found = client.search_experiments(view_type=ViewType.ALL, filter_string=(
            f"tags.study_name = '{study.name}' and tags.study_digest = '{identity.study_digest}'"))
        if found:
            moved = found[0]
            raise UserError(f"{where} was renamed to {moved.name!r} (experiment {moved.experiment_id}); rename it "
                            f"back: {env} mlflow experiments rename --experiment-id {moved.experiment_id} "
                            f"--new-name {shlex.quote(study.name)}")
        return None
    if experiment.lifecycle_stage == LifecycleStage.DELETED:
        raise UserError(f"{where} is deleted (experiment {experiment.experiment_id}, with its runs); restore it: {env} "
                        f"mlflow experiments restore --experiment-id {experiment.experiment_id}; or give the study "
                        "file another study.name")
    problem = identity.mismatch(experiment.tags)
    if problem:
        raise UserError(f"{problem} ({where})")
    return experiment


def check_experiment(uri: str, study: StudyConfig, identity: StudyIdentity, optuna_names: set, storage: str) -> None:
    """UserError, writing nothing, when the study's MLflow experiment is not this study's to write, or holds runs of
    Optuna studies that the storage (`storage`, its URL masked; `optuna_names`, the names it holds) no longer has:
    deleted (optuna delete-study), or not the storage the study ran with. Recreated, they would run it all again."""
    client = MlflowClient(tracking_uri=uri)
    experiment = _study_experiment(client, uri, study, identity)
    if experiment is None:
        return
    recorded, token = set(), None
    while True:
        page = client.search_runs([experiment.experiment_id], "tags.kind = 'run'", run_view_type=ViewType.ALL,
                                  max_results=1000, page_token=token)
        recorded |= {run.data.tags["optuna_study"] for run in page if run.data.tags.get("optuna_study")}
        token = page.token
        if not token:
            break
    missing = sorted(recorded - optuna_names)
    if missing:
        raise UserError(f"the MLflow experiment {study.name!r} at {redact(uri)} holds runs of the Optuna "
                        f"stud{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)}, which {storage} does not "
                        "hold: deleted (optuna delete-study), or not the --storage the study ran with; pass that "
                        "storage or restore it from a backup (made again, they would run every trial again), or give "
                        "the study file another study.name")


# MLflow's HTTP client would retry a server that is away for minutes without a word: a few quick tries, so that the
# tracker's own patience (one announcement, bounded retries, one line) speaks for it. Set them to override.
HTTP_PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# What a tracking server or database that is down or restarting makes MLflow raise: its REST client wraps
# connection errors in an MlflowException, and a server whose database is away answers 5xx naming the database
# error. Any other MlflowException is a real error, raised at once.
OUTAGE_CODES = ("TEMPORARILY_UNAVAILABLE",)
OUTAGE_TEXT = ("Max retries exceeded", "Connection refused", "ConnectionError", "Read timed out",
               "OperationalError", "server closed the connection", "could not connect to server",
               "the database system is")


class Tracker(Patient):
    """Writes one study's runs to MLflow; refuses an experiment recorded under another identity. Every write waits
    out a tracking store that went away, as the ledger does for Optuna (ledger.storage.Patient)."""

    store_kind = "the MLflow tracking store"

    def __init__(self, uri: str, study: StudyConfig, identity: StudyIdentity, common_tags: dict, log=print):
        super().__init__(None, log)
        self.uri = uri
        for name, value in HTTP_PATIENCE.items():
            os.environ.setdefault(name, value)
        self.client = MlflowClient(tracking_uri=uri)
        self.study, self.identity, self.common_tags = study, identity, common_tags
        experiment = _study_experiment(self.client, uri, study, identity)
        if experiment is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    study.name, artifact_location=_artifact_location(uri, study),
                    tags={**identity.as_attrs(), **EXPERIMENT_KIND, "study_name": study.name,
                          "study_file": str(study.path)},
                )
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = _study_experiment(self.client, uri, study, identity)  # another machine made it just now
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
            for key, value in {**identity.as_attrs(), **EXPERIMENT_KIND, "study_name": study.name}.items():
                if not experiment.tags.get(key):
                    self.client.set_experiment_tag(self.experiment_id, key, value)
        self.parents: dict[str, str] = {}

    def store_name(self) -> str:
        return f"{self.store_kind} {redact(self.uri)}"

    def is_outage(self, err: Exception) -> bool:
        if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            sqlalchemy.exc.OperationalError)):
            return True
        return isinstance(err, MlflowException) and (
            err.error_code in OUTAGE_CODES or any(text in str(err) for text in OUTAGE_TEXT))

    def _runs(self, filter_string: str) -> list:
        return list(self.client.search_runs([self.experiment_id], filter_string, max_results=5000))

    @patient
    def parent_run(self, variant: str) -> str:
        """The variant's parent run, created once and found again on resume (RUNNING again if it had ended)."""
        if variant not in self.parents:
            found = self._runs(f"tags.kind = 'variant' and tags.variant = '{variant}'")
            if found:
                self.parents[variant] = found[0].info.run_id
            else:
                run = self.client.create_run(self.experiment_id, run_name=variant, tags={
                    **self.common_tags, **self._arm_tags(variant), "kind": "variant", "variant": variant,
                    "description": self.study.variants[variant].description,
                })
                self.client.log_text(run.info.run_id, self.study.text, "study.toml")
                self.parents[variant] = run.info.run_id
        return self.parents[variant]

    def _arm_tags(self, arm: str) -> dict:
        """Tags that place an arm of a study with [axes]: its variant and one `axis.KEY` tag per axis value."""
        found = self.study.variants[arm]
        if not found.axes:
            return {}
        return {"base_variant": found.variant, **{f"axis.{key}": str(value) for key, value in found.axes}}

    @patient
    def start_run(self, config: RunConfig, name: str, tags: dict) -> str:
        """A child run of the variant with params, tags and the study file and config as artifacts."""
        parent = self.parent_run(config.variant)
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **self.common_tags, **self._arm_tags(config.variant), **{k: str(v) for k, v in tags.items()}, "kind": "run",
            "variant": config.variant,
            "state": RunState.RUNNING, "mlflow.parentRunId": parent,
        })
        run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in config.flat().items()]
        self.client.log_batch(run_id, params=params)
        self.client.log_text(run_id, self.study.text, "study.toml")
        self.client.log_text(run_id, json.dumps(config.to_dict(), indent=2), "config.json")
        self._log_corpus(run_id, str(tags.get("phase", "")))
        return run_id

    def _log_corpus(self, run_id: str, phase: str) -> None:
        """The corpus splits the run reads, as MLflow dataset inputs (the runs table's Dataset column): one per
        split named CORPUS.SPLIT, its file's MD5 as digest, context train, valid, and test where the run evaluates
        it (confirmation runs only). Nothing when the identity holds no MD5s (a corpus that was not checked)."""
        splits = ("train", "valid", "test") if phase == CONFIRM else ("train", "valid")
        inputs = []
        for split in splits:
            md5, path = self.identity.corpus_md5.get(split), self.identity.corpus_files.get(split)
            if md5 is None:
                continue
            corpus = Path(path).parent.name if path else self.study.corpus
            source = json.dumps({"uri": Path(path).resolve().as_uri()} if path else {"corpus": self.study.corpus})
            inputs.append(DatasetInput(Dataset(f"{corpus}.{split}", md5, "local" if path else "code", source),
                                       [InputTag(DATASET_CONTEXT, split)]))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    @patient
    def continue_run(self, run_id: str, restored: int, tags: dict) -> set | None:
        """Reopen a retried trial's run for the attempt that continues it from epoch `restored` + 1: RUNNING again,
        its name without "[interrupted]", its tags this attempt's; returns the epochs it already logged.

        None (make a new run) when the run is gone or logged epochs past `restored`: those would be logged twice.
        """
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if self.is_outage(err):
                raise
            return None  # deleted in the UI, or never written
        logged = {m.step for m in self.client.get_metric_history(run_id, "val_ppl")}
        if run.data.tags.get("kind") != "run" or any(step > restored for step in logged):
            return None
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in {**tags, "state": RunState.RUNNING}.items()])
        if "fail_reason" in run.data.tags:
            self.client.delete_tag(run_id, "fail_reason")
        name = run.info.run_name
        for suffix in NAME_SUFFIX.values():
            name = name.removesuffix(suffix)
        self.client.update_run(run_id, status="RUNNING", name=name)
        return logged

    @patient
    def run_seconds(self, run_id: str) -> float:
        """The `seconds` a run has logged (0 when none): the time its attempts took so far."""
        try:
            return float(self.client.get_run(run_id).data.metrics.get("seconds", 0.0))
        except MlflowException as err:
            if self.is_outage(err):
                raise
            return 0.0

    @patient
    def run_trial(self, run_id: str) -> str | None:
        """The `trial` tag of a run: the number of the Optuna trial that has it now (a continued run changes hands)."""
        return self.client.get_run(run_id).data.tags.get("trial")

    @patient
    def log_epoch(self, run_id: str, epoch: EpochResult) -> None:
        """One epoch's metrics (every field of EpochResult; averaging as 0/1), step = epoch."""
        now = _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, float(getattr(epoch, k)), now, epoch.epoch)
                                               for k in EPOCH_METRICS])

    @patient
    def finish(self, run_id: str, state: RunState, *, reason: str = "", result: RunResult | None = None,
               seconds: float | None = None) -> None:
        """End a child run as finished, pruned, failed or interrupted, with its summary metrics: the RunResult's
        fields that were measured, or only `seconds` for a run that did not finish."""
        now = _now_ms()
        values = dataclasses.asdict(result) if result is not None else {"seconds": seconds}
        self._write_summary(run_id, values, {"state": state, **({"fail_reason": reason[-5000:]} if reason else {})})
        if state in NAME_SUFFIX:
            name = self.client.get_run(run_id).info.run_name
            if not name.endswith(NAME_SUFFIX[state]):
                self.client.update_run(run_id, name=name + NAME_SUFFIX[state])
        self.client.set_terminated(run_id, MLFLOW_STATUS[state], now)

    @patient
    def set_parent_state(self, variant: str, state: RunState) -> None:
        """The variant's parent run: running (being worked on), finished (settled with results), failed (nothing
        could finish) or interrupted (the coordinator stopped before the variant settled)."""
        run_id = self.parent_run(variant)
        status = MLFLOW_STATUS[state]
        if self.client.get_run(run_id).info.status == status:
            return
        if status == "RUNNING":
            self.client.update_run(run_id, status=status)
        else:
            self.client.set_terminated(run_id, status, _now_ms())

    @patient
    def summarize_variant(self, variant: str, metrics: dict, tags: dict) -> None:
        """Headline numbers on the parent run (best search value, confirmation mean)."""
        self._write_summary(self.parent_run(variant), metrics, tags)

    def _write_summary(self, run_id: str, metrics: dict, tags: dict) -> None:
        """Summary metrics and tags of a run, written once: only those missing or changed are logged (a resumed or
        re-run study writes nothing twice); a changed metric gets the next step, so no step holds two values."""
        now, data = _now_ms(), self.client.get_run(run_id).data
        changed = {k: float(v) for k, v in metrics.items() if v is not None and not _same(data.metrics.get(k), v)}
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, len(self.client.get_metric_history(run_id, k)) if k in data.metrics else 0)
                     for k, v in changed.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items() if data.tags.get(k) != str(v)],
        )

    @patient
    def close_stale_runs(self) -> int:
        """Child runs left RUNNING by the local coordinator that stopped: mark them interrupted."""
        stale = self._runs("tags.kind = 'run' and attributes.status = 'RUNNING'")
        for run in stale:
            self.finish(run.info.run_id, RunState.INTERRUPTED, reason="the coordinator stopped while it ran")
        return len(stale)

    @patient
    def close_trial_runs(self, optuna_study: str, trial: int, state: RunState, reason: str) -> int:
        """End the runs still RUNNING for one Optuna trial whose coordinator is gone; returns how many.

        Found by tags, not by the trial's mlflow_run_id, to include a run made just before its coordinator died.
        """
        runs = self._runs(f"tags.kind = 'run' and tags.optuna_study = '{optuna_study}' and tags.trial = '{trial}' "
                          "and attributes.status = 'RUNNING'")
        for run in runs:
            self.finish(run.info.run_id, state, reason=reason)
        return len(runs)


# --- reading, for the report ----------------------------------------------------------------------------
def find_experiment(uri: str, study: StudyConfig) -> str | None:
    """The id of the study's experiment at uri, None when there is none; UserError when it belongs to another
    version of the study file, or was deleted or renamed."""
    experiment = _study_experiment(MlflowClient(tracking_uri=uri), uri, study, study.identity())
    return None if experiment is None else experiment.experiment_id


def _parsed(raw, parse):
    """(value, True) of a tag read with parse; (None, True) when absent; (None, False) when it does not parse."""
    if raw in (None, ""):
        return None, True
    try:
        return parse(raw), True
    except (ValueError, TypeError):
        return None, False


def _status_state(run) -> RunState:
    """The state MLflow's status (which the UI cannot edit) and the run's name give."""
    if run.info.status == "KILLED":
        return RunState.PRUNED if (run.info.run_name or "").endswith(NAME_SUFFIX[RunState.PRUNED]) \
            else RunState.INTERRUPTED
    return {"FINISHED": RunState.FINISHED, "FAILED": RunState.FAILED}.get(run.info.status, RunState.RUNNING)


def _child_record(run, env: str) -> tuple[dict, list[str]]:
    """One child run's record and what a person changed in it (each with its restore). A tag that duplicates a
    param (variant, seed: MLflow never lets a param change) takes the param's value; a state tag claiming a result
    that the run's status denies takes the status's; a number that does not parse is left out."""
    tags, params, metrics, found = run.data.tags, run.data.params, run.data.metrics, []

    def tag(key, parse, truth=None):
        value, ok = _parsed(tags.get(key), parse)
        if truth is not None and (value != truth or not ok):
            found.append(f"tag {key} = {tags.get(key)!r} was edited (the run's params say {truth}); using {truth}; "
                         f"set it back to {truth} in the MLflow UI")
            return truth
        if not ok:
            found.append(f"tag {key} = {tags.get(key)!r} was edited and is not a number; left out of the report")
        return value

    seed_param, _ = _parsed(params.get("train.seed"), int)
    state, ok = _parsed(tags.get("state"), RunState)
    status_state = _status_state(run)
    # A result claimed on a run MLflow ended without one; not the reverse (a finished run marked failed only drops
    # it), nor a RUNNING status (a coordinator stopped between the tag and the status: the result was logged).
    if not ok or state == RunState.FINISHED and run.info.status in ("FAILED", "KILLED"):
        found.append(f"tag state = {tags.get('state')!r} was edited (its MLflow status is {run.info.status}); using "
                     f"{status_state}; set it back to {status_state} in the MLflow UI")
        state = status_state
    phase = tags.get("phase", "")
    if phase not in PHASES:
        recorded = tags.get("optuna_study", "").rsplit("/", 1)[-1]
        found.append(f"tag phase = {phase!r} was edited; using {recorded or 'none'} (from its optuna_study tag); "
                     "set it back in the MLflow UI")
        phase = recorded if recorded in PHASES else ""
    row = {
        "run_id": run.info.run_id, "name": run.info.run_name, "variant": tag("variant", str, params.get("variant")),
        "phase": phase, "trial": tag("trial", int), "seed": tag("seed", int, seed_param),
        "attempt": tag("attempt", int), "state": state or RunState.RUNNING,
        "fail_reason": tags.get("fail_reason", ""), "device": tags.get("device", ""),
        "device_name": tags.get("device_name", ""), "versions": tags.get("versions", ""),
        "git_commit": tags.get("git_commit", ""), "corpus": tags.get("corpus", ""),
        "corpus_md5": tags.get("corpus_md5", ""), "end_time": run.info.end_time or 0,
        "params": dict(params), **{k: metrics.get(k) for k in RESULT_METRICS},
    }
    return row, found


def read_child_runs(uri: str, experiment_id: str, log=print) -> list[dict]:
    """One record per child run: its tags (variant, phase, trial, seed, state, ...), params and result metrics; what
    people changed in a run (a tag edited, the run deleted) is said through `log`, one line each, with its restore."""
    client, rows, token = MlflowClient(tracking_uri=uri), [], None
    env = f"MLFLOW_TRACKING_URI={shlex.quote(redact(uri))}"
    while True:
        # Every run of the experiment: a child whose `kind` tag was edited is still one (MLflow's parent tag).
        page = client.search_runs([experiment_id], "", run_view_type=ViewType.ALL, max_results=1000,
                                  page_token=token)
        for run in page:
            kind = run.data.tags.get("kind")
            if kind == "variant" or kind != "run" and "mlflow.parentRunId" not in run.data.tags:
                continue
            if run.info.lifecycle_stage == LifecycleStage.DELETED:  # left out, as MLflow shows it; Optuna's tally stays
                log(f"MLflow run {run.info.run_id} ({run.info.run_name}) is deleted, so the report leaves it out; "
                    f"restore it: {env} mlflow runs restore --run-id {run.info.run_id}")
                continue
            row, found = _child_record(run, env)
            if kind != "run":
                found.append(f"tag kind = {kind!r} was edited; read as a trial's run; set it back to 'run'")
            rows.append(row)
            for what in found:
                log(f"MLflow run {run.info.run_id} ({run.info.run_name}): {what}")
        token = page.token
        if not token:
            return rows


def read_epoch_metrics(uri: str, run_id: str, keys: tuple) -> dict:
    """key -> {epoch: value} of one run's per-epoch metrics."""
    client = MlflowClient(tracking_uri=uri)
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}
