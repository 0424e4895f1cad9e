"""The answer key in the report and the results API (issue #21, part 3): published against measured per arm, with
the difference, the measured interval and whether the published value agrees, recomputed here with numpy and scipy
alone; the signs of the published differences; a key whose ordering is violated says so on the page and in the
conclusions."""

import html
import re

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import results
from harness.report.page import render_html
from helpers import logged_run, study_log, tiny_study

pytestmark = pytest.mark.fast

TEST_PPL = {"weight_only": (101.0, 103.0, 104.0), "locked_only": (106.0, 107.0, 109.0)}
VAL_PPL = {"weight_only": (111.0, 112.0, 114.0), "locked_only": (115.0, 117.0, 118.0)}


def keyed(tmp_path, expect: str):
    study = tiny_study(tmp_path, "ptb", trials=1, seeds="[1, 2, 3]",
                       edits=[("max_retries = 1\n", "max_retries = 1\n[expect]\n" + expect)])
    runs = [logged_run(arm, seed=s, test_ppl=TEST_PPL[arm][i], best_val_ppl=VAL_PPL[arm][i])
            for arm in TEST_PPL for i, s in enumerate((1, 2, 3))]
    found = results.from_log(study_log(study, runs, []))
    return found, html.unescape(render_html(found))


def t_interval(values) -> tuple:
    values = np.asarray(values)
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def test_published_against_measured_recomputed_independently(tmp_path):
    found, page = keyed(tmp_path, 'source = "A paper, Table 1"\ntest_ppl = { weight_only = 103.5, locked_only = 100.0 }'
                                  '\nval_ppl = { weight_only = 130.0 }\ntolerance = 0.01\n')
    key = found.answer_key.set_index(["arm", "metric"])
    for arm, metric, published, values in (("weight_only", "test_ppl", 103.5, TEST_PPL["weight_only"]),
                                           ("locked_only", "test_ppl", 100.0, TEST_PPL["locked_only"]),
                                           ("weight_only", "val_ppl", 130.0, VAL_PPL["weight_only"])):
        row, (low, high) = key.loc[(arm, metric)], t_interval(values)
        mean = np.mean(values)
        assert (row.measured, row.ci_low, row.ci_high) == pytest.approx((mean, low, high), rel=1e-12)
        assert row["diff"] == pytest.approx(mean - published) and row.seeds == 3  # row.diff: the Series method
        assert row.agrees == (low <= published <= high or abs(mean / published - 1) <= 0.01)
        shown = re.search(rf'<tr data-arm="{arm}"><td>{arm}</td><td>{"test" if metric == "test_ppl" else "validation"}'
                          r'</td>.*?</tr>', page, re.S).group(0)
        assert f'data-col="published">{published:g}<' in shown and f'data-col="diff">{mean - published:+.2f}<' in shown
        assert f"[{low:.2f}, {high:.2f}]" in shown
        assert f'data-col="agrees">{"yes" if row.agrees else "no"}<' in shown
    assert list(key.agrees) == [True, False, False]  # 103.5 inside weight_only's interval; the others far off
    (sign,) = found.answer_signs.itertuples()
    assert (sign.first, sign.second, sign.published_diff) == ("weight_only", "locked_only", 3.5)
    assert sign.measured_diff == pytest.approx(np.mean(TEST_PPL["weight_only"]) - np.mean(TEST_PPL["locked_only"]))
    assert not sign.holds  # published: locked_only lower; measured: weight_only lower
    verdict = found.answer_verdict
    assert verdict.startswith("Not reproduced: 1 of 3 published values agree with the measured ones")
    assert f"Answer key (A paper, Table 1): {verdict}" in found.conclusions
    assert f'<p id="answer-verdict"><b>{verdict}</b></p>' in page


def test_a_key_whose_ordering_is_violated_says_so(tmp_path):
    found, page = keyed(tmp_path, 'source = "A paper"\ntest_ppl = { weight_only = 80.0, locked_only = 70.0 }\n'
                                  'ordering_only = ["weight_only", "locked_only"]\n')
    assert found.answer_key.agrees.isna().all() and not found.answer_key.values_compared.any()
    assert ("the published ordering is violated: published weight_only > locked_only (test), measured the other way "
            "by 4.67") in found.answer_verdict
    assert "ordering only" in page and "the published ordering is violated" in page
    assert any(s.startswith("Answer key (A paper): Not reproduced") for s in found.conclusions)


def test_a_key_that_holds_says_reproduced(tmp_path):
    found, _ = keyed(tmp_path, 'source = "A paper"\ntest_ppl = { weight_only = 102.5, locked_only = 107.5 }\n')
    assert found.answer_verdict == ("Reproduced: 2 of 2 published values agree with the measured ones (within the "
                                    "measured 95% interval); the published ordering holds.")
    assert found.answer_key.agrees.all() and found.answer_signs.holds.all()


def test_without_expect_there_is_no_answer_key(tmp_path):
    study = tiny_study(tmp_path, "ptb", trials=1, seeds="[1, 2]")
    found = results.from_log(study_log(study, [logged_run("weight_only", test_ppl=100.0)], []))
    assert found.answer_key.empty and found.answer_verdict is None
    assert "Answer key" not in render_html(found) and not any("Answer key" in s for s in found.conclusions)
