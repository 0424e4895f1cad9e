"""Bad input, generated (issue #20, items 6, 8, 11, 12, 13): hypothesis draws members of each class on every input
surface (study file keys and values, `--set`, flags, store URLs, JSON and checkpoint contents, paths) and each must
meet the promise: exit 2, one line, no traceback, nothing changed in the stores. Each class also keeps its issue's
example and the members found beyond it as plain tests. test_bad_input.py holds the hand-written classes before these.
"""

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from optuna.storages import InMemoryStorage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import child_runs, open_coordinator, refused, tiny_config, tiny_corpus, tiny_study, with_corpus
from harness.data import load_corpus
from harness.errors import UserError
from harness.study.ledger.writer import Ledger
from harness.study.rules import CONFIRM, SEARCH, RunState, search_space
from harness.study.scheduler import Outcome, Slot
from harness.study.spec import load_study
from harness.train import RunResult, TrainingDiverged, measured, train_model

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("in_tmp")]  # in_tmp: conftest.py

# Each generated example runs main() in-process; a few dozen per class keep the fast tier fast (HYPOTHESIS_EXAMPLES=300
# for a deeper search).
EXAMPLES = settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 25)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

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


def study_file(folder: Path, corpus: str, text: str = "", layers: int = 2, name: str = "props.toml") -> Path:
    path = folder / name
    path.write_text(with_corpus(text or STUDY.format(layers=layers), corpus), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict:
    """Every file under folder with its content's digest: what "nothing changed" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


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


# --- 6. non-finite results ----------------------------------------------------------------------------
# Class: a run whose validation or test perplexity is no measurement (inf, NaN, or MLflow's 1.797e308 for inf).
# Mechanism: one rule, harness.train.measured; train_model raises TrainingDiverged on it before a result exists,
# the coordinator checks every result it receives (train.divergence) before either store records it, and the
# ledger's best and the report's filters use the same rule.
@pytest.mark.parametrize("value, is_measured", [
    (58.8, True), (1e308, True), (math.inf, False), (-math.inf, False), (math.nan, False),
    (1.7976931348623157e308, False), (None, False), ("58.8", False), (True, False),
])
def test_a_perplexity_is_a_measurement_only_when_finite_and_below_the_float_limit(value, is_measured):
    assert measured(value) is is_measured


def test_a_large_learning_rate_diverges_in_perplexity_though_the_loss_stays_finite():
    # The example: lr 1e4 keeps the training loss finite, but exp(val loss) overflows.
    with pytest.raises(TrainingDiverged, match=r"validation perplexity became inf \(loss [0-9.e+]+ nats"):
        train_model(tiny_config(lr=1e4, epochs=1), tiny_corpus(), progress=False)


def test_a_test_perplexity_that_overflows_is_a_diverged_run(monkeypatch):
    losses = iter([1.0, 800.0])  # the validation pass, then the test pass
    monkeypatch.setattr("harness.train.evaluate", lambda *a: next(losses))
    with pytest.raises(TrainingDiverged, match="test perplexity became inf"):
        train_model(tiny_config(epochs=1), tiny_corpus(), progress=False)


@pytest.mark.slow  # MLflow's SQLite store takes seconds to create
def test_results_that_are_no_measurement_are_recorded_as_failed_in_both_stores(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=2, seeds="[1]",
                       edits=[("[variants.weight_only]\n", ""), ("max_retries = 1", "max_retries = 0")])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    coordinator = open_coordinator(study, f"sqlite:///{tmp_path / 'optuna.db'}", uri, tmp_path / "runs")
    ledger, slot = coordinator.ledger, Slot(0, "cpu", 1)

    def run(best_val_ppl, test_ppl=None):
        task = coordinator.next_task(slot)
        coordinator.on_start(task, slot)
        result = RunResult(best_val_ppl, 1, test_ppl, None, None, 1.0, 1)
        coordinator.on_done(task, slot, Outcome(RunState.FINISHED, result=result))

    run(math.inf)  # the example: search trial 0
    run(300.0)
    assert ledger.tally("locked_only", SEARCH).finished == 1 and ledger.best("locked_only")[1] == 300.0
    run(250.0, 1.7976931348623157e308)  # the confirmation: MLflow's stand-in for inf
    assert ledger.tally("locked_only", CONFIRM).finished == 0 and ledger.confirmation_results("locked_only") == {}
    _, runs, _ = child_runs(uri, study.name)
    failed = [r for r in runs if r.data.tags["state"] == RunState.FAILED]
    assert sorted(r.data.tags["trial"] for r in failed) == ["0", "0"]  # search #0 and confirm #0
    assert all("diverged" in r.data.tags["fail_reason"] for r in failed)
    assert not any({"best_val_ppl", "test_ppl"} & set(r.data.metrics) for r in failed)


def test_an_infinite_value_an_older_harness_recorded_is_never_best(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=2, seeds="[1, 2]")
    ledger = Ledger(study, InMemoryStorage(), study.identity(), log=lambda *a: None)
    ledger.finish(ledger.claim("locked_only", SEARCH), math.inf, {})  # straight to Optuna, as before the guard
    ledger.finish(ledger.claim("locked_only", SEARCH), 300.0, {})
    assert ledger.best("locked_only")[1] == 300.0
    ledger.enqueue_confirmation("locked_only")
    ledger.finish(ledger.claim("locked_only", CONFIRM), 290.0, {"test_ppl": 1.7976931348623157e308})
    ledger.finish(ledger.claim("locked_only", CONFIRM), 291.0, {"test_ppl": 280.0})
    assert list(ledger.confirmation_results("locked_only").values()) == [280.0]


@pytest.mark.slow  # calibration runs in child processes
def test_plan_on_a_recipe_that_diverges_is_one_line(tmp_path, test_corpus, capsys):
    path = study_file(tmp_path, test_corpus, STUDY.format(layers=2).replace("threads = 1\n", "threads = 1\nlr = 1e4\n"))
    message = refused(capsys, "plan", path, "--devices", "cpu", "--trials-per-device", "1")
    assert "calibrating the study on cpu: validation perplexity became inf" in message


# --- 8. late failures ---------------------------------------------------------------------------------
# Class: anything that would fail after the study ran, or queue for months, when it can be checked before the first
# trial. Mechanism: the output folders a study writes into (<reports>/<study>/ and its files, <runs>/<study>/) go
# through cli._output_dir with the rest before anything runs; a budget beyond MAX_TRIALS runs per arm is refused
# with the way to price it (plan), and ablate's first line carries plan's estimate.
@pytest.mark.parametrize("argv, plant, expected", [
    (["ablate", "{study}", "--devices", "cpu"], "reports/props", "reports/props is a file, not a folder"),
    (["ablate", "{study}", "--devices", "cpu"], "reports/props/index.html/", "index.html is a folder, where the "
                                                                              "report writes a file"),
    (["ablate", "{study}", "--devices", "cpu"], "runs/props", "runs/props is a file, not a folder"),
    (["report", "{study}"], "reports/props/results.csv/", "results.csv is a folder"),
])
def test_output_folders_a_study_writes_into_are_checked_before_it_starts(tmp_path, test_corpus, capsys, argv, plant,
                                                                         expected):
    study = study_file(tmp_path, test_corpus)
    where = tmp_path / plant
    where.parent.mkdir(parents=True, exist_ok=True)
    where.mkdir() if plant.endswith("/") else where.write_text("the user's\n")
    assert expected in refused_unchanged(capsys, tmp_path, *[a.format(study=study) for a in argv])
    assert not (tmp_path / "optuna.db").exists()


@EXAMPLES
@given(trials=st.integers(min_value=10_001, max_value=2**31 - 1), key=st.sampled_from(["trials", "confirm_seeds"]))
def test_a_budget_that_would_queue_for_months_is_refused(tmp_path, test_corpus, capsys, trials, key):
    value = trials if key == "trials" else f"[{', '.join(map(str, range(10_001)))}]"
    text = STUDY.format(layers=2).replace("trials = 2\n", f"trials = {trials}\n" if key == "trials" else "").replace(
        "confirm_seeds = []\n", f"confirm_seeds = {value}\n" if key == "confirm_seeds" else "confirm_seeds = []\n")
    path = study_file(tmp_path, test_corpus, text)
    assert "a typo, not a plan" in refused_unchanged(capsys, tmp_path, "ablate", path, "--devices", "cpu")


# --- 11. paths the OS refuses -------------------------------------------------------------------------
# Class: a path the OS would refuse (a name over 255 bytes, a path over 4096, a symlink loop, ...), on every surface.
# Mechanism: harness.paths.check_path on every path a user gives (cli's output folders, stores.sqlite_path for both
# store URLs, data's corpus folder for study.corpus and --data-dir, spec for the study file), and main() words any
# OSError of that errno family that still gets through in one line.
PATH_SURFACES = {
    "train --out": ["train", "{study}", "--variant", "locked_only", "--out", "{path}"],
    "ablate --runs-dir": ["ablate", "{study}", "--devices", "cpu", "--runs-dir", "{path}"],
    "ablate --reports-dir": ["ablate", "{study}", "--devices", "cpu", "--reports-dir", "{path}"],
    "report --out": ["report", "{study}", "--out", "{path}"],
    "masks --out": ["masks", "--out", "{path}"],
    "data fetch --data-dir": ["data", "fetch", "ptb", "--data-dir", "{path}", "--url", "http://127.0.0.1:1"],
    "--storage": ["ablate", "{study}", "--devices", "cpu", "--storage", "sqlite:///{path}"],
    "--tracking-uri": ["ablate", "{study}", "--devices", "cpu", "--tracking-uri", "sqlite:///{path}"],
    "study.corpus": ["plan", "{corpus_study}"],
    "the study file": ["plan", "{path}"],
}


def path_argv(tmp_path, test_corpus, surface: str, path: str) -> list:
    study = study_file(tmp_path, test_corpus)
    corpus_study = tmp_path / "corpus.toml"
    corpus_study.write_text(with_corpus(STUDY.format(layers=2), path), encoding="utf-8")
    return [a.format(study=study, path=path, corpus_study=corpus_study) for a in PATH_SURFACES[surface]]


@pytest.mark.parametrize("surface", PATH_SURFACES)
def test_a_name_over_255_bytes_is_one_line_on_every_surface(tmp_path, test_corpus, capsys, surface):
    argv = path_argv(tmp_path, test_corpus, surface, str(tmp_path / ("a" * 300)))
    assert "over the 255 a file system accepts" in refused_unchanged(capsys, tmp_path, *argv)


@pytest.mark.parametrize("surface", PATH_SURFACES)
def test_a_symlink_loop_is_one_line_on_every_surface(tmp_path, test_corpus, capsys, surface):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    argv = path_argv(tmp_path, test_corpus, surface, str(tmp_path / "loop1" / "x"))
    assert "ELOOP" in refused_unchanged(capsys, tmp_path, *argv)


@EXAMPLES
@given(surface=st.sampled_from(sorted(PATH_SURFACES)),
       name=st.tuples(st.text(alphabet=st.sampled_from("aZ9_-.é漢 "), max_size=120), st.integers(0, 200)).map(
           lambda p: p[0] + "x" * max(1, 256 - len(p[0].encode()) + p[1])),  # at least 256 bytes
       depth=st.integers(min_value=0, max_value=3))
def test_generated_names_the_os_refuses_are_one_line(tmp_path, test_corpus, capsys, surface, name, depth):
    path = tmp_path.joinpath(*["sub"] * depth, name)
    message = refused_unchanged(capsys, tmp_path, *path_argv(tmp_path, test_corpus, surface, str(path)))
    assert "bytes, over the" in message


def test_an_os_refusal_no_check_named_first_is_still_one_line(tmp_path, test_corpus, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "somewhere"))

    monkeypatch.setattr("harness.cli.cmd_plan", refuse)
    monkeypatch.setattr("harness.cli.build_parser", _parser_with(refuse))
    assert "Read-only file system (EROFS)" in refused(capsys, "plan", study_file(tmp_path, test_corpus))


def _parser_with(func):
    from harness.cli import build_parser

    def build():
        parser = build_parser()
        parser.set_defaults(func=func)
        for action in parser._subparsers._group_actions:  # argparse's subparsers: set each command's func
            for sub in action.choices.values():
                sub.set_defaults(func=func)
        return parser
    return build


# --- 12. files the harness reads that someone else wrote ----------------------------------------------
# Class: a JSON, checkpoint or cache file whose values have the wrong types or ranges. Mechanism: each reader checks
# every value it uses, as strictly as a study file: plan._check_seconds (and the JSON layouts' types), train's
# _check_layout of last.pt, data's _check_payload of the token cache (a bad cache is rebuilt, never served).
JSON_VALUES = st.one_of(st.text(max_size=5), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                        st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 < v <= 7 * 24 * 3600),
                        st.integers(min_value=7 * 24 * 3600 + 1, max_value=10**400), st.integers(max_value=0))


@EXAMPLES
@given(value=JSON_VALUES, layout=st.sampled_from(["seconds_per_epoch", "gpu-check", "device"]))
def test_generated_epoch_time_files_with_wrong_values_are_one_line(tmp_path, test_corpus, capsys, value, layout):
    data = {"seconds_per_epoch": {"seconds_per_epoch": {"locked_only": value}},
            "gpu-check": {"rows": [{"numbers": {"epoch_seconds": value}}]},
            "device": {"seconds_per_epoch": {"locked_only": 60.0}, "device": value}}[layout]
    if layout == "device" and isinstance(value, str):
        value = [value]  # a string is a device's name: make it a list
        data["device"] = value
    given_file = tmp_path / "times.json"
    given_file.write_text(json.dumps(data), encoding="utf-8")
    message = refused_unchanged(capsys, tmp_path, "plan", study_file(tmp_path, test_corpus), "--devices", "cpu",
                                "--seconds-per-epoch", given_file)
    assert str(given_file) in message


@pytest.mark.parametrize("text, expected", [
    ('{"seconds_per_epoch": {"awd": 1e400}}', "is not seconds per epoch"),  # json reads it as inf
    ('{"seconds_per_epoch": {"awd": 1e12}}', "is not seconds per epoch"),  # the "huge numbers"
    ('{"seconds_per_epoch": {"awd": "63.5"}}', "is not seconds per epoch"),  # the "wrong types"
    ('{"rows": [{"numbers": {"epoch_seconds": "abc"}}]}', "is not seconds per epoch"),
    ('{"rows": [{"numbers": ["epoch_seconds"]}]}', "expected one row with an epoch time"),
    ('{"rows": [{"numbers": {"epoch_seconds": 60}}], "environment": "gpu"}', "environment = 'gpu' should be"),
])
def test_epoch_time_files_examples(tmp_path, test_corpus, capsys, text, expected):
    (tmp_path / "times.json").write_text(text, encoding="utf-8")
    message = refused_unchanged(capsys, tmp_path, "plan", study_file(tmp_path, test_corpus), "--devices", "cpu",
                                "--seconds-per-epoch", tmp_path / "times.json")
    assert expected in message


@pytest.fixture(scope="module")
def last_checkpoint(tmp_path_factory):
    """A real last.pt of a one-epoch tiny run (of two), and the run's config and corpus."""
    folder = tmp_path_factory.mktemp("checkpoint")
    config, corpus = tiny_config(epochs=1), tiny_corpus()
    train_model(config, corpus, checkpoint_dir=folder, progress=False, evaluate_test=False)
    return torch.load(folder / "last.pt", weights_only=True), tiny_config(epochs=2), corpus


CHECKPOINT_VALUES = st.one_of(st.text(max_size=3), st.booleans(), st.none(), st.floats(), st.integers(-5, 10**20),
                              st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                    max_size=2))


@EXAMPLES
@given(key=st.sampled_from(["epoch", "epochs", "best", "best.epoch", "best.val_loss", "optimizer", "corpus_md5"]),
       value=CHECKPOINT_VALUES)
def test_generated_checkpoint_values_of_the_wrong_type_are_refused(tmp_path, last_checkpoint, key, value):
    saved, config, corpus = last_checkpoint
    damaged = {**saved, "best": dict(saved["best"])}
    section, _, name = key.partition(".")
    if name:
        damaged[section][name] = value
    else:
        damaged[key] = value
    # A value of the right type and range is no damage: only check the ones the harness never writes.
    right = {"epoch": lambda v: v == 1 and type(v) is int, "best.epoch": lambda v: type(v) is int and v >= 0,
             "best.val_loss": lambda v: type(v) is float, "corpus_md5": lambda v: isinstance(v, dict)}
    if right.get(key, lambda v: False)(value):
        return
    folder = tmp_path / f"run-{abs(hash((key, repr(value))))}"
    folder.mkdir()
    torch.save(damaged, folder / "last.pt")
    torch.save({"model": saved["model"]}, folder / "best.pt")
    with pytest.raises(UserError, match="last.pt"):
        train_model(config, corpus, checkpoint_dir=folder, progress=False, evaluate_test=False)


def test_a_checkpoint_whose_epoch_is_a_string_is_refused(tmp_path, last_checkpoint):
    saved, config, corpus = last_checkpoint
    torch.save({**saved, "epoch": "1"}, tmp_path / "last.pt")  # the example
    torch.save({"model": saved["model"]}, tmp_path / "best.pt")
    with pytest.raises(UserError, match=r"damaged or foreign: epoch = '1'"):
        train_model(config, corpus, checkpoint_dir=tmp_path, progress=False, evaluate_test=False)


@pytest.mark.parametrize("bad_id", [-1, "vocab", 10**6])
def test_a_token_cache_with_ids_outside_the_vocabulary_is_rebuilt(tmp_path, bad_id):
    from helpers import write_corpus

    folder = write_corpus(tmp_path / "toy")
    first = load_corpus(str(folder), log=lambda *a: None)
    (cache,) = (folder / ".cache").glob("*.pt")
    payload = torch.load(cache, weights_only=True)
    payload["train"][0] = len(first.vocab) if bad_id == "vocab" else bad_id
    torch.save(payload, cache)
    said = []
    again = load_corpus(str(folder), log=said.append)
    assert any("ignoring unreadable cache" in line and "outside the vocabulary" in line for line in said), said
    assert torch.equal(again.train, first.train)


# --- every key of the study file and --set, any value -------------------------------------------------
# The promise over the whole surface: whatever value a key gets, the study loads or is refused in one line.
STUDY_KEYS = [f"{section}.{key}" for section, keys in {
    "fixed.model": ("emb_size", "hidden_size", "n_layers", "tie_weights", "cell"),
    "fixed.dropout": ("embedding", "input", "hidden", "output", "weight", "hidden_mode"),
    "fixed.train": ("epochs", "batch_size", "bptt", "lr", "clip", "nonmono", "seed", "optimizer", "train_tokens"),
    "budget": ("trials", "epochs", "pruner", "warmup_epochs", "confirm_seeds", "max_retries"),
    "search": ("weight", "hidden", "lr", "sampler", "seed"),
    "study": ("name", "corpus", "metric"),
}.items() for key in keys]
TOML_VALUES = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70).map(str), st.booleans().map(lambda b: str(b).lower()),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: repr(v).replace("inf", "inf").replace("nan", "nan")),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters='"\\\n\r'), max_size=300).map(json.dumps),
    st.lists(st.floats(min_value=-2.0, max_value=2.0), max_size=3).map(lambda v: "[" + ", ".join(map(repr, v)) + "]"),
    st.lists(st.integers(min_value=-2**40, max_value=2**40), max_size=3).map(str))


def toml_with(text: str, key: str, value: str) -> str:
    """The study text with `key` (section.name) set to the TOML `value`, replacing its line or adding one."""
    section, name = key.rsplit(".", 1)
    lines, out, inside, done = text.splitlines(), [], False, False
    for line in lines:
        if line.startswith("["):
            if inside and not done:
                out.append(f"{name} = {value}")
                done = True
            inside = line == f"[{section}]"
        if inside and line.split(" = ")[0] == name:
            line, done = f"{name} = {value}", True
        out.append(line)
    if not done:
        out += ([] if inside else [f"[{section}]"]) + [f"{name} = {value}"]
    return "\n".join(out) + "\n"


@EXAMPLES
@given(key=st.sampled_from(STUDY_KEYS), value=TOML_VALUES)
def test_any_value_of_any_study_key_loads_or_is_one_line(tmp_path, test_corpus, capsys, key, value):
    path = tmp_path / "props.toml"
    path.write_text(toml_with(with_corpus(STUDY.format(layers=2), test_corpus), key, value), encoding="utf-8")
    try:
        study = load_study(path)
        for arm in study.variants:
            study.run_config(arm)
    except UserError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        before = snapshot(tmp_path)
        refused(capsys, "ablate", path, "--devices", "cpu")
        assert snapshot(tmp_path) == before


@EXAMPLES
@given(key=st.sampled_from([k.split(".", 1)[1] for k in STUDY_KEYS if k.startswith("fixed.")]), value=TOML_VALUES)
def test_any_set_value_trains_or_is_one_line(tmp_path, test_corpus, capsys, key, value):
    from harness.config import parse_overrides

    study = load_study(study_file(tmp_path, test_corpus))
    try:
        study.run_config("locked_only", parse_overrides([f"{key}={value}"]))
    except UserError as err:
        assert "\n" not in str(err)
        refused_unchanged(capsys, tmp_path, "train", tmp_path / "props.toml", "--variant", "locked_only", "--set",
                          f"{key}={value}")
