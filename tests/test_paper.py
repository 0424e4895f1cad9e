"""The report's copies for a paper: the LaTeX table compiles with booktabs, the Markdown table says what results.csv
holds, every figure opens as PDF (fonts embedded) and SVG at a paper's column width, and the README cites the
configuration the runs logged (study digest, git commit, corpus MD5s).

Run: .venv/bin/python -m pytest -q tests/test_paper.py   (the LaTeX test needs pdflatex with booktabs)
"""

import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from harness.report import build_report
from harness.report.paper import (COLUMN_WIDTH, FONT_SIZE, TEXT_WIDTH, Provenance, latex_table, markdown_table,
                                  write_paper)
from harness.study.spec import load_study
from helpers import latex_with_booktabs

SVG = "{http://www.w3.org/2000/svg}"
DOCUMENT = r"""\documentclass{article}
\usepackage{booktabs}
\usepackage{graphicx}
\begin{document}
\input{table.tex}
\includegraphics{figures/test_ppl.pdf}
\end{document}
"""


@pytest.fixture(scope="module")
def paper(smoke_run, tmp_path_factory) -> Path:
    """The smoke study's report folder, built once for this module."""
    out = tmp_path_factory.mktemp("paper-report")
    build_report(load_study(smoke_run.study), smoke_run.tracking_uri, smoke_run.storage, out)
    return out / "smoke"


def headline(**changes) -> pd.DataFrame:
    """A three-row headline with results.csv's columns: awd (reference), a variant whose name needs escaping, and
    one with a single seed (no sd, no interval, no test); `changes` replaces columns."""
    frame = pd.DataFrame({
        "variant": ["awd", "awd_no_weight@cell=gru", "naive"], "reference": [True, False, False],
        "confirm_seeds": [3, 3, 1], "test_ppl_mean": [100.0, 104.5, 130.0], "test_ppl_sd": [1.0, 2.25, math.nan],
        "test_ppl_ci_low": [97.5, 98.9, math.nan], "test_ppl_ci_high": [102.5, 110.1, math.nan],
        "diff_to_reference": [math.nan, 4.5, 30.0], "diff_ci_low_to_reference": [math.nan, -1.25, math.nan],
        "diff_ci_high_to_reference": [math.nan, 10.25, math.nan], "p_holm_to_reference": [math.nan, 0.0004, math.nan],
        "supported_to_reference": [None, True, None],
    })
    for column, values in changes.items():
        frame[column] = values
    return frame


def markdown_rows(text: str) -> list[list[str]]:
    """The body rows of a Markdown table, each a list of cells stripped of bold marks."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip().strip("*") for cell in line.strip("|").split(" | ")] for line in lines[1:]]


# --- the tables, in-process -------------------------------------------------------------------------
@pytest.mark.fast
def test_markdown_marks_the_lowest_mean_and_shows_what_is_missing():
    frame = headline(test_ppl_mean=[100.0, 99.0, 130.0])  # the best is not the first row
    lines = [line for line in markdown_table(frame).splitlines() if line.startswith("| ")]
    assert lines[2].startswith("| **awd_no_weight@cell=gru** | **3** | **99.00 ± 2.25** |")  # after header, awd
    assert "**" not in lines[1] + lines[3]
    assert markdown_rows(markdown_table(frame)) == [
        ["awd", "3", "100.00 ± 1.00", "[97.50, 102.50]", "reference", "", ""],
        ["awd_no_weight@cell=gru", "3", "99.00 ± 2.25", "[98.90, 110.10]", "4.50", "[-1.25, 10.25]", "< 0.001†"],
        ["naive", "1", "130.00", "", "30.00", "", ""],
    ]


@pytest.mark.fast
@pytest.mark.parametrize("column", [
    np.array([False, True, False]),  # results_frame's supported column: numpy bools
    pd.array([pd.NA, True, False], dtype="boolean"),
    [math.nan, 1.0, 0.0],  # read back from results.csv with a missing value
], ids=["numpy", "nullable", "float"])
def test_a_supported_difference_is_marked_however_the_frame_holds_its_flag(column):
    frame = headline(supported_to_reference=column, p_holm_to_reference=[math.nan, 0.0004, 0.2])
    rows = markdown_rows(markdown_table(frame))
    assert [r[6] for r in rows] == ["", "< 0.001†", "0.200"]
    assert r"$<0.001$$^\dagger$" in latex_table(frame) and latex_table(frame).count(r"^\dagger") == 2  # + caption


@pytest.mark.fast
def test_latex_escapes_names_uses_booktabs_and_bolds_the_best_row():
    text = latex_table(headline())
    assert r"\toprule" in text and r"\midrule" in text and r"\bottomrule" in text
    assert r"awd\_no\_weight@cell=gru" in text and "awd_no" not in text
    body = text.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert body[0].startswith(r"\bfseries \boldmath awd &")  # the lowest mean
    assert not any(r"\bfseries" in row for row in body[1:])
    assert r"$104.50$ $\pm$ $2.25$" in body[1] and r"[$-1.25$, $10.25$]" in body[1] and r"$<0.001$$^\dagger$" in body[1]


# --- the smoke study's files ------------------------------------------------------------------------
@pytest.mark.slow
def test_markdown_table_matches_results_csv(paper):
    results = pd.read_csv(paper / "results.csv")
    rows = markdown_rows((paper / "table.md").read_text(encoding="utf-8"))
    assert [r[0] for r in rows] == list(results.variant)
    for row, r in zip(rows, results.itertuples()):
        assert row[1] == str(r.confirm_seeds)
        assert row[2] == f"{r.test_ppl_mean:.2f} ± {r.test_ppl_sd:.2f}"
        assert row[3] == f"[{r.test_ppl_ci_low:.2f}, {r.test_ppl_ci_high:.2f}]"
        if r.reference:
            assert row[4:] == ["reference", "", ""]
            continue
        assert row[4] == f"{r.diff_to_reference:.2f}"
        assert row[5] == f"[{r.diff_ci_low_to_reference:.2f}, {r.diff_ci_high_to_reference:.2f}]"
        p = "< 0.001" if r.p_holm_to_reference < 0.001 else f"{r.p_holm_to_reference:.3f}"
        assert row[6] == p + ("†" if r.supported_to_reference else "")
    best = results.test_ppl_mean.idxmin()
    marked = [i for i, line in enumerate(l for l in (paper / "table.md").read_text().splitlines()
                                         if l.startswith("| ")) if "**" in line]
    assert marked == [best + 1]  # after the header row


@pytest.mark.slow
@pytest.mark.needs("latex")
def test_table_tex_compiles_with_booktabs(paper, tmp_path):
    shutil.copy(paper / "table.tex", tmp_path)
    shutil.copytree(paper / "figures", tmp_path / "figures")
    (tmp_path / "paper.tex").write_text(DOCUMENT, encoding="utf-8")
    proc = subprocess.run([str(latex_with_booktabs()), "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert "Missing character" not in log and "Undefined control sequence" not in log
    assert (tmp_path / "paper.pdf").read_bytes().startswith(b"%PDF-")


@pytest.mark.slow
def test_every_figure_opens_as_pdf_and_svg_at_column_width_with_fonts_embedded(paper):
    stems = {p.stem for p in (paper / "figures").iterdir()}
    assert stems == {"test_ppl", "isolation", "curves", "sensitivity", "expected_best"}
    widths = {}
    for stem in stems:
        pdf = (paper / "figures" / f"{stem}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType fonts inside, no Type 3
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf)
        widths[stem] = float(box.group(1)) / 72
        svg = ET.parse(paper / "figures" / f"{stem}.svg").getroot()
        assert svg.tag == f"{SVG}svg"
        assert float(svg.get("width").removesuffix("pt")) / 72 == pytest.approx(widths[stem])
        assert svg.findall(f".//{SVG}text") == []  # glyphs are paths: no font needed to show it
        assert len(svg.findall(f".//{SVG}path")) > 20
    assert widths["test_ppl"] == pytest.approx(COLUMN_WIDTH) and widths["isolation"] == pytest.approx(COLUMN_WIDTH)
    assert widths["curves"] == pytest.approx(TEXT_WIDTH) and widths["sensitivity"] == pytest.approx(TEXT_WIDTH)


@pytest.mark.slow
def test_readme_cites_what_the_runs_logged(paper, smoke_run):
    client = MlflowClient(smoke_run.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'run'")
    text = (paper / "README.md").read_text(encoding="utf-8")
    assert experiment.tags["study_digest"] in text
    for commit in {r.data.tags["git_commit"] for r in runs}:
        assert f"`{commit}`" in text
    for pair in experiment.tags["corpus_md5"].split(","):
        split, md5 = pair.split("=")
        assert f"{split}: `{md5}`" in text
    for name in ("index.html", "results.csv", "table.tex", "table.md", "test_ppl", "curves", "sensitivity"):
        assert f"`{name}`" in text


@pytest.mark.fast
def test_a_rebuild_writes_identical_files_and_fonts_stay_small(tmp_path):
    from matplotlib.figure import Figure

    def draw():
        fig = Figure(figsize=(8, 3), layout="constrained")
        ax = fig.subplots()
        ax.plot([1, 2, 3], [3, 1, 2])
        ax.set_title("a title at 14 pt", fontsize=14)
        return fig

    provenance = Provenance("studies/x.toml", "0123456789abcdef", ("abc",), "ptb", {"train": "f0"})
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        figure = draw()
        write_paper(tmp_path / folder, headline(), {"line": figure, "nothing_yet": None}, provenance, "x")
    assert max(t.get_fontsize() for t in figure.texts + [figure.axes[0].title]) <= FONT_SIZE
    for name in ("table.tex", "table.md", "figures/line.pdf", "figures/line.svg", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not (tmp_path / "a" / "figures" / "nothing_yet.pdf").exists()
