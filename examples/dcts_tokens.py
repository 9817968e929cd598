"""Where dCTS puts its tokens: train the policy (stage 1) and measure tokens per image against thresholds.

    python examples/dcts_tokens.py --dataset_name ../shared/datasets/camvid --image_size 512 --train_steps 300

Reports, on the validation split: the oracle partition's tokens per image (from ground-truth targets), and for a
sweep of policy thresholds the policy's tokens per image, the share of area per superpatch size, and how often the
partition shares a block that the ground truth calls mixed. Writes `results.json` and the model (with its trained
policy) to `--output_dir`.
"""

import argparse
import json
import os
import random
import sys

import numpy as np
import torch
from PIL import ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402

from step_hf import StepConfig, StepForSemanticSegmentation, StepImageProcessor  # noqa: E402
from step_hf.accounting import superpatch_area_shares  # noqa: E402
from step_hf.configuration_step import SUPERPATCH_SIZES  # noqa: E402
from step_hf.superpatch import (  # noqa: E402
    cells_to_blocks,
    decisions_from_thresholds,
    layout_from_superpatch_map,
    partition_from_decisions,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True, help="a Hub id or a local folder laid out like one")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="validation")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--model_name_or_path", help="a saved STEP model; default: a new ViT-Tiny STEP model")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    parser.add_argument("--output_dir", default="outputs/dcts")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_model(args, id2label: dict[int, str]) -> StepForSemanticSegmentation:
    if args.model_name_or_path:
        return StepForSemanticSegmentation.from_pretrained(args.model_name_or_path)
    config = StepConfig.from_preset(
        "tiny", image_size=args.image_size, id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    return StepForSemanticSegmentation(config)


def batches(dataset, batch_size: int, rng: random.Random, flip: bool):
    order = list(range(len(dataset)))
    rng.shuffle(order)
    for start in range(0, len(order) - batch_size + 1 if flip else len(order), batch_size):
        rows = dataset[order[start : start + batch_size]]
        images, labels = rows["image"], rows["label"]
        if flip:
            mirrored = [rng.random() < 0.5 for _ in images]
            images = [ImageOps.mirror(im) if m else im for im, m in zip(images, mirrored)]
            labels = [ImageOps.mirror(lb) if m else lb for lb, m in zip(labels, mirrored)]
        yield images, labels


def train_policy(model, processor, dataset, args) -> list[float]:
    model.train()
    model.set_training_stage("policy")
    optimizer = torch.optim.AdamW(model.step.policy.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.train_steps)
    rng, step, losses = random.Random(args.seed), 0, []
    while step < args.train_steps:
        for images, labels in batches(dataset, args.batch_size, rng, flip=True):
            inputs = processor(images, segmentation_maps=labels, return_tensors="pt")
            loss = model(inputs["pixel_values"], superpatch_targets=inputs["superpatch_targets"], policy_only=True).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0 or step == args.train_steps:
                print(f"step {step}: policy loss {np.mean(losses[-50:]):.4f}", flush=True)
            if step == args.train_steps:
                break
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, processor, dataset, args) -> dict:
    sizes = model.config.shared_sizes
    oracle_counts, oracle_shares = [], []
    sweep = {t: {"counts": [], "shares": [], "shared_mixed": 0, "shared": 0} for t in args.thresholds}
    for images, labels in batches(dataset, args.batch_size, random.Random(0), flip=False):
        inputs = processor(images, segmentation_maps=labels, return_tensors="pt")
        targets = inputs["superpatch_targets"]
        grid = tuple(targets.shape[-2:])
        # One pass: the policy's logits, and the model's own ground-truth ("oracle") partition.
        outputs = model(inputs["pixel_values"], superpatch_targets=targets, partition_source="oracle",
                        policy_only=True)
        oracle_counts += outputs.token_counts.tolist()
        oracle_shares.append(superpatch_area_shares(outputs.superpatch_map))
        policy_logits = outputs.policy_logits
        block_logits = {size: cells_to_blocks(policy_logits[:, k], size) for k, size in enumerate(sizes)}
        for threshold, record in sweep.items():
            decisions = decisions_from_thresholds(block_logits, [threshold] * len(sizes))
            partition = partition_from_decisions(decisions, grid)
            record["counts"] += layout_from_superpatch_map(partition).batch.lengths.tolist()
            record["shares"].append(superpatch_area_shares(partition))
            for k, size in enumerate(sizes):  # chosen blocks of this size that the ground truth calls mixed
                chosen = partition == size
                record["shared"] += int(chosen.sum())
                record["shared_mixed"] += int((chosen & (targets[:, k] == 0)).sum())

    def summary(counts, shares):
        counts = np.array(counts)
        shares = torch.cat(shares).mean(0).tolist()
        return {
            "tokens_mean": float(counts.mean()), "tokens_p5": float(np.percentile(counts, 5)),
            "tokens_p95": float(np.percentile(counts, 95)),
            "area_share": {str(size): round(share, 4) for size, share in zip(SUPERPATCH_SIZES, shares)},
        }

    results = {"grid_cells": grid[0] * grid[1], "oracle": summary(oracle_counts, oracle_shares), "policy": {}}
    for threshold, record in sweep.items():
        results["policy"][str(threshold)] = summary(record["counts"], record["shares"])
        results["policy"][str(threshold)]["shared_area_mixed"] = record["shared_mixed"] / max(1, record["shared"])
    return results


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    # The training script's loader: the same columns, id2label and checks of every label before anything runs.
    dataset, id2label = train.load_data(train.parse_args([
        "--dataset_name", args.dataset_name, "--train_split", args.train_split, "--eval_split", args.eval_split,
        "--image_column_name", args.image_column, "--label_column_name", args.label_column,
    ]))
    model = load_model(args, id2label)
    processor = StepImageProcessor(
        size={"height": args.image_size, "width": args.image_size},
        superpatch_sizes=model.config.superpatch_sizes, num_labels=model.config.num_labels,
    )
    losses = train_policy(model, processor, dataset["train"], args) if args.train_steps else []
    results = evaluate(model, processor, dataset["validation"], args)
    results["train_steps"], results["final_policy_loss"] = args.train_steps, float(np.mean(losses[-50:] or [np.nan]))
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    cells = results["grid_cells"]
    print(f"\n{args.eval_split}: {cells} cells per image at {args.image_size}x{args.image_size}")
    print("| partition | tokens/image (mean) | p5 | p95 | reduction | area in 2/4/8/16 | shared area that is mixed |")
    print("|---|---|---|---|---|---|---|")
    rows = [("oracle", results["oracle"])] + [(f"policy @ {t}", r) for t, r in results["policy"].items()]
    for name, row in rows:
        shares = "/".join(f"{row['area_share'][str(s)]:.2f}" for s in (2, 4, 8, 16))
        mixed = f"{row['shared_area_mixed']:.3f}" if "shared_area_mixed" in row else "0"
        print(f"| {name} | {row['tokens_mean']:.1f} | {row['tokens_p5']:.0f} | {row['tokens_p95']:.0f} | "
              f"{cells / row['tokens_mean']:.2f}x | {shares} | {mixed} |")


if __name__ == "__main__":
    main()
