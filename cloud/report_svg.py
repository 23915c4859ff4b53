"""Static SVG charts for the KPI report (cloud/report.py), drawn the way the store page's
edge/web/static/app.js draws them: same geometry (600 x 220 viewBox), classes (`bar`,
`bar-dwell`, `line`, `dot`, `cell`, `suppressed` hatched with the `#hatch` pattern) and
`data-value` / `data-suppressed` attributes, so one stylesheet serves both. Here they are
rendered once in Python: the report needs no script at all.

Every text that reaches the markup goes through `esc` (store ids and zone names are user data).
A value of None is a suppressed (or absent) cell and is drawn hatched, never guessed.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

W, H = 600, 220
ML, MR, MT, MB = 44, 12, 12, 30


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def fmt_int(v: float | None) -> str:
    return "—" if v is None else f"{round(v):,}"


def fmt_pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f} %"


def fmt_min(s: float | None) -> str:
    return "—" if s is None else f"{s / 60:.1f} min"


def nice_max(v: float) -> float:
    if not v > 0:
        return 1.0
    p = 10.0 ** math.floor(math.log10(v))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * p >= v:
            return m * p
    return 10.0 * p


class _Svg:
    def __init__(self, chart_id: str, label: str, width: int = W, height: int = H) -> None:
        self.parts: list[str] = [f'<svg id="{esc(chart_id)}" class="chart" viewBox="0 0 {width} {height}" role="img" '
                                 f'aria-label="{esc(label)}">']

    def add(self, tag: str, attrs: dict[str, object], title: str | None = None, text: str | None = None) -> None:
        a = " ".join(f'{k}="{esc(round(v, 2) if isinstance(v, float) else v)}"' for k, v in attrs.items())
        inner = (f"<title>{esc(title)}</title>" if title is not None else "") + (esc(text) if text is not None else "")
        self.parts.append(f"<{tag} {a}>{inner}</{tag}>" if inner else f"<{tag} {a}/>")

    def text(self, x: float, y: float, s: str, cls: str = "label", anchor: str = "middle") -> None:
        self.add("text", {"x": x, "y": y, "class": cls, "text-anchor": anchor}, text=s)

    def done(self) -> str:
        return "".join([*self.parts, "</svg>"])


def _empty(chart_id: str, label: str, message: str) -> str:
    s = _Svg(chart_id, label)
    s.text(W / 2, H / 2, message, cls="empty")
    return s.done()


def _y_axis(s: _Svg, top: float, fmt: Callable[[float], str]) -> None:
    lead = top / 10 ** math.floor(math.log10(top))
    n = 4 if lead == 2 else 5
    for i in range(n + 1):
        v, y = top * i / n, H - MB - (H - MT - MB) * i / n
        s.add("line", {"x1": ML, "x2": W - MR, "y1": y, "y2": y, "class": "grid"})
        s.add("text", {"x": ML - 6, "y": y + 4, "class": "label", "text-anchor": "end"}, text=fmt(v))


def _x_labels(s: _Svg, labels: Sequence[str], x0: float, step: float) -> None:
    every = max(1, math.ceil(len(labels) / 8))
    for i, lab in enumerate(labels):
        if i % every == 0:
            s.text(x0 + step * i + step / 2, H - MB + 16, lab)


def bar_chart(chart_id: str, label: str, labels: Sequence[str], values: Sequence[float | None], *,
              unit: str, bar_class: str = "", value_labels: bool = False) -> str:
    """Columns; None is a hatched (suppressed) column."""
    if not values:
        return _empty(chart_id, label, "no data in this range")
    s = _Svg(chart_id, label)
    top = nice_max(max([0.0, *(float(v) for v in values if v is not None)]))
    _y_axis(s, top, fmt_int if top >= 5 else (lambda v: f"{v:.1f}"))
    step = (W - ML - MR) / len(values)
    bw, plot_h = max(1.0, step * 0.78), H - MT - MB
    for i, v in enumerate(values):
        x = ML + step * i + (step - bw) / 2
        if v is None:
            s.add("rect", {"x": x, "y": MT, "width": bw, "height": plot_h, "class": "suppressed",
                           "data-suppressed": 1}, title=f"{labels[i]}: suppressed (fewer than k people)")
            continue
        h = plot_h * v / top
        s.add("rect", {"x": x, "y": H - MB - h, "width": bw, "height": max(h, 0.5), "class": f"bar {bar_class}".strip(),
                       "data-value": v}, title=f"{labels[i]}: {fmt_int(v)} {unit}")
        if value_labels:
            s.text(x + bw / 2, H - MB - h - 4, fmt_int(v), cls="value-label")
    _x_labels(s, labels, ML, step)
    return s.done()


def line_chart(chart_id: str, label: str, labels: Sequence[str], values: Sequence[float | None]) -> str:
    """A ratio (0..1) as a line with dots; None breaks the line and is hatched."""
    if not values:
        return _empty(chart_id, label, "no data in this range")
    s = _Svg(chart_id, label)
    top = nice_max(max([0.05, *(float(v) for v in values if v is not None)]))
    _y_axis(s, top, lambda v: f"{round(v * 100)}%")
    step, plot_h = (W - ML - MR) / len(values), H - MT - MB

    def px(i: int) -> float:
        return ML + step * i + step / 2

    def py(v: float) -> float:
        return H - MB - plot_h * v / top

    segs: list[list[str]] = [[]]
    for i, v in enumerate(values):
        if v is None:
            s.add("rect", {"x": ML + step * i, "y": MT, "width": step, "height": plot_h, "class": "suppressed",
                           "data-suppressed": 1}, title=f"{labels[i]}: suppressed")
            segs.append([])
        else:
            segs[-1].append(f"{px(i):.1f},{py(v):.1f}")
    for seg in segs:
        if seg:
            s.add("path", {"d": "M" + " L".join(seg), "class": "line"})
    for i, v in enumerate(values):
        if v is not None:
            s.add("circle", {"cx": px(i), "cy": py(v), "r": 3.5, "class": "dot", "data-value": round(v, 4)},
                  title=f"{labels[i]}: {fmt_pct(v)}")
    _x_labels(s, labels, ML, step)
    return s.done()


def heatmap(chart_id: str, label: str, labels: Sequence[str], zones: Sequence[str],
            cells: Sequence[Sequence[float | None]], *, width: int = W, row_height: float | None = None,
            unit: str = "people on average", noun: str = "people", digits: int = 1) -> str:
    """cells[z][i]: the value of row z (a zone, or a store) in column i, None = suppressed or no
    data; `width` of the viewBox (a chart across two columns is drawn wider, keeping its text
    size); `row_height` fixes the rows' height (the chart grows with them) instead of the 220."""
    if not zones or not labels:
        return _empty(chart_id, label, "no zone data in this range")
    height = H if row_height is None else round(MT + MB + row_height * len(zones))
    s = _Svg(chart_id, label, width, height)
    left, plot_h = 96, height - MT - MB
    plot_w = width - left - MR
    row_h, col_w = plot_h / len(zones), plot_w / len(labels)
    top = max([0.0, *(v for row in cells for v in row if v is not None)])

    def ramp(v: float) -> str:  # white -> accent blue, as on the store page
        t = min(1.0, v / top) if top > 0 else 0.0
        return "rgb({},{},{})".format(*(round(a + (b - a) * t) for a, b in ((235, 31), (242, 84), (250, 150))))

    for zi, zone in enumerate(zones):
        y = MT + row_h * zi
        s.text(left - 8, y + row_h / 2 + 4, zone[:14], anchor="end")
        for i, lab in enumerate(labels):
            v = cells[zi][i]
            box = {"x": left + col_w * i + 0.5, "y": y + 0.5, "width": max(col_w - 1, 0.5),
                   "height": max(row_h - 1, 0.5)}
            if v is None:
                s.add("rect", {**box, "class": "cell suppressed", "data-suppressed": 1},
                      title=f"{zone}, {lab}: suppressed or no data")
            else:
                s.add("rect", {**box, "class": "cell", "fill": ramp(v), "data-value": round(v, 2)},
                      title=f"{zone}, {lab}: {v:,.{digits}f} {unit}")
    every = max(1, math.ceil(len(labels) / (8 * width / W)))
    for i, lab in enumerate(labels):
        if i % every == 0:
            s.text(left + col_w * i + col_w / 2, height - MB + 16, lab)
    s.text(width - MR, height - 2, f"darker = more {noun} (max {top:,.{digits}f})", anchor="end")
    return s.done()


def hbar_chart(chart_id: str, label: str, names: Sequence[str], values: Sequence[float | None], *,
               fmt: Callable[[float | None], str], bar_class: str = "") -> str:
    """One horizontal bar per store (the comparison); None is hatched."""
    if not names:
        return _empty(chart_id, label, "no stores")
    row = 26.0
    s = _Svg(chart_id, label, W, round(MT + row * len(names) + 8))
    left, right = 110, 70
    top = nice_max(max([0.0, *(float(v) for v in values if v is not None)]))
    for i, (name, v) in enumerate(zip(names, values, strict=True)):
        y = MT + row * i
        s.text(left - 8, y + row / 2 + 4, name[:16], anchor="end")
        if v is None:
            s.add("rect", {"x": left, "y": y + 3, "width": W - left - right, "height": row - 6, "class": "suppressed",
                           "data-suppressed": 1}, title=f"{name}: suppressed")
            continue
        w = (W - left - right) * v / top
        s.add("rect", {"x": left, "y": y + 3, "width": max(w, 0.5), "height": row - 6,
                       "class": f"bar {bar_class}".strip(), "data-value": round(v, 4)}, title=f"{name}: {fmt(v)}")
        s.text(left + max(w, 0.5) + 6, y + row / 2 + 4, fmt(v), cls="value-label", anchor="start")
    return s.done()
