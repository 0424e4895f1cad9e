"""The report's figures, drawn with seaborn and matplotlib from a StudyResult: each function returns a Figure,
or None when there is nothing to draw yet. Deterministic: a rebuilt report draws the same pixels.
"""

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

from harness import stats
from harness.study.rules import CONFIRM, RunState
from harness.report.summary import StudyResult, level_key, searchable_params

GREY, GAP = "#5c6a78", "#e4572e"


def _label(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib would read $...$ in a variant name as math


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(width, height), layout="constrained")
        return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def palette(variants) -> dict:
    """One colour per variant, the same in every figure."""
    names = list(variants)
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


def plot_test_ppl(result: StudyResult, colors: dict) -> Figure | None:
    rows = [r for r in result.rows if r.test_ppl]
    if not rows:
        return None
    fig, axes = _figure(8, 0.45 * len(rows) + 1.1)
    ax = axes[0, 0]
    points = pd.DataFrame([{"variant": _label(r.name), "test_ppl": p} for r in rows for p in r.test_ppl.values()])
    order = [_label(r.name) for r in rows]
    # A swarm, not a jittered strip: the same layout on every rebuild (seaborn's jitter draws from numpy's
    # global random state).
    sns.swarmplot(points, x="test_ppl", y="variant", order=order, hue="variant", hue_order=order,
                  palette=[colors[r.name] for r in rows], size=7, alpha=0.8, legend=False, ax=ax)
    for i, r in enumerate(rows):
        if r.ci:
            ax.errorbar(r.mean, i, xerr=[[r.mean - r.ci.low], [r.ci.high - r.mean]], fmt="D", color="black",
                        markersize=5, capsize=4, zorder=5)
        else:
            ax.plot(r.mean, i, "D", color="black", markersize=5, zorder=5)
    ax.set(xlabel="test perplexity (dots: seeds; diamond and bar: mean and its 95% interval)", ylabel="")
    return fig


def plot_isolation(result: StudyResult, colors: dict) -> Figure | None:
    trials = result.log.trials[result.log.trials.value.notna()]
    study = result.log.study
    # Best first; with axes within each level, as the headline orders them (levels are not ranked against each other).
    rows = sorted((r for r in result.rows if r.search_best_val_ppl is not None),
                  key=lambda r: (level_key(study, r.name), r.search_best_val_ppl))
    if not rows:
        return None
    fig, axes = _figure(8, 0.45 * len(rows) + 1.4)
    ax = axes[0, 0]
    for i, r in enumerate(rows):
        values = trials[trials.variant == r.name].value
        ax.scatter(values, [i] * len(values), color=GREY, alpha=0.5, s=18, zorder=2,
                   label="finished search trial" if i == 0 else None)
        ax.scatter([r.search_best_val_ppl], [i], color=colors[r.name], s=110, edgecolor="black", zorder=3,
                   label="best trial" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [_label(r.name) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best on top (of its level)
    ax.set(xlabel="validation perplexity after the search (each variant tuned on its own)", ylabel="")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def plot_curves(result: StudyResult, colors: dict) -> Figure | None:
    curves = result.log.curves
    curves = curves[(curves.phase == CONFIRM) & (curves.state == RunState.FINISHED)]
    variants = [r.name for r in result.rows if (curves.variant == r.name).any()]
    if not variants:
        return None
    ncols = min(3, len(variants))
    nrows = math.ceil(len(variants) / ncols)
    fig, axes = _figure(3.4 * ncols, 2.5 * nrows + 0.6, nrows, ncols, sharey=True)
    for ax, variant in zip(axes.flat, variants):
        by_epoch = curves[curves.variant == variant].groupby("epoch")
        lines = {}
        for key, style in (("train_ppl", "--"), ("val_ppl", "-")):
            spread = by_epoch[key].agg(["median", "min", "max"])
            lines[key] = spread["median"]
            ax.plot(spread.index, spread["median"], style, color=colors[variant])
            ax.fill_between(spread.index, spread["min"], spread["max"], color=colors[variant], alpha=0.2)
        ax.fill_between(lines["val_ppl"].index, lines["train_ppl"], lines["val_ppl"], color=GAP, alpha=0.12)
        seeds = curves[curves.variant == variant].seed.nunique()
        ax.set_title(f"{_label(variant)} ({seeds} seed{'s' * (seeds != 1)})", fontsize=10)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("perplexity (log scale)")
    # Colours tell the variants apart (titles name them); the legend explains the styles.
    fig.legend(handles=[Line2D([], [], color=GREY, ls="--", label="train (median over seeds)"),
                        Line2D([], [], color=GREY, label="validation (median over seeds)"),
                        Patch(color=GREY, alpha=0.2, label="range over seeds"),
                        Patch(color=GAP, alpha=0.12, label="gap between the medians")],
               loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    return fig


def plot_sensitivity(result: StudyResult, colors: dict) -> Figure | None:
    trials = result.log.trials
    rows = [r for r in result.rows if r.searched and (trials.variant == r.name).any()]
    if not rows:
        return None
    params = searchable_params(rows)
    fig, axes = _figure(2.3 * len(params) + 0.8, 1.9 * len(rows) + 0.6, len(rows), len(params))
    for i, r in enumerate(rows):
        mine = trials[trials.variant == r.name]
        done, pruned = mine[mine.value.notna()], mine[mine.state == RunState.PRUNED]
        for j, param in enumerate(params):
            ax = axes[i, j]
            if param not in r.searched:
                ax.set_visible(False)
                continue
            ax.scatter([t[param] for t in done.params], done.value, color=colors[r.name], s=25)
            if r.best_params:
                ax.scatter([r.best_params[param]], [r.search_best_val_ppl], s=90, facecolor="none", edgecolor="black")
            # Pruned trials stopped early, so their perplexity is not comparable: mark where they were, on top.
            ax.plot([t[param] for t in pruned.params], [0.97] * len(pruned), "v", color=GREY,
                    transform=ax.get_xaxis_transform())
            if param == "train.lr":
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(param, fontsize=8)
            ax.tick_params(labelsize=7)
        first = next(axes[i, j] for j, p in enumerate(params) if p in r.searched)
        first.set_ylabel(f"{_label(r.name)}\nval ppl", fontsize=8)
    fig.legend(handles=[Line2D([], [], ls="", marker="o", color=GREY, label="finished (variant's colour)"),
                        Line2D([], [], ls="", marker="o", markersize=9, markerfacecolor="none", color="black",
                               label="best"),
                        Line2D([], [], ls="", marker="v", color=GREY, label="pruned (where)")],
               loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def plot_expected_best(result: StudyResult, colors: dict) -> Figure | None:
    trials = result.log.trials[result.log.trials.best_seen.notna()]
    variants = [r.name for r in result.rows if (trials.variant == r.name).any()]
    if not variants:
        return None
    fig, axes = _figure(8, 3.8)
    ax = axes[0, 0]
    for variant in variants:
        values = trials[trials.variant == variant].best_seen.to_numpy(dtype=float)
        k = np.arange(1, len(values) + 1)
        mean, sd = np.array([stats.expected_best(values, n) for n in k]).T
        ax.plot(k, mean, "o-", color=colors[variant], label=_label(variant))
        ax.fill_between(k, mean - sd, mean + sd, color=colors[variant], alpha=0.15)
    ax.set(xlabel="number of search trials k", ylabel="expected best val ppl",
           xlim=(0.5, trials.groupby("variant").size().max() + 0.5))
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig




def report_figures(result: StudyResult) -> dict:
    """Every figure of the report by file name (None where there is nothing to draw yet), for harness.report.paper."""
    colors = palette(result.log.study.variants)
    return {"test_ppl": plot_test_ppl(result, colors), "isolation": plot_isolation(result, colors),
            "curves": plot_curves(result, colors), "sensitivity": plot_sensitivity(result, colors),
            "expected_best": plot_expected_best(result, colors)}
