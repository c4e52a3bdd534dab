"""PNG charts drawn with Pillow (matplotlib is not a dependency of this project).

Two kinds: horizontal stacked bars (latency per stage and target) and a log-scale dot/line chart
(parity errors per frame). Both are deliberately plain: title, axis with ticks, legend, values.
"""

from __future__ import annotations

import math
from pathlib import Path

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
           "#CCB974", "#64B5CD"]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = span / max(1, ticks)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _format_seconds(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} us"


def stacked_bars(path: Path, title: str, subtitle: str, rows: list[tuple[str, dict[str, float], str]],
                 segments: list[str], unit: str = "s") -> Path:
    """rows: (label, {segment: value}, note shown right of the bar). One bar per row."""
    from PIL import Image, ImageDraw

    width, left, right, top, bar, gap = 1100, 230, 170, 88, 30, 16
    legend_h = 40
    height = top + len(rows) * (bar + gap) + 50 + legend_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(20), _font(14), _font(12)
    draw.text((20, 14), title, fill="black", font=title_font)
    draw.text((20, 44), subtitle, fill="#444444", font=small)
    total_max = max((sum(v for v in values.values() if v) for _, values, _ in rows), default=1.0) or 1.0
    step = _nice_step(total_max)
    axis_max = step * math.ceil(total_max / step)
    plot_w = width - left - right
    scale = plot_w / axis_max
    axis_y = top + len(rows) * (bar + gap)
    for i in range(int(round(axis_max / step)) + 1):  # grid and ticks
        x = left + i * step * scale
        draw.line([(x, top - 6), (x, axis_y)], fill="#E5E5E5")
        label = f"{i * step:g}"
        draw.text((x - _text_width(draw, label, small) / 2, axis_y + 4), label, fill="#333333", font=small)
    draw.text((left + plot_w / 2 - 20, axis_y + 20), unit, fill="#333333", font=small)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(segments)}
    for r, (label, values, note) in enumerate(rows):
        y = top + r * (bar + gap)
        draw.text((left - 10 - _text_width(draw, label, font), y + 7), label, fill="black", font=font)
        x = float(left)
        for name in segments:
            value = values.get(name) or 0.0
            if value <= 0:
                continue
            w = value * scale
            draw.rectangle([x, y, x + max(w, 1), y + bar], fill=colors[name])
            x += w
        draw.text((x + 8, y + 7), note, fill="black", font=font)
    draw.line([(left, top - 6), (left, axis_y)], fill="black")
    draw.line([(left, axis_y), (left + plot_w, axis_y)], fill="black")
    x, y = left, height - legend_h + 6
    for name in segments:
        draw.rectangle([x, y + 3, x + 14, y + 17], fill=colors[name])
        draw.text((x + 20, y + 2), name, fill="black", font=font)
        x += 40 + _text_width(draw, name, font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def log_lines(path: Path, title: str, subtitle: str, series: list[tuple[str, list[float]]], x_label: str,
              y_label: str, x_values: list[int] | None = None) -> Path:
    """Each series: (name, values per x); values <= 0 or non-finite are skipped. Log10 y axis."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 1000, 580, 90, 260, 96, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(20), _font(14), _font(12)
    draw.text((20, 14), title, fill="black", font=title_font)
    draw.text((20, 44), subtitle, fill="#444444", font=small)
    values = [v for _, vs in series for v in vs if v is not None and math.isfinite(v) and v > 0]
    count = max((len(vs) for _, vs in series), default=1)
    xs = x_values or list(range(count))
    lo = math.floor(math.log10(min(values)) - 0.3) if values else -8
    hi = math.ceil(math.log10(max(values)) + 0.1) if values else 0
    hi = max(hi, lo + 1)
    plot_w, plot_h = width - left - right, height - top - bottom
    to_x = (lambda i: left + plot_w / 2) if count == 1 else (lambda i: left + i * plot_w / (count - 1))
    to_y = lambda v: top + plot_h * (hi - math.log10(v)) / (hi - lo)  # noqa: E731
    for e in range(lo, hi + 1):
        y = top + plot_h * (hi - e) / (hi - lo)
        draw.line([(left, y), (left + plot_w, y)], fill="#E5E5E5")
        label = f"1e{e}"
        draw.text((left - 8 - _text_width(draw, label, small), y - 7), label, fill="#333333", font=small)
    for i, x_value in enumerate(xs[:count] if count > 1 else []):
        x = to_x(i)
        draw.text((x - 4, top + plot_h + 6), str(x_value), fill="#333333", font=small)
    draw.text((left + plot_w / 2 - 40, top + plot_h + 26), x_label if count > 1 else f"{x_label} {xs[0] if xs else 0}",
              fill="#333333", font=small)
    draw.text((10, top - 20), y_label, fill="#333333", font=small)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    single = count == 1  # one x value: spread the series side by side and print each value
    for s, (name, vs) in enumerate(series):
        color = PALETTE[s % len(PALETTE)]
        place_x = (lambda i: left + (s + 1) * plot_w / (len(series) + 1)) if single else to_x  # noqa: E731
        points = [(place_x(i), to_y(v), v) for i, v in enumerate(vs) if v is not None and math.isfinite(v) and v > 0]
        if len(points) > 1:
            draw.line([(x, y) for x, y, _ in points], fill=color, width=2)
        for x, y, v in points:
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color)
            if single:
                draw.text((x + 8, y - 8), f"{v:.1e}", fill="black", font=small)
        ly = top + 10 + s * 22
        draw.rectangle([left + plot_w + 16, ly + 2, left + plot_w + 30, ly + 16], fill=color)
        draw.text((left + plot_w + 36, ly), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
