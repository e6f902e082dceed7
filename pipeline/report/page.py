"""The building blocks of a report page: one self-contained HTML file (CSS inline, images as base64 data URIs,
no script, and a Content-Security-Policy that forbids any request, so a browser opening it fetches nothing).

Every text that comes from a run (prompts, generated continuations, file names) is escaped here: ``text()``
for prose, the table helpers for cells. Only the Markdown the stages write (table.md: a bold title line,
captions, pipe tables, bullet notes) is turned into HTML, by ``markdown()``, which knows that subset only."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MARKER", "Section", "text", "image", "table", "key_values", "markdown", "page", "number"]

# the first comment of every page we write: a file at the output path without it is the user's, never replaced
MARKER = "<!-- rome-lightning report -->"

# no request of any kind (no script, font, frame or remote image): the page shows the same offline, forever
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1rem 2rem 4rem; color: #1d2126; background: #fff; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
.meta, .note { color: #57606a; font-size: 0.9rem; }
nav ul { columns: 3; list-style: none; padding-left: 0; }
nav a, a { color: #0550ae; text-decoration: none; }
.scroll { overflow-x: auto; margin: 0.6rem 0; }
table { border-collapse: collapse; font-size: 0.85rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; white-space: nowrap; }
tr.highlight td { background: #fff8c5; }
table.kv th { width: 14rem; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
.figures figure { flex: 1 1 320px; max-width: 640px; }
figcaption { font-size: 0.8rem; color: #57606a; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; }
pre { background: #f6f8fa; padding: 0.5rem; white-space: pre-wrap; word-break: break-word; }
.status-applied { color: #1a7f37; font-weight: 600; }
.status-rolled_back, .status-reverted, .status-skipped { color: #cf222e; font-weight: 600; }
"""


@dataclass
class Section:
    """One ``<h2>`` part of the page: its anchor, heading and HTML body."""

    anchor: str
    title: str
    body: str


def text(value: object) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def number(value: object, digits: int = 4) -> str:
    """A number for a table cell: fixed decimals for floats, as is for the rest, "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def image(path: Path, caption: str | None = None) -> str:
    """A PNG embedded as a data URI (the page stays one file); a missing file is said, not fatal."""
    if not path.is_file():
        return f'<p class="note">({text(path.name)} is not there)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = caption or path.name
    cap = f"<figcaption>{text(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{text(alt)}">{cap}</figure>'


def figures(items: Iterable[str]) -> str:
    """Figures (``image()`` results) side by side where the page is wide enough."""
    return f'<div class="figures">{"".join(items)}</div>'


def _cell(value: object, tag: str = "td", digits: int = 4) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    shown = number(value, digits) if numeric or value is None else value
    cls = ' class="num"' if numeric else ""
    return f"<{tag}{cls}>{text(shown)}</{tag}>"


def table(
    head: Sequence[str],
    rows: Iterable[Sequence[object]],
    highlight: Iterable[int] = (),
    digits: int | Sequence[int] = 4,
) -> str:
    """A table of plain values (escaped here; numbers right-aligned, floats with ``digits`` decimals: one
    for all columns or one per column); ``highlight``: indices of rows to mark."""
    marked = set(highlight)
    per_column = [digits] * len(head) if isinstance(digits, int) else list(digits)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="highlight"' if i in marked else ""
        body.append(f"<tr{cls}>" + "".join(_cell(v, "td", d) for v, d in zip(row, per_column)) + "</tr>")
    thead = "<tr>" + "".join(f"<th>{text(h)}</th>" for h in head) + "</tr>"
    return f'<div class="scroll"><table><thead>{thead}</thead><tbody>{"".join(body)}</tbody></table></div>'


def key_values(pairs: Iterable[tuple[str, object]]) -> str:
    """A two-column table: what, value."""
    rows = "".join(f"<tr><th>{text(k)}</th>{_cell(v)}</tr>" for k, v in pairs)
    return f'<div class="scroll"><table class="kv"><tbody>{rows}</tbody></table></div>'


def _inline(line: str) -> str:
    """Escaped text with the stages' one inline form, ``**bold**``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text(line))


def _pipe_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown(source: str) -> str:
    """The Markdown the stages write (table.md) as HTML: pipe tables, ``- `` bullets, ``**bold**``, paragraphs.
    Anything else is shown as escaped text, never interpreted."""
    out: list[str] = []
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_pipe_table(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        if line.strip():
            para = []
            while (i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("|")) and not lines[
                i
            ].startswith("- "):
                para.append(_inline(lines[i]))
                i += 1
            out.append(f"<p>{' '.join(para)}</p>")
            continue
        i += 1
    return "\n".join(out)


def _pipe_table(block: list[str]) -> str:
    rows = [_pipe_cells(line) for line in block]
    separator = len(rows) > 1 and all(re.fullmatch(r":?-{3,}:?", c) for c in rows[1])
    head, body = (rows[0], rows[2:]) if separator else ([], rows)

    def cell(value: str, tag: str) -> str:
        numeric = tag == "td" and re.fullmatch(r"[-+]?\d[\d.]*( ± [\d.]+)?", value) is not None
        cls = ' class="num"' if numeric else ""
        return f"<{tag}{cls}>{_inline(value)}</{tag}>"

    thead = f"<thead><tr>{''.join(cell(c, 'th') for c in head)}</tr></thead>" if head else ""
    tbody = "".join(f"<tr>{''.join(cell(c, 'td') for c in row)}</tr>" for row in body)
    return f'<div class="scroll"><table>{thead}<tbody>{tbody}</tbody></table></div>'


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: the marker, the policy, the styles, a contents list and the sections."""
    nav = "".join(f'<li><a href="#{s.anchor}">{text(s.title)}</a></li>' for s in sections)
    body = "\n".join(f'<section id="{s.anchor}">\n<h2>{text(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    return (
        f"<!DOCTYPE html>\n{MARKER}\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{text(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<h1>{text(title)}</h1>\n<p class="meta">{text(subtitle)}</p>\n'
        f"<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n"
    )
