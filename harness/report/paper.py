"""Paper-ready copies of a report, written beside index.html: the headline table as LaTeX (booktabs) and Markdown,
every figure as PDF and SVG at a paper's column width with its fonts embedded, and a README.md that lists them and
says how to cite the configuration (study file digest, git commit, corpus MD5s).
"""

import itertools
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.text import Text

COLUMN_WIDTH = 3.25  # inches: one column of a two-column paper (ACL, IEEE, ICML)
TEXT_WIDTH = 6.75  # inches: both columns, for figures of several panels
FONT_SIZE = 8  # points: the largest text in a paper figure (captions in such papers are 9-10 pt)
WIDE = 8.5  # inches: a report figure wider than this has several panels side by side and spans both columns
# TrueType (42) puts the fonts into the PDF (Type 3, matplotlib's default, is refused by some publishers); SVG glyphs
# as paths render the same everywhere, with no font to install. No dates: a rebuilt file is byte-identical.
VECTOR_RC = {"pdf.fonttype": 42, "svg.fonttype": "path", "svg.hashsalt": "awd-ablation"}
NO_DATES = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
TABLE_COLUMNS = ("variant", "seeds", "test ppl", "95% CI", "diff", "95% CI of diff", "Holm p")


@dataclass(frozen=True)
class Provenance:
    """What identifies the configuration behind a report: the study file, its digest, the git commits and the
    corpus files' MD5s the runs logged."""

    study_file: str
    study_digest: str  # sha256 of the study file's text, first 16 hex digits (StudyConfig.digest)
    git_commits: tuple  # the distinct commits the runs were made from, "-dirty" when uncommitted changes ran
    corpus: str
    corpus_md5: dict  # split -> MD5 hex, as the runs' corpus_md5 tag records it

    @classmethod
    def from_runs(cls, study_file, study_digest: str, corpus: str, runs: pd.DataFrame) -> "Provenance":
        """From the report's runs (columns git_commit and corpus_md5, "split=md5,..."; empty strings when not
        logged)."""
        md5 = {}
        for recorded in runs.corpus_md5[runs.corpus_md5 != ""].unique():
            md5.update(pair.split("=", 1) for pair in str(recorded).split(",") if "=" in pair)
        commits = tuple(sorted(c for c in runs.git_commit.unique() if c))
        return cls(str(study_file), study_digest, commits, corpus, dict(sorted(md5.items())))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value, latex: bool) -> str:
    if _missing(value):
        return "--" if latex else "—"
    text = f"{value:.2f}"
    return f"${text}$" if latex else text  # in math, - is a minus sign


def _interval(low, high, latex: bool) -> str:
    if _missing(low) or _missing(high):
        return ""
    return f"[{_number(low, latex)}, {_number(high, latex)}]"


def _holm(p, supported, latex: bool) -> str:
    if _missing(p):
        return ""
    text = ("$<0.001$" if latex else "< 0.001") if p < 0.001 else f"{p:.3f}"
    # `supported` comes as numpy's or pandas' bool from the frames (never `is True`); NaN or NA when not judged
    marked = not pd.isna(supported) and bool(supported)  # pd.isna is True for None too
    return text + ((r"$^\dagger$" if latex else "†") if marked else "")


def headline_cells(headline: pd.DataFrame, latex: bool) -> pd.DataFrame:
    """The headline table as text, one row per variant in results.csv's order (best first): seeds, test
    perplexity mean ± sd, its 95% interval, the difference to the reference with its interval and Holm p († when
    supported). `headline` has results.csv's columns (harness.report.summary.results_frame)."""
    pm = r" $\pm$ " if latex else " ± "
    rows = []
    for r in headline.itertuples():
        reference = bool(r.reference)
        mean = _number(r.test_ppl_mean, latex)
        rows.append({
            "variant": r.variant, "seeds": str(int(r.confirm_seeds)),
            "test ppl": mean + ("" if _missing(r.test_ppl_sd) else pm + _number(r.test_ppl_sd, latex)),
            "95% CI": _interval(r.test_ppl_ci_low, r.test_ppl_ci_high, latex),
            "diff": "reference" if reference else _number(r.diff_to_reference, latex),
            "95% CI of diff": "" if reference else _interval(r.diff_ci_low_to_reference,
                                                             r.diff_ci_high_to_reference, latex),
            "Holm p": "" if reference else _holm(r.p_holm_to_reference, r.supported_to_reference, latex),
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _best_rows(headline: pd.DataFrame) -> set:
    """Positions of the lowest mean test perplexity: one row, or with [axes] (the headline's axis.KEY columns) one per
    axis level, since arms of different levels are not compared; empty when no arm has a mean."""
    means = pd.to_numeric(headline.test_ppl_mean, errors="coerce").reset_index(drop=True)
    levels = [c for c in headline.columns if c.startswith("axis.")]
    if not levels:
        return set() if means.isna().all() else {int(means.idxmin())}
    values = headline[levels].reset_index(drop=True)
    best = set()
    for level in itertools.product(*(values[c].dropna().unique() for c in levels)):
        # The arms at this level, those an axis cannot act on (<NA> there: one arm for every value) included.
        here = pd.concat([values[c].isna() | (values[c] == v) for c, v in zip(levels, level)], axis=1).all(axis=1)
        if means[here].notna().any():
            best.add(int(means[here].idxmin()))
    return best


def _reference(headline: pd.DataFrame) -> str:
    """The reference in words: its arm name, or with [axes] (one reference arm per level) its variant at each level."""
    found = headline.variant[headline.reference.astype(bool)]
    if len(found) > 1:  # arm names are variant@axis=value,...; '@' is not allowed in a variant name
        return f"{str(found.iloc[0]).split('@')[0]}'s arm at the same axis level"
    return str(found.iloc[0]) if len(found) else "the reference"


def caption(headline: pd.DataFrame) -> str:
    """The table's caption in plain words (the LaTeX one escapes it)."""
    return (f"Test perplexity over the confirmation seeds: mean ± sd and its 95% interval; diff: mean difference to "
            f"{_reference(headline)} (negative is better) with its 95% interval and Holm-adjusted p over all the "
            "report's comparisons († supported: Holm p < 0.05). Bold: the lowest mean"
            + (" at each axis level." if any(c.startswith("axis.") for c in headline.columns) else "."))


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)


def latex_table(headline: pd.DataFrame, label: str = "tab:headline") -> str:
    """The headline as a LaTeX table environment (needs \\usepackage{booktabs}), written by pandas' Styler."""
    cells = headline_cells(headline, latex=True)
    cells["variant"] = cells.variant.map(_latex_escape)
    cells.columns = ["variant", "seeds", r"test ppl (mean $\pm$ sd)", r"95\% CI", r"$\Delta$",
                     r"95\% CI of $\Delta$", "Holm $p$"]
    best = _best_rows(headline)
    # table*: both columns of a two-column paper (the same as table in a one-column one); \small to fit 7 columns
    styler = cells.style.hide(axis="index").set_table_styles([{"selector": "small", "props": ":;"}])
    if best:  # \boldmath too: the numbers are math, which \bfseries alone leaves regular
        styler = styler.apply(lambda row: ["bfseries: ; boldmath: ;" if row.name in best else "" for _ in row],
                              axis=1)
    text = _latex_escape(caption(headline))
    for plain, latex in (("±", r"$\pm$"), ("<", "$<$"), ("†", r"$^\dagger$"), ("diff:", r"$\Delta$:")):
        text = text.replace(plain, latex)
    return styler.to_latex(hrules=True, column_format="lrrrrrr", environment="table*", position="t",
                           position_float="centering", caption=text, label=label)


def markdown_table(headline: pd.DataFrame) -> str:
    """The headline as a GitHub Markdown table, best row in bold, with its caption below. Written here rather than
    by DataFrame.to_markdown, which needs the tabulate package for one table."""
    cells = headline_cells(headline, latex=False)
    best = _best_rows(headline)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---:|" * (len(TABLE_COLUMNS) - 1)]
    for i, row in enumerate(cells.itertuples(index=False)):
        texts = [str(v).replace("|", r"\|") for v in row]
        if i in best:
            texts = [f"**{t}**" if t else t for t in texts]
        lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines) + f"\n\n{caption(headline)}\n"


def fit_to_paper(fig: Figure) -> Figure:
    """The figure resized in place for a paper: one column wide (both columns when it has panels side by side),
    text at most FONT_SIZE, the height shrunk with the text."""
    width, height = fig.get_size_inches()
    target = TEXT_WIDTH if width > WIDE else COLUMN_WIDTH
    shrink = FONT_SIZE / matplotlib.rcParams["font.size"]
    fig.set_size_inches(target, height * min(1.0, max(target / width, shrink)))
    for ax in fig.axes:
        ax.tick_params(labelsize=min(FONT_SIZE - 1, matplotlib.rcParams["font.size"]))
    for text in fig.findobj(Text):
        text.set_fontsize(min(text.get_fontsize(), FONT_SIZE))
    for ax in fig.axes:  # a label written for an 8 in figure may be wider than its panel now: break it into lines
        panel = ax.get_position().width * target * 72  # points
        for label in (ax.xaxis.label, ax.title):
            columns = max(12, int(panel / (0.55 * label.get_fontsize())))  # ~0.55 em per character
            label.set_text(textwrap.fill(label.get_text(), columns, break_long_words=False))
    for legend in list(fig.legends):  # a legend in one row may now be wider than the figure: two rows or more
        if legend.get_window_extent().width > fig.bbox.width:
            labels = [t.get_text() for t in legend.get_texts()]
            legend.remove()  # redrawn below, since Legend.set_ncols does not rebuild a legend already laid out
            fig.legend(legend.legend_handles, labels, loc="outside lower center", ncols=math.ceil(len(labels) / 2),
                       fontsize=FONT_SIZE, frameon=False)
    return fig


def save_vector(fig: Figure, stem: Path) -> list[Path]:
    """stem.pdf and stem.svg of the figure at its size, fonts embedded (VECTOR_RC)."""
    out = []
    with matplotlib.rc_context(VECTOR_RC):
        for form in ("pdf", "svg"):
            path = stem.with_suffix(f".{form}")
            fig.savefig(path, format=form, metadata=NO_DATES[form])
            out.append(path)
    return out


def readme(study_name: str, provenance: Provenance, figures: list) -> str:
    """reports/STUDY/README.md: what the folder holds (`figures`: the names drawn) and how to cite the configuration."""
    commits = ", ".join(f"`{c}`" for c in provenance.git_commits) or "not logged"
    dirty = any(c.endswith("-dirty") for c in provenance.git_commits)
    md5 = "\n".join(f"  - {split}: `{digest}`" for split, digest in provenance.corpus_md5.items()) or "  - not logged"
    drawn = ", ".join(f"`{name}`" for name in figures) or "none yet (nothing to draw)"
    first = provenance.git_commits[0] if provenance.git_commits else "(not logged)"
    return f"""# {study_name}: report files

Rebuilt from MLflow and Optuna by `python -m harness report {provenance.study_file}` (and at the end of
`make ablation`): every file here is a pure function of what those stores hold.

- `index.html`: the report, one self-contained page
- `results.csv`: its headline table as numbers, one row per variant; `comparisons.csv`: every comparison it makes
- `table.tex`: the headline table for LaTeX: `\\usepackage{{booktabs}}` in the preamble, then `\\input{{table.tex}}`
  (a `table*`, spanning both columns of a two-column paper)
- `table.md`: the same table in Markdown
- `figures/NAME.pdf` and `figures/NAME.svg` for NAME in {drawn}: vector files {COLUMN_WIDTH} in wide (one column;
  {TEXT_WIDTH} in, both columns, for figures of several panels), text at most {FONT_SIZE} pt, fonts embedded
  (TrueType in the PDF, glyphs as paths in the SVG); include them at their natural size:
  `\\includegraphics{{figures/NAME.pdf}}`

## Citing the configuration

- study file: `{provenance.study_file}`, digest `{provenance.study_digest}` (SHA-256 of its text, first 16 hex
  digits; the harness refuses to mix runs of another version of the file under this study name)
- git commit{'s' if len(provenance.git_commits) > 1 else ''} of the harness the runs ran from: {commits}{
    " (-dirty: uncommitted changes ran, which the commit alone does not reproduce)" if dirty else ""}
- corpus `{provenance.corpus}`, MD5 of each split file:
{md5}

For example: "awd-ablation at commit {first}, study file `{Path(provenance.study_file).name}` (digest
{provenance.study_digest}), corpus {provenance.corpus} (MD5s in the study's report README)."
"""


def write_paper(folder: Path, headline: pd.DataFrame, figures: dict, provenance: Provenance,
                study_name: str) -> list[Path]:
    """Write table.tex, table.md, figures/NAME.pdf|svg (each Figure of `figures`, name -> Figure or None when
    there is nothing to draw yet; resized in place) and README.md into folder; returns the paths written.
    `headline` has results.csv's columns."""
    folder = Path(folder)
    (folder / "table.tex").write_text(latex_table(headline), encoding="utf-8")
    (folder / "table.md").write_text(markdown_table(headline), encoding="utf-8")
    drawn = []
    for name, fig in figures.items():
        if fig is not None:
            (folder / "figures").mkdir(exist_ok=True)
            drawn += save_vector(fit_to_paper(fig), folder / "figures" / name)
    names = [name for name, fig in figures.items() if fig is not None]
    (folder / "README.md").write_text(readme(study_name, provenance, names), encoding="utf-8")
    return [folder / "table.tex", folder / "table.md", *drawn, folder / "README.md"]
