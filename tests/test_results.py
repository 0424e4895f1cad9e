"""The results API (harness.results): every frame has its documented columns and dtypes, is the report's own numbers,
and recomputes independently from MLflow's raw metrics (pandas and scipy alone); the README's example runs; errors are
one line.

Run: .venv/bin/python -m pytest -q tests/test_results.py
"""

import re

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy import stats as scipy_stats

from harness import results
from harness.errors import UserError
from harness.report.summary import conclusions, summarize
from helpers import REPO, logged_run, study_log, tiny_study

pytestmark = pytest.mark.fast

W, I = "dropout.weight", "dropout.input"


def assert_documented(frame: pd.DataFrame, columns: dict, extra=()):
    """The frame has exactly the documented columns (plus `extra`, in place), each with its documented dtype."""
    assert [c for c in frame.columns if c not in extra] == list(columns)
    for name, dtype in columns.items():
        assert str(frame[name].dtype) == dtype, name


def tiny_results(tmp_path, edits=(), runs=None, trials=None):
    study = tiny_study(tmp_path, "ptb", trials=3, seeds="[1, 2, 3]", edits=edits)
    runs = runs if runs is not None else [
        *(logged_run("weight_only", seed=s, test_ppl=100 + s * s, best_val_ppl=110 + s, params={W: 0.3, I: 0.2})
          for s in (1, 2, 3)),
        *(logged_run("locked_only", seed=s, test_ppl=104 + s, best_val_ppl=112 + s, params={I: 0.25})
          for s in (1, 2, 3)),
    ]
    trials = trials if trials is not None else [
        ("weight_only", {W: 0.3, I: 0.2}, 111.0, None), ("weight_only", {W: 0.45, I: 0.1}, None, 130.0),
        ("weight_only", {W: 0.2, I: 0.4}, 112.0, None), ("locked_only", {I: 0.25}, 113.0, None),
        ("locked_only", {I: 0.35}, 113.5, None), ("locked_only", {I: 0.15}, 113.2, None),
    ]
    log = study_log(study, runs, trials)
    return log, results.from_log(log)


def test_every_frame_has_its_documented_columns_and_dtypes(tmp_path):
    log, found = tiny_results(tmp_path)
    assert_documented(found.runs, results.RUNS, extra=(W, I))
    assert_documented(found.curves, results.CURVES)
    assert_documented(found.trials, results.TRIALS)
    assert_documented(found.headline, results.HEADLINE, extra=(f"best.{I}", f"best.{W}"))
    assert_documented(found.comparisons, results.COMPARISONS)
    assert_documented(found.search_flags, results.FLAGS)
    assert_documented(found.answer_key, results.ANSWER_KEY)  # empty without [expect], typed all the same
    assert_documented(found.answer_signs, results.ANSWER_SIGNS)
    assert found.answer_verdict is None and found.reference == "weight_only"  # no awd: the best arm


def test_the_frames_are_the_reports_numbers(tmp_path):
    log, found = tiny_results(tmp_path)
    result = summarize(log)
    assert found.conclusions == conclusions(result) and found.missing == result.missing
    runs = found.runs.set_index("run_id")
    assert runs.loc["weight_only-confirm-0-2", "test_ppl"] == 104.0
    assert runs.loc["weight_only-confirm-0-2", W] == 0.3 and pd.isna(runs.loc["locked_only-confirm-0-2", W])
    assert runs.loc["weight_only-confirm-0-2", "device_hours"] == pytest.approx(0.01)
    pruned = runs.loc["weight_only-search-1-141"]
    assert pruned.state == "pruned" and pd.isna(pruned.best_val_ppl) and pd.isna(pruned.test_ppl)
    assert (found.runs.arm == found.runs.variant).all()  # no [axes]: each arm is its variant
    headline = found.headline.set_index("variant")
    assert headline.loc["weight_only", "test_ppl_mean"] == pytest.approx(np.mean([101, 104, 109]))
    assert headline.loc["weight_only", f"best.{W}"] == 0.3 and headline.loc["locked_only", f"best.{I}"] == 0.25
    assert headline.loc["weight_only", "trials_pruned"] == 1
    (comparison,) = found.comparisons.itertuples()
    assert (comparison.variant, comparison.baseline) == ("locked_only", "weight_only")
    d = np.array([105, 106, 107]) - np.array([101, 104, 109])
    assert comparison.diff == pytest.approx(d.mean())
    assert comparison.p == pytest.approx(scipy_stats.ttest_rel([105, 106, 107], [101, 104, 109]).pvalue)
    trials = found.trials[found.trials.arm == "weight_only"]
    assert list(trials.state) == ["finished", "pruned", "finished"] and trials.value.isna().tolist() == [0, 1, 0]
    assert trials.best_seen.tolist() == [111.0, 130.0, 112.0] and trials.params.iloc[1] == {W: 0.45, I: 0.1}
    curves = found.curves[found.curves.run_id == "weight_only-confirm-0-1"]
    assert list(curves.epoch) == [1, 2, 3, 4] and list(curves.averaging) == [False, False, True, True]


def test_arms_of_a_study_with_axes_carry_their_variant_and_axis_values(tmp_path):
    edits = [("[search]", '[axes]\n"train.train_tokens" = [3000, 6000]\n[search]')]
    study = tiny_study(tmp_path, "ptb", trials=3, seeds="[1, 2]", edits=edits)
    arms = list(study.variants)
    runs = [logged_run(arm, seed=s, test_ppl=100.0 + i + s, params={I: 0.2}) for i, arm in enumerate(arms)
            for s in (1, 2)]
    found = results.from_log(study_log(study, runs, []))
    assert "axis.train.train_tokens" in found.runs.columns
    row = found.runs[found.runs.arm == "weight_only@train_tokens=6000"].iloc[0]
    assert row.variant == "weight_only" and row["axis.train.train_tokens"] == 6000


def test_a_study_still_running_gives_what_finished_and_says_what_is_missing(tmp_path):
    runs = [logged_run("weight_only", seed=1, test_ppl=100.0)]
    _, found = tiny_results(tmp_path, runs=runs, trials=[("weight_only", {W: 0.3, I: 0.2}, 111.0, None)])
    assert "weight_only: 1 of 3 search trials settled." in found.missing
    assert "locked_only: no search has started." in found.missing
    assert found.headline.set_index("variant").loc["locked_only", "confirm_seeds"] == 0
    assert found.comparisons.p.isna().all()


def test_load_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such study file"):
        results.load(tmp_path / "nope.toml")
    study = tiny_study(tmp_path, "ptb")
    with pytest.raises(UserError, match=r"no MLflow tracking store at .*none\.db: run the study first") as err:
        results.load(study.path, storage=f"sqlite:///{tmp_path / 'o.db'}", tracking_uri=f"sqlite:///{tmp_path}/none.db")
    assert "\n" not in str(err.value) and not (tmp_path / "none.db").exists()


# --- on a real study ---------------------------------------------------------------------------------------------
def readme_example() -> str:
    """The README's notebook example: the python block under 'Results in Python'."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Results in Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs(smoke_run, monkeypatch, capsys):
    code = readme_example().replace("studies/ablation.toml", str(smoke_run.study))
    code = code.replace('"sqlite:///optuna.db"', repr(smoke_run.storage))
    code = code.replace('"sqlite:///mlflow.db"', repr(smoke_run.tracking_uri))
    assert code != readme_example()
    exec(compile(code, "README.md", "exec"), {})
    assert "Ordered by mean test perplexity" in capsys.readouterr().out


@pytest.mark.slow
def test_the_frames_recompute_from_mlflows_raw_metrics(smoke_run):
    """runs, curves and comparisons from MLflow's raw runs and metric histories, with pandas and scipy alone."""
    found = results.load(smoke_run.study, storage=smoke_run.storage, tracking_uri=smoke_run.tracking_uri)
    client = MlflowClient(smoke_run.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    raw = client.search_runs([experiment.experiment_id], "tags.kind = 'run'", max_results=1000)
    runs = found.runs.set_index("run_id")
    assert set(runs.index) == {r.info.run_id for r in raw}
    for r in raw:
        row, metrics = runs.loc[r.info.run_id], r.data.metrics
        assert (row.arm, row.phase, row.state) == (r.data.tags["variant"], r.data.tags["phase"], r.data.tags["state"])
        assert row.seed == int(r.data.tags["seed"]) and row.params == r.data.params
        for key in ("best_val_ppl", "test_ppl", "seconds"):
            assert (pd.isna(row[key]) and key not in metrics) or row[key] == metrics[key], key
        curve = found.curves[found.curves.run_id == r.info.run_id].set_index("epoch")
        for key in ("train_loss", "train_ppl", "val_loss", "val_ppl"):
            history = {m.step: m.value for m in client.get_metric_history(r.info.run_id, key)}
            assert curve[key].to_dict() == history, key
    confirmed = [r for r in raw if r.data.tags["phase"] == "confirm" and r.data.tags["state"] == "finished"]
    tests = pd.DataFrame([{"arm": r.data.tags["variant"], "seed": int(r.data.tags["seed"]),
                           "test_ppl": r.data.metrics["test_ppl"]} for r in confirmed]).pivot(
        index="seed", columns="arm", values="test_ppl")
    p = []
    for c in found.comparisons.itertuples():
        d = tests[c.variant] - tests[c.baseline]
        half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert (c.diff, c.diff_ci_low, c.diff_ci_high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half),
                                                                        rel=1e-12)
        assert c.p == pytest.approx(scipy_stats.ttest_rel(tests[c.variant], tests[c.baseline]).pvalue, rel=1e-9)
        p.append(c.p)
    holm = np.minimum(1, np.maximum.accumulate(np.sort(p) * np.arange(len(p), 0, -1)))[np.argsort(np.argsort(p))]
    assert list(found.comparisons.p_holm) == pytest.approx(list(holm), rel=1e-9)
    assert list(found.comparisons.supported) == [h < 0.05 for h in holm]
    headline = found.headline.set_index("variant")
    for arm, values in tests.items():
        assert headline.loc[arm, "test_ppl_mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert headline.loc[arm, "test_ppl_sd"] == pytest.approx(values.std(ddof=1), rel=1e-12)
