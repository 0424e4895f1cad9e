"""The comparison report of a study: one self-contained HTML page and two CSVs, built only from what was logged.

    python -m harness report studies/ablation.toml [--tracking-uri URI] [--storage URL] [--out reports]

Four layers, one module each: `logs` reads the MLflow runs and Optuna trials, `summary` computes every
reported number (statistics from harness.stats), `plots` draws the figures, `page` renders them through the
Jinja2 template in templates/. The report can be rebuilt at any time; a study still running or partly failed
gives a partial report that says what is missing. Writes <out>/<study>/index.html, results.csv (one row per
variant) and comparisons.csv (every comparison and its verdict).
"""

from dataclasses import dataclass
from pathlib import Path

from harness.study.spec import StudyConfig
from harness.report.logs import read_logs
from harness.report.page import render_html
from harness.report.summary import comparisons_frame, conclusions, results_frame, summarize


@dataclass(frozen=True)
class Report:
    """Where a built report is, and its conclusions in words."""

    page: Path
    results_csv: Path
    comparisons_csv: Path
    conclusions: list


def build_report(study: StudyConfig, tracking_uri: str, storage: str, out_dir: Path = Path("reports")) -> Report:
    """Write <out_dir>/<study>/index.html, results.csv and comparisons.csv from what was logged."""
    result = summarize(read_logs(study, tracking_uri, storage))
    folder = Path(out_dir) / study.name
    folder.mkdir(parents=True, exist_ok=True)
    report = Report(folder / "index.html", folder / "results.csv", folder / "comparisons.csv", conclusions(result))
    results_frame(result).to_csv(report.results_csv, index=False)
    comparisons_frame(result).to_csv(report.comparisons_csv, index=False)
    report.page.write_text(render_html(result, Path(out_dir)), encoding="utf-8")
    return report
