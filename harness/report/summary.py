"""The report's numbers, a pure function of a StudyLog: one headline row per arm with its search judged
(harness.study.adequacy), every comparison (arm minus baseline in mean test perplexity over the confirmation seeds;
baselines awd, else the best, and no_dropout for each technique's own effect; one Holm family; supported by
stats.is_supported alone), the answer key of [expect], what is missing, and the conclusions in words. In a study
with [axes] every comparison is within one axis level (an arm against the baseline's arm at its level) and the
family is harness.report.crossing's, with the interaction contrasts.
"""

import itertools
import shlex
from dataclasses import dataclass, field

import numpy as np

from harness import stats
from harness.config import SITES
from harness.study.adequacy import Flag, judge_trials
from harness.study.ledger.studies import SearchTrial
from harness.study.rules import CONFIRM, SEARCH, RunState, Tally, measured, search_space, trials_for
from harness.report import crossing
from harness.report.crossing import NO_DROPOUT, REFERENCE
from harness.report.answer_keys import KeyResult, check_key
from harness.report.logs import StudyLog

CONVERGED_BY = 0.75  # a run whose best epoch lies in its last quarter may still have been improving
SEARCHABLE = tuple(f"dropout.{site}" for site in SITES) + ("train.lr",)


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
    best_epochs: tuple = ()  # the confirmation runs' best epochs (1-based), in seed order
    epochs: int | None = None  # epochs each confirmation run trained
    flags: tuple = ()  # harness.study.adequacy.Flag: why the search may not have found the arm's best
    val_ppl: dict = field(default_factory=dict)  # confirmation seed -> best validation perplexity

    @property
    def converged(self) -> bool | None:
        """Whether every confirmation run reached its best validation perplexity before its last quarter of epochs:
        a best epoch at the end would mean more epochs might still change its numbers. None without runs."""
        if not self.best_epochs or not self.epochs:
            return None
        return not self.late_best_epochs

    @property
    def late_best_epochs(self) -> list:
        """The confirmation runs' best epochs that fell in the last quarter of their epochs, sorted."""
        return sorted(e for e in self.best_epochs if self.epochs and e > CONVERGED_BY * self.epochs)

    @property
    def mean(self) -> float | None:
        """Mean test perplexity over the confirmation seeds."""
        return float(np.mean(list(self.test_ppl.values()))) if self.test_ppl else None

    @property
    def sd(self) -> float | None:
        """Sample standard deviation (n - 1) over the seeds, as the ablation logs it."""
        return float(np.std(list(self.test_ppl.values()), ddof=1)) if len(self.test_ppl) > 1 else None

    @property
    def ci(self) -> stats.Interval | None:
        """Confidence interval of the mean test perplexity (stats.mean_ci)."""
        return stats.mean_ci(list(self.test_ppl.values())) if len(self.test_ppl) > 1 else None

    @property
    def trials_run(self) -> int:
        """Search attempts that ended and counted: finished, pruned, failed for good, and failed then retried."""
        return self.trials.attempts if self.trials else 0


@dataclass(frozen=True)
class StudyResult:
    """The report's content: headline rows best first (with axes: level by level, best first within each), every
    comparison, the reference and what is missing."""

    log: StudyLog
    rows: list  # VariantResult, best mean test perplexity first (with axes: level by level)
    comparisons: list  # stats.Comparison of each pair of arms, named, adjusted together (Holm)
    reference: str  # the reference variant; with axes its arm at each level is that level's reference
    reference_note: str
    missing: list  # sentences; empty when the study is complete
    answer_key: KeyResult | None = None  # published against measured, when the study file has [expect]
    crossed: crossing.CrossedResult | None = None  # with [axes]: the per-level effects and interaction contrasts

    def variant_of(self, arm: str) -> str:
        """The variant an arm runs ("awd" of "awd@cell=gru"; the arm itself without axes)."""
        found = self.log.study.variants.get(arm)
        return found.variant if found else arm

    def is_reference(self, arm: str) -> bool:
        """Whether the arm is the reference (with axes: the reference variant's arm at its level)."""
        return self.variant_of(arm) == self.reference

    def against(self, baseline: str) -> dict:
        """arm -> [stats.Comparison] of the comparisons against one baseline variant (with axes: its arm at the
        compared arm's level; one per level for an arm an axis cannot act on where the baseline's arms differ)."""
        found = {}
        for c in self.comparisons:
            if self.variant_of(c.baseline) == baseline:
                found.setdefault(c.variant, []).append(c)
        return found


def searchable_params(rows) -> list:
    """The parameters any of these variants searched, in the fixed order of SEARCHABLE."""
    return [p for p in SEARCHABLE if any(p in r.searched for r in rows)]


def _variant_result(log: StudyLog, variant: str) -> VariantResult:
    runs = log.runs[log.runs.variant == variant]
    finished = runs[runs.state == RunState.FINISHED]
    search = finished[(finished.phase == SEARCH) & finished.best_val_ppl.map(measured)]
    searched = tuple(search_space(log.study, variant))
    best_val, best_params = None, {}
    if len(search):
        best = search.loc[search.best_val_ppl.idxmin()]
        best_val = float(best.best_val_ppl)
        best_params = {k: float(best.params[k]) for k in searched if k in best.params}
    # A run whose test perplexity is no measurement (inf, or MLflow's 1.797e308 for it) diverged: it is listed with
    # the failures, not averaged.
    confirm = finished[(finished.phase == CONFIRM) & finished.test_ppl.map(measured)].sort_values("end_time")
    test_ppl = {int(s): float(p) for s, p in zip(confirm.seed, confirm.test_ppl)}  # a seed's latest run wins
    val_ppl = {int(s): float(p) for s, p in zip(confirm.seed, confirm.best_val_ppl) if measured(p)}
    latest = confirm.drop_duplicates("seed", keep="last").sort_values("seed")
    # The search is judged against the seed noise of its own objective (validation perplexity), once measured.
    noise = float(np.std(list(val_ppl.values()), ddof=1)) if len(val_ppl) > 1 else None
    return VariantResult(
        variant, log.study.variants[variant].description, searched, best_val, best_params, test_ppl,
        log.tallies.get(variant, {}).get(SEARCH), float(runs.seconds.sum()) / 3600,
        tuple(int(e) for e in latest.best_epoch.dropna()),
        int(latest.epochs.max()) if latest.epochs.notna().any() else None,
        tuple(judge_trials(search_space(log.study, variant), _search_trials(log, variant), noise)), val_ppl,
    )


def _search_trials(log: StudyLog, variant: str) -> list:
    """The arm's search trials as the ledger reads them (a pruned trial's value None, not NaN)."""
    def number(value) -> float | None:
        return None if value is None or not np.isfinite(value) else float(value)

    mine = log.trials[log.trials.variant == variant]
    return [SearchTrial(t.variant, int(t.number), t.state, number(t.value), number(t.best_seen), dict(t.params))
            for t in mine.itertuples()]


def _reference(study, results: dict) -> tuple[str, str]:
    """(reference variant, why it was chosen: "" for awd). Without awd: with [axes], no_dropout, else the first
    variant of the study file, chosen before any result (a best variant would rank arms across levels); without
    axes, the best variant, said to be picked after seeing the results."""
    if crossing.has_variant(study, REFERENCE):
        return REFERENCE, ""
    if study.axes:
        first = next(iter(study.variants.values())).variant
        chosen, why = (NO_DROPOUT, "") if crossing.has_variant(study, NO_DROPOUT) else (
            first, " (the first variant of the study file; neither awd nor no_dropout is in it)")
        return chosen, (f"{REFERENCE} is not in this study, so each arm is compared with {chosen}'s arm at its "
                        f"level{why}.")
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


def level_key(study, arm: str) -> tuple:
    """Where an arm's axis level sorts: each axis's value position in [axes] (after the last for an axis that cannot
    act on the arm); () without axes."""
    mine = dict(study.variants[arm].axes)
    return tuple(values.index(mine[key]) if key in mine else len(values) for key, values in study.axes.items())


def contrast_pairs(variants: list, reference: str) -> list:
    """(variant, baseline) of every comparison: each variant against the reference, then each other variant
    against no_dropout (each technique's own effect) where the study has it."""
    pairs = [(v, reference) for v in variants if v != reference]
    if NO_DROPOUT in variants and reference != NO_DROPOUT:
        pairs += [(v, NO_DROPOUT) for v in variants if v not in (reference, NO_DROPOUT)]
    return pairs


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def missing_parts(log: StudyLog) -> list:
    """Sentences naming what a complete study would have and this one lacks (empty when complete)."""
    study, runs, out = log.study, log.runs, []
    for variant in study.variants:
        mine = runs[runs.variant == variant]
        phases = log.tallies.get(variant, {})
        if SEARCH not in phases:
            out.append(f"{variant}: no search has started.")
            continue
        c, budget = phases[SEARCH], trials_for(study, variant)
        if c.settled < budget:
            out.append(f"{variant}: {c.settled} of {budget} search trials settled"
                       + (f", {c.running} running." if c.running else "."))
        elif c.finished == 0:
            out.append(f"{variant}: no search trial finished, so nothing could be confirmed.")
            continue
        confirm = mine[mine.phase == CONFIRM]
        done = set(confirm[confirm.state == RunState.FINISHED].seed)
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
    for run in runs[runs.state == RunState.RUNNING].itertuples():
        out.append(f"{run.variant}: MLflow run '{run.name}' is still running (if no coordinator is, resuming the "
                   "study marks it interrupted).")
    return out


def summarize(log: StudyLog) -> StudyResult:
    """Headline rows, every comparison (Holm-adjusted as one family) and the list of what is missing."""
    study = log.study
    results = {v: _variant_result(log, v) for v in study.variants}
    reference, note = _reference(study, results)
    # With axes, the comparisons are the crossed family's per-level effects (one family with the interactions).
    crossed = crossing.cross(study, {name: r.test_ppl for name, r in results.items()}, reference)
    if crossed is None:
        pairs = contrast_pairs(list(results), reference)
        comparisons = stats.adjust([stats.compare(results[v].test_ppl, results[b].test_ppl, names=(v, b))
                                    for v, b in pairs])
    else:
        comparisons = [e.comparison for e in crossed.effects]
    order = sorted(results.values(), key=lambda r: (level_key(study, r.name), r.mean is None, r.mean or 0.0,
                                                   r.search_best_val_ppl is None, r.search_best_val_ppl or 0.0))
    key = None
    if study.expect is not None:
        key = check_key(study.expect, {"test_ppl": {r.name: r.test_ppl for r in order},
                                       "val_ppl": {r.name: r.val_ppl for r in order}})
    return StudyResult(log, order, comparisons, reference, note, missing_parts(log), key, crossed)


def _ppl(value: float) -> str:
    return f"{value:.2f}"


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


def flag_text(arm: str, flag: Flag) -> str:
    """A search flag said of its arm: "weight_only's best weight 0.494 sits at the top of its range [0.05, 0.5]"."""
    return f"{arm}'s {flag.text[4:] if flag.text.startswith('its ') else flag.text}"


def search_limited(result: StudyResult, *arms: str) -> str:
    """What limits the searches of these arms, in words ("" when their searches are clean)."""
    rows = {r.name: r for r in result.rows}
    return "; ".join(flag_text(arm, f) for arm in arms if arm in rows for f in rows[arm].flags)


def _search_conclusions(result: StudyResult) -> list:
    """One sentence naming every arm whose search may not have found its best, with the fix for each."""
    flagged = [r for r in result.rows if r.flags]
    if not flagged:
        return []
    return ["Search-limited, so these arms' numbers may improve with more search (fix in brackets): " + "; ".join(
        f"{flag_text(r.name, f)} [{f.fix}]" for r in flagged for f in r.flags) + "."]


def _orderings(result: StudyResult, confirmed: list) -> list:
    """"Ordered by mean test perplexity ..." over every arm; with axes one sentence per axis level, naming the
    variants of the arms at that level (arms of different levels are not compared)."""
    seeds = "/".join(map(str, sorted({len(r.test_ppl) for r in confirmed})))
    lead = f"ordered by mean test perplexity (lower is better; {seeds} confirmation seeds): "
    if result.crossed is None:
        return [lead[0].upper() + lead[1:] + " < ".join(f"{r.name} {_ppl(r.mean)}" for r in confirmed) + "."]
    study, rows, out = result.log.study, {r.name: r for r in confirmed}, []
    variants = list(dict.fromkeys(arm.variant for arm in study.variants.values()))
    for combination in itertools.product(*study.axes.values()):
        level = dict(zip(study.axes, combination))
        arms = [rows[a] for v in variants for a in crossing.arms_at(study, v, level) if a in rows]
        if arms:
            arms.sort(key=lambda r: r.mean)
            out.append(f"At {crossing.level_text(study, tuple(level.items()))}, {lead}"
                       + " < ".join(f"{result.variant_of(r.name)} {_ppl(r.mean)}" for r in arms) + ".")
    return out


def _said_by_crossed(result: StudyResult) -> set:
    """(arm, baseline arm) of the effects the crossed section's sentences state (both orientations): with axes the
    conclusions leave them to it."""
    if result.crossed is None:
        return set()
    pairs = [p for i in result.crossed.interactions for p in (i.first, i.second)]
    return {(p.arm, p.baseline) for p in pairs} | {(p.baseline, p.arm) for p in pairs}


def conclusions(result: StudyResult) -> list:
    """The report's findings in sentences: the ordering (with axes, per level), each supported difference, and what
    is not supported with the seeds a decision would take; every verdict touching an arm whose search is flagged
    says so. With axes the per-level effects the crossed section states (harness.report.crossed) are not repeated."""
    confirmed = [r for r in result.rows if r.test_ppl]
    key = [f"Answer key ({result.answer_key.expect.source}): {result.answer_key.verdict}"] if result.answer_key else []
    if not confirmed:
        return (["No confirmation run has finished yet, so there is nothing to conclude."]
                + _search_conclusions(result) + key)
    out = _orderings(result, confirmed)
    supported, open_questions, said = [], [], _said_by_crossed(result)
    for comp in result.comparisons:
        if comp.diff is None or (comp.variant, comp.baseline) in said:
            continue
        # Said as "better beats worse by a positive amount": flip the interval of variant - baseline when needed.
        better, worse = (comp.variant, comp.baseline) if comp.diff < 0 else (comp.baseline, comp.variant)
        low, high = (-comp.ci.high, -comp.ci.low) if comp.ci and comp.diff < 0 else (
            (comp.ci.low, comp.ci.high) if comp.ci else (None, None))
        interval = f"95% CI {low:.2f}..{high:.2f}" if comp.ci else "no interval"
        limited = search_limited(result, comp.variant, comp.baseline)
        if comp.supported:
            supported.append(f"{better} beats {worse} by {abs(comp.diff):.2f} ppl ({interval}, {comp.test} "
                             f"p {_p(comp.p)}, Holm p {_p(comp.p_holm)})"
                             + (f", but search-limited: {limited}." if limited else "."))
        else:
            why = f"Holm p {_p(comp.p_holm)}" if comp.p_holm is not None else (comp.note or "not tested")
            needed = comp.seeds_needed
            need = ("an unknown number of seeds" if needed is None else
                    f"about {needed.text}" if needed.per_variant else needed.text)
            open_questions.append(f"Not supported{', and search-limited' if limited else ''}: {better} ahead of "
                                  f"{worse} by {abs(comp.diff):.2f} ppl ({interval}, {why}); deciding it would take "
                                  f"{need}, if the observed difference is real" + (f"; {limited}." if limited else "."))
    if supported:
        out += supported
    elif len(result.rows) == 1:
        out.append(f"The study has one arm, {result.rows[0].name}, so there is nothing to compare it with.")
    elif said:
        out.append("Beyond the effects stated above, no other difference is supported after Holm's correction.")
    else:
        out.append("No difference is supported after Holm's correction.")
    late = []
    for r in confirmed:
        if r.converged is False:  # the same rule as the headline's warning mark
            late.append(f"{r.name} ({len(r.late_best_epochs)} of {len(r.best_epochs)} seeds best in the last quarter "
                        f"of {r.epochs} epochs, at epoch {', '.join(map(str, r.late_best_epochs))})")
    if late:
        out.append("Still improving near the end, so more epochs might change these numbers: " + ", ".join(late) + ".")
    return out + open_questions + _search_conclusions(result) + key


def rerun_commands(result: StudyResult) -> list:
    """One `python -m harness train` command per confirmation run: the study plus the --set it differed by."""
    study, out = result.log.study, []
    runs = result.log.runs
    for r in result.rows:
        base = {k: str(v) for k, v in study.run_config(r.name).flat().items()}
        confirm = runs[(runs.variant == r.name) & (runs.phase == CONFIRM) & (runs.state == RunState.FINISHED)]
        for run in confirm.sort_values("seed").itertuples():
            sets = [f"--set {shlex.quote(f'{k}={v}')}" for k, v in sorted(run.params.items())
                    if k in base and base[k] != v]
            out.append(f"python -m harness train {shlex.quote(str(study.path))} --variant {shlex.quote(r.name)} "
                       + " ".join(sets))
    return out
