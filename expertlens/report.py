"""One self-contained HTML page of titled sections: text, tables and plotly figures.

The page embeds plotly.js once (inline, no CDN), so it opens offline: gzip-compressed and base64-encoded, unpacked by
the browser's ``DecompressionStream`` before the figures are drawn. Pages whose figures use only cartesian traces
(scatter, bar, heatmap, ...) carry plotly's cartesian bundle (about 0.7 MB inline instead of 4.8 MB for the full
one). Every figure fills the page's width. Input is generic: a list of :class:`Section` (or a single one), or any
object with a ``.sections()`` method returning them (e.g. a study result object).
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import gzip
import html
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs, get_plotlyjs_version

__all__ = ["Section", "HasSections", "report", "render_html", "table_html", "figure_div_id", "CARTESIAN_TRACES"]

_VENDOR = Path(__file__).parent / "_vendor"
_CARTESIAN_VERSION = "4.1.1"  # of the vendored plotly.js-cartesian-dist-min (see _vendor/README.md)
# trace types the cartesian bundle registers (its package README)
CARTESIAN_TRACES = frozenset(
    {"bar", "box", "contour", "heatmap", "histogram", "histogram2d", "histogram2dcontour", "image", "pie",
     "scatter", "scatterternary", "violin"}
)  # fmt: skip
_FIG_CONFIG = {"responsive": True, "displaylogo": False}

TableLike = Mapping[str, Any] | Sequence[Mapping[str, Any]]


@dataclass
class Section:
    """One titled section of a report.

    Attributes:
        title: section heading.
        figures: plotly figures, shown in order after the text.
        tables: tables, shown after the figures. Each is a ``dict`` (``{column: list}`` with equal-length
            list values becomes a column table, any other dict a two-column key/value table), a list of
            row dicts (columns = union of keys, in first-seen order), an object with ``to_dict("records")``
            (e.g. a pandas DataFrame), or a ``(caption, table)`` pair.
        text: paragraphs of plain text (blank lines separate paragraphs; HTML is escaped).

    Example:
        >>> import plotly.graph_objects as go
        >>> from expertlens.report import Section
        >>> s = Section("Routing", figures=[go.Figure(go.Bar(y=[1, 2]))], tables=[{"layer": 3, "kl": 0.1}])
        >>> s.title
        'Routing'
    """

    title: str
    figures: list[go.Figure] = field(default_factory=list)
    tables: list[Any] = field(default_factory=list)
    text: str = ""


@runtime_checkable
class HasSections(Protocol):
    """Anything that can describe itself as report sections (e.g. a study result).

    Example:
        >>> from expertlens.report import HasSections, Section, report
        >>> class Result:
        ...     def sections(self):
        ...         return [Section("Numbers", tables=[{"a": 1.0}])]
        >>> isinstance(Result(), HasSections)
        True
        >>> report(Result(), "/tmp/result.html")  # doctest: +SKIP
    """

    def sections(self) -> Iterable[Section]: ...


# ------------------------------------------------------------------------------------------------ tables
def _fmt(v: Any) -> str:
    """Format one table cell as escaped HTML text."""
    if hasattr(v, "detach") and hasattr(v, "numel"):  # torch tensor
        v = v.detach().cpu()
        v = v.item() if v.numel() == 1 else v.tolist()
    elif isinstance(v, np.ndarray):
        v = v.item() if v.size == 1 else v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        f = float(v)
        if math.isnan(f):
            return "NaN"
        if f != 0 and (abs(f) >= 1e5 or abs(f) < 1e-3):
            return f"{f:.4e}"
        return f"{f:.4g}"
    if isinstance(v, (list, tuple)):
        return html.escape("[" + ", ".join(_fmt_plain(x) for x in v) + "]")
    return html.escape(str(v))


def _is_number(v: Any) -> bool:
    if hasattr(v, "numel") and hasattr(v, "item"):
        return v.numel() == 1 and not isinstance(v.item(), bool)
    if isinstance(v, (np.ndarray, np.generic)):
        return v.size == 1 and v.dtype.kind in "iuf"
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    """One ``<td>``; numbers are right-aligned (``class=num``)."""
    return f"<td class=num>{_fmt(v)}</td>" if _is_number(v) else f"<td>{_fmt(v)}</td>"


def _fmt_plain(v: Any) -> str:
    return html.unescape(_fmt(v))


def _rows(table: Any) -> tuple[list[str], list[list[Any]]]:
    """Normalise a table-like object to (columns, rows)."""
    if hasattr(table, "to_dict") and not isinstance(table, Mapping):
        table = table.to_dict("records")
    if isinstance(table, Mapping):
        vals = list(table.values())
        columnar = (
            bool(vals)
            and all(isinstance(v, (list, tuple, np.ndarray)) or hasattr(v, "tolist") for v in vals)
            and len({len(v) for v in vals}) == 1
            and all(not isinstance(v, (str, bytes)) for v in vals)
        )
        if columnar:
            cols = [str(k) for k in table]
            return cols, [list(r) for r in zip(*[list(v) for v in vals])]
        return ["key", "value"], [[k, v] for k, v in table.items()]
    rows = list(table)
    cols: list[str] = []
    for r in rows:
        if not isinstance(r, Mapping):
            raise TypeError(f"table rows must be dicts, got {type(r).__name__}")
        for k in r:
            if str(k) not in cols:
                cols.append(str(k))
    return cols, [[{str(k): v for k, v in r.items()}.get(c, "") for c in cols] for r in rows]


def table_html(table: TableLike | Any, caption: str | None = None) -> str:
    """Render a table (dict, list of row dicts, or DataFrame-like) as an HTML ``<table>``.

    Args:
        table: ``{column: values}`` (equal-length sequences), ``{key: value}``, a list of row dicts, or an
            object with ``to_dict("records")``.
        caption: optional caption.

    Returns:
        The HTML of the table (``class="el-table"``).

    Example:
        >>> from expertlens.report import table_html
        >>> print(table_html([{"layer": 3, "kl": 0.0123}], caption="best"))  # doctest: +ELLIPSIS
        <table class="el-table"><caption>best</caption><thead><tr><th>layer</th><th>kl</th></tr>...
    """
    cols, rows = _rows(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="el-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------------------------ page
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1500px; padding: 1.5em 2em; color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
nav ol { columns: 2; }
.el-meta { color: #777; font-size: .9em; }
.el-figure { margin: 1em 0; width: 100%; }
.el-plot { width: 100%; }
.el-table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
.el-table caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
.el-table th, .el-table td { border: 1px solid #ddd; padding: .25em .6em; }
.el-table th { background: #f4f4f4; text-align: left; }
.el-table td.num { text-align: right; font-variant-numeric: tabular-nums; }
.el-table tbody tr:nth-child(even) { background: #fafafa; }
"""


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def _as_sections(obj: Any) -> list[Section]:
    if isinstance(obj, Section):
        return [obj]
    if isinstance(obj, go.Figure):
        return [Section(title=obj.layout.title.text or "Figure", figures=[obj])]
    if isinstance(obj, HasSections) and not isinstance(obj, (list, tuple)):
        return _as_sections(list(obj.sections()))
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, Mapping)):
        out: list[Section] = []
        for item in obj:
            if isinstance(item, (Section, go.Figure)):
                out.extend(_as_sections(item))
            else:
                raise TypeError(f"report items must be Section or plotly Figure, got {type(item).__name__}")
        return out
    raise TypeError(
        f"report() needs a Section, a list of Sections or an object with .sections(), got {type(obj).__name__}"
    )


def figure_div_id(section_index: int, figure_index: int) -> str:
    """The HTML ``id`` of figure ``figure_index`` of section ``section_index`` in a report page.

    Example:
        >>> from expertlens.report import figure_div_id
        >>> figure_div_id(0, 1)  # doctest: +SKIP
        'el-fig-0-1'
    """
    return f"el-fig-{section_index}-{figure_index}"


def _page_bundle(figures: Sequence[go.Figure]) -> tuple[str, str]:
    """The plotly.js a page needs, as ``(label, base64 of its gzip)``: the cartesian bundle where it suffices."""
    types = {t.type for fig in figures for t in fig.data}
    vendored = _VENDOR / f"plotly-cartesian-{_CARTESIAN_VERSION}.min.js.gz"
    # the figures' JSON follows the installed plotly's schema, so a bundle of another version could misdraw them
    cartesian = types <= CARTESIAN_TRACES and get_plotlyjs_version() == _CARTESIAN_VERSION and vendored.exists()
    return _bundle(str(vendored) if cartesian else None)


@functools.lru_cache(maxsize=2)
def _bundle(vendored: str | None) -> tuple[str, str]:
    if vendored is not None:
        raw, label = Path(vendored).read_bytes(), f"plotly.js (cartesian) v{_CARTESIAN_VERSION}"
    else:
        raw, label = gzip.compress(get_plotlyjs().encode(), 9, mtime=0), f"plotly.js v{get_plotlyjs_version()}"
    return label, base64.b64encode(raw).decode("ascii")


def _figure_json(fig: go.Figure) -> str:
    """The figure at the page's width, as JSON safe inside a ``<script>`` element."""
    full = go.Figure(fig).update_layout(width=None, autosize=True)  # fill the page; keep the caller's figure
    return pio.to_json(full, validate=False).replace("<", "\\u003c")  # no "</script>" can end the element early


# Unpack plotly.js (gzip, base64), run it, then draw every figure from its JSON; a figure that cannot be drawn
# says why in its place instead of staying blank.
_LOADER = """
(async () => {
  const packed = document.getElementById("el-plotly-gz").textContent.trim();
  const bytes = Uint8Array.from(atob(packed), (ch) => ch.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const tag = document.createElement("script");
  tag.textContent = await new Response(stream).text();
  document.head.appendChild(tag);
  for (const div of document.querySelectorAll("div.el-plot")) {
    const spec = JSON.parse(document.getElementById(div.id + "-json").textContent);
    await Plotly.newPlot(div, spec.data, spec.layout, CONFIG);
  }
  document.body.dataset.elPlotted = document.querySelectorAll("div.el-plot").length;
})().catch((err) => {
  console.error("expertlens report: " + err);
  for (const div of document.querySelectorAll("div.el-plot:empty")) {
    div.textContent = "This figure needs a browser with JavaScript and DecompressionStream (" + err + ").";
  }
});
"""


def render_html(sections: Any, title: str = "expertlens report") -> str:
    """Render sections to one self-contained HTML page (plotly.js embedded once, inline).

    Every figure is drawn at the page's width (``autosize``; a fixed ``layout.width`` is dropped, the caller's
    figure is left as it is). plotly.js is inlined once, gzip-compressed: the cartesian bundle when every trace
    is one of :data:`CARTESIAN_TRACES` and the installed plotly targets plotly.js 4.1.1, else the full bundle.

    Args:
        sections: a :class:`Section`, a list of sections (plotly figures are accepted as one-figure
            sections), or an object with a ``.sections()`` method.
        title: page title and top heading.

    Returns:
        The HTML text. Figure ``j`` of section ``i`` lives in ``<div id="el-fig-{i}-{j}">``, its JSON in
        ``<script type="application/json" id="el-fig-{i}-{j}-json">``.

    Example:
        >>> import plotly.graph_objects as go
        >>> from expertlens.report import Section, render_html
        >>> page = render_html([Section("A", figures=[go.Figure(go.Bar(y=[1]))])])
        >>> 'id="el-fig-0-0"' in page
        True
    """
    secs = _as_sections(sections)
    used: set[str] = set()
    slugs = [_slug(s.title, used) for s in secs]
    nav = "".join(f'<li><a href="#{slug}">{html.escape(s.title)}</a></li>' for s, slug in zip(secs, slugs))
    parts, figures = [], []
    for i, (sec, slug) in enumerate(zip(secs, slugs)):
        parts.append(f'<section id="{slug}">\n<h2>{html.escape(sec.title)}</h2>')
        for para in (p.strip() for p in re.split(r"\n\s*\n", sec.text or "")):
            if para:
                parts.append(f"<p>{html.escape(para)}</p>")
        for j, fig in enumerate(sec.figures):
            if not isinstance(fig, go.Figure):
                raise TypeError(f"section {sec.title!r}: figures must be plotly Figures, got {type(fig)}")
            figures.append(fig)
            div_id = figure_div_id(i, j)
            height = f' style="height:{int(fig.layout.height)}px"' if fig.layout.height else ""
            parts.append(
                f'<div class="el-figure"><div id="{div_id}" class="el-plot"{height}></div>'
                f'<script type="application/json" id="{div_id}-json">{_figure_json(fig)}</script></div>'
            )
        for tab in sec.tables:
            caption = None
            if isinstance(tab, tuple) and len(tab) == 2 and isinstance(tab[0], str):
                caption, tab = tab
            parts.append(table_html(tab, caption))
        parts.append("</section>")
    scripts = []
    if figures:
        label, packed = _page_bundle(figures)
        scripts = [
            f"<!-- {label}, MIT licence, gzip + base64 -->",
            f'<script type="application/gzip;base64" id="el-plotly-gz">{packed}</script>',
            f"<script>{_LOADER.replace('CONFIG', json.dumps(_FIG_CONFIG))}</script>",
        ]
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="el-meta">generated by expertlens on {stamp}</p>',
            f"<nav><ol>{nav}</ol></nav>" if len(secs) > 1 else "",
            *parts,
            *scripts,
            "</body>",
            "</html>",
        ]
    )


def report(sections: Any, path: str | Path, *, title: str = "expertlens report") -> Path:
    """Write one self-contained HTML page with titled sections of text, figures and tables.

    plotly.js is embedded once, inline (gzip-compressed), so the page works offline without a CDN; see
    :func:`render_html`.

    Args:
        sections: a :class:`Section`, a list of sections (plotly figures are accepted as one-figure
            sections), or an object with a ``.sections()`` method (e.g. a study result).
        path: output file (parent folders are created).
        title: page title and top heading.

    Returns:
        The path written.

    Example:
        >>> import torch
        >>> from expertlens.plot import routing_heatmap
        >>> from expertlens.report import Section, report
        >>> sec = Section("Routing", figures=[routing_heatmap(torch.rand(4, 8), torch.rand(4, 8))],
        ...               tables=[[{"layer": 2, "expert": 5, "delta_pp": 12.5}]], text="Harmful vs harmless.")
        >>> report([sec], "report.html")  # doctest: +SKIP
        PosixPath('report.html')
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(sections, title=title), encoding="utf-8")
    return out
