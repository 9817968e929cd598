"""Plot mIoU against FLOPs per image from the JSON files of `examples/sweep.py` (one curve per file), with PIL.

    python examples/plot_sweep.py outputs/sweep-policy.json outputs/sweep-exits.json --output curve.png

Also writes the plotted points as CSV next to the picture.
"""

import argparse
import csv
import json
import os

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="JSON files written by examples/sweep.py")
    parser.add_argument("--labels", nargs="*", help="a legend entry per file (default: the file names)")
    parser.add_argument("--output", default="miou_vs_flops.png")
    args = parser.parse_args()
    labels = args.labels or [os.path.splitext(os.path.basename(path))[0] for path in args.sweeps]
    plot([json.load(open(path)) for path in args.sweeps], labels, args.output)


def plot(sweeps: list[list[dict]], labels: list[str], output: str, colours: list[int] | None = None) -> None:
    """One curve per list of rows (rows as `examples/sweep.py` writes them; one row draws a point), the picture at
    `output` and the points in a CSV beside it. `colours`: a colour index per curve (default: one each)."""
    curves = [sorted(((row["gflops_per_image"], 100 * row["mean_iou"], row) for row in rows), key=lambda p: p[0])
              for rows in sweeps]

    width, height, margin, legend_width = 900, 600, 80, 340  # the legend in a column right of the axes
    xs = [x for curve in curves for x, _, _ in curve]
    ys = [y for curve in curves for _, y, _ in curve]
    x_low, x_high = 0.0, max(xs) * 1.05
    y_pad = max(0.5, (max(ys) - min(ys)) * 0.1)
    y_low, y_high = min(ys) - y_pad, max(ys) + y_pad

    def point(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x_low) / (x_high - x_low) * (width - 2 * margin),
                height - margin - (y - y_low) / (y_high - y_low) * (height - 2 * margin))

    picture = Image.new("RGB", (width + legend_width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for step in range(6):  # axis ticks and grid
        x = x_low + (x_high - x_low) * step / 5
        y = y_low + (y_high - y_low) * step / 5
        px, _ = point(x, y_low)
        _, py = point(x_low, y)
        draw.line([px, margin, px, height - margin], fill=(230, 230, 230))
        draw.line([margin, py, width - margin, py], fill=(230, 230, 230))
        draw.text((px - 12, height - margin + 8), f"{x:.2f}", fill="black")
        draw.text((margin - 45, py - 6), f"{y:.1f}", fill="black")
    draw.text((width / 2 - 60, height - 35), "GFLOPs per image", fill="black")
    draw.text((10, margin - 30), "validation mIoU (%)", fill="black")
    for index, (curve, label) in enumerate(zip(curves, labels)):
        colour = COLOURS[(colours[index] if colours else index) % len(COLOURS)]
        points = [point(x, y) for x, y, _ in curve]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((width - margin + 20, margin + 16 * index), f"- {label}", fill=colour)
    picture.save(output)

    with open(os.path.splitext(output)[0] + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["curve", "partition_source", "policy_threshold", "exit_threshold", "gflops_per_image",
                         "mean_iou", "tokens_per_image", "halted_share"])
        for curve, label in zip(curves, labels):
            for x, y, row in curve:
                writer.writerow([label, row["partition_source"], row["policy_threshold"], row["exit_threshold"],
                                 f"{x:.4f}", f"{y:.2f}", f"{row['tokens_per_image']:.1f}",
                                 " ".join(f"{s:.3f}" for s in row["halted_share"])])
    print(f"wrote {output} and its CSV")


if __name__ == "__main__":
    main()
