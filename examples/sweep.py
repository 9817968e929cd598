"""Accuracy against compute over a sweep of policy and exit thresholds, for a trained STEP model.

    python examples/sweep.py --model_name_or_path outputs/camvid-tiny --dataset_name ../shared/datasets/camvid \
        --policy_thresholds 0.7 0.5 0.3 --exit_thresholds 1.01 0.99 0.95 0.9 0.8

For every pair of thresholds (one value used for every superpatch size, one for every exit; an exit threshold
above 1 switches halting off) it reports validation mIoU, tokens per image, share halted per exit and FLOPs per
image (policy included, 2 FLOPs per multiply-add). `--partition_source oracle` or `dense` replaces the policy.
Writes a Markdown table to stdout and the rows as JSON to `--output`, each with the exact settings it was measured
with. The best row is the cheapest (fewest FLOPs) within `--max_miou_drop` mIoU points of the most accurate;

    python examples/save_settings.py --model_name_or_path outputs/camvid-tiny --sweep sweep.json \
        --output_dir outputs/tuned

writes a copy of the model that runs with its settings by default (and so reproduces the row).
"""

import argparse
import itertools
import json

from accelerate import Accelerator
from data import load_data
from torch.utils.data import DataLoader

from step_hf import StepForSemanticSegmentation, StepImageProcessor
from step_hf.calibrate import cheapest_within
from step_hf.configuration_step import PARTITION_SOURCES, resolve_settings
from step_hf.evaluation import EvalTransform, evaluate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name")
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--image_size", type=int, help="shortest edge; default: the model's processor's")
    parser.add_argument("--partition_source", default="policy", choices=PARTITION_SOURCES)
    parser.add_argument("--policy_thresholds", type=float, nargs="+", default=[0.5])
    parser.add_argument("--exit_thresholds", type=float, nargs="+", default=[1.01])
    parser.add_argument("--max_eval_samples", type=int)
    parser.add_argument("--max_miou_drop", type=float, default=1.0,
                        help="the best row: the fewest FLOPs within this many mIoU points of the most accurate row")
    parser.add_argument("--output", default="sweep.json")
    return parser.parse_args(argv)


def sweep(model, loader, accelerator, processor, args) -> list[dict]:
    """One row per pair of thresholds: the evaluation under those settings, and the settings themselves."""
    config, rows = accelerator.unwrap_model(model).config, []
    policy_values = args.policy_thresholds if args.partition_source == "policy" else [None]
    for policy_threshold, exit_threshold in itertools.product(policy_values, args.exit_thresholds):
        halting = exit_threshold <= 1 and bool(config.exit_layers)
        settings = {"partition_source": args.partition_source, "halting": halting}
        if policy_threshold is not None:
            settings["policy_thresholds"] = [policy_threshold] * len(config.shared_sizes)
        if halting:
            settings["exit_thresholds"] = [exit_threshold] * len(config.exit_layers)
        results = evaluate(model, loader, accelerator, settings)
        rows.append({"partition_source": args.partition_source, "policy_threshold": policy_threshold,
                     "exit_threshold": exit_threshold if halting else None, **results,
                     "settings": resolve_settings(config, settings).to_dict(),
                     "processor_size": processor.to_dict()["size"], "dataset_name": args.dataset_name,
                     "split": args.eval_split})
        accelerator.print(f"policy {policy_threshold}, exits {exit_threshold}: mIoU {100 * results['mean_iou']:.2f}, "
                          f"{results['tokens_per_image']:.1f} tokens, {results['gflops_per_image']:.2f} GFLOPs")
    best_miou = max(row["mean_iou"] for row in rows)
    rows[cheapest_within(rows, best_miou, args.max_miou_drop, "gflops_per_image")]["best"] = True
    return rows


def print_table(rows: list[dict], exit_layers: list[int], args) -> None:
    exits = ", ".join(f"exit {layer}" for layer in exit_layers)
    print(f"\n| partition | policy thr. | exit thr. | mIoU | tokens/image | halted ({exits}) | GFLOPs/image |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        halted = ", ".join(f"{100 * s:.1f}%" for s in row["halted_share"]) if row["exit_threshold"] else "off"
        print(f"| {row['partition_source']} | {row['policy_threshold'] or '-'} | {row['exit_threshold'] or 'off'} "
              f"| {100 * row['mean_iou']:.2f} | {row['tokens_per_image']:.1f} | {halted} | "
              f"{row['gflops_per_image']:.3f} |")
    best = next(row for row in rows if row.get("best"))
    print(f"\nbest (fewest FLOPs within {args.max_miou_drop} mIoU of the most accurate): row {rows.index(best)}, "
          f"policy {best['policy_threshold']}, exits {best['exit_threshold'] or 'off'}. Save a model that runs "
          f"with it by default:\n  python examples/save_settings.py --model_name_or_path {args.model_name_or_path} "
          f"--sweep {args.output} --output_dir OUTPUT_DIR")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    model = StepForSemanticSegmentation.from_pretrained(args.model_name_or_path).eval()
    processor = StepImageProcessor.from_pretrained(args.model_name_or_path)
    if args.image_size:
        processor.size = {"shortest_edge": args.image_size}
    dataset, _ = load_data(dataset_name=args.dataset_name, eval_split=args.eval_split,
                           max_eval_samples=args.max_eval_samples)
    loader = accelerator.prepare_data_loader(DataLoader(EvalTransform(dataset["validation"], processor)))
    model = accelerator.prepare_model(model, evaluation_mode=True)
    rows = sweep(model, loader, accelerator, processor, args)
    if accelerator.is_main_process:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
        print_table(rows, accelerator.unwrap_model(model).config.exit_layers, args)


if __name__ == "__main__":
    main()
