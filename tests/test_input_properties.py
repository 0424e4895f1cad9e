"""Bad input, generated (issue #20, items 6, 8, 11, 12, 13): hypothesis draws members of each class on every input
surface (study file keys and values, `--set`, flags, store URLs, JSON and checkpoint contents, paths) and each must
meet the promise: exit 2, one line, no traceback, nothing changed in the stores. Each class also keeps its issue's
example and the members found beyond it as plain tests. test_bad_input.py holds the hand-written classes before these.
"""

import hashlib
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import with_corpus
from harness.cli import main
from harness.study.rules import search_space
from harness.study.spec import load_study

pytestmark = pytest.mark.fast

# Each generated example runs main() in-process; a few dozen per class keep the fast tier fast.
EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

STUDY = """
[study]
name = "props"
corpus = "ptb"
[fixed.model]
emb_size = 8
hidden_size = 8
n_layers = {layers}
[fixed.dropout]
input = 0.2
weight = 0.2
[fixed.train]
epochs = 1
batch_size = 4
eval_batch_size = 4
test_batch_size = 4
bptt = 10
train_tokens = 2000
valid_tokens = 400
threads = 1
[variants.locked_only]
[variants.weight_only]
[search]
weight = [0.1, 0.5]
[budget]
trials = 2
pruner = "none"
confirm_seeds = []
max_retries = 1
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Each test in its own folder (the default stores and runs/ are relative), SIGTERM restored afterwards."""
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def study_file(folder: Path, corpus: str, text: str = "", layers: int = 2, name: str = "props.toml") -> Path:
    path = folder / name
    path.write_text(with_corpus(text or STUDY.format(layers=layers), corpus), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict:
    """Every file under folder with its content's digest: what "nothing changed" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def refused(capsys, *argv) -> str:
    """The error line of a command that must be refused: exit 2, one line on stderr, no traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse exits by itself
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def refused_unchanged(capsys, folder: Path, *argv) -> str:
    """refused(), and nothing under folder made, changed or deleted."""
    before = snapshot(folder)
    message = refused(capsys, *argv)
    assert snapshot(folder) == before
    return message


# --- 13. settings that cannot act ----------------------------------------------------------------------
# Class: a setting the file, an axis or --set gives that can change no run. Mechanism: one rule,
# harness.config.idle_sites (which rate cannot act on which model), used by StudyConfig.active_sites, which
# run_config, the axes' crossing and rules.search_space all go through; load_study refuses what acts nowhere.
IDLE_IN_FILE = {
    "hidden rate, one layer (the issue's example)": ("[fixed.dropout]\n", "[fixed.dropout]\nhidden = 0.3\n",
                                                     "fixed.dropout.hidden = 0.3 cannot act in any arm"),
    "hidden range searched, one layer": ("weight = [0.1, 0.5]\n", "weight = [0.1, 0.5]\nhidden = [0.1, 0.5]\n",
                                         "search.hidden cannot act in any arm"),
    "hidden_mode in fixed.dropout": ("[fixed.dropout]\n", "[fixed.dropout]\nhidden_mode = 'naive'\n",
                                     "fixed.dropout.hidden_mode cannot act"),
    "a mode with no masked site": ("[variants.weight_only]\n", "[variants.weight_only]\n[variants.mine]\n"
                                   "sites = ['weight']\nhidden_mode = 'naive'\n",
                                   "variants.mine.hidden_mode = 'naive' cannot act"),
    "nonmono with plain SGD": ("threads = 1\n", "threads = 1\noptimizer = 'sgd'\nnonmono = 3\n",
                               "fixed.train.nonmono cannot act: train.optimizer is sgd"),
    "a hidden-rate axis, one layer": ("[search]\n", "[axes]\n\"dropout.hidden\" = [0.1, 0.3]\n[search]\n",
                                      "axes.\"dropout.hidden\" cannot act in any arm"),
}


@pytest.mark.parametrize("old, new, expected", IDLE_IN_FILE.values(), ids=IDLE_IN_FILE.keys())
def test_a_setting_that_cannot_act_is_refused(tmp_path, test_corpus, capsys, old, new, expected):
    text = STUDY.format(layers=1)
    assert old in text
    path = study_file(tmp_path, test_corpus, text.replace(old, new, 1))
    assert expected in refused_unchanged(capsys, tmp_path, "plan", path)


def test_the_hidden_rate_acts_and_is_searched_where_the_model_can_use_it(tmp_path, test_corpus):
    text = STUDY.format(layers="{layers}").replace("[variants.weight_only]\n", "[variants.weight_only]\n"
                                                   "[variants.naive_recurrent]\n").replace(
        "weight = [0.1, 0.5]\n", "weight = [0.1, 0.5]\nhidden = [0.1, 0.5]\n").replace(
        "[fixed.dropout]\n", "[fixed.dropout]\nhidden = 0.3\n")
    one = load_study(study_file(tmp_path, test_corpus, text.format(layers=1)))
    # One layer: naive_recurrent applies the hidden rate to h(t-1); locked_only has nowhere to put it.
    assert "dropout.hidden" in search_space(one, "naive_recurrent")
    assert "dropout.hidden" not in search_space(one, "locked_only")
    assert one.run_config("locked_only").dropout.hidden == 0.0 and one.run_config("naive_recurrent").dropout.hidden
    two = load_study(study_file(tmp_path, test_corpus, text.format(layers=2), name="two.toml"))
    assert "dropout.hidden" in search_space(two, "locked_only") and two.run_config("locked_only").dropout.hidden == 0.3


def test_an_axis_on_layers_searches_the_hidden_rate_only_where_it_acts(tmp_path, test_corpus):
    text = STUDY.format(layers=2).replace("[search]\n", "[axes]\n\"model.n_layers\" = [1, 2]\n[search]\n").replace(
        "weight = [0.1, 0.5]\n", "weight = [0.1, 0.5]\nhidden = [0.1, 0.5]\n")
    study = load_study(study_file(tmp_path, test_corpus, text))
    assert "dropout.hidden" not in search_space(study, "locked_only@n_layers=1")
    assert "dropout.hidden" in search_space(study, "locked_only@n_layers=2")


@pytest.mark.parametrize("pair, expected", [
    ("dropout.hidden=0.5", "--set dropout.hidden=0.5 cannot act in 'locked_only': with n_layers = 1"),
    ("train.nonmono=3", "--set train.nonmono=3 cannot act: train.optimizer is sgd"),
])
def test_set_of_a_setting_that_cannot_act_is_refused(tmp_path, test_corpus, capsys, pair, expected):
    text = STUDY.format(layers=1).replace("threads = 1\n", "threads = 1\noptimizer = 'sgd'\n")
    path = study_file(tmp_path, test_corpus, text)
    assert expected in refused_unchanged(capsys, tmp_path, "train", path, "--variant", "locked_only", "--set", pair)


@EXAMPLES
@given(rate=st.floats(min_value=0.01, max_value=0.99), mode=st.sampled_from(["locked", "naive", "timestep"]),
       where=st.sampled_from(["fixed", "search", "axis", "set"]))
def test_generated_hidden_rates_on_one_layer_are_refused(tmp_path, test_corpus, capsys, rate, mode, where):
    text = STUDY.format(layers=1).replace("[variants.weight_only]\n", f"[variants.weight_only]\n[variants.mine]\n"
                                          f"sites = ['hidden', 'input']\nhidden_mode = '{mode}'\n")
    edits = {"fixed": ("[fixed.dropout]\n", f"[fixed.dropout]\nhidden = {rate!r}\n"),
             "search": ("weight = [0.1, 0.5]\n", f"weight = [0.1, 0.5]\nhidden = [{rate / 2!r}, {rate!r}]\n"),
             "axis": ("[search]\n", f"[axes]\n\"dropout.hidden\" = [{rate / 2!r}, {rate!r}]\n[search]\n"),
             "set": ("", "")}
    path = study_file(tmp_path, test_corpus, text.replace(*edits[where], 1))
    extra = ["--set", f"dropout.hidden={rate!r}"] if where == "set" else []
    message = refused_unchanged(capsys, tmp_path, "train", path, "--variant", "mine", *extra)
    assert "cannot act" in message and "n_layers = 1" in message or "axes" in message
