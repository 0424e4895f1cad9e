"""The report's crossed section for a study with [axes]: effect rows per level, one Holm family with the interaction
contrasts, the sentences and the plot, recomputed independently with scipy from synthetic per-seed results; and one
tiny study with an axis run end to end, whose page shows the section.

Run: .venv/bin/python -m pytest -q tests/test_crossed_report.py
"""

import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape
from scipy import stats as scipy_stats

from harness import results
from harness.masks import png_data_uri, weight_figure
from harness.report import build_report
from harness.report.page import render_html
from harness.report.paper import caption, markdown_table
from harness.report.plots import palette, plot_isolation
from harness.report.summary import summarize
from harness.report.crossed import cross_result, crossed_conclusions, crossed_frame, crossed_section, plot_crossed
from harness.report.crossing import cross
from harness.report.summary import StudyResult, VariantResult
from harness.study.coordinator import run_study
from harness.study.scheduler import Slot
from harness.study.spec import load_study
from helpers import child_runs, logged_run, study_log, tiny_study

pytestmark = pytest.mark.fast

BASE = """
[study]
name = "crossed"
[fixed.model]
n_layers = 2
[fixed.dropout]
weight = 0.3
embedding = 0.1
[variants.no_dropout]
[variants.weight_only]
[variants.embedding_only]
"""
SEEDS = range(1, 7)
# True effect against no_dropout: weight drop helps the LSTM much more than the GRU; embedding dropout the same.
EFFECT = {"no_dropout": {"lstm": 0.0, "gru": 0.0}, "weight_only": {"lstm": -30.0, "gru": -5.0},
          "embedding_only": {"lstm": -10.0, "gru": -10.0}, "awd": {"lstm": -40.0, "gru": -20.0}}


def study_with(tmp_path, axes='"model.cell" = ["lstm", "gru"]\n', extra=""):
    path = tmp_path / "crossed.toml"
    path.write_text(BASE + extra + ("[axes]\n" + axes if axes else ""))
    return load_study(path)


def synthetic(study, seed=1) -> dict:
    """arm -> {seed: test ppl}: a per-cell, per-seed base shared by the arms of a cell (so pairing matters), plus
    the variant's true effect and its own noise."""
    rng = np.random.default_rng(seed)
    base = {c: {s: 500 + rng.normal(0, 8) for s in SEEDS} for c in ("lstm", "gru")}
    out = {}
    for arm, spec in study.variants.items():
        cell = dict(spec.axes).get("model.cell", "lstm")
        noise = 0.0 if spec.variant == "no_dropout" else 2.0
        out[arm] = {s: v + EFFECT[spec.variant][cell] + rng.normal(0, noise) for s, v in base[cell].items()}
    return out


def paired(a: dict, b: dict) -> tuple:
    """(mean difference, (low, high), p) of a - b over their seeds, from scipy alone."""
    seeds = sorted(a)
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    test = scipy_stats.ttest_rel(x, y)
    ci = test.confidence_interval(0.95)
    return float(np.mean(x - y)), (ci.low, ci.high), float(test.pvalue)


def holm(p_values: list) -> list:
    """Holm's step-down adjustment, written out apart from harness.stats."""
    m, order = len(p_values), np.argsort(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def effect_per_seed(test_ppl, variant, baseline, cell) -> dict:
    arm, base = test_ppl[f"{variant}@cell={cell}"], test_ppl[f"{baseline}@cell={cell}"]
    return {s: arm[s] - base[s] for s in arm}


def test_one_row_per_technique_and_level_and_one_contrast_per_technique_recomputed_with_scipy(tmp_path):
    study = study_with(tmp_path)
    test_ppl = synthetic(study)
    frame = crossed_frame(cross(study, test_ppl))
    effects = frame[frame.kind == "effect"]
    assert [(r.variant, r.baseline, r["model.cell"]) for _, r in effects.iterrows()] == [
        (v, "no_dropout", c) for c in ("lstm", "gru") for v in ("weight_only", "embedding_only")]
    for _, row in effects.iterrows():
        diff, (low, high), p = paired(test_ppl[row.arm], test_ppl[row.baseline_arm])
        assert row.arm == f"{row.variant}@cell={row['model.cell']}"
        assert (row["diff"], row.ci_low, row.ci_high, row.p) == pytest.approx((diff, low, high, p), rel=1e-9)
    contrasts = frame[frame.kind == "interaction"]
    assert [(r.variant, r.axis, r["first"], r.second) for _, r in contrasts.iterrows()] == [
        ("weight_only", "model.cell", "lstm", "gru"), ("embedding_only", "model.cell", "lstm", "gru")]
    for _, row in contrasts.iterrows():
        diff, (low, high), p = paired(effect_per_seed(test_ppl, row.variant, "no_dropout", "lstm"),
                                      effect_per_seed(test_ppl, row.variant, "no_dropout", "gru"))
        assert (row["diff"], row.ci_low, row.ci_high, row.p) == pytest.approx((diff, low, high, p), rel=1e-9)
    weight, embedding = contrasts.itertuples()
    assert weight.diff < -15 and weight.supported and not embedding.supported  # the planted interaction alone


def test_effects_and_contrasts_are_one_holm_family(tmp_path):
    study = study_with(tmp_path)
    frame = crossed_frame(cross(study, synthetic(study, seed=3)))
    assert list(frame.p_holm) == pytest.approx(holm(list(frame.p)), rel=1e-12)
    # Not two families: adjusting the effects alone would give smaller Holm p-values.
    effects = frame[frame.kind == "effect"]
    assert any(alone < together for alone, together in zip(holm(list(effects.p)), effects.p_holm))
    assert list(frame.supported) == [p < 0.05 for p in frame.p_holm]


def test_with_the_reference_its_own_effect_is_measured_once_and_read_turned(tmp_path):
    study = study_with(tmp_path, extra="[variants.awd]\n")
    test_ppl = synthetic(study)
    crossed = cross(study, test_ppl)
    frame = crossed_frame(crossed)
    pairs = [(r.arm, r.baseline_arm) for r in frame[frame.kind == "effect"].itertuples()]
    assert ("no_dropout@cell=gru", "awd@cell=gru") in pairs and ("awd@cell=gru", "no_dropout@cell=gru") not in pairs
    assert len(frame) == 6 + 4 + 3  # against awd (3 per cell), against no_dropout (2 per cell), 3 contrasts
    said = " ".join(crossed_conclusions(crossed))
    diff, (low, high), _ = paired(test_ppl["awd@cell=gru"], test_ppl["no_dropout@cell=gru"])
    assert "awd against no_dropout: test perplexity " in said
    assert f"{abs(diff):.2f} lower at cell=gru ({diff:+.2f}, 95% CI {low:+.2f}..{high:+.2f};" in said


def test_sentences_say_each_level_and_whether_the_difference_is_supported(tmp_path):
    study = study_with(tmp_path)
    test_ppl = synthetic(study)
    crossed = cross(study, test_ppl)
    frame = crossed_frame(crossed).set_index(["kind", "variant", "model.cell"], drop=False)
    said = crossed_conclusions(crossed)
    assert len(said) == 4  # per technique: its effect at each level, then the difference between them
    for sentence, variant in zip(said[::2], ("weight_only", "embedding_only")):
        assert sentence.startswith(f"{variant} against no_dropout: test perplexity ")
        for cell in ("lstm", "gru"):
            diff, (low, high), _ = paired(test_ppl[f"{variant}@cell={cell}"], test_ppl[f"no_dropout@cell={cell}"])
            row = frame.loc[("effect", variant, cell)]
            holm_p = "Holm p < 0.001" if row.p_holm < 0.001 else f"Holm p = {row.p_holm:.3f}"
            assert (f"{abs(diff):.2f} lower at cell={cell} ({diff:+.2f}, 95% CI {low:+.2f}..{high:+.2f}; {holm_p}: "
                    f"{'supported' if row.p_holm < 0.05 else 'not supported'})") in sentence
    for sentence, variant, verdict in ((said[1], "weight_only", "is supported."),
                                       (said[3], "embedding_only", "is not supported.")):
        diff, (low, high), _ = paired(effect_per_seed(test_ppl, variant, "no_dropout", "lstm"),
                                      effect_per_seed(test_ppl, variant, "no_dropout", "gru"))
        assert sentence.startswith(f"The difference in {variant}'s effect between cell=lstm and cell=gru, "
                                   f"{diff:+.2f} ppl (lstm minus gru; 95% CI {low:+.2f}..{high:+.2f}, Holm p ")
        assert sentence.endswith(verdict)


def test_with_two_axes_a_sentence_and_a_plot_row_per_value_of_the_other_axis(tmp_path):
    study = study_with(tmp_path, axes='"model.cell" = ["lstm", "gru"]\n"train.train_tokens" = [2000, 4000]\n')
    rng = np.random.default_rng(1)
    test_ppl = {arm: {s: 500 + rng.normal(0, 5) for s in SEEDS} for arm in study.variants}
    crossed = cross(study, test_ppl)
    said = crossed_conclusions(crossed)
    assert any(s.startswith("weight_only against no_dropout with train_tokens=2000: test perplexity ") and
               "at cell=lstm" in s and "at cell=gru" in s for s in said)
    assert any(s.startswith("weight_only against no_dropout with cell=gru: test perplexity ") and
               "at train_tokens=2000" in s and "at train_tokens=4000" in s for s in said)
    fig = plot_crossed(crossed)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["against no_dropout\ntrain_tokens=2000", "against no_dropout\ntrain_tokens=4000"]


def test_the_plot_draws_each_techniques_effect_and_interval_at_each_level(tmp_path):
    study = study_with(tmp_path, extra="[variants.awd]\n")
    test_ppl = synthetic(study)
    fig = plot_crossed(cross(study, test_ppl))
    against_no_dropout, against_awd = fig.axes
    assert against_no_dropout.get_title() == "against no_dropout" and against_awd.get_title() == "against awd"
    drawn = {bars.get_label(): bars for bars in against_no_dropout.containers}
    assert sorted(drawn) == ["awd", "embedding_only", "weight_only"]  # one line per technique
    for variant, bars in drawn.items():
        expected = [paired(test_ppl[f"{variant}@cell={c}"], test_ppl[f"no_dropout@cell={c}"]) for c in ("lstm", "gru")]
        line, _, (vertical,) = bars.lines
        assert list(line.get_ydata()) == pytest.approx([diff for diff, _, _ in expected])
        assert np.diff(line.get_xdata()) == pytest.approx([1.0])  # lstm at 0, gru at 1 (dodged alike)
        ends = [end for segment in vertical.get_segments() for end in (segment[0][1], segment[1][1])]
        assert ends == pytest.approx([end for _, ci, _ in expected for end in ci])


def test_a_rate_axis_draws_a_technique_it_cannot_act_on_as_one_arm(tmp_path):
    study = study_with(tmp_path, axes='"dropout.weight" = [0.2, 0.5]\n')
    rng = np.random.default_rng(2)
    fig = plot_crossed(cross(study, {arm: {s: 500 + rng.normal(0, 5) for s in SEEDS} for arm in study.variants}))
    drawn = {bars.get_label(): bars.lines[0] for bars in fig.axes[0].containers}
    assert sorted(drawn) == ["embedding_only (one arm)", "weight_only"]
    assert drawn["embedding_only (one arm)"].get_linestyle() == ":" and drawn["weight_only"].get_linestyle() == "-"
    (same,) = set(drawn["embedding_only (one arm)"].get_ydata())  # one arm: the same effect at every level


# --- the headline of a study with axes: every comparison within one axis level ---------------------------------
# The GRU's arms are all far better than the LSTM's: a headline ranking arms across cells would pick gru arms as
# "best" and compare LSTM arms with them. Within each cell awd is best.
CELL_BASE = {"lstm": 560.0, "gru": 480.0}


def crossed_log(tmp_path, variants=("no_dropout", "weight_only", "embedding_only", "awd")):
    path = tmp_path / "crossed.toml"
    path.write_text(BASE.split("[variants.no_dropout]")[0] + "".join(f"[variants.{v}]\n" for v in variants)
                    + '[axes]\n"model.cell" = ["lstm", "gru"]\n')
    study = load_study(path)
    rng = np.random.default_rng(5)
    base = {c: {s: CELL_BASE[c] + rng.normal(0, 8) for s in SEEDS} for c in CELL_BASE}
    test_ppl = {arm: {s: v + EFFECT[spec.variant][dict(spec.axes)["model.cell"]] + rng.normal(0, 2)
                      for s, v in base[dict(spec.axes)["model.cell"]].items()}
                for arm, spec in study.variants.items()}
    runs = [logged_run(arm, seed=s, test_ppl=v) for arm, by_seed in test_ppl.items() for s, v in by_seed.items()]
    return study, test_ppl, study_log(study, runs)


def cells_named(sentence: str) -> set:
    return set(re.findall(r"cell=(\w+)", sentence))


def test_with_axes_the_headline_compares_each_arm_with_awds_arm_at_its_own_level(tmp_path):
    study, test_ppl, log = crossed_log(tmp_path)
    found = results.from_log(log)
    headline, crossed = found.headline, found.crossed
    assert found.reference == "awd" and "not in this study" not in " ".join(found.conclusions)
    # Grouped by level (the [axes] order), best first within each: never one ranking across cells.
    mean = {arm: np.mean(list(by_seed.values())) for arm, by_seed in test_ppl.items()}
    assert list(headline.variant) == [arm for c in ("lstm", "gru")
                                      for arm in sorted((a for a in mean if a.endswith(f"={c}")), key=mean.get)]
    assert [arm.split("@")[0] for arm in headline.variant[:4]] != [arm.split("@")[0] for arm in headline.variant[4:]]
    assert list(headline.reference) == [True, False, False, False] * 2
    family = crossed.set_index(["arm", "baseline_arm"])
    for row in headline.itertuples():
        cell = row.variant.split("=")[1]
        assert row.reference_arm == f"awd@cell={cell}"
        if row.reference:
            assert pd.isna(row.diff_to_reference)
            continue
        diff, (low, high), p = paired(test_ppl[row.variant], test_ppl[f"awd@cell={cell}"])
        assert (row.diff_to_reference, row.diff_ci_low_to_reference, row.diff_ci_high_to_reference,
                row.p_to_reference) == pytest.approx((diff, low, high, p), rel=1e-9)
        # One Holm family for the whole report: the headline's Holm p is the crossed section's for the same pair.
        assert row.p_holm_to_reference == pytest.approx(family.loc[(row.variant, row.reference_arm), "p_holm"])
    assert list(crossed.p_holm) == pytest.approx(holm(list(crossed.p)), rel=1e-12)
    assert all(cells_named(a) == cells_named(b) for a, b in zip(found.comparisons.variant, found.comparisons.baseline))
    assert caption(headline).startswith("Test perplexity over the confirmation seeds: mean ± sd and its 95% interval; "
                                        "diff: mean difference to awd's arm at the same axis level (negative is "
                                        "better)")
    assert list(headline["axis.model.cell"]) == [arm.split("=")[1] for arm in headline.variant]
    # The paper's table bolds the lowest mean of each level, not one arm across levels.
    bold = [line.split(" | ")[0].strip("|* ") for line in markdown_table(headline).splitlines() if "**" in line]
    assert bold == ["awd@cell=lstm", "awd@cell=gru"]
    assert caption(headline).endswith("the lowest mean at each axis level.")


def test_with_axes_the_isolation_plot_ranks_searches_within_each_level(tmp_path):
    study, _, _ = crossed_log(tmp_path)
    # Every GRU arm's search is better than every LSTM arm's: one ranking would put all of them on top.
    trials = [(arm, {}, CELL_BASE[dict(spec.axes)["model.cell"]] + i, None)
              for i, (arm, spec) in enumerate(reversed(study.variants.items()))]
    result = summarize(study_log(study, [], trials))
    fig = plot_isolation(result, palette(study.variants))
    labels = [tick.get_text() for tick in fig.axes[0].get_yticklabels()]
    assert [label.split("=")[1] for label in labels] == ["lstm"] * 4 + ["gru"] * 4
    values = {arm: value for arm, _, value, _ in trials}
    assert all(values[a] < values[b] for a, b in zip(labels, labels[1:]) if a.split("=")[1] == b.split("=")[1])


def test_with_a_rate_axis_an_arm_it_cannot_act_on_competes_at_every_level_for_the_bold_row(tmp_path):
    study = study_with(tmp_path, axes='"dropout.weight" = [0.2, 0.5]\n')  # no_dropout and embedding_only: one arm
    means = {"no_dropout": 520.0, "embedding_only": 490.0, "weight_only@weight=0.2": 480.0,
             "weight_only@weight=0.5": 500.0}
    runs = [logged_run(arm, seed=s, test_ppl=mean + s) for arm, mean in means.items() for s in (1, 2, 3)]
    headline = results.from_log(study_log(study, runs)).headline
    assert pd.isna(headline.set_index("variant").loc["embedding_only", "axis.dropout.weight"])
    bold = [line.split(" | ")[0].strip("|* ") for line in markdown_table(headline).splitlines() if "**" in line]
    assert sorted(bold) == ["embedding_only", "weight_only@weight=0.2"]  # best at 0.5: the arm shared by both levels


def test_with_axes_the_crossed_answer_leads_and_no_sentence_compares_across_levels(tmp_path):
    study, test_ppl, log = crossed_log(tmp_path)
    found = results.from_log(log)
    crossed_said = crossed_conclusions(found.summary.crossed)
    said = found.conclusions
    assert said[:len(crossed_said)] == crossed_said and crossed_said[0].startswith("weight_only against no_dropout")
    rest = said[len(crossed_said):]
    for cell in ("lstm", "gru"):
        arms = sorted(("awd", "embedding_only", "weight_only", "no_dropout"),
                      key=lambda v: np.mean(list(test_ppl[f"{v}@cell={cell}"].values())))
        ordering = (f"At cell={cell}, ordered by mean test perplexity (lower is better; 6 confirmation seeds): "
                    + " < ".join(f"{v} {np.mean(list(test_ppl[f'{v}@cell={cell}'].values())):.2f}" for v in arms) + ".")
        assert ordering in rest
    assert all(len(cells_named(sentence)) <= 1 for sentence in rest)  # the crossed ones contrast levels, by design
    # Effects against no_dropout are the crossed section's to say; the headline's sentences add those against awd.
    assert not any(s.startswith(("weight_only@cell=lstm beats no_dropout", "Not supported: weight_only@cell=lstm ahead "
                                 "of no_dropout")) for s in rest)
    assert any("weight_only@cell=gru" in s and "awd@cell=gru" in s for s in rest)
    page = render_html(found)
    assert page.index('id="crossed-question"') < page.index('id="conclusions"') < page.index('id="headline"')
    assert "vs awd at the same level" in page and "Conclusions per arm" in page
    assert str(escape("Δ is the arm's mean minus the mean of awd's arm at the same axis level")) in page


@pytest.mark.parametrize("variants, reference, why", [
    (("no_dropout", "weight_only", "embedding_only"), "no_dropout", ""),
    (("weight_only", "embedding_only"), "weight_only",
     " (the first variant of the study file; neither awd nor no_dropout is in it)")])
def test_with_axes_and_no_awd_the_reference_is_chosen_before_the_results_and_compared_at_each_level(
        tmp_path, variants, reference, why):
    # embedding_only is the best variant at every level: a reference picked from the results would be it.
    study, test_ppl, log = crossed_log(tmp_path, variants=variants)
    found = results.from_log(log)
    note = f"awd is not in this study, so each arm is compared with {reference}'s arm at its level{why}."
    assert found.reference == reference and found.summary.reference_note == note
    assert found.conclusions[0] == note  # the crossed sentences that follow are against it too
    headline = found.headline.set_index("variant")
    assert list(headline.index[headline.reference]) == [f"{reference}@cell=lstm", f"{reference}@cell=gru"]
    assert headline.loc["embedding_only@cell=gru", "reference_arm"] == f"{reference}@cell=gru"
    diff, _, p = paired(test_ppl["embedding_only@cell=gru"], test_ppl[f"{reference}@cell=gru"])
    assert (headline.loc["embedding_only@cell=gru", "diff_to_reference"],
            headline.loc["embedding_only@cell=gru", "p_to_reference"]) == pytest.approx((diff, p))
    assert all(cells_named(a) == cells_named(b) for a, b in zip(found.comparisons.variant, found.comparisons.baseline))
    assert str(escape(note)) in render_html(found).split('id="conclusions"')[0]  # the crossed notes, above


def test_with_a_rate_axis_an_arm_it_cannot_act_on_is_compared_with_the_reference_at_every_level(tmp_path):
    study = study_with(tmp_path, axes='"dropout.weight" = [0.2, 0.5]\n', extra="[variants.awd]\n")
    rng = np.random.default_rng(4)
    test_ppl = {arm: {s: 500 + 10 * i + rng.normal(0, 3) for s in SEEDS} for i, arm in enumerate(study.variants)}
    runs = [logged_run(arm, seed=s, test_ppl=v) for arm, by_seed in test_ppl.items() for s, v in by_seed.items()]
    found = results.from_log(study_log(study, runs))
    effects = found.crossed[found.crossed.kind == "effect"].set_index(["arm", "baseline_arm"])
    for shared in ("no_dropout", "embedding_only"):  # weight drop is off in both: one arm for both levels
        for rate in (0.2, 0.5):
            row = effects.loc[(shared, f"awd@weight={rate}")]
            diff, _, p = paired(test_ppl[shared], test_ppl[f"awd@weight={rate}"])
            assert (row["diff"], row.p, row["dropout.weight"]) == pytest.approx((diff, p, rate))
    headline = found.headline.set_index("variant")
    # One Δ per level does not fit one cell: the row says where they are instead of showing one of them.
    shared = headline.loc["embedding_only"]
    assert pd.isna(shared.diff_to_reference) and pd.isna(shared.reference_arm)
    assert shared.note_to_reference == ("one comparison per level, against awd@weight=0.2, awd@weight=0.5: see the "
                                        "crossed section (crossed.csv)")
    assert headline.loc["weight_only@weight=0.5", "reference_arm"] == "awd@weight=0.5"
    assert shared.note_to_reference in render_html(found)


def result_of(study, test_ppl) -> StudyResult:
    rows = [VariantResult(arm, "", (), None, {}, values, None, 0.0) for arm, values in test_ppl.items()]
    crossed = cross(study, test_ppl)
    return StudyResult(SimpleNamespace(study=study), rows, [e.comparison for e in crossed.effects] if crossed else [],
                       "awd", "", [], crossed=crossed)


def test_without_axes_there_is_no_section(tmp_path):
    study = study_with(tmp_path, axes="")
    result = result_of(study, synthetic(study))
    assert cross_result(result) is None and crossed_section(result) is None and crossed_conclusions(None) == []
    assert plot_crossed(None) is None


def test_the_section_before_any_confirmation_says_so(tmp_path):
    study = study_with(tmp_path)
    section = crossed_section(result_of(study, {arm: {} for arm in study.variants}))
    assert section["image"] is None and {row["diff"] for row in section["effects"]} == {"—"}
    assert all("not measured yet at cell=" in s for s in section["conclusions"][::2])
    assert all(s.endswith("is not tested (no confirmation seeds on one side).") for s in section["conclusions"][1::2])


def test_a_section_with_no_effect_to_measure_says_so_rather_than_that_nothing_finished(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text(BASE.split("[variants.no_dropout]")[0]
                    + '[variants.weight_only]\n[axes]\n"model.cell" = ["lstm", "gru"]\n')  # one variant: no baseline
    study = load_study(path)
    section = crossed_section(result_of(study, {arm: {s: 500.0 + s * s for s in SEEDS} for arm in study.variants}))
    assert section["conclusions"] == [
        "There is no effect to measure: no arm has another variant's arm at its level to be compared with."]


@pytest.mark.slow
def test_a_tiny_study_with_an_axis_reports_the_crossed_question(tmp_path, test_corpus):
    study = tiny_study(tmp_path, test_corpus, trials=1, seeds="[1, 2]", edits=[
        ("[variants.locked_only]", "[variants.no_dropout]\n[variants.locked_only]"),
        ("epochs = 2", "epochs = 1"),
        ("[search]", '[axes]\n"model.cell" = ["lstm", "rnn_tanh"]\n[search]')])
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_study(study, storage=storage, tracking_uri=uri, slots=[Slot(0, "cpu", 1), Slot(1, "cpu", 1)],
              runs_dir=tmp_path / "runs", log=lambda *a: None)
    report = build_report(study, uri, storage, tmp_path / "reports")
    page = report.page.read_text()
    assert 'id="crossed-question"' in page and 'id="crossed"' in page and 'id="interactions"' in page
    assert re.search(r'<img id="crossed-plot" src="data:image/png;base64,', page)
    # The numbers, recomputed from what MLflow holds: test perplexity per arm and seed.
    _, runs, _ = child_runs(uri, study.name)
    test_ppl = {}
    for run in runs:
        if run.data.tags["phase"] == "confirm" and run.data.tags["state"] == "finished":
            test_ppl.setdefault(run.data.tags["variant"], {})[int(run.data.tags["seed"])] = run.data.metrics["test_ppl"]
    table = pd.read_csv(report.page.parent / "crossed.csv")
    effects = table[table.kind == "effect"]
    assert len(effects) == 4 and len(table) == 6  # 2 techniques x 2 cells, and one contrast per technique
    for row in effects.itertuples():
        diff, (low, high), p = paired(test_ppl[row.arm], test_ppl[row.baseline_arm])
        assert (row.diff, row.ci_low, row.ci_high, row.p) == pytest.approx((diff, low, high, p), rel=1e-6)
    assert list(table.p_holm) == pytest.approx(holm(list(table.p)), rel=1e-9)
    sentences = [s for s in report.conclusions if " against no_dropout: test perplexity " in s]
    assert len(sentences) == 2 and all(s in page for s in ("at cell=lstm", "at cell=rnn_tanh"))
    assert any(s.startswith("The difference in weight_only's effect between cell=lstm and cell=rnn_tanh")
               for s in report.conclusions)
    for sentence in report.conclusions:
        assert str(escape(sentence)) in page  # as the autoescaping template writes it
    # Issue #18 item 4: the page's weight-drop diagram is the per-cell one, the vanilla RNN's H x H beside GRU's and
    # LSTM's gate blocks.
    weight = weight_figure()
    assert [mask.shape for mask in weight.masks.values()] == [(6, 6)] * 2 + [(18, 6)] * 2 + [(24, 6)] * 2
    assert png_data_uri(weight.figure) in page
    assert "rnn_tanh and rnn_relu: H x H; gru: 3H x H, gates r, z, n; lstm: 4H x H, gates i, f, g, o" in page
