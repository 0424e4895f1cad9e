"""Study files: validation errors name the file, key and value; variants resolve to the right rates."""

import pytest

from harness.config import SITES, parse_overrides
from harness.study.spec import BUILTIN_VARIANTS, load_study
from harness.errors import UserError

from helpers import REPO, VALID

pytestmark = pytest.mark.fast



def write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def error_of(tmp_path, text) -> str:
    with pytest.raises(UserError) as info:
        load_study(write(tmp_path, text))
    return str(info.value)


def test_shipped_studies_load():
    for path in (REPO / "studies").glob("*.toml"):
        study = load_study(path)
        assert study.variants, path
        for name in study.variants:
            study.run_config(name)


def test_variants_switch_sites_and_modes(tmp_path):
    study = load_study(write(tmp_path, VALID))
    awd = study.run_config("awd").dropout
    assert (awd.embedding, awd.input, awd.hidden, awd.output, awd.weight) == (0.1, 0.4, 0.25, 0.4, 0.5)
    locked = study.run_config("locked_only").dropout
    assert (locked.embedding, locked.weight, locked.input) == (0.0, 0.0, 0.4)
    mine = study.run_config("mine").dropout
    assert mine.hidden_mode == "timestep" and mine.weight == 0.5 and mine.input == 0.4 and mine.output == 0.0


def test_builtin_variants_cover_the_ablation():
    assert {"no_dropout", "naive", "embedding_only", "locked_only", "weight_only", "awd", "awd_no_embedding",
            "awd_no_locked", "awd_no_weight", "awd_naive", "awd_timestep", "naive_recurrent"} == set(BUILTIN_VARIANTS)
    assert BUILTIN_VARIANTS["naive"].hidden_mode == "naive" and "embedding" not in BUILTIN_VARIANTS["naive"].sites
    assert BUILTIN_VARIANTS["awd"].sites == frozenset(SITES)


@pytest.mark.parametrize("text, expected", [
    ("[study\nname=1", "malformed TOML"),
    ("[fixed.train]\nepoch = 3\n[variants.awd]", "unknown key 'fixed.train.epoch' (did you mean 'epochs'?)"),
    ("[fixed.dropout]\ninput = 1.0\n[variants.awd]", "fixed.dropout.input = 1.0 is outside [0, 1)"),
    ("[fixed.dropout]\nweight = -0.1\n[variants.awd]", "weight = -0.1 is outside [0, 1)"),
    ("[fixed.train]\nlr = 'fast'\n[variants.awd]", "fixed.train.lr = 'fast' should be a number"),
    ("[variants.awdd]", "variants.awdd] is not a built-in variant (did you mean 'awd'?)"),
    ("[variants.x]\nsites = ['embeding']\nhidden_mode = 'locked'", "variants.x.sites"),
    ("[variants.x]\nsites = []\nhidden_mode = 'sideways'", "hidden_mode = 'sideways' is not one of"),
    ("[variants.awd]\n[search]\ninput = [0.6, 0.1]", "search.input = [0.6, 0.1] is inverted"),
    ("[variants.awd]\n[search]\nweight = [0.2, 1.5]", "search.weight = 1.5 is outside [0, 1)"),
    ("[study]\nname = '<b>x</b>'\n[variants.awd]", "unsafe for file names, MLflow filters and HTML"),
    ("[study]\nname = '../up'\n[variants.awd]", "unsafe for file names, MLflow filters and HTML"),
    ("[budget]\npruner = 'mean'\n[variants.awd]", "budget.pruner = 'mean' is not one of"),
    ("[budget]\ntrials = 0\n[variants.awd]", "budget.trials = 0 must be > 0"),
    ("[study]\ncorpus='ptb'", "no [variants.NAME] table"),
])
def test_bad_study_files_name_file_key_and_value(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert str(tmp_path / "study.toml") in message
    assert expected in message


def test_unknown_variant_lists_the_study_ones(tmp_path):
    study = load_study(write(tmp_path, VALID))
    with pytest.raises(UserError, match="unknown variant 'awdd' \\(did you mean 'awd'\\?\\); this study defines: awd"):
        study.run_config("awdd")


def test_overrides_are_typed_and_checked(tmp_path):
    study = load_study(write(tmp_path, VALID))
    config = study.run_config("awd", parse_overrides(["train.epochs=1", "dropout.hidden_mode=naive", "train.lr=5"]))
    assert config.train.epochs == 1 and config.dropout.hidden_mode == "naive" and config.train.lr == 5.0
    with pytest.raises(UserError, match="unknown key 'train.epoch'"):
        parse_overrides(["train.epoch=1"])
    with pytest.raises(UserError, match="section.key=value"):
        parse_overrides(["epochs=1"])
    with pytest.raises(UserError, match="input = 1.5 is outside"):
        study.run_config("awd", parse_overrides(["dropout.input=1.5"]))
    with pytest.raises(UserError, match="keeps embedding dropout off"):
        study.run_config("locked_only", parse_overrides(["dropout.embedding=0.2"]))


def test_flat_config_round_trips(tmp_path):
    config = load_study(write(tmp_path, VALID)).run_config("mine")
    assert config.flat()["dropout.hidden_mode"] == "timestep"
    assert type(config).from_dict(config.to_dict()) == config
