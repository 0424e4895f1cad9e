"""Bad input to `python -m harness ablate`, as a user would type it: one line on stderr saying what is wrong,
where and how to fix it; exit code 2; no traceback. test_config.py and test_data.py check the same mistakes
at the library level; resuming a study under its name with another file is in test_ablation.py (SQLite) and
test_distributed.py (PostgreSQL).
"""

import hashlib

import pytest

from helpers import VALID, run_harness, write_corpus

pytestmark = pytest.mark.slow

STUDY_MISTAKES = {
    "malformed-toml": ("[study\nname=1", "malformed TOML"),
    "unknown-key": ("[fixed.train]\nepoch = 3\n[variants.awd]",
                    "unknown key 'fixed.train.epoch' (did you mean 'epochs'?)"),
    "rate-of-one": ("[fixed.dropout]\ninput = 1.0\n[variants.awd]", "fixed.dropout.input = 1.0 is outside [0, 1)"),
    "negative-rate": ("[fixed.dropout]\nweight = -0.1\n[variants.awd]", "weight = -0.1 is outside [0, 1)"),
    "unknown-variant": ("[variants.awdd]", "[variants.awdd] is not a built-in variant (did you mean 'awd'?)"),
    "unknown-technique": ("[variants.x]\nsites = ['embeding']\nhidden_mode = 'locked'",
                          "variants.x.sites = ['embeding']: each site must be one of"),
    "inverted-range": ("[variants.awd]\n[search]\ninput = [0.6, 0.1]",
                       "search.input = [0.6, 0.1] is inverted or empty; write [low, high] with low < high"),
    "unsafe-name": ("[study]\nname = '<b>x</b>'\n[variants.awd]", "is unsafe for file names, MLflow filters and HTML; use letters"),
}


def corpus_missing(folder):
    return folder, "corpus 'toy' is not in"


def corpus_wrong_md5(folder):
    write_corpus(folder)
    (folder / "MD5SUMS").write_text(f"{'0' * 32}  train.txt\n")
    actual = hashlib.md5((folder / "train.txt").read_bytes()).hexdigest()
    return folder, actual


def corpus_not_utf8(folder):
    return write_corpus(folder, train=b"a b\nc \xff d\n"), "byte offset 6"


def corpus_empty_split(folder):
    return write_corpus(folder, valid=""), "valid.txt"


def ablate(tmp_path, study_text):
    path = tmp_path / "study.toml"
    path.write_text(study_text)
    proc = run_harness("ablate", path, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}", "--devices", "cpu", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "optuna.db").exists()  # refused before anything was recorded
    return proc.stderr


@pytest.mark.parametrize("text, expected", STUDY_MISTAKES.values(), ids=STUDY_MISTAKES.keys())
def test_bad_study_file_is_one_line_naming_file_and_key(tmp_path, text, expected):
    message = ablate(tmp_path, text)
    assert message.startswith(f"error: {tmp_path / 'study.toml'}: ") and expected in message


@pytest.mark.parametrize("make_corpus", [corpus_missing, corpus_wrong_md5, corpus_not_utf8, corpus_empty_split])
def test_bad_corpus_is_one_line_naming_the_file(tmp_path, make_corpus):
    folder, expected = make_corpus(tmp_path / "toy")
    message = ablate(tmp_path, VALID.replace('name = "t"', f'name = "t"\ncorpus = "{folder}"'))
    assert str(folder) in message and expected in message
