"""Published results as answer keys: the [expect] table of a study file, the keys the harness ships, and the
corpus whose answer is known exactly."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import synthetic
from harness.data import load_corpus
from harness.errors import UserError
from harness.report.answer_keys import check_key
from harness.study.spec import load_study
from helpers import REPO

pytestmark = pytest.mark.fast

BASE = """
[study]
name = "keyed"
[fixed.model]
n_layers = 2
[variants.naive]
[variants.locked_only]
"""


def study_with(tmp_path, expect: str):
    path = tmp_path / "keyed.toml"
    path.write_text(BASE + "[expect]\n" + expect)
    return load_study(path)


def test_expect_holds_the_published_numbers_and_their_source(tmp_path):
    study = study_with(tmp_path, 'source = "Gal & Ghahramani 2016, Table 1"\ntest_ppl = { naive = 82.7, '
                                 'locked_only = 79.7 }\nval_ppl = { naive = 86.2 }\nordering_only = ["naive"]\n'
                                 'tolerance = 0.02\nnote = "no lr decay"\n')
    key = study.expect
    assert key.source == "Gal & Ghahramani 2016, Table 1" and key.note == "no lr decay"
    assert key.test_ppl == {"naive": 82.7, "locked_only": 79.7} and key.val_ppl == {"naive": 86.2}
    assert key.ordering_only == ("naive",) and key.tolerance == 0.02
    path = tmp_path / "plain.toml"
    path.write_text(BASE)
    assert load_study(path).expect is None


@pytest.mark.parametrize("expect, message", [
    ('test_ppl = { naive = 82.7 }\n', "expect.source is missing"),
    ('source = ""\ntest_ppl = { naive = 82.7 }\n', "expect.source is missing"),
    ('source = "x"\n', "[expect] gives no number"),
    ('source = "x"\ntest_ppl = { awd = 60 }\n', "expect.test_ppl.awd: no such arm"),
    ('source = "x"\ntest_ppl = { naive = 0.5 }\n', "should be a perplexity"),
    ('source = "x"\ntest_ppl = { naive = "82" }\n', "should be a perplexity"),
    ('source = "x"\ntest_ppl = { naive = inf }\n', "should be a perplexity"),
    ('source = "x"\ntest_ppl = { naive = 82.7 }\nordering_only = ["locked_only"]\n', "expect.ordering_only"),
    ('source = "x"\ntest_ppl = { naive = 82.7 }\ntolerance = 1.5\n', "expect.tolerance = 1.5"),
    ('source = "x"\ntest_ppl = { naive = 82.7 }\nsorce = "y"\n', "unknown key 'expect.sorce'"),
    ('source = "x"\ntest_ppl = 82.7\n', "expect.test_ppl = 82.7 should be a table"),
])
def test_a_bad_answer_key_is_one_line_naming_the_key(tmp_path, expect, message):
    with pytest.raises(UserError) as caught:
        study_with(tmp_path, expect)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["known-answer", "awd-table4", "gal-medium-ptb"])
def test_the_shipped_keys_name_their_source_and_arms_of_their_study(name):
    study = load_study(REPO / "studies" / f"{name}.toml")
    key = study.expect
    assert key is not None and key.source and set(key.test_ppl) <= set(study.variants)
    assert set(key.val_ppl) <= set(study.variants)


def test_the_markov_corpus_is_written_on_first_use_and_its_answer_is_exp_h(tmp_path, monkeypatch):
    monkeypatch.setenv("AWD_CACHE_DIR", str(tmp_path / "cache"))
    corpus = load_corpus("markov", tmp_path, log=lambda *a: None)
    assert corpus.vocab_size == synthetic.N_STATES and (tmp_path / "markov" / "MD5SUMS").is_file()
    key = load_study(REPO / "studies" / "known-answer.toml").expect
    truth = synthetic.make_source().perplexity
    assert math.isclose(key.test_ppl["awd"], truth, abs_tol=5e-4) and key.test_ppl["no_dropout"] == key.test_ppl["awd"]
    again = load_corpus("markov", tmp_path, log=lambda *a: None)  # the same files: the same ids
    assert again.md5 == corpus.md5


def test_a_generated_corpus_goes_to_the_cache_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o555)  # a team folder, read-only (root ignores the bits: the harness honours them)
    monkeypatch.setenv("AWD_CACHE_DIR", str(tmp_path / "cache"))
    try:
        corpus = load_corpus("markov", shared, log=lambda *a: None)
        # A trial process loads without writing: it finds the corpus where its coordinator wrote it.
        assert load_corpus("markov", shared, fetch_missing=False, log=lambda *a: None).path == corpus.path
    finally:
        shared.chmod(0o755)
    assert corpus.path == tmp_path / "cache" / "corpora" / "markov" and not (shared / "markov").exists()


# --- published against measured ---------------------------------------------------------------------------
def gal_key(tmp_path, ordering_only='[]', tolerance=0.0):
    return study_with(tmp_path, f'source = "G&G 2016"\ntest_ppl = {{ naive = 82.7, locked_only = 79.7 }}\n'
                                f'ordering_only = {ordering_only}\ntolerance = {tolerance}\n').expect


def seeds(*values):
    return dict(enumerate(values, start=1))


def test_published_against_measured_recomputed_by_hand(tmp_path):
    key = gal_key(tmp_path)
    measured = {"test_ppl": {"naive": seeds(83.0, 82.0, 84.0), "locked_only": seeds(85.0, 86.0, 84.0)}}
    result = check_key(key, measured)
    naive, locked = result.rows
    assert (naive.arm, naive.measured, naive.seeds) == ("naive", 83.0, 3) and naive.diff == pytest.approx(0.3)
    t = scipy_stats.t.ppf(0.975, 2) * np.std([83.0, 82.0, 84.0], ddof=1) / math.sqrt(3)
    assert (naive.ci.low, naive.ci.high) == pytest.approx((83.0 - t, 83.0 + t))
    assert naive.agrees(0.0) is True  # 82.7 lies in [80.5, 85.5]
    assert locked.measured == 85.0 and locked.agrees(0.0) is False  # 79.7 lies below [82.5, 87.5]
    (sign,) = result.signs
    assert (sign.published, sign.measured, sign.holds) == (pytest.approx(3.0), pytest.approx(-2.0), False)
    assert result.verdict.startswith("Not reproduced: 1 of 2 published values agree")
    assert "the published ordering is violated: published naive > locked_only (test), measured the other way by 2.00" \
           in result.verdict and "off: locked_only test 85.00 vs 79.7" in result.verdict


def test_a_tolerance_lets_a_value_agree_outside_the_interval_and_ordering_only_arms_are_not_compared(tmp_path):
    measured = {"test_ppl": {"naive": seeds(86.0, 86.1, 85.9), "locked_only": seeds(81.0, 81.1, 80.9)}}
    assert check_key(gal_key(tmp_path), measured).rows[0].agrees(0.0) is False  # 82.7 vs 86 +- 0.25
    result = check_key(gal_key(tmp_path, tolerance=0.05), measured)
    assert [row.agrees(0.05) for row in result.rows] == [True, True]
    assert result.verdict == ("Reproduced: 2 of 2 published values agree with the measured ones (within the measured "
                              "95% interval or 5%); the published ordering holds.")
    result = check_key(gal_key(tmp_path, ordering_only='["naive", "locked_only"]'), measured)
    assert [row.agrees(0.0) for row in result.rows] == [None, None]
    assert result.verdict == "Reproduced: the published ordering holds."


def test_nothing_measured_yet_is_said(tmp_path):
    assert check_key(gal_key(tmp_path), {}).verdict.startswith("Not checked yet")
