"""The comparison report of a study, a client of harness.results: `logs` reads MLflow and Optuna, `summary` computes
every number (statistics from harness.stats), harness.results holds them as frames; `plots` draws, `page` renders the
Jinja2 template, `crossed` answers a study's [axes], `paper` writes copies for a paper; <out>/<study>/ gets index.html,
results.csv, comparisons.csv (crossed.csv with axes), table.tex, table.md, figures/ and README.md, also while a
study runs.

    python -m harness report studies/ablation.toml [--tracking-uri URI] [--storage URL] [--out reports]
"""

from dataclasses import dataclass
from pathlib import Path

from harness.study.spec import StudyConfig


# What a report writes into <out>/<study>/ (also figures/, and crossed.csv with axes).
REPORT_FILES = ("index.html", "results.csv", "comparisons.csv", "table.tex", "table.md", "README.md")


@dataclass(frozen=True)
class Report:
    """Where a built report is, and its conclusions in words."""

    page: Path
    results_csv: Path
    comparisons_csv: Path
    conclusions: list


def build_report(study: StudyConfig, tracking_uri: str, storage: str, out_dir: Path = Path("reports")) -> Report:
    """Write <out_dir>/<study>/index.html, results.csv, comparisons.csv and the paper's files from what was logged."""
    # Imported here: harness.results imports this package's modules, and `from harness import results` must not
    # pull in the plotting stack.
    from harness import results
    from harness.report.page import render_html
    from harness.report import plots
    from harness.report.logs import read_logs
    from harness.report.paper import Provenance, write_paper

    found = results.from_log(read_logs(study, tracking_uri, storage))
    folder = Path(out_dir) / study.name
    folder.mkdir(parents=True, exist_ok=True)
    report = Report(folder / "index.html", folder / "results.csv", folder / "comparisons.csv", found.conclusions)
    found.headline.to_csv(report.results_csv, index=False)
    found.comparisons.to_csv(report.comparisons_csv, index=False)
    if not found.crossed.empty:
        found.crossed.to_csv(folder / "crossed.csv", index=False)
    report.page.write_text(render_html(found, Path(out_dir)), encoding="utf-8")
    write_paper(folder, found.headline, plots.report_figures(found.summary),
                Provenance.from_runs(study.path, study.digest, study.corpus, found.summary.log.runs), study.name)
    return report
