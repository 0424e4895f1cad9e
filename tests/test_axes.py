"""Studies that cross their variants with axes: the arms a study file declares, their configs and names, the
refusals of axes that cannot be, and a study with axes run, interrupted and resumed with every arm recorded once."""

import optuna
import pytest

from harness.errors import UserError
from harness.study.coordinator import run_study
from harness.study.rules import CONFIRM, SEARCH, count_runs, optuna_name
from harness.study.scheduler import Slot
from harness.study.spec import load_study
from helpers import TINY, child_runs, with_corpus

pytestmark = pytest.mark.fast

BASE = """
[study]
name = "axes"
[fixed.model]
emb_size = 16
hidden_size = 16
n_layers = 2
[fixed.dropout]
input = 0.3
weight = 0.3
[variants.no_dropout]
[variants.weight_only]
[variants.awd]
[search]
input = [0.1, 0.5]
[budget]
trials = 2
confirm_seeds = [1, 2]
"""


def study_with(tmp_path, axes: str, base: str = BASE):
    path = tmp_path / "axes.toml"
    path.write_text(base + "[axes]\n" + axes)
    return load_study(path)


def refusal(tmp_path, axes: str) -> str:
    with pytest.raises(UserError) as caught:
        study_with(tmp_path, axes)
    return str(caught.value)


def test_every_variant_runs_at_every_combination_of_the_axes(tmp_path):
    study = study_with(tmp_path, '"model.cell" = ["lstm", "gru"]\n"train.train_tokens" = [2000, 4000]\n')
    assert list(study.variants) == [f"{v}@cell={c},train_tokens={n}" for c in ("lstm", "gru") for n in (2000, 4000)
                                    for v in ("no_dropout", "weight_only", "awd")]
    arm = study.variants["weight_only@cell=gru,train_tokens=4000"]
    assert arm.variant == "weight_only" and arm.axes == (("model.cell", "gru"), ("train.train_tokens", 4000))
    config = study.run_config(arm.name)
    assert (config.model.cell, config.train.train_tokens, config.variant) == ("gru", 4000, arm.name)
    assert (config.dropout.weight, config.dropout.input) == (0.3, 0.0)  # the variant's sites, as without axes
    # Each arm has its own search budget and the same paired confirmation seeds.
    runs = count_runs(study)
    assert {runs[(a, SEARCH)] for a in study.variants if a.startswith("weight_only")} == {1}  # nothing searched
    assert {runs[(a, SEARCH)] for a in study.variants if a.startswith("awd")} == {2}
    assert {runs[(a, CONFIRM)] for a in study.variants} == {2}
    assert optuna_name(study, arm.name, SEARCH) == "axes/weight_only@cell=gru,train_tokens=4000/search"


def test_a_rate_axis_crosses_only_the_variants_that_use_the_site(tmp_path):
    study = study_with(tmp_path, '"dropout.weight" = [0.2, 0.5]\n')
    assert list(study.variants) == ["no_dropout", "weight_only@weight=0.2", "awd@weight=0.2",
                                    "weight_only@weight=0.5", "awd@weight=0.5"]
    assert study.run_config("awd@weight=0.5").dropout.weight == 0.5
    assert study.run_config("no_dropout").dropout.weight == 0.0


def test_keys_that_share_a_name_are_spelled_in_full(tmp_path):
    study = study_with(tmp_path, '"model.cell" = ["lstm", "gru"]\n"train.lr" = [10, 30]\n')
    assert "awd@cell=gru,lr=30" in study.variants
    assert study.run_config("awd@cell=gru,lr=30").train.lr == 30.0


def test_without_axes_the_arms_are_the_variants(tmp_path):
    path = tmp_path / "plain.toml"
    path.write_text(BASE)
    study = load_study(path)
    assert list(study.variants) == ["no_dropout", "weight_only", "awd"] and study.axes == {}
    assert all(v.variant == v.name and v.axes == () for v in study.variants.values())


def test_set_still_overrides_an_arm(tmp_path):
    study = study_with(tmp_path, '"model.cell" = ["lstm", "gru"]\n')
    assert study.run_config("awd@cell=gru", {"train.epochs": 1}).train.epochs == 1
    with pytest.raises(UserError, match="variant 'awd' is crossed with \\[axes\\]: name one of its arms: "
                                        "awd@cell=lstm, awd@cell=gru$"):
        study.run_config("awd")


@pytest.mark.parametrize("axes, message", [
    ('"model.cel" = ["lstm", "gru"]\n', 'axes."model.cel": not a setting (did you mean \'model.cell\'?)'),
    ('cell = ["lstm", "gru"]\n', 'axes."cell": not a setting'),
    ('"train.seed" = [1, 2]\n', "cannot be an axis: the confirmation seeds set it"),
    ('"train.epochs" = [5, 10]\n', "cannot be an axis: budget.epochs"),
    ('"dropout.hidden_mode" = ["locked", "naive"]\n', "cannot be an axis: each variant sets it"),
    ('"dropout.input" = [0.2, 0.4]\n', "[search] searches it"),
    ('"model.cell" = ["lstm"]\n', "should be a list of at least two values"),
    ('"model.cell" = "gru"\n', "should be a list of at least two values"),
    ('"model.cell" = ["lstm", "lstm"]\n', "lists 'lstm' twice"),
    ('"model.cell" = ["lstm", "transformer"]\n', "cell = 'transformer' is not one of lstm, gru, rnn_tanh"),
    ('"model.n_layers" = [2, 0]\n', "n_layers = 0 must be > 0"),
    ('"model.n_layers" = [2, 2.5]\n', "should be an integer"),
    ('"dropout.weight" = [0.2, 1.0]\n', "weight = 1.0 is outside [0, 1)"),
])
def test_axes_that_cannot_be_are_refused_in_one_line_naming_the_key(tmp_path, axes, message):
    text = refusal(tmp_path, axes)
    assert message in text and str(tmp_path / "axes.toml") in text and "\n" not in text


@pytest.mark.slow
def test_a_study_with_axes_runs_resumes_and_records_every_arm_once(tmp_path, test_corpus):
    text = with_corpus(TINY.format(trials=2, seeds="[1]"), test_corpus)
    path = tmp_path / "tiny.toml"
    path.write_text(text + '[axes]\n"model.cell" = ["gru", "rnn_tanh"]\n')
    study = load_study(path)
    assert list(study.variants) == ["locked_only@cell=gru", "weight_only@cell=gru", "locked_only@cell=rnn_tanh",
                                    "weight_only@cell=rnn_tanh"]
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    slots, started = [Slot(0, "cpu", 1), Slot(1, "cpu", 1)], []

    def interrupt(line):  # Ctrl-C once, when both slots have started a trial
        if " start  " in line:
            started.append(line)
            if len(started) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(study, storage=storage, tracking_uri=uri, slots=slots, runs_dir=tmp_path / "runs", log=interrupt)
    run_study(study, storage=storage, tracking_uri=uri, slots=slots, runs_dir=tmp_path / "runs", log=lambda *a: None)
    _, runs, parents = child_runs(uri, study.name)
    finished = [(r.data.tags["variant"], r.data.tags["phase"], r.data.tags["trial"]) for r in runs
                if r.data.tags["state"] == "finished"]
    assert len(finished) == len(set(finished)) == 4 * (2 + 1)  # every arm: its search budget and one seed
    for run in runs + parents:  # MLflow says which arm: its variant and each axis value, as tags
        arm = study.variants[run.data.tags["variant"]]
        assert run.data.tags["base_variant"] == arm.variant
        assert run.data.tags["axis.model.cell"] == dict(arm.axes)["model.cell"]
    for run in runs:
        if run.data.tags["state"] == "finished":
            assert run.data.params["model.cell"] == run.data.tags["axis.model.cell"]
    assert sorted(p.info.status for p in parents) == ["FINISHED"] * 4
    names = set(optuna.get_all_study_names(storage))
    assert names == {optuna_name(study, arm, phase) for arm in study.variants for phase in (SEARCH, CONFIRM)}
