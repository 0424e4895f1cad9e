"""The report page: a StudyResult rendered through templates/report.html.j2 (Jinja2, autoescaped), figures
embedded as PNG data URIs, so the page is one self-contained file with no script and no external link.
"""

import datetime
import math
import shlex
from pathlib import Path

import jinja2
import numpy as np

from harness import stats
from harness.masks import mask_figures, png_data_uri
from harness.report import plots
from harness.report.crossed import crossed_section
from harness.report.summary import NO_DROPOUT, StudyResult, conclusions, rerun_commands
from harness.study.rules import CONFIRM, RunState
from harness.study.stores import redact

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _num(value, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value) -> str:
    return "—" if value is None else "< 0.001" if value < 0.001 else f"{value:.3f}"


def _interval(ci: stats.Interval | None, signed: bool = False) -> str:
    if ci is None:
        return ""
    form = "{:+.2f}" if signed else "{:.2f}"
    return f"{form.format(ci.low)}, {form.format(ci.high)}"


def _headline(result: StudyResult) -> list:
    seeds = len(result.log.study.budget.confirm_seeds)
    to_reference = result.against(result.reference)
    rows = []
    for r in result.rows:
        c, tally = to_reference.get(r.name), r.trials
        rows.append({
            "name": r.name, "description": r.description, "is_reference": r.name == result.reference,
            "search_best_val_ppl": _num(r.search_best_val_ppl), "mean": _num(r.mean),
            "sd": _num(r.sd) if r.sd is not None else "", "ci": _interval(r.ci),
            "seeds": f"{len(r.test_ppl)} of {seeds}",
            "diff": "—" if c is None or c.diff is None else f"{c.diff:+.2f}",
            "diff_ci": _interval(c.ci, signed=True) if c else "", "p": _p(c.p) if c and c.p is not None else "",
            "test": c.test if c else "", "note": c.note if c else "", "p_holm": _p(c.p_holm) if c else "",
            "supported": ("yes" if c.supported else "no") if c and c.p_holm is not None else "—",
            "rates": (", ".join(f"{k.split('.', 1)[1]} {v:.3g}" for k, v in r.best_params.items()) if r.best_params
                      else "—" if r.searched else "nothing searched"),
            "trials_run": r.trials_run if tally else "—", "trials_pruned": tally.pruned if tally else "—",
            "trials_failed": (f"{tally.failed + tally.retried}"
                              + (f" ({tally.retried} retried)" if tally.retried else "")
                              + (f", {tally.interrupted} interrupted" if tally.interrupted else "")) if tally else "—",
            "device_hours": f"{r.device_hours:.3f}",
            "best_epoch": (f"{np.median(r.best_epochs):g} of {r.epochs}" + ("" if r.converged else " ⚠"))
                          if r.best_epochs else "—",
        })
    return rows


def _headline_notes(result: StudyResult) -> list:
    tested = sum(c.p is not None for c in result.comparisons)
    baselines = result.reference + (f" and, for each technique's own effect, {NO_DROPOUT}"
                                    if any(c.baseline == NO_DROPOUT for c in result.comparisons) else "")
    notes = [
        "Rows are ordered by mean test perplexity, lowest first. The search picks each variant's rates by validation "
        "perplexity; test perplexity comes only from the confirmation runs, which retrain those rates with new seeds.",
        f"Δ is the variant's mean minus {result.reference}'s: negative means lower (better) perplexity. Intervals are "
        f"95%: Student t (paired differences where the seeds match, Welch otherwise) below {stats.BCA_MIN_N} seeds, "
        "scipy's BCa bootstrap from there on; each interval is for its own comparison, unadjusted.",
        f"p: two-sided paired t-test over matching seeds, Welch's t-test otherwise. Every comparison in this report "
        f"(against {baselines}: {len(result.comparisons)} in all, {tested} tested) is one family for "
        "Holm's adjustment, "
        f"and a difference is called supported when its Holm-adjusted p is below {stats.ALPHA}.",
        "Best epoch: the median over the confirmation seeds of the epoch with the lowest validation perplexity; ⚠ "
        "marks a variant with a seed whose best epoch fell in the last quarter of its epochs (it may not have "
        "converged).",
        "Trials run, pruned and failed count the search; failed includes attempts that were retried, and interrupted "
        "ones (Ctrl-C, a stopped machine), which use no attempt. Device-hours add up the logged seconds of every run.",
    ]
    if result.reference_note:
        notes.insert(0, result.reference_note)
    return notes


def _section(title: str, fig, caption: str, missing: str, importances=None) -> dict:
    return {"title": title, "image": png_data_uri(fig) if fig is not None else None, "caption": caption,
            "missing": missing, "importances": importances}


def _plots(result: StudyResult) -> list:
    colors = plots.palette(result.log.study.variants)
    importances = [(r.name, result.log.importances.get(r.name) or "no search study in the Optuna storage.")
                   for r in result.rows]
    return [
        _section("Test perplexity over seeds", plots.plot_test_ppl(result, colors),
                 "Each dot is one confirmation seed; variants ordered best (lowest) to worst; diamond and bar: the "
                 "mean and its 95% interval.", "No confirmation run has finished yet."),
        _section("Isolation: best validation perplexity per variant", plots.plot_isolation(result, colors),
                 "Each variant's rates were tuned on their own with the same budget; the large marker is the best "
                 "finished search trial (pruned trials are left out: they stopped early).",
                 "No search trial has finished yet."),
        _section("Learning curves", plots.plot_curves(result, colors),
                 "Train (dashed) and validation (solid) perplexity per epoch of the confirmation runs: median across "
                 "seeds, bands from the lowest to the highest seed. The red band is the gap between them: it widens "
                 "where a variant overfits. Train perplexity is measured with dropout on.",
                 "No confirmation run has finished yet, so there are no curves."),
        _section("Sensitivity to the searched parameters", plots.plot_sensitivity(result, colors),
                 "Best validation perplexity of each finished search trial against each searched parameter, one row "
                 "per variant (ring: the best trial). Triangles along the top mark where pruned trials were: they "
                 "stopped early, so their perplexity is not comparable.",
                 "No search trial with searched parameters has been logged yet.", importances),
        _section("Expected best validation perplexity against the number of trials",
                 plots.plot_expected_best(result, colors),
                 "Expected lowest validation perplexity of k trials drawn with replacement from the logged ones, ±1 sd "
                 "(Dodge et al. 2019, Show Your Work). Pruned trials count with the best value they reached. The "
                 "search's trials are not independent draws (TPE learns), so read it as a budget curve: where it is "
                 "still falling, more trials would likely have helped.", "No search trial has been logged yet."),
    ]


def _failures(result: StudyResult) -> list:
    runs = result.log.runs
    failed = runs[runs.state.isin([RunState.FAILED, RunState.INTERRUPTED])].sort_values("end_time")
    return [{"variant": f.variant, "name": f.name, "state": f.state, "attempt": f.attempt, "device": f.device,
             "reason": str(f.fail_reason).strip().splitlines()[-1] if str(f.fail_reason).strip() else ""}
            for f in failed.itertuples()]


def _counted(series) -> list:
    found = series[series != ""].value_counts()
    return [(value, int(n)) for value, n in found.items()]


def _facts(result: StudyResult) -> dict:
    runs = result.log.runs
    named = runs.device + runs.device_name.map(lambda n: f" ({n})" if n else "")
    hours = runs.seconds.groupby(named).sum() / 3600
    return {"commits": _counted(runs.git_commit), "dirty": bool(runs.git_commit.str.endswith("-dirty").any()),
            "corpora": _counted(runs.corpus), "corpus_md5": _counted(runs.corpus_md5),
            "devices": [(d, float(h)) for d, h in hours.items() if d], "versions": _counted(runs.versions)}


def _configs(result: StudyResult) -> dict:
    runs = result.log.runs[result.log.runs.state == RunState.FINISHED]
    configs = {}
    for r in result.rows:
        mine = runs[runs.variant == r.name]
        confirmed = mine[mine.phase == CONFIRM]
        if len(mine):
            chosen = (confirmed if len(confirmed) else mine).iloc[0]
            configs[r.name] = {k: v for k, v in chosen.params.items() if k != "train.seed"}
    keys = sorted({k for c in configs.values() for k in c})
    return {"variants": list(configs), "rows": [(k, [c.get(k, "") for c in configs.values()]) for k in keys]}


def render_html(result: StudyResult, out_dir: Path = Path("reports")) -> str:
    """The whole report as one HTML page, images embedded; every logged string escaped by the template."""
    log, study = result.log, result.log.study
    rebuild = (f"python -m harness report {shlex.quote(str(study.path))} "
               f"--tracking-uri {shlex.quote(redact(log.tracking_uri))} --storage {shlex.quote(redact(log.storage))}")
    if Path(out_dir) != Path("reports"):
        rebuild += f" --out {shlex.quote(str(out_dir))}"
    return _TEMPLATES.get_template("report.html.j2").render(
        study=study, result=result, tracking_uri=redact(log.tracking_uri), storage=redact(log.storage),
        built=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        conclusions=conclusions(result), headline=_headline(result), headline_notes=_headline_notes(result),
        plots=_plots(result), failures=_failures(result),
        masks=[{"title": m.title, "rule": m.rule, "image": png_data_uri(m.figure)} for m in mask_figures()],
        facts=_facts(result), rebuild=rebuild, reruns=rerun_commands(result), configs=_configs(result),
        crossed=crossed_section(result),
    )
