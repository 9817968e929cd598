"""One small chart drawer (PIL only): curves of points on linear or logarithmic axes, with ticks, a light grid and a
legend in a column right of the axes. The resolution-cost plot and the mIoU-against-FLOPs sweeps both draw with it.
"""

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Curve:
    """One curve: its legend entry, its points `(x, y)`, its colour, line width, and whether points get dots."""

    label: str
    points: list[tuple[float, float]]
    colour: tuple[int, int, int]
    width: int = 2
    dots: bool = False


def axis_ticks(low: float, high: float, log: bool) -> list[tuple[float, str]]:
    """Ticks `(value, label)`: the decades in range on a log axis, six even steps on a linear one."""
    if log:
        decades = range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)
        return [(10.0**power, f"{10.0**power:g}") for power in decades]
    return [(low + (high - low) * step / 5, f"{low + (high - low) * step / 5:.3g}") for step in range(6)]


def draw_chart(curves: list[Curve], path: str, x_label: str, y_label: str, log_x: bool = False, log_y: bool = False,
               x_range: tuple[float, float] | None = None, y_range: tuple[float, float] | None = None,
               x_ticks: list[tuple[float, str]] | None = None) -> None:
    """Draw `curves` into a PNG at `path`. Ranges default to the points' (a log axis needs positive values);
    `x_ticks` replace the automatic ones of the x axis."""
    width, height, margin, legend_width = 900, 600, 80, 340
    xs = [x for curve in curves for x, _ in curve.points]
    ys = [y for curve in curves for _, y in curve.points]
    (x_low, x_high), (y_low, y_high) = x_range or (min(xs), max(xs)), y_range or (min(ys), max(ys))
    scale_x = math.log if log_x else float
    scale_y = math.log if log_y else float

    def at(x: float, y: float) -> tuple[float, float]:
        fx = (scale_x(x) - scale_x(x_low)) / ((scale_x(x_high) - scale_x(x_low)) or 1)
        fy = (scale_y(y) - scale_y(y_low)) / ((scale_y(y_high) - scale_y(y_low)) or 1)
        return margin + fx * (width - 2 * margin), height - margin - fy * (height - 2 * margin)

    picture = Image.new("RGB", (width + legend_width, height), "white")
    draw = ImageDraw.Draw(picture)
    for value, label in x_ticks or axis_ticks(x_low, x_high, log_x):
        x, _ = at(value, y_low)
        draw.line([x, margin, x, height - margin], fill=(230, 230, 230))
        draw.text((x - 20, height - margin + 8), label, fill="black")
    for value, label in axis_ticks(y_low, y_high, log_y):
        _, y = at(x_low, value)
        draw.line([margin, y, width - margin, y], fill=(230, 230, 230))
        draw.text((margin - 55, y - 6), label, fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((width / 2 - 100, height - 35), x_label, fill="black")
    draw.text((10, margin - 30), y_label, fill="black")
    for index, curve in enumerate(curves):
        points = [at(x, y) for x, y in curve.points]
        if len(points) > 1:
            draw.line(points, fill=curve.colour, width=curve.width)
        for px, py in points if curve.dots else []:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=curve.colour)
        draw.text((width - margin + 20, margin + 16 * index), f"- {curve.label}", fill=curve.colour)
    picture.save(path)


__all__ = ["COLOURS", "Curve", "axis_ticks", "draw_chart"]
