"""Each arm's search judged in the report (issue #21, part 1): a best value at a range's edge, a search still
improving and a searched parameter that changes nothing each show in the headline's search column and qualify every
verdict of the conclusions that touches the arm, with the fix; a clean search shows none of it."""

import html
import re

import pytest

from harness import results
from harness.report.page import render_html
from helpers import logged_run, study_log, tiny_study

pytestmark = pytest.mark.fast

W, I = "dropout.weight", "dropout.input"


def report_of(tmp_path, weight_trials, val_sd=10.0, locked_test=(106.0, 107.0, 108.0)):
    """Page and results of the tiny study: weight_only searched with these (weight, val ppl) trials and confirmed on
    three seeds (test ppl 101, 103, 103) whose validation perplexity has sd `val_sd` (the noise a search is judged
    against); locked_only's search is clean, its seeds' test perplexity `locked_test` (by default clearly worse)."""
    study = tiny_study(tmp_path, "ptb", trials=len(weight_trials), seeds="[1, 2, 3]")
    trials = [("weight_only", {W: w, I: 0.3}, value, None) for w, value in weight_trials]
    trials += [("locked_only", {I: i}, v, None) for i, v in ((0.25, 505.0), (0.3, 505.5), (0.35, 506.0))][
        :len(weight_trials)]
    best = min(v for _, v in weight_trials)
    runs = [logged_run("weight_only", seed=s, test_ppl=100.0 + s + (s == 2), best_val_ppl=best + val_sd * (s - 2))
            for s in (1, 2, 3)]
    runs += [logged_run("locked_only", seed=s, test_ppl=p, best_val_ppl=505.0 + s) for s, p in zip((1, 2, 3),
                                                                                                 locked_test)]
    found = results.from_log(study_log(study, runs, trials))
    return html.unescape(render_html(found)), found


def search_cell(page: str, arm: str) -> str:
    row = re.search(rf'<tr data-variant="{arm}".*?</tr>', page, re.S).group(0)
    return re.sub(r"<[^>]+>", " ", re.search(r'data-col="search"[^>]*>(.*?)</td>', row, re.S).group(1)).strip()


def verdicts_about(found, arm: str) -> list:
    return [s for s in found.conclusions if f" {arm} " in f" {s} " and ("beats" in s or s.startswith("Not supported"))]


def test_a_best_value_at_its_ranges_edge_is_flagged_with_the_range_to_widen(tmp_path):
    page, found = report_of(tmp_path, [(0.494, 500.0), (0.3, 501.0), (0.2, 501.5)])
    text = "best weight 0.494 sits at the top of its range [0.1, 0.5]"
    assert search_cell(page, "weight_only") == f"⚠ {text} (fix: widen search.weight above 0.5)"
    assert search_cell(page, "locked_only") == "ok"
    (verdict,) = verdicts_about(found, "weight_only")  # supported, and qualified all the same
    assert verdict.startswith("weight_only beats locked_only by 4.67 ppl (95% CI 3.23..6.10")
    assert verdict.endswith(f"), but search-limited: weight_only's {text}.")
    (fixes,) = [s for s in found.conclusions if s.startswith("Search-limited")]
    assert f"weight_only's {text} [widen search.weight above 0.5]" in fixes and "locked_only" not in fixes
    assert list(found.search_flags.kind) == ["edge"] and found.comparisons.search_limited[0] == f"weight_only's {text}"
    assert found.headline.set_index("variant").loc["weight_only", "search_fixes"] == "widen search.weight above 0.5"


def test_a_verdict_not_supported_says_it_is_search_limited_too(tmp_path):
    _, found = report_of(tmp_path, [(0.494, 500.0), (0.3, 501.0), (0.2, 501.5)], locked_test=(101.5, 102.0, 104.5))
    (verdict,) = verdicts_about(found, "weight_only")
    assert verdict.startswith("Not supported, and search-limited: weight_only ahead of locked_only by 0.33 ppl")
    assert verdict.endswith("if the observed difference is real; weight_only's best weight 0.494 sits at the top of "
                            "its range [0.1, 0.5].")


def test_a_search_still_improving_is_flagged_with_the_trials_to_add(tmp_path):
    page, found = report_of(tmp_path, [(0.3, 600.0), (0.25, 560.0), (0.35, 500.0)], val_sd=1.0)
    assert search_cell(page, "weight_only").startswith("⚠ its expected best was still falling at trial 3 (by ")
    assert "(fix: add search trials (budget.trials = 6))" in search_cell(page, "weight_only")
    (verdict,) = verdicts_about(found, "weight_only")
    assert "search-limited" in verdict and "weight_only's expected best was still falling at trial 3" in verdict
    assert any("[add search trials (budget.trials = 6)]" in s for s in found.conclusions)
    assert list(found.search_flags.kind) == ["still_falling"]


def test_a_searched_parameter_that_changes_nothing_is_flagged_as_inert(tmp_path):
    page, found = report_of(tmp_path, [(0.3, 500.0), (0.2, 500.0), (0.4, 500.0)])
    cell = search_cell(page, "weight_only")
    assert cell.startswith("⚠ weight took 3 values and every finished trial gave the same validation perplexity")
    assert "fix: remove search.weight for this model" in cell
    (verdict,) = verdicts_about(found, "weight_only")
    assert "search-limited" in verdict and "weight_only's weight took 3 values" in verdict
    assert list(found.search_flags.kind) == ["inert"] and list(found.search_flags.param) == [W]


def test_a_clean_search_is_not_flagged(tmp_path):
    page, found = report_of(tmp_path, [(0.3, 500.0), (0.25, 500.5), (0.2, 501.0)])
    assert search_cell(page, "weight_only") == search_cell(page, "locked_only") == "ok"
    assert "search-limited" not in " ".join(found.conclusions).lower()
    assert found.search_flags.empty and (found.comparisons.search_limited == "").all()
    assert (found.headline.search_flags == "").all()
