"""The report page: a study's harness.results rendered through templates/report.html.j2 (Jinja2, autoescaped),
figures embedded as PNG data URIs, so the page is one self-contained file with no script and no external link.
"""

import datetime
import functools
import shlex
from pathlib import Path

import jinja2
import pandas as pd

from harness import stats
from harness.study import adequacy
from harness.masks import mask_figures, png_data_uri
from harness.report import plots
from harness.report.answer_keys import METRICS
from harness.report.crossed import crossed_section
from harness.report.summary import NO_DROPOUT, StudyResult, conclusions, rerun_commands
from harness.study.rules import CONFIRM, RunState, search_space
from harness.study.stores import redact

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _missing(value) -> bool:
    return value is None or bool(pd.isna(value))


def _num(value, digits: int = 2) -> str:
    return "—" if _missing(value) else f"{value:.{digits}f}"


def _p(value) -> str:
    return "—" if _missing(value) else "< 0.001" if value < 0.001 else f"{value:.3f}"


def _span(low, high, signed: bool = False) -> str:
    form = "{:+.2f}" if signed else "{:.2f}"
    return "" if _missing(low) else f"{form.format(low)}, {form.format(high)}"


def _interval(ci: stats.Interval | None) -> str:
    return "" if ci is None else _span(ci.low, ci.high)


def _headline(found) -> list:
    """The headline table's cells, from the results' headline frame (the numbers of results.csv)."""
    study, seeds = found.study, len(found.study.budget.confirm_seeds)
    flags = found.search_flags.groupby("arm")
    flagged = {arm: [f"⚠ {f.text} (fix: {f.fix})" for f in mine.itertuples()] for arm, mine in flags}
    rows = []
    for r in found.headline.to_dict("records"):
        name = r["variant"]
        best = {k.split(".", 2)[2]: v for k, v in r.items() if k.startswith("best.") and not _missing(v)}
        failed, retried, interrupted = r["trials_failed"], r["trials_retried"], r["trials_interrupted"]
        no_search = _missing(r["trials_run"])  # no Optuna search study yet
        rows.append({
            "name": name, "description": r["description"], "is_reference": r["reference"],
            "search_best_val_ppl": _num(r["search_best_val_ppl"]), "mean": _num(r["test_ppl_mean"]),
            "sd": "" if _missing(r["test_ppl_sd"]) else _num(r["test_ppl_sd"]),
            "ci": _span(r["test_ppl_ci_low"], r["test_ppl_ci_high"]), "seeds": f"{r['confirm_seeds']} of {seeds}",
            "diff": "—" if _missing(r["diff_to_reference"]) else f"{r['diff_to_reference']:+.2f}",
            "diff_ci": _span(r["diff_ci_low_to_reference"], r["diff_ci_high_to_reference"], signed=True),
            "p": "" if _missing(r["p_to_reference"]) else _p(r["p_to_reference"]),
            "test": "" if _missing(r["test_to_reference"]) else r["test_to_reference"],
            "note": "" if _missing(r["note_to_reference"]) else r["note_to_reference"],
            "p_holm": "" if r["reference"] else _p(r["p_holm_to_reference"]),
            "supported": "—" if _missing(r["p_holm_to_reference"]) else "yes" if r["supported_to_reference"] else "no",
            "rates": (", ".join(f"{k} {v:.3g}" for k, v in best.items()) if best
                      else "—" if search_space(study, name) else "nothing searched"),
            "trials_run": "—" if no_search else r["trials_run"],
            "trials_pruned": "—" if no_search else r["trials_pruned"],
            "trials_failed": "—" if no_search else (f"{failed + retried}" + (f" ({retried} retried)" if retried else "")
                                                    + (f", {interrupted} interrupted" if interrupted else "")),
            "device_hours": f"{r['device_hours']:.3f}",
            "best_epoch": "—" if _missing(r["best_epoch_median"]) else (
                f"{r['best_epoch_median']:g} of {r['epochs']}" + ("" if r["converged"] else " ⚠")),
            "search": flagged.get(name, []),
        })
    return rows


def reference_label(result: StudyResult) -> str:
    """What the headline's Δ is measured against: "awd", or with axes "awd at the same level"."""
    return result.reference + (" at the same level" if result.crossed is not None else "")


def _headline_notes(result: StudyResult) -> list:
    baselines = result.reference + (f" and, for each technique's own effect, {NO_DROPOUT}"
                                    if any(result.variant_of(c.baseline) == NO_DROPOUT for c in result.comparisons)
                                    else "")
    if result.crossed is None:
        tested = sum(c.p is not None for c in result.comparisons)
        order = "Rows are ordered by mean test perplexity, lowest first."
        delta = f"Δ is the variant's mean minus {result.reference}'s"
        family = (f"Every comparison in this report (against {baselines}: {len(result.comparisons)} in all, {tested} "
                  "tested) is one family for Holm's adjustment, ")
    else:
        family_size = len(result.crossed.family)
        tested = sum(c.p is not None for c in result.crossed.family)
        order = ("Rows are grouped by axis level, in the order of [axes] (an arm an axis cannot act on comes after "
                 "that axis's levels), and ordered by mean test perplexity, lowest first, within each level.")
        delta = (f"Δ is the arm's mean minus the mean of {result.reference}'s arm at the same axis level (the "
                 "reference row of that level; arms of different levels are never compared)")
        family = (f"Every comparison in this report (against {baselines} at each level, and the crossed section's "
                  f"interaction contrasts: {family_size} in all, {tested} tested) is one family for Holm's "
                  "adjustment, ")
    notes = [
        order + " The search picks each variant's rates by validation perplexity; test perplexity comes only from the "
        "confirmation runs, which retrain those rates with new seeds.",
        f"{delta}: negative means lower (better) perplexity. Intervals are "
        f"95%: Student t (paired differences where the seeds match, Welch otherwise) below {stats.BCA_MIN_N} seeds, "
        "scipy's BCa bootstrap from there on; each interval is for its own comparison, unadjusted.",
        "p: two-sided paired t-test over matching seeds, Welch's t-test otherwise. " + family
        + f"and a difference is called supported when its Holm-adjusted p is below {stats.ALPHA}.",
        "Best epoch: the median over the confirmation seeds of the epoch with the lowest validation perplexity; ⚠ "
        "marks a variant with a seed whose best epoch fell in the last quarter of its epochs (it may not have "
        "converged).",
        "Search: ⚠ marks why a search may not have found its arm's best: a best value within "
        f"{adequacy.EDGE_MARGIN:.0%} of its range's edge, an expected best still falling at the last trial (by more "
        "than the seeds' sd of validation perplexity), or a searched parameter that changed nothing; each verdict "
        "touching such an arm says so in the conclusions.",
        "Trials run, pruned and failed count the search; failed includes attempts that were retried, and interrupted "
        "ones (Ctrl-C, a stopped machine), which use no attempt. Device-hours add up the logged seconds of every run.",
    ]
    if result.reference_note:
        notes.insert(0, result.reference_note)
    return notes


def _section(title: str, draw, caption: str, missing: str, importances=None) -> dict:
    """One figure of the page: draw() returns a Figure, or None when there is nothing to draw yet (then `missing`
    says so); a figure that cannot be drawn from this study's numbers is said in words instead."""
    try:
        fig = draw()
        image = png_data_uri(fig) if fig is not None else None
    except Exception as err:  # noqa: BLE001  degenerate numbers must not cost the rest of the report
        image, missing = None, f"This figure could not be drawn from these results ({type(err).__name__}: {err})."
    return {"title": title, "image": image, "caption": caption, "missing": missing, "importances": importances}


def _plots(result: StudyResult) -> list:
    colors = plots.palette(result.log.study.variants)
    importances = [(r.name, result.log.importances.get(r.name) or "no search study in the Optuna storage.")
                   for r in result.rows]
    return [
        _section("Test perplexity over seeds", lambda: plots.plot_test_ppl(result, colors),
                 "Each dot is one confirmation seed; variants ordered best (lowest) to worst"
                 + (", level by level" if result.crossed is not None else "") + "; diamond and bar: the mean and its "
                 "95% interval.", "No confirmation run has finished yet."),
        _section("Isolation: best validation perplexity per variant", lambda: plots.plot_isolation(result, colors),
                 "Each variant's rates were tuned on their own with the same budget; the large marker is the best "
                 "finished search trial (pruned trials are left out: they stopped early).",
                 "No search trial has finished yet."),
        _section("Learning curves", lambda: plots.plot_curves(result, colors),
                 "Train (dashed) and validation (solid) perplexity per epoch of the confirmation runs: median across "
                 "seeds, bands from the lowest to the highest seed. The red band is the gap between them: it widens "
                 "where a variant overfits. Train perplexity is measured with dropout on.",
                 "No confirmation run has finished yet, so there are no curves."),
        _section("Sensitivity to the searched parameters", lambda: plots.plot_sensitivity(result, colors),
                 "Best validation perplexity of each finished search trial against each searched parameter, one row "
                 "per variant (ring: the best trial). Triangles along the top mark where pruned trials were: they "
                 "stopped early, so their perplexity is not comparable.",
                 "No search trial with searched parameters has been logged yet.", importances),
        _section("Expected best validation perplexity against the number of trials",
                 lambda: plots.plot_expected_best(result, colors),
                 "Expected lowest validation perplexity of k trials drawn with replacement from the logged ones, ±1 sd "
                 "(Dodge et al. 2019, Show Your Work). Pruned trials count with the best value they reached. The "
                 "search's trials are not independent draws (TPE learns), so read it as a budget curve: where it is "
                 "still falling, more trials would likely have helped.", "No search trial has been logged yet."),
    ]


def _answer_key(found) -> dict | None:
    key = found.summary.answer_key
    if key is None:
        return None
    rows = [{"arm": r.arm, "metric": METRICS[r.metric], "published": f"{r.published:g}", "measured": _num(r.measured),
             "ci": _interval(r.ci), "seeds": r.seeds, "diff": "—" if r.diff is None else f"{r.diff:+.2f}",
             "agrees": ("ordering only" if not r.values_compared else "—" if r.measured is None else
                        "yes" if r.agrees(key.expect.tolerance) else "no")} for r in key.rows]
    signs = [{"metric": METRICS[s.metric], "pair": f"{s.first} − {s.second}", "published": f"{s.published:+.2f}",
              "measured": "—" if s.measured is None else f"{s.measured:+.2f}",
              "holds": "—" if s.holds is None else "yes" if s.holds else "no"} for s in key.signs]
    return {"source": key.expect.source, "note": key.expect.note, "tolerance": key.expect.tolerance, "rows": rows,
            "signs": signs, "verdict": key.verdict}


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


@functools.cache  # the diagrams depend on the dropout modules alone (seeded), not on the study
def _masks() -> tuple:
    return tuple({"title": m.title, "rule": m.rule, "image": png_data_uri(m.figure)} for m in mask_figures())


def render_html(found, out_dir: Path = Path("reports")) -> str:
    """The whole report of a harness.results.StudyResults as one HTML page, images embedded; every logged string
    escaped by the template."""
    result = found.summary
    log, study = result.log, result.log.study
    rebuild = (f"python -m harness report {shlex.quote(str(study.path))} "
               f"--tracking-uri {shlex.quote(redact(log.tracking_uri))} --storage {shlex.quote(redact(log.storage))}")
    if Path(out_dir) != Path("reports"):
        rebuild += f" --out {shlex.quote(str(out_dir))}"
    return _TEMPLATES.get_template("report.html.j2").render(
        study=study, result=result, tracking_uri=redact(log.tracking_uri), storage=redact(log.storage),
        built=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        conclusions=conclusions(result), headline=_headline(found), headline_notes=_headline_notes(result),
        reference=reference_label(result),
        answer_key=_answer_key(found),
        plots=_plots(result), failures=_failures(result),
        masks=_masks(),
        facts=_facts(result), rebuild=rebuild, reruns=rerun_commands(result), configs=_configs(result),
        crossed=crossed_section(result),
    )
