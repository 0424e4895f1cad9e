"""The report of the smoke study: its numbers equal what MLflow holds, in the CSV and in a real browser, and an
independent recomputation (pandas and scipy on MLflow's raw metrics) gives the same headline; a rebuild is
identical; partial studies say what is missing; logged strings are escaped; a study that never ran is a clear error.

Run: .venv/bin/python -m pytest -q tests/test_report.py   (the browser test needs Chromium)
"""

import asyncio
import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy import stats as scipy_stats

from harness import results
from harness.cli import build_parser
from harness.config import parse_overrides
from harness.study.spec import load_study
from harness.errors import UserError
from harness.report import build_report
from harness.report.logs import read_logs
from harness.report.page import render_html
from harness.report.summary import conclusions, rerun_commands, summarize
from helpers import headless_chromium

pytestmark = pytest.mark.slow

NASTY = "<script>alert('x')</script> & \"quotes\""


@pytest.fixture(scope="module")
def smoke_study(smoke_run):
    return load_study(smoke_run.study)


@pytest.fixture(scope="module")
def report(smoke_run, smoke_study, tmp_path_factory) -> Path:
    """The smoke study's report page, built once for this module."""
    return build_report(smoke_study, smoke_run.tracking_uri, smoke_run.storage, tmp_path_factory.mktemp("reports")).page


def logged_summaries(smoke_run) -> dict:
    """Per variant, the parent run's summary metrics and the child runs' summed seconds, straight from MLflow."""
    client = MlflowClient(smoke_run.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    out = {}
    for run in client.search_runs([experiment.experiment_id], "tags.kind = 'variant'"):
        out[run.data.tags["variant"]] = dict(run.data.metrics, seconds=0.0)
    for run in client.search_runs([experiment.experiment_id], "tags.kind = 'run'", max_results=1000):
        out[run.data.tags["variant"]]["seconds"] += run.data.metrics.get("seconds", 0.0)
    return out


def test_csv_holds_the_logged_numbers(smoke_run, report):
    assert report.name == "index.html" and report.parent.name == "smoke"
    table = pd.read_csv(report.parent / "results.csv").set_index("variant")
    logged = logged_summaries(smoke_run)
    assert set(table.index) == set(logged) == {"no_dropout", "locked_only", "awd"}
    for variant, metrics in logged.items():
        row = table.loc[variant]
        assert row.search_best_val_ppl == pytest.approx(metrics["search_best_val_ppl"], rel=1e-12)
        assert row.test_ppl_mean == pytest.approx(metrics["confirm_test_ppl_mean"], rel=1e-12)
        assert row.test_ppl_sd == pytest.approx(metrics["confirm_test_ppl_sd"], rel=1e-12)
        assert row.confirm_seeds == metrics["confirm_seeds"]
        assert row.device_hours == pytest.approx(metrics["seconds"] / 3600, rel=1e-9)
        assert row.test_ppl_ci_low <= row.test_ppl_mean <= row.test_ppl_ci_high
    assert table.reference.to_dict() == {"awd": True, "locked_only": False, "no_dropout": False}
    assert table.loc["no_dropout", "trials_run"] == 1  # nothing to search: one trial, not the budget


def test_headline_recomputed_independently_from_mlflow(smoke_run, report):
    """Means, intervals, differences, p-values and Holm from MLflow's raw per-run metrics, with pandas and scipy
    alone (no harness code), against results.csv and comparisons.csv."""
    client = MlflowClient(smoke_run.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    rows = [{"variant": r.data.tags["variant"], "seed": int(r.data.tags["seed"]), "test_ppl": r.data.metrics["test_ppl"]}
            for r in client.search_runs([experiment.experiment_id],
                                        "tags.kind = 'run' and tags.phase = 'confirm' and tags.state = 'finished'")]
    tests = pd.DataFrame(rows).pivot(index="seed", columns="variant", values="test_ppl")
    table = pd.read_csv(report.parent / "results.csv").set_index("variant")
    for variant, values in tests.items():
        n, mean, sd = len(values), values.mean(), values.std(ddof=1)
        half = scipy_stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)
        assert table.loc[variant, "test_ppl_mean"] == pytest.approx(mean, rel=1e-12)
        assert table.loc[variant, "test_ppl_sd"] == pytest.approx(sd, rel=1e-12)
        assert (table.loc[variant, "test_ppl_ci_low"], table.loc[variant, "test_ppl_ci_high"]) == pytest.approx(
            (mean - half, mean + half), rel=1e-12)
    comparisons = pd.read_csv(report.parent / "comparisons.csv")
    pairs = [("no_dropout", "awd"), ("locked_only", "awd"), ("locked_only", "no_dropout")]  # study file's order
    assert list(zip(comparisons.variant, comparisons.baseline)) == pairs
    raw = []
    for variant, baseline in pairs:
        d = tests[variant] - tests[baseline]  # paired by seed
        half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        row = comparisons[(comparisons.variant == variant) & (comparisons.baseline == baseline)].iloc[0]
        assert row["diff"] == pytest.approx(d.mean(), rel=1e-12)  # row.diff would be the Series method
        assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)
        assert row["p"] == pytest.approx(scipy_stats.ttest_rel(tests[variant], tests[baseline]).pvalue, rel=1e-9)
        raw.append(row["p"])
    # Holm by hand: sorted p times (m, m-1, ...), made monotone, capped at 1.
    order = np.argsort(raw)
    holm, running = [0.0] * len(raw), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(raw) - rank) * raw[i]))
        holm[i] = running
    assert list(comparisons.p_holm) == pytest.approx(holm, rel=1e-9)
    assert list(comparisons.supported) == [h < 0.05 for h in holm]
    to_awd = table.loc[["no_dropout", "locked_only"]]
    assert list(to_awd.p_holm_to_reference) == pytest.approx(holm[:2], rel=1e-9)


def test_a_rebuilt_report_is_identical_but_for_its_build_time(smoke_run, smoke_study, report):
    def without_time(text: str) -> str:
        return re.sub(r"Built \d{4}-\d\d-\d\d \d\d:\d\d UTC", "Built", text)

    def files() -> dict:  # every file of the report's folder, figures/ included: relative path -> bytes
        return {str(p.relative_to(report.parent)): p.read_bytes() for p in report.parent.rglob("*") if p.is_file()}

    before = files()
    again = build_report(smoke_study, smoke_run.tracking_uri, smoke_run.storage, report.parent.parent)
    after = files()
    assert set(after) == set(before) and {"index.html", "results.csv", "comparisons.csv", "table.tex", "table.md",
                                          "README.md"} <= set(before)
    assert any(name.startswith("figures/") and name.endswith(".pdf") for name in before)
    page = before.pop("index.html").decode()
    assert page != without_time(page)  # the build time is there, and only it differs
    assert without_time(after.pop("index.html").decode()) == without_time(page)
    assert after == before  # the CSVs, the paper's tables, README and vector figures byte for byte
    assert again.page == report


def test_page_is_self_contained_and_says_the_study_is_complete(report):
    page = report.read_text()
    assert "Complete: every variant" in page and "Partial report" not in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for heading in ("Headline", "Test perplexity over seeds", "Isolation", "Learning curves", "Sensitivity",
                    "Parameter importances", "Expected best", "The dropout masks", "Reproducibility"):
        assert heading in page
    assert page.count('<figure class="mask"><img src="data:image/png;base64,') == 5  # one diagram per technique
    assert "too few for parameter importances" in page  # 3 trials per variant
    assert "python -m harness report " in page and "python -m harness train " in page


# --- in a real browser ------------------------------------------------------------------------------
PAGE_FACTS = """(async () => {
  const images = [...document.images];
  const undecodable = [];
  await Promise.all(images.map(i => i.decode().catch(() => undecodable.push(i.alt))));
  return {
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    undecodable,
    fetched: performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:')),
    rows: [...document.querySelectorAll('#headline tbody tr')].map(tr => ({
      variant: tr.dataset.variant,
      cells: Object.fromEntries([...tr.querySelectorAll('[data-col]')].map(c => [c.dataset.col, c.innerText.trim()])),
    })),
    status: document.querySelector('.status').innerText,
    conclusions: [...document.querySelectorAll('#conclusions li')].map(li => li.innerText),
  };
})()"""


async def inspect_in_chromium(page: Path, profile: Path) -> tuple[dict, list]:
    """Open the page in headless Chromium over DevTools; the page's facts and the errors the browser saw."""
    async with headless_chromium(profile) as (tools, session):
        await tools.call("Page.navigate", session, url=page.as_uri())
        await tools.wait_for("Page.loadEventFired")
        facts = await tools.call("Runtime.evaluate", session, expression=PAGE_FACTS, awaitPromise=True,
                                 returnByValue=True)
        return facts["result"]["value"], tools.errors()


@pytest.mark.servers
@pytest.mark.needs("chromium")
def test_report_in_headless_chromium(smoke_run, report, tmp_path):
    facts, errors = asyncio.run(inspect_in_chromium(report, tmp_path / "profile"))
    assert errors == []
    assert facts["images"] >= 10  # five plots and five mask diagrams
    assert facts["broken"] == [] and facts["undecodable"] == []
    assert facts["fetched"] == []  # nothing loaded from disk or network
    assert facts["status"].startswith("Complete")
    logged = logged_summaries(smoke_run)
    shown = {row["variant"]: row["cells"] for row in facts["rows"]}
    assert list(shown) == sorted(logged, key=lambda v: logged[v]["confirm_test_ppl_mean"])  # best first
    for variant, metrics in logged.items():
        cells = shown[variant]
        assert cells["search_best_val_ppl"] == f"{metrics['search_best_val_ppl']:.2f}"
        assert cells["test_ppl_mean"] == f"{metrics['confirm_test_ppl_mean']:.2f}"
        assert cells["test_ppl_sd"] == f"± {metrics['confirm_test_ppl_sd']:.2f}"
        assert cells["seeds"] == f"{metrics['confirm_seeds']:.0f} of 2"
        assert cells["device_hours"] == f"{metrics['seconds'] / 3600:.3f}"
        if variant == "awd":
            assert cells["diff"] == "reference"
        else:
            diff = metrics["confirm_test_ppl_mean"] - logged["awd"]["confirm_test_ppl_mean"]
            assert cells["diff"].splitlines()[0] == f"{diff:+.2f}"
            assert cells["p"].splitlines()[1] == "paired t" and cells["supported"] in ("yes", "no")
    assert facts["conclusions"][0].startswith("Ordered by mean test perplexity")


# --- what the page says about itself ----------------------------------------------------------------
def test_rerun_commands_rebuild_the_logged_configs(smoke_run, smoke_study):
    result = summarize(read_logs(smoke_study, smoke_run.tracking_uri, smoke_run.storage))
    commands = rerun_commands(result)
    runs = result.log.runs
    confirmed = runs[(runs.phase == "confirm") & (runs.state == "finished")]
    assert len(commands) == len(confirmed) == 6
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[3:])
        config = load_study(args.study).run_config(args.variant, parse_overrides(args.set))
        logged = confirmed[(confirmed.variant == args.variant) & (confirmed.seed == config.train.seed)]
        assert {k: str(v) for k, v in config.flat().items()} == logged.iloc[0].params


def copy_stores(smoke_run, folder: Path) -> tuple[str, str]:
    """A private copy of the smoke study's MLflow and Optuna databases, to doctor."""
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy(smoke_run.workdir / name, folder / name)
    return f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder / 'optuna.db'}"


def test_partial_study_says_what_is_missing(smoke_run, smoke_study, tmp_path):
    uri, storage = copy_stores(smoke_run, tmp_path)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke")
    children = client.search_runs([experiment.experiment_id], "tags.kind = 'run'", max_results=1000)
    failed = next(r for r in children if r.data.tags["variant"] == "awd" and r.data.tags.get("phase") == "confirm"
                  and r.data.tags["seed"] == "2")
    client.set_tag(failed.info.run_id, "state", "failed")
    client.set_tag(failed.info.run_id, "fail_reason", f"Traceback ...\nRuntimeError: {NASTY}")
    for run in children:  # no_dropout has not begun: its runs and Optuna studies are gone
        if run.data.tags["variant"] == "no_dropout":
            client.delete_run(run.info.run_id)
    for phase in ("search", "confirm"):
        optuna.delete_study(study_name=f"smoke/no_dropout/{phase}", storage=storage)
    client.create_run(experiment.experiment_id, run_name="locked_only search #3", tags={
        "kind": "run", "variant": "locked_only", "phase": "search", "trial": "3", "state": "running"})

    page = build_report(smoke_study, uri, storage, tmp_path / "reports").page
    text = page.read_text()
    assert "Partial report" in text
    assert "no_dropout: no search has started." in text
    assert ("awd: confirmation seed 2 has no finished run (failed: RuntimeError: "
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;quotes&#34;)") in text
    assert "locked_only search #3&#39; is still running" in text
    assert "<script" not in text
    table = pd.read_csv(page.parent / "results.csv").set_index("variant")
    assert table.loc["awd", "confirm_seeds"] == 1
    assert pd.isna(table.loc["no_dropout", "search_best_val_ppl"])
    assert table.loc["locked_only", "note_to_reference"] == "2 vs 1 seeds: an interval or a test needs at least 2 on each side"


def _rename(frame: pd.DataFrame, names: dict) -> pd.DataFrame:
    return frame.assign(variant=frame.variant.map(names))


def test_strings_from_the_study_file_and_runs_are_escaped(smoke_run, smoke_study):
    log = read_logs(smoke_study, smoke_run.tracking_uri, smoke_run.storage)
    names = {v: f"<img src=x onerror=alert('{v}')>" for v in smoke_study.variants}
    names["awd"] = "awd"  # keep the reference
    study = dataclasses.replace(
        smoke_study, notes=NASTY,
        variants={names[k]: dataclasses.replace(v, name=names[k], description=NASTY)
                  for k, v in smoke_study.variants.items()},
    )
    runs = _rename(log.runs, names)
    runs.loc[runs.index[0], ["state", "fail_reason", "device"]] = ["failed", NASTY, NASTY]
    log = dataclasses.replace(
        log, study=study, runs=runs, curves=_rename(log.curves, names), trials=_rename(log.trials, names),
        tallies={names[k]: v for k, v in log.tallies.items()},
        importances={names[k]: v for k, v in log.importances.items()},
    )
    page = render_html(results.from_log(log))
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;quotes&#34;" in page
    assert "&lt;img src=x onerror=alert(&#39;locked_only&#39;)&gt;" in page


def test_a_study_that_never_ran_is_a_user_error(smoke_run, tmp_path):
    study = load_study(smoke_run.study)
    unknown = dataclasses.replace(study, name="never-ran")
    with pytest.raises(UserError, match="has no MLflow experiment 'never-ran': run the study first: "
                                        "python -m harness ablate .*smoke.toml --tracking-uri"):
        build_report(unknown, smoke_run.tracking_uri, smoke_run.storage, tmp_path)
    with pytest.raises(UserError, match="no MLflow tracking store at .*nothing.db: run the study first"):
        build_report(study, f"sqlite:///{tmp_path / 'nothing.db'}", smoke_run.storage, tmp_path)
    assert not (tmp_path / "nothing.db").exists()


# --- the pieces ---------------------------------------------------------------------------------------
def test_conclusions_say_each_supported_difference_and_what_more_seeds_would_decide(smoke_run, smoke_study):
    log = read_logs(smoke_study, smoke_run.tracking_uri, smoke_run.storage)
    # Six seeds: awd best, locked_only a noisy hair behind it (paired p about 0.2); no_dropout far behind.
    seeds = range(1, 7)
    noise = dict(zip(seeds, (0.3, -0.2, 0.1, -0.4, 0.25, 0.0)))
    behind = dict(zip(seeds, (0.5, -0.2, 0.6, -0.1, 0.4, 0.0)))
    ppl = {"awd": {s: 100 + noise[s] for s in seeds}, "locked_only": {s: 100 + noise[s] + behind[s] for s in seeds},
           "no_dropout": {s: 120 + 2 * noise[s] for s in seeds}}
    runs = pd.DataFrame([{**log.runs.iloc[0].to_dict(), "variant": v, "phase": "confirm", "state": "finished",
                          "seed": s, "test_ppl": p, "end_time": s} for v, by_seed in ppl.items() for s, p in by_seed.items()])
    result = summarize(dataclasses.replace(log, runs=runs))
    said = conclusions(result)
    assert said[0] == ("Ordered by mean test perplexity (lower is better; 6 confirmation seeds): awd 100.01 < "
                       "locked_only 100.21 < no_dropout 120.02.")
    assert any(s.startswith("awd beats no_dropout by 20.01 ppl (95% CI ") and "Holm p < 0.001" in s for s in said)
    assert any(s.startswith("locked_only beats no_dropout by ") for s in said)
    undecided = [s for s in said if s.startswith("Not supported: awd ahead of locked_only by 0.20 ppl")]
    assert len(undecided) == 1 and "seeds per variant" in undecided[0]


@pytest.mark.fast
def test_conclusions_name_the_seeds_whose_best_epoch_fell_in_the_last_quarter():
    from harness.report.summary import StudyResult, VariantResult, conclusions

    def row(name, best_epochs):
        return VariantResult(name, "", (), None, {}, {s: 100.0 + s for s in range(1, 7)}, None, 0.0,
                             best_epochs=best_epochs, epochs=24)

    early, late = row("no_dropout", (7, 6, 8, 6, 10, 8)), row("awd", (16, 14, 15, 22, 19, 18))
    assert early.converged and not late.converged  # 18 = 0.75 x 24 is still converged, 19 is not
    sentences = conclusions(StudyResult(None, [late, early], [], "awd", "", []))
    (warning,) = [s for s in sentences if s.startswith("Still improving")]
    assert "awd (2 of 6 seeds best in the last quarter of 24 epochs, at epoch 19, 22)" in warning
    assert "no_dropout" not in warning
