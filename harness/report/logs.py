"""What the report reads: a study's MLflow runs (through harness.study.tracking) and Optuna trials (through the
ledger's reader), gathered once into pandas frames. Nothing here computes a reported number.
"""

import shlex
from dataclasses import dataclass

import pandas as pd

from harness.errors import UserError
from harness.study.ledger.reader import LedgerReader
from harness.study.ledger.storage import open_storage
from harness.study.ledger.studies import holds_study
from harness.study.rules import PHASES, SEARCH
from harness.study.spec import StudyConfig
from harness.study.stores import redact, sqlite_path
from harness.study.tracking import RESULT_METRICS, find_experiment, read_child_runs, read_epoch_metrics

CURVE_METRICS = ("train_loss", "train_ppl", "val_loss", "val_ppl", "averaging")
MIN_IMPORTANCE_TRIALS = 5  # a random forest fit to fewer finished trials reports mostly noise
RUN_COLUMNS = ("run_id", "name", "variant", "phase", "trial", "seed", "attempt", "state", "fail_reason", "device",
               "device_name", "versions", "git_commit", "corpus", "corpus_md5", "end_time", "params", *RESULT_METRICS)
CURVE_COLUMNS = ("run_id", "variant", "phase", "trial", "seed", "state", "epoch", *CURVE_METRICS)
TRIAL_COLUMNS = ("variant", "number", "state", "value", "best_seen", "params")


@dataclass(frozen=True)
class StudyLog:
    """Everything the report reads, gathered once from MLflow and the Optuna storage."""

    study: StudyConfig
    tracking_uri: str
    storage: str
    runs: pd.DataFrame  # one row per MLflow child run (RUN_COLUMNS)
    curves: pd.DataFrame  # per-epoch train/val loss and perplexity of every run (CURVE_COLUMNS)
    trials: pd.DataFrame  # one row per finished or pruned Optuna search trial (TRIAL_COLUMNS)
    tallies: dict  # variant -> phase -> harness.study.rules.Tally; a variant without Optuna studies is absent
    importances: dict  # variant -> {param: importance}, or a sentence saying why there are none


def ablate_command(study: StudyConfig, tracking_uri: str, storage: str) -> str:
    """The command that runs (or resumes) the study into these stores (passwords masked)."""
    return (f"python -m harness ablate {shlex.quote(str(study.path))} "
            f"--tracking-uri {shlex.quote(redact(tracking_uri))} --storage {shlex.quote(redact(storage))}")


def _curves(tracking_uri: str, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs.itertuples():
        history = read_epoch_metrics(tracking_uri, run.run_id, CURVE_METRICS)
        rows += [{"run_id": run.run_id, "variant": run.variant, "phase": run.phase, "trial": run.trial,
                  "seed": run.seed, "state": run.state, "epoch": epoch,
                  **{k: history[k].get(epoch, float("nan")) for k in CURVE_METRICS}}
                 for epoch in sorted(set().union(*history.values()))]
    curves = pd.DataFrame(rows, columns=list(CURVE_COLUMNS))
    curves["averaging"] = curves.averaging.map(lambda v: None if pd.isna(v) else bool(v))  # logged as 0/1
    return curves


def _optuna_side(study: StudyConfig, storage: str, rerun: str) -> tuple[pd.DataFrame, dict, dict]:
    path = sqlite_path(storage, "--storage")
    if path is not None and not path.exists():
        raise UserError(f"no Optuna storage at {path}: pass the --storage the study ran with, or run it first: {rerun}")
    optuna_storage = open_storage(storage)
    if not holds_study(optuna_storage, study):
        raise UserError(f"{redact(storage)} holds no Optuna study of {study.name!r}: pass the --storage the study ran "
                        f"with, or run it first: {rerun}")
    ledger = LedgerReader(study, optuna_storage, study.identity())
    rows, tallies, importances = [], {}, {}
    for variant in study.variants:
        for phase in PHASES:
            if ledger.has(variant, phase):
                tallies.setdefault(variant, {})[phase] = ledger.tally(variant, phase)
        if ledger.has(variant, SEARCH):
            importances[variant] = ledger.importances(variant, MIN_IMPORTANCE_TRIALS)
            rows += [{"variant": t.variant, "number": t.number, "state": t.state, "value": t.value,
                      "best_seen": t.best_seen, "params": t.params} for t in ledger.search_trials(variant)]
    return pd.DataFrame(rows, columns=list(TRIAL_COLUMNS)), tallies, importances


def read_logs(study: StudyConfig, tracking_uri: str, storage: str) -> StudyLog:
    """Gather the study's MLflow runs and Optuna trials; UserError when the study never ran into these stores."""
    rerun = ablate_command(study, tracking_uri, storage)
    path = sqlite_path(tracking_uri, "--tracking-uri")
    if path is not None and not path.exists():  # MLflow would create an empty store there
        raise UserError(f"no MLflow tracking store at {path}: run the study first: {rerun}")
    experiment_id = find_experiment(tracking_uri, study)
    if experiment_id is None:
        raise UserError(f"{redact(tracking_uri)} has no MLflow experiment {study.name!r}: run the study first: "
                        f"{rerun}")
    trials, tallies, importances = _optuna_side(study, storage, rerun)
    runs = pd.DataFrame(read_child_runs(tracking_uri, experiment_id), columns=list(RUN_COLUMNS))
    runs[list(RESULT_METRICS)] = runs[list(RESULT_METRICS)].astype(float)  # None (not logged) -> NaN
    return StudyLog(study, tracking_uri, storage, runs, _curves(tracking_uri, runs), trials, tallies, importances)
