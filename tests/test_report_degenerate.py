"""Degenerate analysis (issue #20, item 7): every analysis step on input it cannot use (one trial, equal values, one
seed, one arm, everything pruned or failed) leaves the report written and says in words what could not be computed;
a figure that cannot be drawn costs only itself."""

import html

import optuna
import pytest
from optuna.distributions import FloatDistribution

from harness import results
from harness.report import plots
from harness.report.page import render_html
from harness.study.ledger.reader import LedgerReader
from harness.study.ledger.storage import open_storage
from helpers import logged_run, study_log, tiny_study

pytestmark = pytest.mark.fast

W, I = "dropout.weight", "dropout.input"
PLOTS = ("plot_test_ppl", "plot_isolation", "plot_curves", "plot_sensitivity", "plot_expected_best")


def page_of(study, runs, trials) -> tuple[str, results.StudyResults]:
    found = results.from_log(study_log(study, runs, trials))
    page = html.unescape(render_html(found))
    assert "could not be drawn" not in page  # each member is handled by what it is, not by the last resort
    return page, found


def confirmed(arm, values, **kw):
    return [logged_run(arm, seed=s, test_ppl=v, best_val_ppl=v + 10, **kw) for s, v in enumerate(values, 1)]


def test_one_search_trial_per_arm(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=1, seeds="[1, 2, 3]")
    trials = [("weight_only", {W: 0.3, I: 0.3}, 500.0, None), ("locked_only", {I: 0.3}, 510.0, None)]
    page, found = page_of(study, confirmed("weight_only", (100, 102, 101)) + confirmed("locked_only", (104, 107, 105)),
                          trials)
    assert page.count('<img src="data:image/png;base64,') >= 10  # every figure drawn, one point a curve
    assert found.search_flags.empty  # one trial: nothing to judge a search by
    assert found.comparisons.supported.notna().all()


def test_equal_values_on_every_seed(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=1, seeds="[1, 2, 3]")
    runs = confirmed("weight_only", (100, 100, 100)) + confirmed("locked_only", (100, 100, 100))
    page, found = page_of(study, runs, [("weight_only", {W: 0.3, I: 0.3}, 500.0, None),
                                        ("locked_only", {I: 0.3}, 500.0, None)])
    said = "no test: the paired differences are the same on every seed, so there is no seed-to-seed variance"
    assert said in page and any(said in s for s in found.conclusions)
    assert "no seed-to-seed spread observed" in page  # the seeds a decision would take: unknown, and why
    assert found.comparisons.p.isna().all() and found.headline.test_ppl_sd.tolist() == [0.0, 0.0]


def test_one_seed(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=1, seeds="[1]")
    page, found = page_of(study, confirmed("weight_only", (100,)) + confirmed("locked_only", (104,)), [])
    assert "1 vs 1 seeds: an interval or a test needs at least 2 on each side" in page
    assert found.headline.test_ppl_sd.isna().all() and found.headline.test_ppl_ci_low.isna().all()


def test_one_arm(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=2, seeds="[1, 2]", edits=[("[variants.locked_only]\n", "")])
    trials = [("weight_only", {W: 0.3, I: 0.3}, 500.0, None), ("weight_only", {W: 0.2, I: 0.3}, 501.0, None)]
    page, found = page_of(study, confirmed("weight_only", (100, 101)), trials)
    assert "The study has one arm, weight_only, so there is nothing to compare it with." in found.conclusions
    assert found.comparisons.empty and "Complete: every variant" in page


def test_everything_pruned(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=2, seeds="[1, 2]")
    searched = (("weight_only", {W: 0.3, I: 0.3}), ("weight_only", {W: 0.2, I: 0.2}), ("locked_only", {I: 0.3}),
                ("locked_only", {I: 0.2}))
    trials = [(arm, params, None, 600.0) for arm, params in searched]
    page, found = page_of(study, [], trials)
    assert "weight_only: no search trial finished, so nothing could be confirmed." in page
    assert "No confirmation run has finished yet." in page and "No search trial has finished yet." in page
    assert found.conclusions[0] == "No confirmation run has finished yet, so there is nothing to conclude."


def test_everything_failed(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=1, seeds="[1]")
    runs = [logged_run(arm, phase="search", seed=141, state="failed", best_val_ppl=None,
                       fail_reason="Traceback ...\nRuntimeError: CUDA error") for arm in ("weight_only", "locked_only")]
    page, found = page_of(study, runs, [])
    assert "Failed and interrupted runs" in page and "RuntimeError: CUDA error" in page
    assert "No search trial has been logged yet." in page
    assert found.headline.search_best_val_ppl.isna().all()


@pytest.mark.parametrize("plot", PLOTS)
def test_a_figure_that_cannot_be_drawn_is_said_in_words_and_the_rest_is_written(tmp_path, monkeypatch, plot):
    def broken(*args):
        raise ValueError("Axis limits cannot be NaN or Inf")

    monkeypatch.setattr(plots, plot, broken)
    study = tiny_study(tmp_path, "ptb", trials=1, seeds="[1, 2]")
    runs = confirmed("weight_only", (100, 101)) + confirmed("locked_only", (103, 105))
    found = results.from_log(study_log(study, runs, [("weight_only", {W: 0.3, I: 0.3}, 500.0, None)]))
    page = html.unescape(render_html(found))
    assert page.count("This figure could not be drawn from these results (ValueError: Axis limits cannot be NaN or "
                      "Inf).") == 1
    assert page.count('<img src="data:image/png;base64,') >= 9 and "Reproducibility" in page


def searched_storage(tmp_path, study, values):
    """An Optuna storage holding the study's weight_only search: one finished trial per value, distinct params."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = optuna.create_study(study_name=f"{study.name}/weight_only/search", storage=storage)
    for key, value in study.identity().as_attrs().items():  # what the harness records on every study it makes
        search.set_user_attr(key, value)
    for i, value in enumerate(values):
        search.add_trial(optuna.trial.create_trial(
            params={W: 0.1 + 0.05 * i, I: 0.4 - 0.03 * i}, value=value,
            distributions={W: FloatDistribution(0.1, 0.5), I: FloatDistribution(0.1, 0.5)}))
    return LedgerReader(study, open_storage(storage), study.identity())


def test_importances_over_equal_values_say_why_there_are_none(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=6)
    reader = searched_storage(tmp_path, study, [500.0] * 6)
    assert reader.importances("weight_only", 5) == ("every finished search trial gave the same validation perplexity "
                                                    "(500.00), so there is no variance for a parameter to explain.")


def test_importances_optuna_cannot_compute_say_so(tmp_path, monkeypatch):
    study = tiny_study(tmp_path, "ptb", trials=6)
    reader = searched_storage(tmp_path, study, [500.0 + i for i in range(6)])
    assert set(reader.importances("weight_only", 5)) == {W, I}  # distinct values: computed

    def refuse(*args, **kwargs):
        raise RuntimeError("Encountered zero total variance in all trees.")

    monkeypatch.setattr(optuna.importance, "get_param_importances", refuse)
    assert reader.importances("weight_only", 5) == ("Optuna could not compute them from these trials (Encountered zero "
                                                    "total variance in all trees.).")
