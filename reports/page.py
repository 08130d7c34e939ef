"""The report as a document: sections of tables and figures, rendered as HTML and as Markdown.

Sections are built once (`reports/sections.py`) and rendered twice, so the page and the Markdown
summary always show the same numbers. Every string from an artifact is data: the HTML renderer
escapes each one (text and attributes), the Markdown renderer escapes it and its `|`.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path


# ---- cells -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One table cell: its text, whether it is a number (right-aligned), and a hover text."""

    text: str
    num: bool = False
    title: str = ""
    nowrap: bool = False  # a short phrase that reads badly broken (a sub-network's description)


def num(v, digits: int) -> Cell:
    """A number at a fixed precision, thousands separated; `–` where there is none (never measured,
    an undefined rank)."""
    if not _real(v):
        return Cell("–", num=True)
    return Cell(f"{float(v):,.{digits}f}", num=True)


def _real(v) -> bool:
    """A finite real number (numpy's included), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def ms(v) -> Cell:
    """A latency in ms: about four significant digits (0.0123, 0.123, 1.234, 12.34, 123.4)."""
    if not _real(v):
        return num(None, 0)
    a = abs(v)
    return num(v, 1 if a >= 100 else 2 if a >= 10 else 3 if a >= 1 else 4)


def frac(v) -> Cell:
    """A fraction of the full model (0.700)."""
    return num(v, 3)


def pct(v) -> Cell:
    """A percentage: two decimals under 10 %, one above."""
    return num(v, 2 if not _real(v) or abs(v) < 10 else 1)


def ppl(v) -> Cell:
    """A perplexity: one decimal under 1000, none above."""
    return num(v, 1 if not _real(v) or abs(v) < 1000 else 0)


def count(v) -> Cell:
    return num(v, 0)


def _text(c) -> str:
    return c.text if isinstance(c, Cell) else str(c)


# ---- the document ------------------------------------------------------------------------------------
@dataclass
class Table:
    header: list[str]
    rows: list[list] = field(default_factory=list)  # cells: Cell or str
    caption: str = ""
    collapsed: bool = False  # a long reference table: folded away under its caption (HTML <details>)


@dataclass
class Figure:
    file: str  # a safe file name inside the report folder
    caption: str


@dataclass
class Section:
    """A heading with its text, tables and figures. A section whose data is not in the run yet is
    one line instead, naming the command that makes it (`missing`)."""

    id: str  # the HTML anchor
    title: str
    intro: str = ""
    blocks: list = field(default_factory=list)  # Table, Figure or str (a paragraph), in order
    missing: str = ""  # why the section is empty: the command that produces its data

    def add(self, *blocks) -> "Section":
        self.blocks.extend(b for b in blocks if b is not None)
        return self


@dataclass
class Page:
    title: str
    about: list[str]  # "what this is": short facts, shown as one line at the top
    sections: list[Section]


# ---- HTML --------------------------------------------------------------------------------------------
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;max-width:1120px;
 margin:0 auto;padding:1.2em 1.5em 3em}
h1{font-size:1.7em;margin:.2em 0 .3em}
h2{font-size:1.25em;margin:1.8em 0 .4em;padding-top:.6em;border-top:1px solid #ddd}
p.about{margin:.2em 0 .8em;color:#333}p.about span+span::before{content:" · ";color:#999}
nav{font-size:.9em;margin:.4em 0 1em}nav a{margin-right:.9em;color:#0b5cad;text-decoration:none;white-space:nowrap}
p.intro{color:#444;font-size:.92em;max-width:60em;margin:.2em 0 .6em}
table{border-collapse:collapse;margin:.3em 0 1.2em;font-size:.9em}
caption{text-align:left;font-weight:600;padding:.2em 0 .35em;color:#333}
th,td{padding:.28em .6em;border-bottom:1px solid #e3e3e3;vertical-align:top}
th{background:#f4f5f7;text-align:left;font-weight:600;border-bottom:2px solid #ccc;vertical-align:bottom;
 max-width:9em}
th.num{text-align:right}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.cfg{white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
td[title]{cursor:help;text-decoration:underline dotted #aaa}
.figs{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}
figure{margin:.6em 0 1.4em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.88em;color:#444;max-width:60em;margin-top:.3em}
details{margin:.2em 0 1em}summary{cursor:pointer;color:#0b5cad;font-size:.92em}
ul.missing{color:#555;font-size:.92em;padding-left:1.2em}code{background:#f2f2f2;padding:0 .25em;border-radius:3px}
""".strip()


def _cell_html(c, tag: str = "td") -> str:
    e = html.escape
    cell = c if isinstance(c, Cell) else Cell(str(c))
    cls = "num" if cell.num else "cfg" if cell.nowrap else ""
    attrs = (f" class='{cls}'" if cls else "") + (f" title=\"{e(cell.title)}\"" if cell.title else "")
    return f"<{tag}{attrs}>{e(cell.text)}</{tag}>"


def _table_html(t: Table) -> str:
    e = html.escape
    numeric = [bool(t.rows) and all(isinstance(r[i], Cell) and r[i].num for r in t.rows) for i in range(len(t.header))]
    head = "".join(f"<th class='num'>{e(h)}</th>" if n else f"<th>{e(h)}</th>" for h, n in zip(t.header, numeric))
    body = "\n".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in t.rows)
    caption = f"<caption>{e(t.caption)}</caption>" if t.caption and not t.collapsed else ""
    table = f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
    if t.collapsed:
        return f"<details><summary>{e(t.caption or 'table')} ({len(t.rows)} rows)</summary>{table}</details>"
    return table


def _figure_html(f: Figure, folder: Path) -> str:
    e = html.escape
    data = base64.b64encode((folder / f.file).read_bytes()).decode()
    return (f"<figure><img alt=\"{e(f.caption)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{e(f.caption)}</figcaption></figure>")


def render_html(page: Page, folder: Path) -> str:
    """The self-contained page: styles inline, every figure embedded as a data: URI read from `folder`."""
    e = html.escape
    present = [s for s in page.sections if not s.missing]
    missing = [s for s in page.sections if s.missing]
    parts = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
             # Defence in depth: the page needs no script and loads nothing, so allow neither.
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'\">",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{e(page.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(page.title)}</h1>",
             "<p class='about'>" + "".join(f"<span>{e(a)}</span>" for a in page.about) + "</p>",
             "<nav>" + "".join(f"<a href='#{e(s.id)}'>{e(s.title)}</a>" for s in present)
             + ("<a href='#not-yet'>Not in this run yet</a>" if missing else "") + "</nav>"]
    for s in present:
        parts.append(f"<section id='{e(s.id)}'><h2>{e(s.title)}</h2>")
        if s.intro:
            parts.append(f"<p class='intro'>{_commands_html(s.intro)}</p>")
        for i, b in enumerate(s.blocks):
            if isinstance(b, Table):
                parts.append(_table_html(b))
            elif isinstance(b, Figure):  # consecutive figures share a row where they fit
                first = i == 0 or not isinstance(s.blocks[i - 1], Figure)
                last = i == len(s.blocks) - 1 or not isinstance(s.blocks[i + 1], Figure)
                parts.append(("<div class='figs'>" if first else "") + _figure_html(b, folder)
                             + ("</div>" if last else ""))
            else:
                parts.append(f"<p class='intro'>{_commands_html(str(b))}</p>")
        parts.append("</section>")
    if missing:
        parts.append("<section id='not-yet'><h2>Not in this run yet</h2><ul class='missing'>")
        parts += [f"<li id='{e(s.id)}'><strong>{e(s.title)}</strong>: {_commands_html(s.missing)}</li>"
                  for s in missing]
        parts.append("</ul></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _commands_html(text: str) -> str:
    """`text` escaped, with each `backquoted` span shown as code."""
    pieces = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(pieces))


# ---- Markdown ----------------------------------------------------------------------------------------
def _md(text) -> str:
    """Markdown-safe text: no raw HTML (`<`, `>`, `&` escaped), no table-breaking `|`, one line."""
    return html.escape(_text(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _table_md(t: Table) -> list[str]:
    numeric = [bool(t.rows) and all(isinstance(r[i], Cell) and r[i].num for r in t.rows) for i in range(len(t.header))]
    lines = [f"**{_md(t.caption)}**", ""] if t.caption else []
    lines += ["| " + " | ".join(_md(h) for h in t.header) + " |",
              "|" + "".join("---:|" if n else "---|" for n in numeric)]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in t.rows] + [""]


def render_markdown(page: Page) -> str:
    """The same sections as Markdown, for terminals and pull requests (figures as relative links)."""
    lines = [f"# {_md(page.title)}", "", " · ".join(_md(a) for a in page.about), ""]
    for s in page.sections:
        if s.missing:
            continue
        lines += [f"## {_md(s.title)}", ""] + ([_md(s.intro), ""] if s.intro else [])
        for b in s.blocks:
            if isinstance(b, Table):
                lines += _table_md(b)
            elif isinstance(b, Figure):
                lines += [f"![{_md(b.caption)}]({b.file})", ""]
            else:
                lines += [_md(b), ""]
    missing = [s for s in page.sections if s.missing]
    if missing:
        lines += ["## Not in this run yet", ""] + [f"- **{_md(s.title)}**: {_md(s.missing)}" for s in missing] + [""]
    return "\n".join(lines)
