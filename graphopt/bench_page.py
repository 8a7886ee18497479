"""`graphopt bench --html`: the page, self-contained (inline SVG, no script, no network).

It shows how the run was made, the table (contenders numbered, with its footnotes), and two
charts drawn here, so they need no matplotlib:
- median latency per contender: bars, with the 25th-75th percentile as a line;
- output cosine vs speed-up: a scatter whose points carry their number, each number placed
  so that no two numbers and no number and point overlap (a thin line joins a number moved
  away from its point); the legend beside it names the numbers.
"""

from __future__ import annotations

import html
import math
from typing import Any, Optional

from graphopt.svg import MONOSPACE, Box, escape, place_labels, shorten, text_width

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
"""One colour per contender, in table order (matplotlib's tab10)."""

_STYLE = (
    "body{font-family:sans-serif;margin:16px}table{border-collapse:collapse}"
    "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}"
    "th,td:nth-child(2),td:last-child{white-space:normal}td:nth-child(2),th:nth-child(2),td:last-child,th:last-child{text-align:left}"
    ".notes{font-size:small;color:#333;max-width:70em}.charts{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start;margin-top:16px}"
    ".legend td{text-align:left}.swatch{display:inline-block;width:10px;height:10px;border-radius:50%}"
)


def bench_page(result: Any, footnotes: list[str]) -> str:
    """The HTML page of a `graphopt.bench.BenchResult`; `footnotes` go under the table."""
    head, *rows = result.cells()
    table = "<table><tr><th>#</th>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    for number, cells in enumerate(rows, 1):
        swatch = f'<span class="swatch" style="background:{_color(number)}"></span> {number}'
        table += f"<tr><td>{swatch}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
    table += "</table>"
    notes = "".join(f"<p>{html.escape(note)}</p>" for note in footnotes)
    numbered = list(enumerate(result.rows, 1))
    charts = f'<div class="charts">{bars_svg(numbered)}{scatter_svg(numbered)}{_legend(numbered)}</div>'
    return (
        "<!doctype html><meta charset='utf-8'><title>graphopt bench</title>"
        f"<style>{_STYLE}</style><h1>graphopt bench: {html.escape(result.model)}</h1>"
        f"<p>{html.escape(result.header())}</p>{table}<div class='notes'>{notes}</div>{charts}\n"
    )


def _color(number: int) -> str:
    return COLORS[(number - 1) % len(COLORS)]


def _svg_open(width: float, height: float, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{escape(MONOSPACE)}"><title>{escape(title)}</title>'
    )


def bars_svg(numbered: list[tuple[int, Any]]) -> str:
    """Median latency per contender (bars) with its 25th-75th percentile (a line)."""
    rows = [(n, r) for n, r in numbered if r.median_ms is not None]
    if not rows:
        return "<p>(no contender was timed)</p>"
    labels = [f"{n} {shorten(r.label, 44)}" for n, r in rows]
    label_width = max(text_width(label, 12) for label in labels)
    values = [f"{r.median_ms:.2f} ms" for _, r in rows]
    value_width = max(text_width(value, 11) for value in values)
    bar_area, row_height, top = 300.0, 24.0, 30.0
    left = 10 + label_width + 8
    largest = max(max(r.median_ms, (r.spread_ms or (0, 0))[1]) for _, r in rows) or 1.0
    width = left + bar_area + 8 + value_width + 10
    parts = [_svg_open(width, top + row_height * len(rows) + 10, "median latency per contender")]
    parts.append(f'<text x="10" y="14" dominant-baseline="central" font-size="12" font-weight="bold">median latency, ms (line: 25th-75th percentile)</text>')
    for i, ((n, r), label, value) in enumerate(zip(rows, labels, values)):
        y = top + i * row_height
        length = bar_area * r.median_ms / largest
        parts.append(f'<g><title>{escape(r.label)}: {escape(value)}</title>')
        parts.append(f'<text x="{left - 8:.1f}" y="{y + 8:.1f}" dominant-baseline="central" text-anchor="end" font-size="12">{escape(label)}</text>')
        parts.append(f'<rect x="{left:.1f}" y="{y:.1f}" width="{max(length, 1):.1f}" height="16" fill="{_color(n)}" opacity="0.85"/>')
        end = length
        if r.spread_ms:
            low, high = (bar_area * s / largest for s in r.spread_ms)
            parts.append(f'<line x1="{left + low:.1f}" x2="{left + high:.1f}" y1="{y + 8:.1f}" y2="{y + 8:.1f}" stroke="#222" stroke-width="2"/>')
            end = max(end, high)
        parts.append(f'<text x="{left + end + 6:.1f}" y="{y + 8:.1f}" dominant-baseline="central" font-size="11">{escape(value)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(numbered: list[tuple[int, Any]]) -> str:
    """Output cosine (y) vs speed-up (x) per contender, points marked by their numbers."""
    points = [(n, 1 / r.ratio, r.cosine) for n, r in numbered if r.ratio and r.cosine is not None]
    if not points:
        return "<p>(no contender has both a speed-up and a cosine)</p>"
    x_ticks, x_lo, x_hi = _axis([x for _, x, _ in points] + [1.0])
    y_ticks, y_lo, y_hi = _axis([y for _, _, y in points])
    y_labels = [_tick(t, y_ticks) for t in y_ticks]
    left = 12 + max(text_width(label, 11) for label in y_labels) + 6
    top, plot_w, plot_h = 34.0, 380.0, 280.0
    width, height = left + plot_w + 16, top + plot_h + 48

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * plot_h

    parts = [_svg_open(width, height, "output cosine vs speed-up")]
    parts.append('<text x="10" y="14" dominant-baseline="central" font-size="12" font-weight="bold">output cosine vs original (up is closer)</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>')
    for tick, label in zip(y_ticks, y_labels):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{left - 6:.1f}" y="{py(tick):.1f}" dominant-baseline="central" text-anchor="end" font-size="11">{label}</text>')
    for tick in x_ticks:
        parts.append(f'<line x1="{px(tick):.1f}" x2="{px(tick):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 12:.1f}" dominant-baseline="central" text-anchor="middle" font-size="11">{_tick(tick, x_ticks)}</text>')
    parts.append(f'<line x1="{px(1.0):.1f}" x2="{px(1.0):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#999" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 32:.1f}" dominant-baseline="central" text-anchor="middle" font-size="12">speed-up vs original (x, right is faster)</text>')
    anchors = [(px(x), py(y)) for _, x, y in points]
    sizes = [(text_width(str(n), 12) + 6, 16.0) for n, _, _ in points]
    markers = [Box.around(ax, ay, 12, 12) for ax, ay in anchors]
    centres = place_labels(anchors, sizes, Box(left + 1, top + 1, left + plot_w - 1, top + plot_h - 1), markers)
    for (n, x, y), (ax, ay) in zip(points, anchors):
        parts.append(f'<circle class="point" cx="{ax:.1f}" cy="{ay:.1f}" r="5" fill="{_color(n)}" stroke="#fff"><title>{n}: speed-up {x:.2f}x, cosine {y:.6f}</title></circle>')
    for (n, _, _), (ax, ay), (cx, cy), (w, h) in zip(points, anchors, centres, sizes):
        if math.hypot(cx - ax, cy - ay) > 16:
            parts.append(f'<line x1="{ax:.1f}" y1="{ay:.1f}" x2="{cx:.1f}" y2="{cy:.1f}" stroke="{_color(n)}" stroke-width="1"/>')
        parts.append(f'<rect x="{cx - w / 2:.1f}" y="{cy - h / 2:.1f}" width="{w:.1f}" height="{h:.1f}" rx="3" fill="#fff" stroke="{_color(n)}"/>')
        parts.append(f'<text class="point-label" x="{cx:.1f}" y="{cy:.1f}" dominant-baseline="central" text-anchor="middle" font-size="12" font-weight="bold" fill="{_color(n)}">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(numbered: list[tuple[int, Any]]) -> str:
    """The scatter's legend: number, colour, contender, speed-up and cosine."""
    rows = "".join(
        f'<tr><td><span class="swatch" style="background:{_color(n)}"></span> {n}</td><td>{html.escape(r.label)}</td>'
        f"<td>{_fmt(1 / r.ratio if r.ratio else None, '.2f')}</td><td>{_fmt(r.cosine, '.6f')}</td></tr>"
        for n, r in numbered
    )
    return f'<table class="legend"><tr><th>#</th><th>contender</th><th>speed-up</th><th>cosine</th></tr>{rows}</table>'


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _axis(values: list[float]) -> tuple[list[float], float, float]:
    """Ticks and limits for `values`: about five round ticks, limits padded by a tenth."""
    lo, hi = min(values), max(values)
    span = hi - lo
    if span <= abs(hi) * 1e-9 or span == 0:
        span = max(abs(hi) * 1e-6, 1e-9)
        lo, hi = lo - span / 2, hi + span / 2
    lo, hi = lo - span * 0.1, hi + span * 0.1
    raw = (hi - lo) / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return ticks, lo, hi


def _tick(value: float, ticks: list[float]) -> str:
    """`value` with as many decimals as the tick step needs."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"
