"""The crossed question of a study with axes: which effects are measured at each level, which interaction contrasts
test whether an effect differs between levels, and the contrast's numbers."""

import numpy as np
import pytest

from harness import stats
from harness.report.crossing import arms_at, compare_interaction, crossed_pairs, interactions
from harness.study.spec import load_study

pytestmark = pytest.mark.fast

BASE = """
[study]
name = "crossed"
[fixed.model]
n_layers = 2
[fixed.dropout]
weight = 0.3
input = 0.3
[variants.no_dropout]
[variants.weight_only]
[variants.awd]
"""


def crossed(tmp_path, axes: str):
    path = tmp_path / "crossed.toml"
    path.write_text(BASE + "[axes]\n" + axes)
    return load_study(path)


def test_each_effect_is_measured_at_every_level_against_the_baselines_arm_at_that_level(tmp_path):
    study = crossed(tmp_path, '"model.cell" = ["lstm", "gru", "rnn_tanh"]\n')
    pairs = [(p.arm, p.baseline) for p in crossed_pairs(study)]
    levels = ("lstm", "gru", "rnn_tanh")
    assert pairs == ([(f"{v}@cell={c}", f"awd@cell={c}") for c in levels for v in ("no_dropout", "weight_only")]
                     + [(f"weight_only@cell={c}", f"no_dropout@cell={c}") for c in levels])


def test_an_interaction_contrast_per_technique_and_pair_of_levels(tmp_path):
    study = crossed(tmp_path, '"model.cell" = ["lstm", "gru", "rnn_tanh"]\n')
    found = [(i.variant, i.baseline_variant, i.axis, i.levels) for i in interactions(study)]
    pairs_of_levels = [("lstm", "gru"), ("lstm", "rnn_tanh"), ("gru", "rnn_tanh")]
    assert found == ([("weight_only", "no_dropout", "model.cell", levels) for levels in pairs_of_levels]
                     + [("awd", "no_dropout", "model.cell", levels) for levels in pairs_of_levels])


def test_with_two_axes_a_contrast_holds_the_other_axis_fixed(tmp_path):
    study = crossed(tmp_path, '"model.cell" = ["lstm", "gru"]\n"train.train_tokens" = [2000, 4000]\n')
    weight = [i for i in interactions(study) if i.variant == "weight_only"]
    assert [(i.axis, i.levels, i.at) for i in weight] == [
        ("model.cell", ("lstm", "gru"), (("train.train_tokens", 2000),)),
        ("model.cell", ("lstm", "gru"), (("train.train_tokens", 4000),)),
        ("train.train_tokens", (2000, 4000), (("model.cell", "lstm"),)),
        ("train.train_tokens", (2000, 4000), (("model.cell", "gru"),)),
    ]


def test_a_baseline_the_axis_cannot_act_on_serves_every_level(tmp_path):
    study = crossed(tmp_path, '"dropout.weight" = [0.2, 0.5]\n')
    assert arms_at(study, "no_dropout", {"dropout.weight": 0.5}) == ["no_dropout"]
    assert arms_at(study, "awd", {}) == ["awd@weight=0.2", "awd@weight=0.5"]
    # no_dropout's one arm serves every level, so it is compared with awd's arm at each level (awd's own effect, read
    # turned), and awd's effect against no_dropout is not measured a second time.
    assert [(p.arm, p.baseline, p.level) for p in crossed_pairs(study)] == [
        ("no_dropout", "awd@weight=0.2", (("dropout.weight", 0.2),)),
        ("no_dropout", "awd@weight=0.5", (("dropout.weight", 0.5),)),
        ("weight_only@weight=0.2", "awd@weight=0.2", (("dropout.weight", 0.2),)),
        ("weight_only@weight=0.5", "awd@weight=0.5", (("dropout.weight", 0.5),)),
        ("weight_only@weight=0.2", "no_dropout", (("dropout.weight", 0.2),)),
        ("weight_only@weight=0.5", "no_dropout", (("dropout.weight", 0.5),))]
    (contrast,) = [i for i in interactions(study) if i.variant == "weight_only"]
    assert contrast.levels == (0.2, 0.5) and contrast.first.baseline == contrast.second.baseline == "no_dropout"


def test_the_contrast_is_the_paired_difference_of_per_seed_effects(tmp_path):
    study = crossed(tmp_path, '"model.cell" = ["lstm", "gru"]\n')
    (contrast,) = [i for i in interactions(study) if i.variant == "weight_only"]
    rng = np.random.default_rng(0)
    seeds = range(1, 7)
    base = {c: {s: 500 + rng.normal(0, 5) for s in seeds} for c in ("lstm", "gru")}
    test_ppl = {f"no_dropout@cell={c}": base[c] for c in base}
    test_ppl["weight_only@cell=lstm"] = {s: v - 30 + rng.normal(0, 2) for s, v in base["lstm"].items()}
    test_ppl["weight_only@cell=gru"] = {s: v - 5 + rng.normal(0, 2) for s, v in base["gru"].items()}
    result = compare_interaction(contrast, test_ppl)
    effect = {c: [test_ppl[f"weight_only@cell={c}"][s] - base[c][s] for s in seeds] for c in base}
    expected = stats.compare(dict(zip(seeds, effect["lstm"])), dict(zip(seeds, effect["gru"])))
    assert result.paired and result.diff == pytest.approx(np.mean(effect["lstm"]) - np.mean(effect["gru"]))
    assert (result.ci, result.p) == (expected.ci, expected.p) and result.diff < -20 and result.p < 0.001
    assert result.variant == "weight_only effect at cell=lstm" and result.baseline == "at cell=gru"
