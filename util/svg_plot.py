"""Inline SVG line plots for the run report (util/report_page.py): no JavaScript, no network. Pure
functions of numbers; the page's text and layout are report_page's."""

import html
import math


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential smoothing debiased at the start (TensorBoard's): s_k = Σ w^(k-i)(1-w) v_i / (1 - w^(k+1))."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def number_text(v: float) -> str:
    """A tick label or table cell: 4 significant digits, or exponent notation outside [1e-3, 1e4)."""
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


class _Frame:
    """The plot area of width × height px (margins for the tick labels) mapping data to pixels; the
    y axis logarithmic when log_y. x0, x1, y0, y1: the data range (y in log10 units when log_y)."""

    left, right, top, bottom = 64, 12, 12, 40

    def __init__(self, xs: list[float], ys: list[float], log_y: bool, width: int, height: int):
        self.width, self.height, self.log_y = width, height, log_y
        self.w, self.h = width - self.left - self.right, height - self.top - self.bottom
        self.x0, self.x1 = min(xs), max(xs)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5
        y0, y1 = self.ty(min(ys)), self.ty(max(ys))
        if y1 == y0:
            y0, y1 = y0 - (0.5 if log_y else abs(y0) * 0.1 or 0.5), y1 + (0.5 if log_y else abs(y1) * 0.1 or 0.5)
        pad = (y1 - y0) * 0.05
        self.y0, self.y1 = y0 - pad, y1 + pad

    def ty(self, v: float) -> float:
        return math.log10(v) if self.log_y else v

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.w

    def py(self, y: float) -> float:
        return self.top + (1 - (self.ty(y) - self.y0) / (self.y1 - self.y0)) * self.h

    def yticks(self) -> list[float]:
        if not self.log_y:
            return nice_ticks(self.y0, self.y1)
        span = self.y1 - self.y0
        mantissas = (1,) if span > 2.5 else (1, 2, 5) if span > 0.7 else range(1, 10)
        return [m * 10.0**e for e in range(math.floor(self.y0) - 1, math.ceil(self.y1) + 1) for m in mantissas]


def _grid_lines(f: _Frame) -> list[str]:
    out = []
    for t in nice_ticks(f.x0, f.x1):
        out.append(
            f'<line x1="{f.px(t):.1f}" y1="{f.top}" x2="{f.px(t):.1f}" y2="{f.top + f.h}" stroke="#eee"/>'
            f'<text x="{f.px(t):.1f}" y="{f.top + f.h + 14}" text-anchor="middle">{number_text(t)}</text>'
        )
    for t in f.yticks():
        if f.y0 <= f.ty(t) <= f.y1:
            out.append(
                f'<line x1="{f.left}" y1="{f.py(t):.1f}" x2="{f.left + f.w}" y2="{f.py(t):.1f}" stroke="#eee"/>'
                f'<text x="{f.left - 4}" y="{f.py(t) + 4:.1f}" text-anchor="end">{number_text(t)}</text>'
            )
    return out


def _series(f: _Frame, s: dict, p: list[tuple[float, float]]) -> list[str]:
    """One series' polyline (and its dots, at most 2000)."""
    out = []
    faint = s.get("faint")
    style = f'stroke="{s["colour"]}" stroke-width="{0.8 if faint else 1.8}" fill="none"' + (
        ' stroke-opacity="0.35"' if faint else ""
    )
    if len(p) > 1:
        out.append(f'<polyline {style} points="' + " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in p) + '"/>')
    if s.get("dots") or len(p) == 1:
        out.extend(
            f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="{1.6 if faint else 3}" fill="{s["colour"]}"'
            + (' fill-opacity="0.45"' if faint else "")
            + "/>"
            for x, y in p[:2000]
        )
    return out


def svg_plot(
    series: list[dict], *, xlabel: str, ylabel: str, log_y: bool = False, width: int = 760, height: int = 300
) -> str:
    """An inline SVG plot. series: [{name, xs, ys, colour, dots (bool), faint (bool)}]; points with a
    None or non-finite y (or y <= 0 on a log axis) are left out. A legend lists the named series."""

    def usable(y):
        return y is not None and math.isfinite(y) and (y > 0 or not log_y)

    pts = [[(x, y) for x, y in zip(s["xs"], s["ys"]) if usable(y)] for s in series]
    xs = [x for p in pts for x, _ in p]
    if not xs:
        return '<p class="empty">no data yet</p>'
    f = _Frame(xs, [y for p in pts for _, y in p], log_y, width, height)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(ylabel)} against {html.escape(xlabel)}">',
        f'<rect x="{f.left}" y="{f.top}" width="{f.w}" height="{f.h}" fill="#fff" stroke="#999"/>',
        *_grid_lines(f),
    ]
    for s, p in zip(series, pts):
        out.extend(_series(f, s, p) if p else [])
    out.append(f'<text x="{f.left + f.w / 2:.0f}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(
        f'<text transform="translate(14 {f.top + f.h / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    for i, s in enumerate(s for s in series if s.get("name")):
        y = f.top + 14 + 15 * i
        out.append(
            f'<rect x="{f.left + f.w - 180}" y="{y - 9}" width="10" height="10" fill="{s["colour"]}"/>'
            f'<text x="{f.left + f.w - 165}" y="{y}">{html.escape(s["name"])}</text>'
        )
    out.append("</svg>")
    return "".join(out)
