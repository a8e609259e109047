"""One self-contained HTML page: plotly figures (plotly.js inlined once, no network) and plain tables."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1150px;
       color: #1d2330; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
     border-bottom: 1px solid #dde2ea; padding-bottom: .3rem; }
.sub { color: #5b6575; margin-top: 0; } .note { background: #f3f6fb; border-left: 4px solid #4a7bd0;
       padding: .6rem 1rem; margin: 1rem 0; } .warn { border-left-color: #d0804a; background: #fbf5f0; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .85rem; }
th, td { border: 1px solid #dde2ea; padding: .25rem .55rem; text-align: right; }
th { background: #f3f6fb; } td.l, th.l { text-align: left; } .figure { margin: .5rem 0 1.5rem; }
"""


class Page:
    """Sections appended in order; ``render()`` returns the whole document."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.parts: list[str] = []
        self.figures = 0

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def note(self, text: str, warn: bool = False) -> None:
        self.parts.append(f'<div class="note{" warn" if warn else ""}">{html.escape(text)}</div>')

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def figure(self, fig: Any, div_id: str) -> None:
        """A plotly figure; the first one carries plotly.js inline, the others reuse it."""
        fig.update_layout(template="plotly_white", margin={"l": 60, "r": 20, "t": 50, "b": 50})
        body = fig.to_html(full_html=False, include_plotlyjs=self.figures == 0, div_id=div_id,
                           config={"displaylogo": False, "responsive": True})
        self.figures += 1
        self.parts.append(f'<div class="figure" data-figure="{html.escape(div_id)}">{body}</div>')

    def table(self, rows: list[dict[str, Any]], left: tuple[str, ...] = ()) -> None:
        if not rows:
            self.parts.append("<p><em>none</em></p>")
            return
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(c)}</th>' for c in columns)
        body = "".join(
            "<tr>" + "".join(f'<td class="{"l" if c in left else ""}">{html.escape(cell(row.get(c)))}</td>'
                             for c in columns) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def render(self) -> str:
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{html.escape(self.title)}'
                f'</title><style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{sub}'
                + "\n".join(self.parts) + "</body></html>\n")


GENERATOR = '<meta name="generator" content="deepsqueeze">'


def is_report(path: Path) -> bool:
    """Whether ``path`` is an HTML page deepsqueeze wrote (what ``report --out`` may replace)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return head.startswith(b"<!DOCTYPE html>") and GENERATOR.encode() in head


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {cell(v)}" for k, v in value.items())
    return str(value)
