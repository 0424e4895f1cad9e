"""The comparison report of a study, built only from what MLflow and Optuna hold: `logs` reads them, `summary`
computes every number (statistics from harness.stats), `plots` draws, `page` renders the Jinja2 template, `paper`
writes copies for a paper; <out>/<study>/ gets index.html, results.csv, comparisons.csv, table.tex, table.md,
figures/ and README.md, also for a study still running (it says what is missing).

    python -m harness report studies/ablation.toml [--tracking-uri URI] [--storage URL] [--out reports]
"""

from dataclasses import dataclass
from pathlib import Path

from harness.study.spec import StudyConfig
from harness.report import plots
from harness.report.logs import read_logs
from harness.report.page import render_html
from harness.report.paper import Provenance, write_paper
from harness.report.summary import comparisons_frame, conclusions, results_frame, summarize


@dataclass(frozen=True)
class Report:
    """Where a built report is, and its conclusions in words."""

    page: Path
    results_csv: Path
    comparisons_csv: Path
    conclusions: list


def build_report(study: StudyConfig, tracking_uri: str, storage: str, out_dir: Path = Path("reports")) -> Report:
    """Write <out_dir>/<study>/index.html, results.csv, comparisons.csv and the paper's files from what was logged."""
    result = summarize(read_logs(study, tracking_uri, storage))
    folder = Path(out_dir) / study.name
    folder.mkdir(parents=True, exist_ok=True)
    report = Report(folder / "index.html", folder / "results.csv", folder / "comparisons.csv", conclusions(result))
    headline = results_frame(result)
    headline.to_csv(report.results_csv, index=False)
    comparisons_frame(result).to_csv(report.comparisons_csv, index=False)
    report.page.write_text(render_html(result, Path(out_dir)), encoding="utf-8")
    write_paper(folder, headline, plots.report_figures(result),
                Provenance.from_runs(study.path, study.digest, study.corpus, result.log.runs), study.name)
    return report
