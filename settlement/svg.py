"""Small inline-SVG charts for the self-contained reports (no scripts, no network).

Values are integer won; axes are labelled in 만 / 억. Every text is escaped."""

from __future__ import annotations

from html import escape

PALETTE = ("#2f6fb0", "#e0813a", "#3f9d58", "#c9453d", "#8a63b8", "#8c6d3f", "#d46fb0", "#6f6f6f",
           "#b5b83a", "#2fb0b0", "#1f3f7a", "#f2b134", "#7bc47f", "#e38b8b", "#b39ddb")
FONT = ("font-family=\"'Noto Sans KR','Malgun Gothic','Apple SD Gothic Neo',sans-serif\" "
        "font-size='11'")


def won_label(value: int) -> str:
    """12,345,678,900 -> '123.5억'; 1,234,567 -> '123만'. Display only (floored)."""
    sign = "-" if value < 0 else ""
    v = abs(int(value))
    if v >= 100_000_000:
        tenths = v * 10 // 100_000_000
        return f"{sign}{tenths // 10:,}.{tenths % 10}억"
    if v >= 10_000:
        return f"{sign}{v // 10_000:,}만"
    return f"{sign}{v:,}"


def _nice_max(value: int) -> int:
    if value <= 0:
        return 1
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        top = int(step * magnitude)
        if top >= value:
            return top
    return 10 * magnitude


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _legend(names: list[str], x: int, y: int) -> str:
    parts = []
    for i, name in enumerate(names):
        col, row = i % 5, i // 5
        px, py = x + col * 130, y + row * 16
        parts.append(f"<rect x='{px}' y='{py - 9}' width='10' height='10' fill='{_color(i)}'/>"
                     f"<text x='{px + 14}' y='{py}' {FONT}>{escape(name)}</text>")
    return "".join(parts)


def stacked_bars(categories: list[str], series: dict[str, list[int]], *, title: str, width: int = 900,
                 height: int = 320) -> str:
    """Vertical bars per category, stacked by series: positive parts up from the zero
    line, negative parts (a day whose clawbacks exceed its cashback) down from it. They
    were clipped to 0, so a day of refunds alone showed no bar at all (finance review)."""
    names = list(series)
    left, right, top, legend_rows = 70, 20, 30, (len(names) + 4) // 5
    bottom = 40 + 16 * legend_rows
    plot_w, plot_h = width - left - right, height - top - bottom
    ups = [sum(max(0, series[n][i]) for n in names) for i in range(len(categories))]
    downs = [sum(max(0, -series[n][i]) for n in names) for i in range(len(categories))]
    vmax = _nice_max(max(ups, default=0)) if any(ups) or not any(downs) else 0
    vmin = _nice_max(max(downs)) if any(downs) else 0
    scale = plot_h / (vmax + vmin)
    zero = top + vmax * scale
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='{escape(title)}'><text x='{left}' y='18' {FONT} font-weight='bold'>{escape(title)}</text>"]
    out.append(_y_axis(left, top, plot_w, plot_h, vmax, vmin))
    n = max(len(categories), 1)
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.7)
    for i, category in enumerate(categories):
        x = left + i * slot + (slot - bar_w) / 2
        up, down = zero, zero  # the stack's top edge above the line, its bottom edge below it
        for j, name in enumerate(names):
            value = series[name][i]
            h = abs(value) * scale
            if h <= 0:
                continue
            y = up - h if value > 0 else down
            out.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{bar_w:.1f}' height='{h:.1f}' "
                       f"fill='{_color(j)}'><title>{escape(category)} {escape(name)}: {value:,} won</title></rect>")
            if value > 0:
                up -= h
            else:
                down += h
        if i % max(1, -(-n // 10)) == 0:
            out.append(f"<text x='{x + bar_w / 2:.1f}' y='{top + plot_h + 14}' text-anchor='middle' {FONT}>"
                       f"{escape(category)}</text>")
    if vmin:
        out.append(f"<line x1='{left}' y1='{zero:.1f}' x2='{left + plot_w}' y2='{zero:.1f}' stroke='#666'/>")
    out.append(_legend(names, left, top + plot_h + 34))
    out.append("</svg>")
    return "".join(out)


def _y_axis(left: int, top: int, plot_w: int, plot_h: int, vmax: int, vmin: int = 0) -> str:
    """Grid lines and labels from -vmin (the bottom) to vmax (the top): four steps over
    the whole range, and the zero line among them where the range crosses it."""
    parts = []
    span = vmax + vmin
    values = sorted({-vmin + span * k // 4 for k in range(5)} | ({0} if vmin else set()))
    for value in values:
        y = top + plot_h - plot_h * (value + vmin) / span
        parts.append(f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' stroke='#ddd'/>"
                     f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end' {FONT}>{won_label(value)}</text>")
    return "".join(parts)


def lines(categories: list[str], series: dict[str, list[int | None]], *, title: str, dashed: set[str] = frozenset(),
          limits: dict[str, int] | None = None, width: int = 900, height: int = 320) -> str:
    """Line per series over the categories (None: no point); horizontal limit lines."""
    limits = limits or {}
    names = list(series)
    left, right, top = 70, 20, 30
    legend_names = names + [f"limit: {k}" for k in limits]
    bottom = 40 + 16 * ((len(legend_names) + 4) // 5)
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in series.values() for v in s if v is not None] + list(limits.values())
    vmax = _nice_max(max(values, default=0))
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='{escape(title)}'><text x='{left}' y='18' {FONT} font-weight='bold'>{escape(title)}</text>"]
    out.append(_y_axis(left, top, plot_w, plot_h, vmax))
    n = max(len(categories) - 1, 1)

    def xy(i: int, v: int) -> tuple[float, float]:
        return left + plot_w * i / n, top + plot_h - plot_h * v / vmax

    # A dashed series shares the colour of the series its name starts with ("city forecast" ~ "city").
    solid = [n for n in names if n not in dashed]
    color_of = {n: _color(i) for i, n in enumerate(solid)}
    for name in names:
        if name not in color_of:
            base = next((b for b in solid if name.startswith(b + " ")), None)
            color_of[name] = color_of[base] if base else _color(len(color_of))
    for name in names:
        points = [xy(i, v) for i, v in enumerate(series[name]) if v is not None]
        if not points:
            continue
        dash = " stroke-dasharray='6 4'" if name in dashed else ""
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color_of[name]}' stroke-width='2'{dash}>"
                   f"<title>{escape(name)}</title></polyline>")
    for name, value in limits.items():
        y = xy(0, value)[1]
        color = color_of.get(name, _color(len(color_of)))
        out.append(f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' stroke='{color}' "
                   f"stroke-width='2' stroke-dasharray='2 3'><title>limit {escape(name)}: {value:,} won</title></line>")
    step = max(1, -(-len(categories) // 10))
    for i, category in enumerate(categories):
        if i % step == 0:
            out.append(f"<text x='{xy(i, 0)[0]:.1f}' y='{top + plot_h + 14}' text-anchor='middle' {FONT}>"
                       f"{escape(category)}</text>")
    out.append(_legend_colored([(n, color_of[n]) for n in names]
                               + [(f"limit: {k}", color_of.get(k, "#444")) for k in limits], left, top + plot_h + 34))
    out.append("</svg>")
    return "".join(out)


def _legend_colored(items: list[tuple[str, str]], x: int, y: int) -> str:
    parts = []
    for i, (name, color) in enumerate(items):
        px, py = x + (i % 5) * 130, y + (i // 5) * 16
        parts.append(f"<rect x='{px}' y='{py - 9}' width='10' height='10' fill='{color}'/>"
                     f"<text x='{px + 14}' y='{py}' {FONT}>{escape(name)}</text>")
    return "".join(parts)


def hbars(labels: list[str], values: list[int], *, title: str, width: int = 900) -> str:
    row_h, left, right, top = 18, 160, 90, 30
    height = top + row_h * max(len(labels), 1) + 10
    vmax = max([v for v in values if v > 0], default=1)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='{escape(title)}'><text x='10' y='18' {FONT} font-weight='bold'>{escape(title)}</text>"]
    plot_w = width - left - right
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * row_h
        w = plot_w * max(0, value) / vmax
        out.append(f"<text x='{left - 6}' y='{y + 12}' text-anchor='end' {FONT}>{escape(label)}</text>"
                   f"<rect x='{left}' y='{y + 2}' width='{w:.1f}' height='{row_h - 5}' fill='{_color(0)}'/>"
                   f"<text x='{left + w + 4:.1f}' y='{y + 12}' {FONT}>{won_label(value)}</text>")
    out.append("</svg>")
    return "".join(out)
