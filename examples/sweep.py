"""Accuracy against compute over a sweep of policy and exit thresholds, for a trained STEP model.

    python examples/sweep.py --model outputs/camvid-tiny --dataset_name ../shared/datasets/camvid \
        --policy_thresholds 0.7 0.5 0.3 --exit_thresholds 1.01 0.99 0.95 0.9 0.8

For every pair of thresholds (one value used for every superpatch size, one for every exit; an exit threshold
above 1 switches halting off) it reports validation mIoU, tokens per image, share halted per exit and FLOPs per
image (policy included, 2 FLOPs per multiply-add). `--partition_source oracle` or `dense` replaces the policy.
Writes a Markdown table to stdout and the rows as JSON to `--output`.
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
        if policy_threshold is not None:
            config.policy_thresholds = [policy_threshold] * len(config.shared_sizes)
        config.exit_thresholds = [exit_threshold] * len(config.exit_layers)
        config.halting = exit_threshold <= 1 and bool(config.exit_layers)
        results = train.evaluate(model, loader, accelerator, args.partition_source)
        rows.append({"partition_source": args.partition_source, "policy_threshold": policy_threshold,
                     "exit_threshold": exit_threshold if config.halting else None, **results})
        accelerator.print(f"policy {policy_threshold}, exits {exit_threshold}: mIoU {100 * results['mean_iou']:.2f}, "
                          f"{results['tokens_per_image']:.1f} tokens, {results['gflops_per_image']:.2f} GFLOPs")

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


if __name__ == "__main__":
    main()
