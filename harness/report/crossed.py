"""The report's crossed section, for a study with [axes]: each technique's effect at every axis level against its
baseline's arm there and each interaction contrast (harness.report.crossing computes them as ONE Holm family, the
headline's per-level effects among them), as a frame (crossed.csv), a plot of effect against level, sentences, and
the page's section, which leads the page. Without [axes] there is no section: every function returns None or nothing.
"""

import itertools

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from harness import stats
from harness.masks import png_data_uri
from harness.report import crossing, plots
from harness.report.crossing import CrossedResult, axis_label, level_text
from harness.report.summary import StudyResult

EFFECT, INTERACTION = "effect", "interaction"


def cross_result(result: StudyResult) -> CrossedResult | None:
    """The crossed comparisons summarize() made (None without axes)."""
    return result.crossed


def _comparison_columns(c: stats.Comparison) -> dict:
    return {"diff": c.diff, "ci_low": c.ci.low if c.ci else None, "ci_high": c.ci.high if c.ci else None,
            "ci_method": c.ci.method if c.ci else None, "test": c.test or None, "p": c.p, "p_holm": c.p_holm,
            "supported": c.supported, "n_variant": c.n_variant, "n_baseline": c.n_baseline, "note": c.note or None}


def crossed_frame(crossed: CrossedResult) -> pd.DataFrame:
    """One row per comparison of the family (crossed.csv): kind (effect or interaction), variant, baseline, one column
    per axis (the arm's value; for an interaction the values held fixed, empty on the contrasted axis), the
    contrasted axis and its two levels, then variant minus baseline (for an interaction: the effect at `first`
    minus at `second`) in test perplexity with its 95% interval, p, Holm p over the whole family, supported."""
    study, rows = crossed.study, []
    for e in crossed.effects:
        level = dict(e.pair.level)
        rows.append({"kind": EFFECT, "variant": e.pair.variant, "baseline": e.pair.baseline_variant,
                     **{key: level.get(key) for key in study.axes}, "axis": None, "first": None, "second": None,
                     "arm": e.pair.arm, "baseline_arm": e.pair.baseline, **_comparison_columns(e.comparison)})
    for i in crossed.interactions:
        at = dict(i.at)
        rows.append({"kind": INTERACTION, "variant": i.variant, "baseline": i.baseline_variant,
                     **{key: at.get(key) for key in study.axes}, "axis": i.axis, "first": i.levels[0],
                     "second": i.levels[1], "arm": None, "baseline_arm": None, **_comparison_columns(i.comparison)})
    return pd.DataFrame(rows)


def _holm(c: stats.Comparison) -> str:
    return "Holm p < 0.001" if c.p_holm < 0.001 else f"Holm p = {c.p_holm:.3f}"


def _interval(ci) -> str:
    return f"95% CI {ci.low:+.2f}..{ci.high:+.2f}" if ci else "no interval"


def _effect_text(crossed: CrossedResult, pair: crossing.Pair, axis: str) -> str:
    diff, ci, c = crossed.effect(pair)
    where = f"{axis_label(crossed.study, axis)}={dict(pair.level)[axis]}"
    if diff is None:
        return f"not measured yet at {where} ({c.note})"
    verdict = (f"{_holm(c)}: " + ("supported" if c.supported else "not supported")) if c.p_holm is not None else (
        c.note or "not tested")
    return f"{abs(diff):.2f} {'lower' if diff < 0 else 'higher'} at {where} ({diff:+.2f}, {_interval(ci)}; {verdict})"


def crossed_conclusions(crossed: CrossedResult | None) -> list:
    """In words, per technique (its effect against the interactions' baseline) and axis: the effect at each level and
    whether the difference between each two levels is supported. [] without axes."""
    if crossed is None:
        return []
    study, out = crossed.study, []
    groups = itertools.groupby(crossed.interactions, key=lambda i: (i.variant, i.baseline_variant, i.axis, i.at))
    for (variant, baseline, axis, at), group in groups:
        group = list(group)
        levels = list(dict.fromkeys(p for i in group for p in (i.first, i.second)))
        held = f" with {level_text(study, at)}" if at else ""
        out.append(f"{variant} against {baseline}{held}: test perplexity "
                   + " and ".join(_effect_text(crossed, p, axis) for p in levels) + ".")
        label = axis_label(study, axis)
        for i in group:
            c, (a, b) = i.comparison, i.levels
            between = f"The difference in {variant}'s effect between {label}={a} and {label}={b}"
            if c.p_holm is None:
                out.append(f"{between} is not tested ({c.note or 'no confirmation seeds'}).")
                continue
            out.append(f"{between}, {c.diff:+.2f} ppl ({a} minus {b}; {_interval(c.ci)}, {_holm(c)}), "
                       + ("is supported." if c.supported else "is not supported."))
    return out


def plot_crossed(crossed: CrossedResult | None) -> Figure | None:
    """Effect (arm minus baseline's arm, test ppl) against the first axis's levels: one line per technique, bars the
    95% intervals; one column per baseline, one row per combination of the other axes. None when nothing is
    measured yet. A technique the axis cannot act on has one arm for every level: drawn dotted, the same at each."""
    if crossed is None or not any(e.comparison.diff is not None for e in crossed.effects):
        return None
    study = crossed.study
    first, *others = study.axes
    x_levels = study.axes[first]
    rests = list(itertools.product(*(study.axes[k] for k in others)))
    baselines = list(dict.fromkeys(e.pair.baseline_variant for e in crossed.effects))
    baselines.sort(key=lambda b: b != crossing.NO_DROPOUT)  # each technique's own effect first
    colors = plots.palette(dict.fromkeys(arm.variant for arm in study.variants.values()))
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(4.6 * len(baselines) + 1.6, 3.2 * len(rests) + 0.8), layout="constrained")
        axes = fig.subplots(len(rests), len(baselines), squeeze=False, sharey=True)
    for row, rest in enumerate(rests):
        held = dict(zip(others, rest))
        for col, baseline in enumerate(baselines):
            ax = axes[row, col]
            # Oriented as arm minus baseline, awd's own effect against no_dropout included (measured once, turned).
            mine = [(p, *crossed.effect(p)[:2]) for p in crossing.effects_against(study, baseline)
                    if all(held.get(k, v) == v for k, v in p.level)]
            variants = list(dict.fromkeys(p.variant for p, _, _ in mine))
            for n, variant in enumerate(variants):
                # Dodged sideways so the bars of techniques at one level do not hide each other.
                shift = (n - (len(variants) - 1) / 2) * 0.08
                xs, ys, lows, highs, acts = [], [], [], [], True
                for x, value in enumerate(x_levels):
                    found = [(p, diff, ci) for p, diff, ci in mine
                             if p.variant == variant and dict(p.level).get(first, value) == value]
                    if not found or found[0][1] is None:
                        continue
                    pair, diff, ci = found[0]
                    acts = first in dict(pair.level)
                    xs.append(x + shift)
                    ys.append(diff)
                    lows.append(diff - ci.low if ci else 0.0)
                    highs.append(ci.high - diff if ci else 0.0)
                if xs:
                    ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o-" if acts else "o:", color=colors[variant],
                                capsize=4, label=_label(variant) + ("" if acts else " (one arm)"))
            ax.axhline(0, color=plots.GREY, linewidth=0.8)
            ax.set_xticks(range(len(x_levels)), [str(v) for v in x_levels])
            ax.set_xlim(-0.5, len(x_levels) - 0.5)
            ax.set_xlabel(axis_label(study, first))
            title = f"against {baseline}" + (f"\n{level_text(study, tuple(held.items()))}" if held else "")
            ax.set_title(_label(title), fontsize=10)
            ax.legend(fontsize=8, frameon=False)
        axes[row, 0].set_ylabel("Δ test ppl (arm − baseline)\nnegative: lower is better")
    return fig


def _label(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib would read $...$ in a variant name as math


def _row(c: stats.Comparison, **columns) -> dict:
    return {**columns, "diff": "—" if c.diff is None else f"{c.diff:+.2f}",
            "ci": f"{c.ci.low:+.2f}, {c.ci.high:+.2f}" if c.ci else "", "note": c.note,
            "p": "" if c.p is None else "< 0.001" if c.p < 0.001 else f"{c.p:.3f}", "test": c.test,
            "p_holm": "—" if c.p_holm is None else "< 0.001" if c.p_holm < 0.001 else f"{c.p_holm:.3f}",
            "supported": "—" if c.p_holm is None else "yes" if c.supported else "no"}


def crossed_section(result: StudyResult) -> dict | None:
    """The page's crossed section (templates/crossed.html.j2); None without axes."""
    crossed = cross_result(result)
    if crossed is None:
        return None
    study = crossed.study
    effects = [_row(e.comparison, variant=e.pair.variant, baseline=e.pair.baseline_variant,
                    level=level_text(study, e.pair.level), arm=e.pair.arm, baseline_arm=e.pair.baseline)
               for e in crossed.effects]
    contrasts = [_row(i.comparison, variant=i.variant, baseline=i.baseline_variant, axis=axis_label(study, i.axis),
                      first=i.levels[0], second=i.levels[1], at=level_text(study, i.at) if i.at else "")
                 for i in crossed.interactions]
    tested = sum(c.p is not None for c in crossed.family)
    fig = plot_crossed(crossed)
    notes = [
        "Each effect is an arm's mean test perplexity minus its baseline's arm at the same axis level, paired over the "
        "confirmation seeds; negative means lower (better) perplexity. An arm an axis cannot act on (a rate axis on a "
        "variant without that site) has one arm for all of that axis's levels.",
        "An interaction contrast is a technique's effect at one level minus its effect at another level of one axis, "
        "the other axes held fixed: the paired per-seed effects at the first level against those at the second.",
        f"These {len(crossed.family)} comparisons ({len(crossed.effects)} effects, {len(crossed.interactions)} "
        f"interaction contrasts; {tested} tested) are the report's one family for Holm's adjustment: the headline's "
        f"Δ and Holm p are these effects against {crossed.reference}'s arm at each level. An effect or a difference "
        f"between levels is called supported when its Holm-adjusted p is below {stats.ALPHA}. Intervals are 95%, per "
        "comparison, unadjusted.",
    ]
    if any(e.pair.variant == crossing.NO_DROPOUT and e.pair.baseline_variant == crossed.reference
           for e in crossed.effects):
        notes.append(f"{crossed.reference}'s own effect against {crossing.NO_DROPOUT} is measured once, as the row "
                     f"{crossing.NO_DROPOUT} against {crossed.reference}: the sentences and the plot show it with "
                     "its sign turned.")
    if result.reference_note:
        notes.insert(0, result.reference_note)
    # An effect acts at two levels of some axis, so it always has a sentence: none means no effect at all.
    said = crossed_conclusions(crossed) or [
        "There is no effect to measure: no arm has another variant's arm at its level to be compared with."]
    return {"conclusions": said, "effects": effects, "interactions": contrasts,
            "image": png_data_uri(fig) if fig is not None else None, "notes": notes,
            "axes": [axis_label(study, k) for k in study.axes], "x_axis": axis_label(study, next(iter(study.axes)))}
