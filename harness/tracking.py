"""MLflow tracking of a study: one experiment, a parent run per variant, a child run per trial and seed.

Only coordinators write here (through MlflowClient, no global active run): one per local SQLite store, so
SQLite is never written by two processes, or one per machine on a shared tracking server. Child runs carry
the flattened resolved config as params, per-epoch metrics with step = epoch, and tags that make every
report number traceable: variant, phase, trial, seed, device, coordinator (host/pid), git commit, corpus MD5
and state (running, finished, pruned, failed + reason).
"""

import json
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from harness.config import RunConfig, StudyConfig
from harness.errors import UserError

EPOCH_METRICS = ("train_loss", "train_ppl", "val_loss", "val_ppl", "lr", "epoch_seconds", "tokens_per_s")
RESULT_METRICS = ("best_val_ppl", "best_epoch", "test_ppl", "test_loss", "seconds", "epochs")
# MLflow's own INFO lines (database migrations) and its two "View run" lines per run on a tracking server
# would drown the live view.
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

MLFLOW_STATUS = {"finished": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _artifact_location(uri: str, study: StudyConfig) -> str | None:
    # Keep a local SQLite store's artifacts beside its database, not wherever the command ran.
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts" / study.name).as_uri()


class Tracker:
    """Writes one study's runs to MLflow."""

    def __init__(self, uri: str, study: StudyConfig, common_tags: dict):
        self.client = MlflowClient(tracking_uri=uri)
        self.study, self.common_tags = study, common_tags
        experiment = self.client.get_experiment_by_name(study.name)
        if experiment is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    study.name, artifact_location=_artifact_location(uri, study),
                    tags={"study_digest": study.digest, "study_file": str(study.path)},
                )
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(study.name)  # another machine made it just now
        if experiment is not None:
            if experiment.tags.get("study_digest", study.digest) != study.digest:
                raise UserError(
                    f"{study.path}: MLflow experiment {study.name!r} was made from a different version of this study "
                    "file; refusing to mix their results: to resume it, run the file it was made from (every run "
                    "holds it as study.toml); to start afresh, give this file a new study.name (or a new "
                    "--tracking-uri)"
                )
            self.experiment_id = experiment.experiment_id
        self.parents: dict[str, str] = {}

    def _runs(self, filter_string: str) -> list:
        return list(self.client.search_runs([self.experiment_id], filter_string, max_results=5000))

    def parent_run(self, variant: str) -> str:
        """The variant's parent run, created once and found again on resume."""
        if variant not in self.parents:
            found = self._runs(f"tags.kind = 'variant' and tags.variant = '{variant}'")
            if found:
                self.parents[variant] = found[0].info.run_id
            else:
                run = self.client.create_run(self.experiment_id, run_name=variant, tags={
                    **self.common_tags, "kind": "variant", "variant": variant,
                    "description": self.study.variants[variant].description,
                })
                self.client.log_text(run.info.run_id, self.study.text, "study.toml")
                self.parents[variant] = run.info.run_id
        return self.parents[variant]

    def start_run(self, config: RunConfig, name: str, tags: dict) -> str:
        """A child run of the variant with params, tags and the study file and config as artifacts."""
        parent = self.parent_run(config.variant)
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **self.common_tags, **{k: str(v) for k, v in tags.items()}, "kind": "run", "variant": config.variant,
            "state": "running", "mlflow.parentRunId": parent,
        })
        run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in config.flat().items()]
        self.client.log_batch(run_id, params=params)
        self.client.log_text(run_id, self.study.text, "study.toml")
        self.client.log_text(run_id, json.dumps(config.to_dict(), indent=2), "config.json")
        return run_id

    def log_epoch(self, run_id: str, epoch: dict) -> None:
        """Per-epoch metrics, step = epoch."""
        now, step = _now_ms(), int(epoch["epoch"])
        metrics = [Metric(k, float(epoch[k]), now, step) for k in EPOCH_METRICS]
        metrics.append(Metric("averaging", float(epoch["averaging"]), now, step))
        self.client.log_batch(run_id, metrics=metrics)

    def finish(self, run_id: str, state: str, *, reason: str = "", result: dict | None = None) -> None:
        """End a child run as finished, pruned, failed or interrupted, with its summary metrics."""
        now = _now_ms()
        metrics = [Metric(k, float(result[k]), now, 0) for k in RESULT_METRICS if result and result.get(k) is not None]
        tags = [RunTag("state", state)] + ([RunTag("fail_reason", reason[-5000:])] if reason else [])
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, MLFLOW_STATUS[state], now)

    def summarize_variant(self, variant: str, metrics: dict, tags: dict) -> None:
        """Headline numbers on the parent run (best search value, confirmation mean)."""
        run_id = self.parent_run(variant)
        now = _now_ms()
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def close_stale_runs(self) -> int:
        """Child runs left RUNNING by the local coordinator that stopped: mark them interrupted."""
        stale = self._runs("tags.kind = 'run' and attributes.status = 'RUNNING'")
        for run in stale:
            self.finish(run.info.run_id, "interrupted", reason="the coordinator stopped while it ran")
        return len(stale)

    def close_trial_runs(self, optuna_study: str, trial: int, state: str, reason: str) -> int:
        """End the runs still RUNNING for one Optuna trial whose coordinator is gone; returns how many.

        Found by tags, not by the trial's mlflow_run_id, to include a run made just before its coordinator died.
        """
        runs = self._runs(f"tags.kind = 'run' and tags.optuna_study = '{optuna_study}' and tags.trial = '{trial}' "
                          "and attributes.status = 'RUNNING'")
        for run in runs:
            self.finish(run.info.run_id, state, reason=reason)
        return len(runs)
