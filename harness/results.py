"""A study's results as pandas frames, the one path the report is built from and the API for notebooks:

    from harness import results
    study = results.load("studies/ablation.toml", storage="sqlite:///optuna.db", tracking_uri="sqlite:///mlflow.db")
    study.runs, study.curves, study.trials, study.headline, study.comparisons, study.conclusions, study.answer_key

Reading starts nothing (no process, no server); a study still running gives what has finished and says what is missing.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness import stats
from harness.report.answer_keys import KeyResult
from harness.report.logs import StudyLog, read_logs
from harness.report.summary import (
    SEARCHABLE, StudyResult, conclusions, search_limited, searchable_params, summarize,
)
from harness.study.spec import StudyConfig, load_study
from harness.study.stores import DEFAULT_STORAGE, DEFAULT_TRACKING_URI

# Each frame's columns and dtypes, in order ("string", "Int64" and "boolean" are pandas' nullable dtypes: <NA>
# where nothing was measured). `runs` adds one `axis.KEY` column per [axes] key and one float column per searched
# parameter ("dropout.weight", "train.lr"); `headline` one `axis.KEY` column per [axes] key (after `reference`; <NA>
# for an arm that axis cannot act on) and one `best.PARAM` column per searched parameter.
RUNS = {
    "run_id": "string", "name": "string", "arm": "string",  # arm: variant@axis=value,... (the variant without axes)
    "variant": "string", "phase": "string", "trial": "Int64", "seed": "Int64", "attempt": "Int64",
    "state": "string",  # finished, pruned, failed, interrupted, running (harness.study.rules.RunState)
    "fail_reason": "string", "params": "object",  # params: every logged setting, key -> text, as MLflow holds it
    "best_val_ppl": "float64", "best_epoch": "Int64", "epochs": "Int64", "test_ppl": "float64",
    "test_loss": "float64", "averaged_from_epoch": "Int64", "seconds": "float64", "device_hours": "float64",
    "device": "string", "device_name": "string", "git_commit": "string", "corpus_md5": "string",
    "end_time": "datetime64[ns, UTC]",
}
CURVES = {
    "run_id": "string", "arm": "string", "phase": "string", "trial": "Int64", "seed": "Int64", "state": "string",
    "epoch": "int64", "train_loss": "float64", "train_ppl": "float64", "val_loss": "float64", "val_ppl": "float64",
    "averaging": "boolean",  # validated with NT-ASGD's averaged weights
}
COMPARISON = {  # one comparison's columns; `headline` holds them against the reference, suffixed `_to_reference`
    "diff": "float64", "diff_ci_low": "float64", "diff_ci_high": "float64", "diff_ci_method": "string",
    "test": "string", "p": "float64", "p_holm": "float64", "supported": "boolean", "seeds_needed": "Int64",
    "note": "string",
}
COMPARISONS = {"variant": "string", "baseline": "string", "n_variant": "int64", "n_baseline": "int64",
               "paired": "bool", **COMPARISON, "search_limited": "string"}  # search_limited: flags of either arm
HEADLINE = {
    "variant": "string", "description": "string", "reference": "bool", "search_best_val_ppl": "float64",
    "confirm_seeds": "int64", "seeds": "string", "test_ppl_mean": "float64", "test_ppl_sd": "float64",
    "test_ppl_ci_low": "float64", "test_ppl_ci_high": "float64", "test_ppl_ci_method": "string",
    "best_epoch_median": "float64", "best_epoch_max": "Int64", "epochs": "Int64", "converged": "boolean",
    **{f"{k}_to_reference": v for k, v in COMPARISON.items()},
    "reference_arm": "string",  # what the *_to_reference columns compare with (with axes: the reference at its level)
    "search_flags": "string", "search_fixes": "string",  # harness.study.adequacy's flags, "; "-joined ("" if none)
    # trials_*: the search's tally; <NA> while the arm has no Optuna search study
    "trials_run": "Int64", "trials_finished": "Int64", "trials_pruned": "Int64", "trials_failed": "Int64",
    "trials_retried": "Int64", "trials_interrupted": "Int64", "device_hours": "float64",
}
TRIALS = {"arm": "string", "number": "int64", "state": "string", "value": "float64", "best_seen": "float64",
          "params": "object"}  # value: NaN when pruned; best_seen: a pruned trial's lowest reported val ppl
FLAGS = {"arm": "string", "kind": "string", "param": "string", "text": "string", "fix": "string"}
ANSWER_KEY = {"arm": "string", "metric": "string", "published": "float64", "measured": "float64", "diff": "float64",
              "ci_low": "float64", "ci_high": "float64", "seeds": "int64", "values_compared": "bool",
              "agrees": "boolean"}  # agrees: <NA> for an ordering-only arm or one not measured yet
ANSWER_SIGNS = {"metric": "string", "first": "string", "second": "string", "published_diff": "float64",
                "measured_diff": "float64", "holds": "boolean"}


def typed(rows: list, columns: dict) -> pd.DataFrame:
    """A frame of these rows with exactly these columns and dtypes (None -> <NA> or NaN)."""
    frame = pd.DataFrame(rows, columns=list(columns))
    for name, dtype in columns.items():
        if dtype in ("float64", "Int64"):  # None in an object column: through float, so <NA> survives astype
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame.astype(columns)


@dataclass(frozen=True)
class StudyResults:
    """One study's results; every frame is documented by its column dict above (RUNS, CURVES, HEADLINE, ...)."""

    study: StudyConfig
    summary: StudyResult  # the report's records (rows, comparisons, answer key) the frames are built from
    runs: pd.DataFrame  # RUNS: one row per MLflow run (search trial attempt or confirmation seed)
    curves: pd.DataFrame  # CURVES: one row per run and epoch
    trials: pd.DataFrame  # TRIALS: one row per finished or pruned Optuna search trial
    headline: pd.DataFrame  # HEADLINE: the report's table (results.csv), one row per arm, best first (by level)
    comparisons: pd.DataFrame  # COMPARISONS: every contrast of the report (comparisons.csv), one Holm family
    search_flags: pd.DataFrame  # FLAGS: why an arm's search may not have found its best, with the fix
    answer_key: pd.DataFrame  # ANSWER_KEY: published against measured per arm and metric (empty without [expect])
    answer_signs: pd.DataFrame  # ANSWER_SIGNS: each published difference between two keyed arms, and if it holds
    crossed: pd.DataFrame  # crossed.csv: each effect per axis level, each interaction contrast (empty without [axes])
    conclusions: list  # the report's sentences: the crossed section's (with axes), then the headline's
    missing: list  # what a complete study would have and this one lacks (empty when complete)

    @property
    def importances(self) -> dict:
        """arm -> {searched parameter: share of the variance of val ppl} (Optuna's fANOVA, seeded), or a sentence
        saying why there are none."""
        return dict(self.summary.log.importances)

    @property
    def reference(self) -> str:
        """The variant every other is compared with (awd, else the best; see summary.reference_note); with axes its
        arm at each level is that level's reference (headline.reference_arm)."""
        return self.summary.reference

    @property
    def answer_verdict(self) -> str | None:
        """The answer key's one-line verdict; None without [expect]."""
        return self.summary.answer_key.verdict if self.summary.answer_key else None


def load(study, storage: str = DEFAULT_STORAGE, tracking_uri: str = DEFAULT_TRACKING_URI) -> StudyResults:
    """The results of a study file (path or StudyConfig) from the stores it ran into; UserError (one line, with the
    fix) when a store is unusable or holds no such study."""
    from harness.study.ledger.storage import check_storage
    from harness.study.stores import check_tracking

    study = study if isinstance(study, StudyConfig) else load_study(Path(study))
    check_tracking(tracking_uri)
    check_storage(storage)
    return from_log(read_logs(study, tracking_uri, storage))


def from_log(log: StudyLog) -> StudyResults:
    """The results of what was read (a pure function: the report's numbers and every frame)."""
    from harness.report.crossed import cross_result, crossed_conclusions, crossed_frame  # draws: loaded when used

    result = summarize(log)
    crossed = cross_result(result)  # None without [axes]
    return StudyResults(log.study, result, runs_frame(log), curves_frame(log), trials_frame(log),
                        headline_frame(result), comparisons_frame(result), flags_frame(result),
                        *answer_frames(result.answer_key),
                        pd.DataFrame() if crossed is None else crossed_frame(crossed),
                        # With axes the reference note leads: the crossed section's effects are against it too.
                        ([result.reference_note] if crossed is not None and result.reference_note else [])
                        + crossed_conclusions(crossed) + conclusions(result), result.missing)


def runs_frame(log: StudyLog) -> pd.DataFrame:
    """RUNS, from the MLflow runs the report read."""
    study, runs = log.study, log.runs
    axes = [f"axis.{key}" for key in study.axes]
    searched = [p for p in SEARCHABLE if (p == "train.lr" and study.search.lr) or p.split(".")[1] in study.search.rates]
    rows = []
    for run in runs.itertuples():
        arm = study.variants.get(run.variant)
        rows.append({
            **{k: getattr(run, k) for k in RUNS if k in runs.columns and k != "end_time"},
            "arm": run.variant, "variant": arm.variant if arm else run.variant,
            "device_hours": run.seconds / 3600 if run.seconds is not None else None,
            "end_time": pd.Timestamp(run.end_time, unit="ms", tz="UTC") if run.end_time else pd.NaT,
            **{f"axis.{k}": v for k, v in (arm.axes if arm else ())},
            **{p: _number(run.params.get(p)) for p in searched},
        })
    frame = typed(rows, RUNS)
    for column in axes:
        frame[column] = [row.get(column) for row in rows]
    for param in searched:
        frame[param] = pd.Series([row[param] for row in rows], dtype="float64")
    return frame


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def curves_frame(log: StudyLog) -> pd.DataFrame:
    """CURVES, from the per-epoch metrics the report read."""
    return typed(log.curves.rename(columns={"variant": "arm"}).to_dict("records"), CURVES)


def trials_frame(log: StudyLog) -> pd.DataFrame:
    """TRIALS, from the Optuna search trials the report read."""
    return typed(log.trials.rename(columns={"variant": "arm"}).to_dict("records"), TRIALS)


def _comparison_columns(c: stats.Comparison | None, suffix: str = "") -> dict:
    return {
        f"diff{suffix}": c.diff if c else None, f"diff_ci_low{suffix}": c.ci.low if c and c.ci else None,
        f"diff_ci_high{suffix}": c.ci.high if c and c.ci else None,
        f"diff_ci_method{suffix}": c.ci.method if c and c.ci else None, f"test{suffix}": c.test if c else None,
        f"p{suffix}": c.p if c else None, f"p_holm{suffix}": c.p_holm if c else None,
        f"supported{suffix}": c.supported if c else None,
        f"seeds_needed{suffix}": c.seeds_needed.per_variant if c and c.seeds_needed else None,
        f"note{suffix}": c.note if c else None,
    }


def _to_reference(result: StudyResult, arm: str, compared: list) -> dict:
    """The headline's *_to_reference columns and reference_arm: the arm's one comparison with the reference, or none
    where it has one per axis level (an arm an axis cannot act on, against a reference that axis acts on)."""
    if len(compared) == 1:
        return {**_comparison_columns(compared[0], "_to_reference"), "reference_arm": compared[0].baseline}
    columns = {**_comparison_columns(None, "_to_reference"), "reference_arm": arm if result.is_reference(arm) else None}
    if compared:
        columns["note_to_reference"] = (f"one comparison per level, against {', '.join(c.baseline for c in compared)}: "
                                        "see the crossed section (crossed.csv)")
    return columns


def headline_frame(result: StudyResult) -> pd.DataFrame:
    """HEADLINE (results.csv): one row per arm, best first; with axes level by level, best first within each."""
    searched = searchable_params(result.rows)
    to_reference = result.against(result.reference)
    rows = []
    for r in result.rows:
        ci = r.ci
        rows.append({
            "variant": r.name, "description": r.description, "reference": result.is_reference(r.name),
            "search_best_val_ppl": r.search_best_val_ppl, "confirm_seeds": len(r.test_ppl),
            "seeds": ";".join(map(str, sorted(r.test_ppl))), "test_ppl_mean": r.mean, "test_ppl_sd": r.sd,
            "test_ppl_ci_low": ci.low if ci else None, "test_ppl_ci_high": ci.high if ci else None,
            "test_ppl_ci_method": ci.method if ci else None,
            "best_epoch_median": float(np.median(r.best_epochs)) if r.best_epochs else None,
            "best_epoch_max": max(r.best_epochs) if r.best_epochs else None, "epochs": r.epochs,
            "converged": r.converged, **_to_reference(result, r.name, to_reference.get(r.name, [])),
            "search_flags": "; ".join(f.text for f in r.flags), "search_fixes": "; ".join(f.fix for f in r.flags),
            "trials_run": r.trials_run if r.trials else None,
            **{f"trials_{k}": getattr(r.trials, k) if r.trials else None
               for k in ("finished", "pruned", "failed", "retried", "interrupted")},
            "device_hours": r.device_hours,
        })
    frame = typed(rows, HEADLINE)
    study = result.log.study
    for i, key in enumerate(study.axes):  # each arm's level, so a reader can group the rows by it
        levels = [dict(study.variants[r.name].axes).get(key) for r in result.rows]
        frame.insert(list(frame.columns).index("reference") + 1 + i, f"axis.{key}",
                     pd.Series(levels, dtype="object"))
    at = list(frame.columns).index("search_flags")
    for i, param in enumerate(searched):  # best.PARAM columns, before the flags
        frame.insert(at + i, f"best.{param}", pd.Series([r.best_params.get(param) for r in result.rows],
                                                        dtype="float64"))
    return frame


def comparisons_frame(result: StudyResult) -> pd.DataFrame:
    """COMPARISONS (comparisons.csv): every comparison the report makes, in the order of the Holm family."""
    return typed([{"variant": c.variant, "baseline": c.baseline, "n_variant": c.n_variant,
                   "n_baseline": c.n_baseline, "paired": c.paired, **_comparison_columns(c),
                   "search_limited": search_limited(result, c.variant, c.baseline)} for c in result.comparisons],
                 COMPARISONS)


def flags_frame(result: StudyResult) -> pd.DataFrame:
    """FLAGS: one row per search flag of each arm (harness.study.adequacy)."""
    return typed([{"arm": r.name, "kind": f.kind, "param": f.param, "text": f.text, "fix": f.fix}
                  for r in result.rows for f in r.flags], FLAGS)


def answer_frames(key: KeyResult | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ANSWER_KEY and ANSWER_SIGNS of the study's [expect] (both empty without one)."""
    rows = [] if key is None else [
        {"arm": r.arm, "metric": r.metric, "published": r.published, "measured": r.measured, "diff": r.diff,
         "ci_low": r.ci.low if r.ci else None, "ci_high": r.ci.high if r.ci else None, "seeds": r.seeds,
         "values_compared": r.values_compared, "agrees": r.agrees(key.expect.tolerance)} for r in key.rows]
    signs = [] if key is None else [
        {"metric": s.metric, "first": s.first, "second": s.second, "published_diff": s.published,
         "measured_diff": s.measured, "holds": s.holds} for s in key.signs]
    return typed(rows, ANSWER_KEY), typed(signs, ANSWER_SIGNS)
