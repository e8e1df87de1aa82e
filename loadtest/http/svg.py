"""The HTML reports' pieces, drawn by hand: inline SVG charts (lines, optionally log x, and
grouped bars) and tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

W, H = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 20, 50
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")

Series = tuple[str, Sequence[tuple[float, float]]]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def _frame(title: str, xlabel: str, ylabel: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
            f'<rect width="{W}" height="{H}" fill="white"/>',
            f'<text x="{W / 2}" y="14" text-anchor="middle" font-size="13">{escape(title)}</text>',
            f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle" font-size="11">'
            f'{escape(xlabel)}</text>',
            f'<text x="12" y="{H / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {H / 2})">{escape(ylabel)}</text>']


def _legend(names: Sequence[str]) -> list[str]:
    out = []
    for i, name in enumerate(names):
        y = TOP + 6 + 14 * i
        out.append(f'<rect x="{LEFT + 8}" y="{y - 8}" width="10" height="10" '
                   f'fill="{COLORS[i % len(COLORS)]}"/>'
                   f'<text x="{LEFT + 22}" y="{y + 1}" font-size="11">{escape(name)}</text>')
    return out


def line_chart(title: str, series: Sequence[Series], *, xlabel: str, ylabel: str,
               log_x: bool = False, step: bool = False) -> str:
    pts = [(x, y) for _, s in series for x, y in s if not log_x or x > 0]
    out = _frame(title, xlabel, ylabel)
    if not pts:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(out)
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x0, x1 = fx(min(p[0] for p in pts)), fx(max(p[0] for p in pts))
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = 0.0, max(p[1] for p in pts) or 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + (fx(v) - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return TOP + ph - (v - y0) / (y1 - y0) * ph

    out.append(f'<g stroke="#ccc" stroke-width="1">'
               f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}"/>'
               f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}"/></g>')
    xt = ([10.0 ** e for e in range(math.floor(x0), math.ceil(x1) + 1)
           if x0 <= e <= x1] or [10 ** x0]) if log_x else _nice_ticks(x0, x1)
    for t in xt:
        out.append(f'<text x="{sx(t):.1f}" y="{TOP + ph + 16}" font-size="10" '
                   f'text-anchor="middle">{_fmt(t)}</text>')
    for t in _nice_ticks(y0, y1):
        out.append(f'<line x1="{LEFT}" y1="{sy(t):.1f}" x2="{LEFT + pw}" y2="{sy(t):.1f}" '
                   f'stroke="#eee"/><text x="{LEFT - 4}" y="{sy(t) + 3:.1f}" font-size="10" '
                   f'text-anchor="end">{_fmt(t)}</text>')
    for i, (_, s) in enumerate(series):
        coords: list[str] = []
        prev_y: float | None = None
        for x, y in s:
            if log_x and x <= 0:
                continue
            if step and prev_y is not None:
                coords.append(f"{sx(x):.1f},{sy(prev_y):.1f}")
            coords.append(f"{sx(x):.1f},{sy(y):.1f}")
            prev_y = y
        out.append(f'<polyline fill="none" stroke="{COLORS[i % len(COLORS)]}" '
                   f'stroke-width="1.6" points="{" ".join(coords)}"/>')
    out += _legend([name for name, _ in series])
    out.append("</svg>")
    return "".join(out)


def bar_chart(title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
              *, ylabel: str, reference: float | None = None) -> str:
    """Grouped bars: one group per label, one bar per series; `reference` draws a line."""
    out = _frame(title, "", ylabel)
    values = [v for _, vs in series for v in vs]
    top = max([*values, reference or 0.0, 1e-9])
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    gw = pw / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)

    def sy(v: float) -> float:
        return TOP + ph - v / top * ph

    for t in _nice_ticks(0.0, top):
        out.append(f'<line x1="{LEFT}" y1="{sy(t):.1f}" x2="{LEFT + pw}" y2="{sy(t):.1f}" '
                   f'stroke="#eee"/><text x="{LEFT - 4}" y="{sy(t) + 3:.1f}" font-size="10" '
                   f'text-anchor="end">{_fmt(t)}</text>')
    for g, label in enumerate(groups):
        gx = LEFT + g * gw + gw * 0.1
        for i, (_, vs) in enumerate(series):
            v = vs[g]
            out.append(f'<rect x="{gx + i * bw:.1f}" y="{sy(v):.1f}" width="{bw - 1:.1f}" '
                       f'height="{TOP + ph - sy(v):.1f}" fill="{COLORS[i % len(COLORS)]}">'
                       f'<title>{escape(label)}: {v:g}</title></rect>')
        out.append(f'<text x="{LEFT + g * gw + gw / 2:.1f}" y="{TOP + ph + 14}" font-size="10" '
                   f'text-anchor="middle">{escape(label)}</text>')
    if reference is not None:
        out.append(f'<line x1="{LEFT}" y1="{sy(reference):.1f}" x2="{LEFT + pw}" '
                   f'y2="{sy(reference):.1f}" stroke="#333" stroke-dasharray="4 3"/>')
    out += _legend([name for name, _ in series])
    out.append("</svg>")
    return "".join(out)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"
