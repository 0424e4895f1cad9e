"""The comparison report of a study: one self-contained HTML page and a CSV, built only from what was logged.

    python -m harness report studies/ablation.toml [--tracking-uri URI] [--storage URL] [--out reports]

Reads the MLflow experiment (child runs' metrics, curves, params, tags) and the Optuna storage (trial states,
searched values), so it can be rebuilt at any time; a study still running or partly failed gives a partial
report that says what is missing. Writes <out>/<study>/index.html and results.csv.
"""

import datetime
import html
import math
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter
from mlflow import MlflowClient

from harness import stats
from harness.config import SITES, StudyConfig
from harness.errors import UserError
from harness.masks import embed_png, mask_figures_html
from harness.ledger import CONFIRM, PHASES, SEARCH, Ledger, Tally, open_storage, search_space, trials_for
from harness.stores import redact, sqlite_path
from harness.tracking import RESULT_METRICS

REFERENCE = "awd"
GREY, GAP = "#5c6a78", "#e4572e"
ALPHA = 0.05
MIN_IMPORTANCE_TRIALS = 5  # a random forest fit to fewer finished trials reports mostly noise
RUN_COLUMNS = ("run_id", "name", "variant", "phase", "trial", "seed", "attempt", "state", "fail_reason", "device",
               "device_name", "versions", "git_commit", "corpus", "corpus_md5", "end_time", "params", *RESULT_METRICS)
CURVE_COLUMNS = ("variant", "seed", "epoch", "train_ppl", "val_ppl")
TRIAL_COLUMNS = ("variant", "number", "state", "value", "best_seen", "params")


# --- what was logged ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyLog:
    """Everything the report reads, gathered once from MLflow and the Optuna storage."""

    study: StudyConfig
    tracking_uri: str
    storage: str
    runs: pd.DataFrame  # one row per MLflow child run (RUN_COLUMNS)
    curves: pd.DataFrame  # per-epoch train/val perplexity of finished confirmation runs (CURVE_COLUMNS)
    trials: pd.DataFrame  # one row per finished or pruned Optuna search trial (TRIAL_COLUMNS)
    counts: dict  # variant -> phase -> harness.ledger.Tally; a variant without Optuna studies is absent
    importances: dict  # variant -> {param: importance}, or a sentence saying why there are none


def _ablate_command(study: StudyConfig, tracking_uri: str, storage: str) -> str:
    """The command that runs (or resumes) the study into these stores (passwords masked)."""
    return (f"python -m harness ablate {shlex.quote(str(study.path))} "
            f"--tracking-uri {shlex.quote(redact(tracking_uri))} --storage {shlex.quote(redact(storage))}")


def _int(value) -> int | None:
    return int(value) if value not in (None, "") else None


def _child_runs(client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    rows, token = [], None
    while True:
        page = client.search_runs([experiment_id], "tags.kind = 'run'", max_results=1000, page_token=token)
        for run in page:
            tags, metrics = run.data.tags, run.data.metrics
            rows.append({
                "run_id": run.info.run_id, "name": run.info.run_name, "variant": tags.get("variant", ""),
                "phase": tags.get("phase", ""), "trial": _int(tags.get("trial")), "seed": _int(tags.get("seed")),
                "attempt": _int(tags.get("attempt")), "state": tags.get("state", "running"),
                "fail_reason": tags.get("fail_reason", ""), "device": tags.get("device", ""),
                "device_name": tags.get("device_name", ""), "versions": tags.get("versions", ""),
                "git_commit": tags.get("git_commit", ""), "corpus": tags.get("corpus", ""),
                "corpus_md5": tags.get("corpus_md5", ""), "end_time": run.info.end_time or 0,
                "params": dict(run.data.params), **{k: metrics.get(k, np.nan) for k in RESULT_METRICS},
            })
        token = page.token
        if not token:
            return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def _curves(client: MlflowClient, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs[(runs.phase == CONFIRM) & (runs.state == "finished")].itertuples():
        history = {key: {m.step: m.value for m in client.get_metric_history(run.run_id, key)}
                   for key in ("train_ppl", "val_ppl")}
        for epoch in sorted(history["val_ppl"]):
            rows.append({"variant": run.variant, "seed": run.seed, "epoch": epoch,
                         "train_ppl": history["train_ppl"].get(epoch, np.nan), "val_ppl": history["val_ppl"][epoch]})
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def _optuna_side(study: StudyConfig, storage: str, rerun: str) -> tuple[pd.DataFrame, dict, dict]:
    path = sqlite_path(storage, "--storage")
    if path is not None and not path.exists():
        raise UserError(f"no Optuna storage at {path}: pass the --storage the study ran with, or run it first: {rerun}")
    try:
        ledger = Ledger(study, open_storage(storage), study.identity(), create=False)
    except UserError as err:
        raise UserError(f"{redact(storage)}: {err}: pass the --storage the study ran with, or run it first: "
                        f"{rerun}") from None
    rows, tallies, importances = [], {}, {}
    for variant in study.variants:
        for phase in PHASES:
            if ledger.has(variant, phase):
                tallies.setdefault(variant, {})[phase] = ledger.tally(variant, phase)
        if ledger.has(variant, SEARCH):
            importances[variant] = ledger.importances(variant, MIN_IMPORTANCE_TRIALS)
            rows += [{"variant": t.variant, "number": t.number, "state": t.state, "value": t.value,
                      "best_seen": t.best_seen, "params": t.params} for t in ledger.search_trials(variant)]
    return pd.DataFrame(rows, columns=list(TRIAL_COLUMNS)), tallies, importances


def read_logs(study: StudyConfig, tracking_uri: str, storage: str) -> StudyLog:
    """Gather the study's MLflow runs and Optuna trials; UserError when the study never ran into these stores."""
    rerun = _ablate_command(study, tracking_uri, storage)
    path = sqlite_path(tracking_uri, "--tracking-uri")
    if path is not None and not path.exists():  # MLflow would create an empty store there
        raise UserError(f"no MLflow tracking store at {path}: run the study first: {rerun}")
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study.name)
    if experiment is None:
        raise UserError(f"{redact(tracking_uri)} has no MLflow experiment {study.name!r}: run the study first: "
                        f"{rerun}")
    problem = study.identity().mismatch(experiment.tags)
    if problem:
        raise UserError(f"{problem} (the MLflow experiment {study.name!r} at {redact(tracking_uri)})")
    trials, trial_counts, importances = _optuna_side(study, storage, rerun)
    runs = _child_runs(client, experiment.experiment_id)
    return StudyLog(study, tracking_uri, storage, runs, _curves(client, runs), trials, trial_counts, importances)


# --- the numbers --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """A variant against the reference: difference in mean test perplexity, its CI, a p-value where informative."""

    diff: float | None
    diff_ci: tuple | None
    test: str  # "paired t", "Welch t", or "" when none ran
    p: float | None
    p_holm: float | None
    note: str  # why there is no p-value, when there is none


@dataclass(frozen=True)
class VariantResult:
    """One headline row, from the variant's logged runs and trials."""

    name: str
    description: str
    searched: tuple  # names of the searched parameters
    search_best_val_ppl: float | None
    best_params: dict  # searched parameter -> value of the best finished search trial
    test_ppl: dict  # confirmation seed -> test perplexity
    trials: Tally | None  # of the search study; None when it is missing
    device_hours: float
    comparison: Comparison | None = None  # None for the reference

    @property
    def mean(self) -> float | None:
        """Mean test perplexity over the confirmation seeds."""
        return float(np.mean(list(self.test_ppl.values()))) if self.test_ppl else None

    @property
    def sd(self) -> float | None:
        """Sample standard deviation (n - 1) over the seeds, as the ablation logs it."""
        return float(np.std(list(self.test_ppl.values()), ddof=1)) if len(self.test_ppl) > 1 else None

    @property
    def ci(self) -> tuple | None:
        """95% percentile-bootstrap CI of the mean test perplexity."""
        return stats.bootstrap_mean_ci(list(self.test_ppl.values())) if len(self.test_ppl) > 1 else None

    @property
    def trials_run(self) -> int:
        """Search attempts that ended: finished, pruned, failed for good, and failed then retried."""
        return self.trials.attempts if self.trials else 0


@dataclass(frozen=True)
class StudyResult:
    """The report's content: headline rows best first, the reference and what is still missing."""

    log: StudyLog
    rows: list  # VariantResult, best mean test perplexity first
    reference: str
    reference_note: str
    missing: list  # sentences; empty when the study is complete


def seeds_needed(paired: bool) -> int:
    """Fewest seeds per variant with which a distribution-free test can reach p < ALPHA."""
    n = 2
    while not stats.can_reach_significance(n, n, paired=paired, alpha=ALPHA):
        n += 1
    return n


def compare(variant: dict, reference: dict) -> Comparison:
    """Seeds -> test ppl of a variant against the reference's: paired when the seeds match, Welch otherwise."""
    if not variant or not reference:
        return Comparison(None, None, "", None, None, "no confirmation seeds on one side")
    diff = float(np.mean(list(variant.values())) - np.mean(list(reference.values())))
    if len(variant) < 2 or len(reference) < 2:
        return Comparison(diff, None, "", None, None,
                          f"{len(variant)} vs {len(reference)} seeds: a CI or a test needs at least 2 on each side")
    paired = set(variant) == set(reference)
    seeds = sorted(variant)
    a = [variant[s] for s in seeds]
    b = [reference[s] for s in seeds] if paired else list(reference.values())
    ci = stats.bootstrap_diff_ci(a, b, paired=paired)
    if not stats.can_reach_significance(len(a), len(b), paired=paired, alpha=ALPHA):
        smallest = stats.min_p_value(len(a), len(b), paired=paired)
        return Comparison(diff, ci, "", None, None,
                          f"not tested: {len(a)} vs {len(b)} {'paired ' if paired else ''}seeds (smallest possible "
                          f"p {smallest:.2g}; needs {seeds_needed(paired)} per variant)")
    p = stats.t_test_p(a, b, paired=paired)
    if math.isnan(p):
        return Comparison(diff, ci, "", None, None, "undefined: the differences do not vary across seeds")
    return Comparison(diff, ci, "paired t" if paired else "Welch t", p, None, "")


def _variant_result(log: StudyLog, variant: str) -> VariantResult:
    runs = log.runs[log.runs.variant == variant]
    finished = runs[runs.state == "finished"]
    search = finished[(finished.phase == SEARCH) & finished.best_val_ppl.notna()]
    searched = tuple(search_space(log.study, variant))
    best_val, best_params = None, {}
    if len(search):
        best = search.loc[search.best_val_ppl.idxmin()]
        best_val = float(best.best_val_ppl)
        best_params = {k: float(best.params[k]) for k in searched if k in best.params}
    confirm = finished[(finished.phase == CONFIRM) & finished.test_ppl.notna()].sort_values("end_time")
    test_ppl = {int(s): float(p) for s, p in zip(confirm.seed, confirm.test_ppl)}  # a seed's latest run wins
    return VariantResult(
        variant, log.study.variants[variant].description, searched, best_val, best_params, test_ppl,
        log.counts.get(variant, {}).get(SEARCH), float(runs.seconds.sum()) / 3600,
    )


def _reference(results: dict) -> tuple[str, str]:
    if REFERENCE in results:
        return REFERENCE, ""
    confirmed = [r for r in results.values() if r.test_ppl]
    searched = [r for r in results.values() if r.search_best_val_ppl is not None]
    if confirmed:
        best = min(confirmed, key=lambda r: r.mean).name
        why = "lowest mean test perplexity"
    elif searched:
        best = min(searched, key=lambda r: r.search_best_val_ppl).name
        why = "lowest validation perplexity of the search; no confirmation has finished"
    else:
        best, why = next(iter(results)), "first in the study file; nothing has finished yet"
    return best, (f"{REFERENCE} is not in this study, so differences are to the best variant, {best} ({why}). It was "
                  "picked after seeing the results, which makes its comparisons optimistic.")


def missing_parts(log: StudyLog) -> list:
    """Sentences naming what a complete study would have and this one lacks (empty when complete)."""
    study, runs, out = log.study, log.runs, []
    for variant in study.variants:
        mine = runs[runs.variant == variant]
        phases = log.counts.get(variant, {})
        if SEARCH not in phases:
            out.append(f"{variant}: no search has started.")
            continue
        c, budget = phases[SEARCH], trials_for(study, variant)
        if c.settled < budget:
            out.append(f"{variant}: {c.settled} of {budget} search trials settled"
                       + (f", {c.running} running." if c.running else "."))
        elif c.finished == 0:
            out.append(f"{variant}: no search trial finished, so nothing could be confirmed.")
        confirm = mine[mine.phase == CONFIRM]
        done = set(confirm[confirm.state == "finished"].seed)
        lacking = {}  # why -> seeds, so a study that has not reached confirmation gets one line per variant
        for seed in (s for s in study.budget.confirm_seeds if s not in done):
            tries = confirm[confirm.seed == seed].sort_values("end_time")
            last = tries.iloc[-1] if len(tries) else None
            why = ("not started" if last is None else
                   f"{last.state}: {_last_line(last.fail_reason)}" if last.fail_reason else last.state)
            lacking.setdefault(why, []).append(str(seed))
        for why, seeds in lacking.items():
            out.append(f"{variant}: confirmation seed{'s' * (len(seeds) > 1)} {', '.join(seeds)} "
                       f"{'have' if len(seeds) > 1 else 'has'} no finished run ({why}).")
    for run in runs[runs.state == "running"].itertuples():
        out.append(f"{run.variant}: MLflow run '{run.name}' is still running (if no coordinator is, resuming the "
                   "study marks it interrupted).")
    return out


def summarize(log: StudyLog) -> StudyResult:
    """Headline rows (with Holm-adjusted comparisons to the reference) and the list of what is missing."""
    results = {v: _variant_result(log, v) for v in log.study.variants}
    reference, note = _reference(results)
    others = [v for v in results if v != reference]
    comparisons = [compare(results[v].test_ppl, results[reference].test_ppl) for v in others]
    adjusted = stats.holm([c.p for c in comparisons])
    for v, c, p in zip(others, comparisons, adjusted):
        results[v] = replace(results[v], comparison=replace(c, p_holm=p))
    order = sorted(results.values(), key=lambda r: (r.mean is None, r.mean or 0.0,
                                                   r.search_best_val_ppl is None, r.search_best_val_ppl or 0.0))
    return StudyResult(log, order, reference, note, missing_parts(log))


def results_frame(result: StudyResult) -> pd.DataFrame:
    """The headline table as numbers (results.csv): one row per variant, best first."""
    params = [f"dropout.{s}" for s in SITES] + ["train.lr"]
    searched = [p for p in params if any(p in r.searched for r in result.rows)]
    rows = []
    for r in result.rows:
        c = r.comparison or Comparison(None, None, "", None, None, "reference")
        rows.append({
            "variant": r.name, "description": r.description, "reference": r.name == result.reference,
            "search_best_val_ppl": r.search_best_val_ppl, "confirm_seeds": len(r.test_ppl),
            "seeds": ";".join(map(str, sorted(r.test_ppl))), "test_ppl_mean": r.mean, "test_ppl_sd": r.sd,
            "test_ppl_ci_low": r.ci[0] if r.ci else None, "test_ppl_ci_high": r.ci[1] if r.ci else None,
            "diff_to_reference": c.diff, "diff_ci_low": c.diff_ci[0] if c.diff_ci else None,
            "diff_ci_high": c.diff_ci[1] if c.diff_ci else None, "test": c.test, "p_value": c.p,
            "p_holm": c.p_holm, "p_note": c.note,
            **{f"best.{p}": r.best_params.get(p) for p in searched},
            "trials_run": r.trials_run,
            **{f"trials_{k}": getattr(r.trials or Tally(), k) for k in ("finished", "pruned", "failed", "retried",
                                                                          "interrupted")},
            "device_hours": r.device_hours,
        })
    return pd.DataFrame(rows)


# --- plots --------------------------------------------------------------------------------------------
def _label(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib would read $...$ in a variant name as math


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(width, height), layout="constrained")
        return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def _palette(variants) -> dict:
    names = list(variants)
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


def _plot_test_ppl(result: StudyResult, colors: dict) -> Figure | None:
    rows = [r for r in result.rows if r.test_ppl]
    if not rows:
        return None
    fig, axes = _figure(8, 0.45 * len(rows) + 1.1)
    ax = axes[0, 0]
    points = pd.DataFrame([{"variant": _label(r.name), "test_ppl": p} for r in rows for p in r.test_ppl.values()])
    order = [_label(r.name) for r in rows]
    sns.stripplot(points, x="test_ppl", y="variant", order=order, hue="variant", hue_order=order,
                  palette=[colors[r.name] for r in rows], size=7, jitter=0.12, alpha=0.8, legend=False, ax=ax)
    for i, r in enumerate(rows):
        if r.ci:
            ax.errorbar(r.mean, i, xerr=[[r.mean - r.ci[0]], [r.ci[1] - r.mean]], fmt="D", color="black",
                        markersize=5, capsize=4, zorder=5)
        else:
            ax.plot(r.mean, i, "D", color="black", markersize=5, zorder=5)
    ax.set(xlabel="test perplexity (dots: seeds; diamond and bar: mean and 95% bootstrap CI)", ylabel="")
    return fig


def _plot_isolation(result: StudyResult, colors: dict) -> Figure | None:
    trials = result.log.trials[result.log.trials.value.notna()]
    rows = sorted((r for r in result.rows if r.search_best_val_ppl is not None), key=lambda r: r.search_best_val_ppl)
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
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best on top
    ax.set(xlabel="validation perplexity after the search (each variant tuned on its own)", ylabel="")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _plot_curves(result: StudyResult, colors: dict) -> Figure | None:
    curves = result.log.curves
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


def _plot_sensitivity(result: StudyResult, colors: dict) -> Figure | None:
    trials = result.log.trials
    rows = [r for r in result.rows if r.searched and (trials.variant == r.name).any()]
    if not rows:
        return None
    params = [p for p in [f"dropout.{s}" for s in SITES] + ["train.lr"] if any(p in r.searched for r in rows)]
    fig, axes = _figure(2.3 * len(params) + 0.8, 1.9 * len(rows) + 0.6, len(rows), len(params))
    for i, r in enumerate(rows):
        mine = trials[trials.variant == r.name]
        done, pruned = mine[mine.value.notna()], mine[mine.state == "pruned"]
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


def _plot_expected_best(result: StudyResult, colors: dict) -> Figure | None:
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


# --- the page -----------------------------------------------------------------------------------------
def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _rates(params: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]} {v:.3g}" for k, v in params.items())


def _cell(column: str, content, css: str = "") -> str:
    return f'<td data-col="{column}"{f" class={css}" if css else ""}>{content}</td>'


def _headline_table(result: StudyResult) -> str:
    head = ("<tr><th>variant</th><th>best val ppl<br>(search)</th><th>test ppl<br>mean ± sd<br>[95% CI]</th>"
            f"<th>seeds</th><th>Δ test ppl<br>vs {_esc(result.reference)}<br>[95% CI]</th><th>p</th>"
            "<th>p<br>(Holm)</th><th>best rates</th><th>trials<br>run</th><th>pruned</th><th>failed</th>"
            "<th>device-<br>hours</th></tr>")
    seeds = len(result.log.study.budget.confirm_seeds)
    body = []
    for r in result.rows:
        c, t = r.comparison, r.trials
        test_ppl = (f'<span data-col="test_ppl_mean">{_num(r.mean)}</span>'
                    + (f'<span data-col="test_ppl_sd"> ± {_num(r.sd)}</span>' if r.sd is not None else "")
                    + (f'<br><small data-col="test_ppl_ci">[{_num(r.ci[0])}, {_num(r.ci[1])}]</small>' if r.ci else ""))
        if c is None:
            diff, p, p_holm = '<span class="ref">reference</span>', "", ""
        else:
            diff = ("—" if c.diff is None else f"{c.diff:+.2f}") + (
                f"<br><small>[{c.diff_ci[0]:+.2f}, {c.diff_ci[1]:+.2f}]</small>" if c.diff_ci else "")
            p = (f"{_p(c.p)}<br><small>{_esc(c.test)}</small>" if c.p is not None
                 else f'<span class="note">{_esc(c.note)}</span>')
            p_holm = "—" if c.p_holm is None else _p(c.p_holm)
        failed = t.failed + t.retried if t else 0
        rates = _esc(_rates(r.best_params)) if r.best_params else ("—" if r.searched else "nothing searched")
        body.append(
            f'<tr data-variant="{_esc(r.name)}"{" class=reference" if c is None else ""}>'
            f'<td class="name"><b>{_esc(r.name)}</b><br><small>{_esc(r.description)}</small></td>'
            + _cell("search_best_val_ppl", _num(r.search_best_val_ppl)) + _cell("test_ppl", test_ppl)
            + _cell("seeds", f"{len(r.test_ppl)} of {seeds}") + _cell("diff", diff) + _cell("p", p)
            + _cell("p_holm", p_holm) + _cell("best_rates", rates, "rates")
            + _cell("trials_run", r.trials_run if t else "—") + _cell("trials_pruned", t.pruned if t else "—")
            + _cell("trials_failed", (f"{failed}" + (f" ({t.retried} retried)" if t.retried else ""))
                    if t else "—")
            + _cell("device_hours", f"{r.device_hours:.3f}") + "</tr>"
        )
    return f'<div class="scroll"><table id="headline"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


def _headline_notes(result: StudyResult) -> str:
    compared = [r.comparison for r in result.rows if r.comparison is not None]
    tested = sum(c.p is not None for c in compared)
    notes = [
        "Rows are ordered by mean test perplexity, lowest first. The search picks each variant's rates by validation "
        "perplexity; test perplexity comes only from the confirmation runs, which retrain those rates with new seeds.",
        f"Δ is the variant's mean minus {_esc(result.reference)}'s: negative means lower (better) perplexity. CIs are "
        f"seeded percentile bootstraps ({stats.N_RESAMPLES:,} resamples) over seeds, paired by seed where the seeds "
        "match; with 2 or 3 seeds they are crude.",
        "p: two-sided paired t-test over matching seeds, Welch's t-test otherwise; "
        + (f"Holm-adjusted across the {tested} variant{'s' * (tested != 1)} tested." if tested
           else "no variant could be tested yet."),
    ]
    if any(c.p is None and c.note.startswith("not tested") for c in compared):
        notes.append(
            "<b>Not tested</b> means too few seeds for a test to be informative: even if every seed favoured one "
            f"variant, no test that avoids assuming normally distributed errors could reach p < {ALPHA} (the smallest "
            "possible p is shown), so a t-test's p-value would rest on that assumption alone. Run at least "
            f"{seeds_needed(True)} confirmation seeds (paired) to test."
        )
    notes.append("Trials run, pruned and failed count the search; failed includes attempts that were retried. "
                 "Device-hours add up the logged seconds of every run, search and confirmation.")
    if result.reference_note:
        notes.insert(0, f"<b>{_esc(result.reference_note)}</b>")
    return "".join(f"<p class=\"small\">{n}</p>" for n in notes)


def _status(result: StudyResult) -> str:
    study = result.log.study
    if not result.missing:
        return (f'<div class="status complete">Complete: every variant has its search trials and '
                f'{len(study.budget.confirm_seeds)} confirmation seeds.</div>')
    items = "".join(f"<li>{_esc(m)}</li>" for m in result.missing)
    return (f'<div class="status partial"><b>Partial report</b>: the study is still running or parts of it failed. '
            f"Missing:<ul>{items}</ul>Rebuild the report when it has finished.</div>")


def _failures(result: StudyResult) -> str:
    failed = result.log.runs[result.log.runs.state.isin(["failed", "interrupted"])].sort_values("end_time")
    if failed.empty:
        return ""
    rows = "".join(
        f"<tr><td>{_esc(f.variant)}</td><td>{_esc(f.name)}</td><td>{_esc(f.state)}</td><td>{_esc(f.attempt)}</td>"
        f"<td>{_esc(f.device)}</td><td><code>{_esc(_last_line(f.fail_reason))}</code></td></tr>"
        for f in failed.itertuples()
    )
    return ("<h2>Failed and interrupted runs</h2><p class=small>Failed trials are retried with the same parameters "
            "while retries remain; the full reasons are the runs' <code>fail_reason</code> tags in MLflow.</p>"
            "<div class=scroll><table><thead><tr><th>variant</th><th>run</th><th>state</th><th>attempt</th>"
            f"<th>device</th><th>reason (last line)</th></tr></thead><tbody>{rows}</tbody></table></div>")


def _plot_section(title: str, fig: Figure | None, caption: str, missing: str) -> str:
    body = (f"<figure>{embed_png(fig, title)}<figcaption>{caption}</figcaption></figure>" if fig is not None
            else f'<p class="note">{missing}</p>')
    return f"<h2>{title}</h2>{body}"


def _importances_table(result: StudyResult) -> str:
    rows = []
    for r in result.rows:
        found = result.log.importances.get(r.name)
        if isinstance(found, dict):
            cells = " ".join(f'<span class="bar" style="--w:{100 * v:.0f}%">{_esc(k)} {v:.2f}</span>'
                             for k, v in found.items())
        else:
            cells = f'<span class="note">{_esc(found or "no search study in the Optuna storage.")}</span>'
        rows.append(f"<tr><td><b>{_esc(r.name)}</b></td><td>{cells}</td></tr>")
    return ("<h3>Parameter importances (Optuna, fANOVA, seeded)</h3><table class=importances><thead><tr><th>variant"
            f"</th><th>share of the variance of validation perplexity explained</th></tr></thead><tbody>{''.join(rows)}"
            "</tbody></table>")


def rerun_commands(result: StudyResult) -> list:
    """One `python -m harness train` command per confirmation run: the study plus the --set it differed by."""
    study, out = result.log.study, []
    runs = result.log.runs
    for r in result.rows:
        base = {k: str(v) for k, v in study.run_config(r.name).flat().items()}
        confirm = runs[(runs.variant == r.name) & (runs.phase == CONFIRM) & (runs.state == "finished")]
        for run in confirm.sort_values("seed").itertuples():
            sets = [f"--set {shlex.quote(f'{k}={v}')}" for k, v in sorted(run.params.items())
                    if k in base and base[k] != v]
            out.append(f"python -m harness train {shlex.quote(str(study.path))} --variant {shlex.quote(r.name)} "
                       + " ".join(sets))
    return out


def _configs_table(result: StudyResult) -> str:
    runs = result.log.runs[result.log.runs.state == "finished"]
    configs = {}
    for r in result.rows:
        mine = runs[runs.variant == r.name]
        confirmed = mine[mine.phase == CONFIRM]
        if len(mine):
            chosen = (confirmed if len(confirmed) else mine).iloc[0]
            configs[r.name] = {k: v for k, v in chosen.params.items() if k != "train.seed"}
    if not configs:
        return '<p class="note">No run has finished yet.</p>'
    keys = sorted({k for c in configs.values() for k in c})
    head = "".join(f"<th>{_esc(v)}</th>" for v in configs)
    rows = []
    for key in keys:
        values = [c.get(key, "") for c in configs.values()]
        differs = ' class="differs"' if len(set(values)) > 1 else ""
        rows.append(f"<tr{differs}><td><code>{_esc(key)}</code></td>" + "".join(f"<td>{_esc(v)}</td>" for v in values)
                    + "</tr>")
    return (f"<div class=scroll><table class=configs><thead><tr><th>parameter</th>{head}</tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table></div>")


def _counted(series: pd.Series) -> str:
    found = series[series != ""].value_counts()
    return ", ".join(f"<code>{_esc(k)}</code> ({n} run{'s' * (n != 1)})" for k, n in found.items()) or "not logged"


def _reproducibility(result: StudyResult, out_dir: Path) -> str:
    log, study, runs = result.log, result.log.study, result.log.runs
    named = runs.device + runs.device_name.map(lambda n: f" ({n})" if n else "")
    hours = runs.seconds.groupby(named).sum() / 3600
    devices = ", ".join(f"<code>{_esc(d)}</code>: {h:.3f} h" for d, h in hours.items() if d) or "not logged"
    commit = _counted(runs.git_commit)
    if runs.git_commit.str.endswith("-dirty").any():
        commit += ('<br><span class="note">-dirty: the checkout had uncommitted changes, so the commit alone does not '
                   "reproduce these runs.</span>")
    rebuild = (f"python -m harness report {shlex.quote(str(study.path))} "
               f"--tracking-uri {shlex.quote(redact(log.tracking_uri))} --storage {shlex.quote(redact(log.storage))}")
    if out_dir != Path("reports"):
        rebuild += f" --out {shlex.quote(str(out_dir))}"
    commands = rerun_commands(result)
    reruns = "\n".join(commands) or "no confirmation run has finished yet"
    return f"""<h2>Reproducibility</h2>
<table class="facts"><tbody>
<tr><th>study file</th><td><code>{_esc(study.path)}</code>, digest <code>{_esc(study.digest)}</code></td></tr>
<tr><th>git commit</th><td>{commit}</td></tr>
<tr><th>corpus</th><td>{_counted(runs.corpus)}; MD5 {_counted(runs.corpus_md5)}</td></tr>
<tr><th>devices</th><td>{devices}</td></tr>
<tr><th>packages</th><td>{_counted(runs.versions)}</td></tr>
</tbody></table>
<h3>Rebuild this report</h3><pre>{_esc(rebuild)}</pre>
<h3>Re-run a row</h3><p class="small">One command per confirmation run (add <code>--device cuda</code> on a GPU); the
<code>--set</code> values are the logged parameters that differ from the study file's settings for that variant.</p>
<details{" open" if reruns.count(chr(10)) < 12 else ""}><summary>{len(commands)} commands</summary>
<pre>{_esc(reruns)}</pre></details>
<h3>Resolved configurations</h3><p class="small">The logged parameters of one finished run per variant (a
confirmation run where there is one; its seed aside). Highlighted rows differ between variants.</p>
{_configs_table(result)}
<details open><summary>The study file, <code>{_esc(study.path)}</code></summary>
<pre>{_esc(study.text)}</pre></details>"""


STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2733;max-width:1180px;margin:0 auto;
padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}
.meta,.small{color:#4a5663;font-size:13px}.note{color:#7a5b00;font-size:12px}
.status{padding:10px 14px;border-radius:6px;margin:14px 0;font-size:14px}.status ul{margin:4px 0 4px 18px;padding:0}
.complete{background:#e8f5e9;border:1px solid #a5d6a7}.partial{background:#fff8e1;border:1px solid #ffcc80}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e3e8ee;padding:5px 8px;text-align:right;vertical-align:top}
#headline td{white-space:nowrap}#headline td.name,#headline td.rates,#headline td[data-col=p]{white-space:normal}
th{background:#f4f6f9;font-weight:600;text-align:center}
td.name,td.rates,.facts td,.facts th,.importances td,.configs td:first-child{text-align:left}
.configs td{text-align:left}.configs tr.differs td{background:#fff8e1}
tr.reference td{background:#eef5fc}.ref{font-weight:600;color:#1f5f99}
td.name{min-width:150px;max-width:200px}td.rates{min-width:140px;max-width:190px}td small{color:#5c6a78}
#headline td[data-col=p]{min-width:140px}#headline .note{display:block;text-align:left}
figure{margin:10px 0}figure img{max-width:100%;height:auto}figcaption{font-size:13px;color:#4a5663;max-width:900px}
.masks{display:flex;flex-wrap:wrap;gap:14px}
.masks figure.mask{display:table;margin:0}.masks figcaption{display:table-caption;caption-side:bottom}
pre{background:#f6f8fa;padding:10px;border-radius:4px;font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere}
.bar{display:inline-block;margin:1px 6px 1px 0;padding:1px 6px;border-radius:3px;
background:linear-gradient(90deg,#cfe3f5 var(--w),#f4f6f9 var(--w))}
details summary{cursor:pointer;font-weight:600;margin:16px 0 6px}
"""


def render_html(result: StudyResult, out_dir: Path = Path("reports")) -> str:
    """The whole report as one HTML page, images embedded; every logged string escaped."""
    log, study = result.log, result.log.study
    colors = _palette(study.variants)
    built = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = ", ".join(map(str, study.budget.confirm_seeds))
    sections = [
        _plot_section("Test perplexity over seeds", _plot_test_ppl(result, colors),
                      "Each dot is one confirmation seed; variants ordered best (lowest) to worst.",
                      "No confirmation run has finished yet."),
        _plot_section("Isolation: best validation perplexity per variant", _plot_isolation(result, colors),
                      "Each variant's rates were tuned on their own with the same budget; the large marker is the best "
                      "finished search trial (pruned trials are left out: they stopped early).",
                      "No search trial has finished yet."),
        _plot_section("Learning curves", _plot_curves(result, colors),
                      "Train (dashed) and validation (solid) perplexity per epoch of the confirmation runs: median "
                      "across seeds, bands from the lowest to the highest seed. The red band is the gap between them: "
                      "it widens where a variant overfits. Train perplexity is measured with dropout on.",
                      "No confirmation run has finished yet, so there are no curves."),
        _plot_section("Sensitivity to the searched parameters", _plot_sensitivity(result, colors),
                      "Best validation perplexity of each finished search trial against each searched parameter, one "
                      "row per variant (ring: the best trial). Triangles along the top mark where pruned trials were: "
                      "they stopped early, so their perplexity is not comparable.",
                      "No search trial with searched parameters has been logged yet.")
        + _importances_table(result),
        _plot_section("Expected best validation perplexity against the number of trials",
                      _plot_expected_best(result, colors),
                      "Expected lowest validation perplexity of k trials drawn with replacement from the logged ones, "
                      "±1 sd (Dodge et al. 2019, <i>Show Your Work</i>). Pruned trials count with the best value they "
                      "reached. The search's trials are not independent draws (TPE learns), so read it as a budget "
                      "curve: where it is still falling, more trials would likely have helped.",
                      "No search trial has been logged yet."),
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(study.name)}: dropout ablation report</title><style>{STYLE}</style></head>
<body>
<h1>Dropout ablation: {_esc(study.name)}</h1>
{f'<p>{_esc(study.notes)}</p>' if study.notes else ''}
<p class="meta">Corpus {_esc(study.corpus)}; {len(study.variants)} variants, {study.budget.trials} search trials each
(the search optimises {_esc(study.metric)}), confirmation seeds {_esc(seeds)}. Built {built} from MLflow
<code>{_esc(redact(log.tracking_uri))}</code> and Optuna <code>{_esc(redact(log.storage))}</code>.</p>
{_status(result)}
<h2>Headline</h2>
{_headline_table(result)}
{_headline_notes(result)}
{"".join(sections)}
{_failures(result)}
<h2>The dropout masks</h2>
<p class="small">Drawn from the project's own modules in <code>harness/dropout.py</code> in train mode.</p>
<div class="masks">{mask_figures_html()}</div>
{_reproducibility(result, out_dir)}
</body></html>
"""


def build_report(study: StudyConfig, tracking_uri: str, storage: str, out_dir: Path = Path("reports")) -> Path:
    """Write <out_dir>/<study>/index.html and results.csv from what was logged; returns the HTML path."""
    result = summarize(read_logs(study, tracking_uri, storage))
    folder = Path(out_dir) / study.name
    folder.mkdir(parents=True, exist_ok=True)
    results_frame(result).to_csv(folder / "results.csv", index=False)
    page = folder / "index.html"
    page.write_text(render_html(result, Path(out_dir)), encoding="utf-8")
    return page
