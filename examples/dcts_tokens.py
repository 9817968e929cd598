"""Where dCTS puts its tokens: train the policy (stage 1, as `train.py --stage policy` trains it) and measure tokens
per image against thresholds.

    python examples/dcts_tokens.py --dataset_name ../shared/datasets/camvid --image_size 512 --policy_steps 300

Reports, on the validation split: the oracle partition's tokens per image (from ground-truth targets), and for a
sweep of policy thresholds the policy's tokens per image, the share of area per superpatch size, and how often the
partition shares a block that the ground truth calls mixed. The model (with its trained policy), its processor and
card go to `--output_dir` as `train.py` writes them, and `results.json` beside them.
"""

import argparse
import json
import os

import numpy as np
import torch
import train
from data import load_data
from torch.utils.data import DataLoader

from step_hf import StepForSemanticSegmentation, StepImageProcessor
from step_hf.accounting import superpatch_area_shares
from step_hf.cli import refusing, run_command
from step_hf.configuration_step import SUPERPATCH_SIZES
from step_hf.evaluation import EvalTransform, predictions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True, help="a Hub id or a local folder laid out like one")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--image_column_name", default="image")
    parser.add_argument("--label_column_name", default="label")
    parser.add_argument("--model_name_or_path", help="a saved STEP model to start from (with --policy_steps 0: the "
                                                     "model whose policy is measured); default: a new ViT-Tiny one")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--policy_steps", type=int, default=300)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--policy_learning_rate", type=float, default=train.TrainArguments.policy_learning_rate,
                        help="as train.py's")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    parser.add_argument("--output_dir", default="outputs/dcts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.policy_steps and not args.model_name_or_path:
        parser.error("--policy_steps 0 measures a trained policy: give its --model_name_or_path.")
    return args


def train_policy(args) -> list[float]:
    """Stage 1 through `train.py` into `--output_dir`; the training losses, step by step."""
    train.run_training(train.TrainArguments(
        dataset_name=args.dataset_name, train_split=args.train_split, eval_split=args.eval_split,
        image_column_name=args.image_column_name, label_column_name=args.label_column_name,
        image_size=args.image_size, stage="policy", policy_steps=args.policy_steps,
        per_device_train_batch_size=args.per_device_train_batch_size, seed=args.seed, checkpointing_steps=0,
        policy_learning_rate=args.policy_learning_rate, output_dir=args.output_dir,
        model_name_or_path=args.model_name_or_path,
    ))
    with open(os.path.join(args.output_dir, "metrics.json")) as f:
        history = json.load(f)["history"]
    return [entry["loss"] for entry in history if entry["stage"] == "policy" and "loss" in entry]


def partition_statistics(model, loader, settings: dict) -> dict:
    """Tokens per image (mean, 5th and 95th percentiles), the share of area per superpatch size, and the share of
    shared area that the ground truth calls mixed, for the partitions the model builds under `settings` (the
    policy at some thresholds, or the oracle)."""
    counts, shares, shared, mixed = [], [], 0, 0
    sizes = torch.tensor(model.config.shared_sizes)[None, :, None, None]
    for batch, outputs, _ in predictions(model, loader, torch.device("cpu"), settings, policy_only=True):
        counts += outputs.token_counts.tolist()
        shares.append(superpatch_area_shares(outputs.superpatch_map))
        chosen = outputs.superpatch_map[:, None] == sizes  # (batch, shared sizes, rows, cols)
        shared += int(chosen.sum())
        mixed += int((chosen & (batch["superpatch_targets"] == 0)).sum())
    counts, shares = np.array(counts), torch.cat(shares).mean(0).tolist()
    return {
        "tokens_mean": float(counts.mean()), "tokens_p5": float(np.percentile(counts, 5)),
        "tokens_p95": float(np.percentile(counts, 95)),
        "area_share": {str(size): round(share, 4) for size, share in zip(SUPERPATCH_SIZES, shares)},
        "shared_area_mixed": mixed / max(1, shared),
    }


def token_statistics(model, loader, thresholds: list[float]) -> dict:
    """`partition_statistics` of the oracle, and of the policy at each threshold (one value for every size)."""
    results = {"oracle": partition_statistics(model, loader, {"partition_source": "oracle"}), "policy": {}}
    for threshold in thresholds:
        settings = {"partition_source": "policy", "policy_thresholds": [threshold] * len(model.config.shared_sizes),
                    "token_budget": None}
        results["policy"][str(threshold)] = partition_statistics(model, loader, settings)
    return results


def print_table(results: dict, args) -> None:
    cells = results["grid_cells"]
    print(f"\n{args.eval_split}: {cells} cells per image at {args.image_size}x{args.image_size}")
    print("| partition | tokens/image (mean) | p5 | p95 | reduction | area in 2/4/8/16 | shared area that is mixed |")
    print("|---|---|---|---|---|---|---|")
    rows = [("oracle", results["oracle"])] + [(f"policy @ {t}", r) for t, r in results["policy"].items()]
    for name, row in rows:
        shares = "/".join(f"{row['area_share'][str(s)]:.2f}" for s in (2, 4, 8, 16))
        print(f"| {name} | {row['tokens_mean']:.1f} | {row['tokens_p5']:.0f} | {row['tokens_p95']:.0f} | "
              f"{cells / row['tokens_mean']:.2f}x | {shares} | {row['shared_area_mixed']:.3f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    losses = train_policy(args) if args.policy_steps else []
    folder = args.output_dir if args.policy_steps else args.model_name_or_path
    with refusing(f"the model {folder}", "a folder saved by examples/train.py --stage policy"):
        model = StepForSemanticSegmentation.from_pretrained(folder).eval()
    processor = StepImageProcessor(
        size={"height": args.image_size, "width": args.image_size},
        superpatch_sizes=model.config.superpatch_sizes, num_labels=model.config.num_labels,
    )
    dataset, _ = load_data(args.dataset_name, train_split=args.train_split, eval_split=args.eval_split,
                           image_column_name=args.image_column_name, label_column_name=args.label_column_name)
    # One image per batch: label maps keep their own sizes.
    loader = DataLoader(EvalTransform(dataset["validation"], processor))
    results = {"grid_cells": (args.image_size // model.config.patch_size) ** 2,
               **token_statistics(model, loader, args.thresholds)}
    results["train_steps"], results["final_policy_loss"] = args.policy_steps, float(np.mean(losses[-50:] or [np.nan]))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results, args)


if __name__ == "__main__":
    run_command(main)
