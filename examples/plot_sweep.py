"""Plot mIoU against FLOPs per image from the JSON files of `examples/sweep.py` (one curve per file), with PIL.

    python examples/plot_sweep.py outputs/sweep-policy.json outputs/sweep-exits.json --output curve.png

Also writes the plotted points as CSV next to the picture.
"""

import argparse
import csv
import json
import os

from step_hf.charts import COLOURS, Curve, draw_chart
from step_hf.cli import run_command


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

    ys = [y for curve in curves for _, y, _ in curve]
    y_pad = max(0.5, (max(ys) - min(ys)) * 0.1)
    draw_chart([Curve(label, [(x, y) for x, y, _ in curve], COLOURS[(colours[index] if colours else index) % len(COLOURS)],
                      dots=True) for index, (curve, label) in enumerate(zip(curves, labels))],
               output, "GFLOPs per image", "validation mIoU (%)",
               x_range=(0.0, max(x for curve in curves for x, _, _ in curve) * 1.05),
               y_range=(min(ys) - y_pad, max(ys) + y_pad))

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
    run_command(main)
