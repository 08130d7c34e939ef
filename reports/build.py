"""`flextron report`: one self-contained HTML page, PNG plots and a Markdown summary of a run.

Reads artifacts from disk only (`reports/artifacts.py`: Parquet/JSON/CSV through the readers that
name a corrupt file and the command that rebuilds it); imports no torch. The sections are built once
(`reports/sections.py`, plots in `reports/figures.py`) and rendered twice (`reports/page.py`): as an
HTML page a person reads and as Markdown for terminals and pull requests. Strings in the artifacts
(regimes, device names, weights) are data: file names built from them go through `safe_name`, and
both renderers escape them. The report folder is built beside RUN/reports and swapped in, so
nothing is written anywhere else and a failed build keeps the previous report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flextron.rundir import check_finite


@dataclass(frozen=True)
class ReportConfig:
    #: the run directory to report on (profiled at least); writes RUN/reports/: index.html, summary.md
    #: and the plots as PNG
    run: str
    #: resolution of the PNG plots in dots per inch (the page embeds them; larger is sharper and heavier)
    dpi: int = 110

    def __post_init__(self):
        check_finite("dpi", self.dpi, low=50, high=400, whole=True)


def build_report(cfg: ReportConfig) -> dict:
    """Write RUN/reports/ (index.html, summary.md, the PNG plots) from the run's artifacts; returns
    the one-line summary: the page, the plots' file names, the summary, the sections shown."""
    from flextron.rundir import rebuild
    from reports.artifacts import Artifacts
    from reports.figures import Plots
    from reports.page import Figure, render_html, render_markdown
    from reports.sections import build_page

    run = Path(cfg.run)
    a = Artifacts(run)
    final = run / "reports"
    with rebuild(final) as tmp:  # two reports at once take turns; each swaps in a whole page
        page = build_page(a, Plots(a, tmp, cfg.dpi))
        (tmp / "summary.md").write_text(render_markdown(page))
        (tmp / "index.html").write_text(render_html(page, tmp))
    plots = [b.file for s in page.sections for b in s.blocks if isinstance(b, Figure)]
    return {"report": str(final / "index.html"), "plots": plots, "summary": str(final / "summary.md"),
            "sections": [s.title for s in page.sections if not s.missing],
            "not_yet": [s.title for s in page.sections if s.missing]}
