"""Accuracy against compute over a sweep of policy and exit thresholds, for a trained STEP model.

    python examples/sweep.py --model outputs/camvid-tiny --dataset_name ../shared/datasets/camvid \
        --policy_thresholds 0.7 0.5 0.3 --exit_thresholds 1.01 0.99 0.95 0.9 0.8

For every pair of thresholds (one value used for every superpatch size, one for every exit; an exit threshold
above 1 switches halting off) it reports validation mIoU, tokens per image, share halted per exit and FLOPs per
image (policy included, 2 FLOPs per multiply-add). `--partition_source oracle` or `dense` replaces the policy.
Writes a Markdown table to stdout and the rows as JSON to `--output`, each with the exact settings it was measured
with. The best row is the cheapest (fewest FLOPs) within `--max_miou_drop` mIoU points of the most accurate;

    python examples/save_settings.py --model outputs/camvid-tiny --sweep sweep.json --output_dir outputs/tuned

writes a copy of the model that runs with its settings by default (and so reproduces the row).
"""

import argparse
import itertools
import json
import os
import sys

from accelerate import Accelerator
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402

from step_hf import StepForSemanticSegmentation, StepImageProcessor  # noqa: E402
from step_hf.configuration_step import PARTITION_SOURCES  # noqa: E402
from step_hf.evaluation import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
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
    args = parser.parse_args()

    accelerator = Accelerator()
    model = StepForSemanticSegmentation.from_pretrained(args.model).eval()
    processor = StepImageProcessor.from_pretrained(args.model)
    if args.image_size:
        processor.size = {"shortest_edge": args.image_size}
    train_args = train.parse_args([
        *(["--dataset_name", args.dataset_name] if args.dataset_name else []), "--eval_split", args.eval_split,
        *(["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else []),
    ])
    dataset, _ = train.load_data(train_args)
    loader = accelerator.prepare_data_loader(DataLoader(train.EvalTransform(dataset["validation"], processor)))
    model = accelerator.prepare_model(model, evaluation_mode=True)
    config = accelerator.unwrap_model(model).config

    rows = []
    policy_values = args.policy_thresholds if args.partition_source == "policy" else [None]
    for policy_threshold, exit_threshold in itertools.product(policy_values, args.exit_thresholds):
        halting = exit_threshold <= 1 and bool(config.exit_layers)
        settings = {"partition_source": args.partition_source, "halting": halting}
        if policy_threshold is not None:
            settings["policy_thresholds"] = [policy_threshold] * len(config.shared_sizes)
        if halting:
            settings["exit_thresholds"] = [exit_threshold] * len(config.exit_layers)
        config.update_settings(**settings)
        results = evaluate(model, loader, accelerator)
        rows.append({"partition_source": args.partition_source, "policy_threshold": policy_threshold,
                     "exit_threshold": exit_threshold if halting else None, **results,
                     "settings": config.settings(), "processor_size": processor.to_dict()["size"],
                     "dataset_name": args.dataset_name, "split": args.eval_split})
        accelerator.print(f"policy {policy_threshold}, exits {exit_threshold}: mIoU {100 * results['mean_iou']:.2f}, "
                          f"{results['tokens_per_image']:.1f} tokens, {results['gflops_per_image']:.2f} GFLOPs")
    best_miou = max(row["mean_iou"] for row in rows)
    best = min((row for row in rows if row["mean_iou"] >= best_miou - args.max_miou_drop / 100),
               key=lambda row: row["gflops_per_image"])
    best["best"] = True

    if accelerator.is_main_process:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
        exits = ", ".join(f"exit {layer}" for layer in config.exit_layers)
        print(f"\n| partition | policy thr. | exit thr. | mIoU | tokens/image | halted ({exits}) | GFLOPs/image |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            halted = ", ".join(f"{100 * s:.1f}%" for s in row["halted_share"]) if row["exit_threshold"] else "off"
            print(f"| {row['partition_source']} | {row['policy_threshold'] or '-'} | {row['exit_threshold'] or 'off'} "
                  f"| {100 * row['mean_iou']:.2f} | {row['tokens_per_image']:.1f} | {halted} | "
                  f"{row['gflops_per_image']:.3f} |")
        print(f"\nbest (fewest FLOPs within {args.max_miou_drop} mIoU of the most accurate): row {rows.index(best)}, "
              f"policy {best['policy_threshold']}, exits {best['exit_threshold'] or 'off'}. Save a model that runs "
              f"with it by default:\n  python examples/save_settings.py --model {args.model} --sweep {args.output} "
              "--output_dir OUTPUT_DIR")


if __name__ == "__main__":
    main()
