"""STEP against the methods it is built from: the tables and the plot of `scripts/lineage_ablation.sh`'s runs.

    python examples/lineage_table.py outputs/lineage --output docs/figures/lineage --time_images 20

Reads every `seed-*` folder under the root. For each variant it reports, per seed and their mean, validation mIoU,
tokens per image, GFLOPs and GMACs (multiply-adds, the unit of the DToP and CTS tables) per image, the share of
tokens halted, and with `--time_images` images per second (batch 1 on this machine's CPU, the model's saved
settings). Then the halting variants compared at equal halted share and at equal FLOPs, read off their threshold
sweeps by linear interpolation between measured rows. Writes Markdown to stdout, and the rows (`.json`) and a plot
of mIoU against GFLOPs with every variant (`.png`, `.csv`) to `--output`.
"""

import argparse
import glob
import json
import os
from types import SimpleNamespace

import numpy as np
import torch
from data import load_data
from plot_sweep import plot

from step_hf import StepForSemanticSegmentation, StepImageProcessor
from step_hf.benchmark import timed
from step_hf.cli import refusing, run_command
from step_hf.evaluation import EvalTransform

# (label, folder under a seed's folder), in the order of the table.
VARIANTS = [
    ("dense ViT + Segmenter", "dense"),
    ("CTS alone (2x2 superpatches, token budget)", "cts"),
    ("DToP alone (dense + halting)", "dtop"),
    ("dCTS", "dcts"),
    ("STEP, MLP exit heads", "step"),
    ("STEP, ATM exit heads", "atm/step"),
    ("STEP, MLP exits at the ablated blocks", "exits/step"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the OUTPUT_ROOT of scripts/lineage_ablation.sh")
    parser.add_argument("--output", default="lineage", help="path prefix of the .json, .png and .csv written")
    parser.add_argument("--dataset_name", default="../shared/datasets/camvid", help="for --time_images")
    parser.add_argument("--time_images", type=int, default=0, help="validation frames timed per model (0: none)")
    parser.add_argument("--halted_shares", type=float, nargs="+", default=[0.2, 0.4, 0.6],
                        help="the shares at which the halting variants are compared")
    return parser.parse_args(argv)


def final_row(folder: str) -> dict:
    """A trained model's final evaluation (its `metrics.json`) as a sweep row, with its exit layers."""
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    config = json.load(open(os.path.join(folder, "config.json")))
    settings = metrics["settings"]
    return {**metrics["final_eval"], "partition_source": settings["partition_source"], "policy_threshold": None,
            "exit_threshold": settings["exit_thresholds"][0] if settings["halting"] else None,
            "exit_layers": config["exit_layers"], "exit_head_type": config.get("exit_head_type", "mlp")}


def images_per_second(folder: str, dataset, count: int) -> float:
    """Frames per second through the saved model at its saved settings, batch 1, on the CPU: the benchmark's timing
    (`step_hf.benchmark.timed`), one warm-up pass over the frames, then the median of three."""
    with refusing(f"the model {folder}", "a folder saved by examples/train.py"):
        model = StepForSemanticSegmentation.from_pretrained(folder).eval()
        frames = EvalTransform(dataset, StepImageProcessor.from_pretrained(folder))
    pixels = [frames[index]["pixel_values"][None] for index in range(count)]
    with torch.inference_mode():
        ms_per_frame, _ = timed(model, pixels, SimpleNamespace(warmup=1, repeats=3, device="cpu"))
    return 1000 / ms_per_frame


def interpolate(rows: list[dict] | None, key: str, at: float, value: str) -> float | None:
    """`value` of the sweep `rows` at `key` = `at`, linear between the two measured rows around it; `None` outside
    the measured range or without a sweep."""
    if rows is None:
        return None
    points = sorted((key_of(row, key), key_of(row, value)) for row in rows)
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if not xs or not xs[0] <= at <= xs[-1]:
        return None
    return float(np.interp(at, xs, ys))


def key_of(row: dict, key: str) -> float:
    return sum(row["halted_share"]) if key == "halted" else row[key]


def collect(root: str, time_images: int, dataset_name: str) -> dict:
    """Per variant, per seed: the final row, the sweep rows (halting variants) and, when asked, images/s."""
    seeds = sorted(glob.glob(os.path.join(root, "seed-*")))
    if not seeds:
        raise ValueError(f"{root} has no seed-* folders: run scripts/lineage_ablation.sh first.")
    dataset = load_data(dataset_name=dataset_name)[0]["validation"] if time_images else None
    results = {}
    for label, name in VARIANTS:
        runs = []
        for seed in seeds:
            folder = os.path.join(seed, name)
            if not os.path.isfile(os.path.join(folder, "metrics.json")):
                continue
            sweep_path = os.path.join(folder, "sweep.json")
            runs.append({
                "seed": os.path.basename(seed), "final": final_row(folder),
                "sweep": json.load(open(sweep_path)) if os.path.isfile(sweep_path) else None,
                "images_per_second": images_per_second(folder, dataset, time_images) if time_images else None,
            })
        if runs:
            results[label] = runs
    return results


def cell(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """Each seed's value and their mean: `a / b (mean m)`; `-` where a value is missing."""
    shown = [f"{value * scale:.{digits}f}" if value is not None else "-" for value in values]
    present = [value for value in values if value is not None]
    mean = f" (mean {np.mean(present) * scale:.{digits}f})" if len(present) > 1 else ""
    return " / ".join(shown) + mean


def main_table(results: dict) -> str:
    lines = ["| variant | exits | mIoU (%) | tokens/image | GFLOPs/image | GMACs/image | halted | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        finals = [run["final"] for run in runs]
        exits = (f"{finals[0]['exit_head_type'].upper()} after {finals[0]['exit_layers']}, thr. "
                 f"{finals[0]['exit_threshold']}" if finals[0]["exit_threshold"] is not None else "off")
        speeds = [run["images_per_second"] for run in runs]
        lines.append(
            f"| {label} | {exits} | {cell([f['mean_iou'] for f in finals], 100)} | "
            f"{cell([f['tokens_per_image'] for f in finals], digits=1)} | "
            f"{cell([f['gflops_per_image'] for f in finals], digits=3)} | "
            f"{cell([f['gflops_per_image'] / 2 for f in finals], digits=3)} | "
            f"{cell([sum(f['halted_share']) for f in finals], 100, 1)}% | "
            f"{cell(speeds, digits=1) if speeds[0] is not None else 'not timed'} |")
    return "\n".join(lines)


def halted_share_table(results: dict, shares: list[float]) -> str:
    lines = ["| variant | " + " | ".join(f"mIoU at {100 * s:.0f}% halted (GFLOPs)" for s in shares) + " |",
             "|---|" + "---|" * len(shares)]
    for label, runs in results.items():
        if runs[0]["sweep"] is None:
            continue
        cells = []
        for share in shares:
            mious = [interpolate(run["sweep"], "halted", share, "mean_iou") for run in runs]
            flops = [interpolate(run["sweep"], "halted", share, "gflops_per_image") for run in runs]
            cells.append(f"{cell(mious, 100)} ({cell(flops, digits=3)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def equal_flops_table(results: dict) -> str:
    """The halting variants' mIoU at three FLOPs budgets spread over the range every one of their sweeps (every
    seed) covers; the variants that do not halt have one cost each (the main table)."""
    sweeps = [run["sweep"] for runs in results.values() for run in runs if run["sweep"]]
    if not sweeps:
        return "(no sweeps)"
    low = max(min(row["gflops_per_image"] for row in rows) for rows in sweeps)
    high = min(max(row["gflops_per_image"] for row in rows) for rows in sweeps)
    if low > high:
        return "(the sweeps share no FLOPs range)"
    budgets = np.linspace(low, high, 3).tolist()
    lines = ["| variant | " + " | ".join(f"mIoU at {budget:.3f} GFLOPs ({budget / 2:.3f} GMACs)" for budget in budgets)
             + " |", "|---|" + "---|" * len(budgets)]
    for label, runs in results.items():
        if runs[0]["sweep"] is None:
            continue
        cells = [cell([interpolate(run["sweep"], "gflops_per_image", budget, "mean_iou") for run in runs], 100)
                 for budget in budgets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = collect(args.root, args.time_images, args.dataset_name)
    print(main_table(results), "", halted_share_table(results, args.halted_shares), "", equal_flops_table(results),
          sep="\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(results, f, indent=1)
    curves, labels, colours = [], [], []
    for index, (label, runs) in enumerate(results.items()):
        for run in runs:
            curves.append(run["sweep"] or [run["final"]])
            labels.append(f"{label}, {run['seed']}")
            colours.append(index)
    plot(curves, labels, args.output + ".png", colours)


if __name__ == "__main__":
    run_command(main)
