"""Published results as answer keys: the [expect] table of a study file, the keys the harness ships, and the
corpus whose answer is known exactly."""

import math

import pytest

from harness import synthetic
from harness.data import load_corpus
from harness.errors import UserError
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
