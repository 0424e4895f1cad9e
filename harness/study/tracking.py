"""MLflow, and the only code that touches it: one experiment per study, a parent run per variant, a child run per
trial and seed, written by coordinators only (MlflowClient, no global active run) and read back for the report.
Child runs carry the resolved config as params, each EpochResult as metrics (step = epoch), the RunResult as
summary metrics, and tags that make every report number traceable (variant, phase, trial, seed, device, git
commit, corpus MD5, state).
"""

import dataclasses
import json
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
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from harness.config import RunConfig
from harness.errors import UserError
from harness.study.ledger.storage import Patient, patient
from harness.study.rules import RunState
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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _artifact_location(uri: str, study: StudyConfig) -> str | None:
    # Keep a local SQLite store's artifacts beside its database, not wherever the command ran.
    path = sqlite_path(uri, "--tracking-uri")
    return None if path is None else (path.resolve().parent / "mlartifacts" / study.name).as_uri()


def ui_command(uri: str) -> str:
    """How to browse this tracking store: the MLflow UI on a local store, the server's address otherwise."""
    if urlsplit(uri).scheme in ("http", "https"):
        return f"open {redact(uri).rstrip('/')}/#/experiments in a browser"
    make = "make ui" + ("" if uri == DEFAULT_TRACKING_URI else f" TRACKING_URI={shlex.quote(redact(uri))}")
    return f"{make}  (or: mlflow ui --backend-store-uri {shlex.quote(redact(uri))})"


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
        self.study, self.common_tags = study, common_tags
        experiment = self.client.get_experiment_by_name(study.name)
        if experiment is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    study.name, artifact_location=_artifact_location(uri, study),
                    tags={**identity.as_attrs(), **EXPERIMENT_KIND, "study_file": str(study.path)},
                )
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(study.name)  # another machine made it just now
        if experiment is not None:
            problem = identity.mismatch(experiment.tags)
            if problem:
                raise UserError(f"{problem} (the MLflow experiment {study.name!r} at {redact(uri)})")
            self.experiment_id = experiment.experiment_id
            for key, value in {**identity.as_attrs(), **EXPERIMENT_KIND}.items():
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
        return run_id

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
        metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None]
        tags = [RunTag("state", state)] + ([RunTag("fail_reason", reason[-5000:])] if reason else [])
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
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
        run_id = self.parent_run(variant)
        now = _now_ms()
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
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
def _int(value) -> int | None:
    return int(value) if value not in (None, "") else None


def find_experiment(uri: str, study: StudyConfig) -> str | None:
    """The id of the study's experiment at uri, None when there is none; UserError when it belongs to another
    version of the study file."""
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(study.name)
    if experiment is None:
        return None
    problem = study.identity().mismatch(experiment.tags)
    if problem:
        raise UserError(f"{problem} (the MLflow experiment {study.name!r} at {redact(uri)})")
    return experiment.experiment_id


def read_child_runs(uri: str, experiment_id: str) -> list[dict]:
    """One record per child run: its tags (variant, phase, trial, seed, state, ...), params and result metrics."""
    client, rows, token = MlflowClient(tracking_uri=uri), [], None
    while True:
        page = client.search_runs([experiment_id], "tags.kind = 'run'", max_results=1000, page_token=token)
        for run in page:
            tags, metrics = run.data.tags, run.data.metrics
            rows.append({
                "run_id": run.info.run_id, "name": run.info.run_name, "variant": tags.get("variant", ""),
                "phase": tags.get("phase", ""), "trial": _int(tags.get("trial")), "seed": _int(tags.get("seed")),
                "attempt": _int(tags.get("attempt")), "state": tags.get("state", RunState.RUNNING),
                "fail_reason": tags.get("fail_reason", ""), "device": tags.get("device", ""),
                "device_name": tags.get("device_name", ""), "versions": tags.get("versions", ""),
                "git_commit": tags.get("git_commit", ""), "corpus": tags.get("corpus", ""),
                "corpus_md5": tags.get("corpus_md5", ""), "end_time": run.info.end_time or 0,
                "params": dict(run.data.params), **{k: metrics.get(k) for k in RESULT_METRICS},
            })
        token = page.token
        if not token:
            return rows


def read_epoch_metrics(uri: str, run_id: str, keys: tuple) -> dict:
    """key -> {epoch: value} of one run's per-epoch metrics."""
    client = MlflowClient(tracking_uri=uri)
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}
