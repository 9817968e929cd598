"""What the exit heads cost next to the encoder: FLOPs (formula) and measured time, MLP against ATM heads.

    python examples/exit_head_cost.py --preset large --image_size 1024 --num_labels 19 150 --device cuda

For each label count and head type it builds a random-weight model (the preset, dense, the default exits), then
reports per image: the FLOPs of one exit head and of all of them against the encoder's (`accounting.analytic_flops`,
2 FLOPs per multiply-add), and the median time of one encoder block, one exit head and the whole forward with
exits run (halting on, thresholds of 1, so that every exit sees every token), and the exits' share of that time.
"""

import argparse

import torch

from step_hf import StepConfig, StepForSemanticSegmentation
from step_hf.accounting import analytic_flops
from step_hf.benchmark import timed
from step_hf.cli import run_command
from step_hf.token_layout import PackedBatch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="large")
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--num_labels", type=int, nargs="+", default=[19, 150])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    return parser.parse_args(argv)


def median_ms(run, args) -> float:
    """Median milliseconds of `run()` over `args.repeats` calls after `args.warmup` (the benchmark's timing)."""
    return timed(lambda _: run(), [None], args)[0]


def measure(args, num_labels: int, head_type: str) -> dict:
    config = StepConfig.from_preset(args.preset, num_labels=num_labels, image_size=args.image_size,
                                    exit_head_type=head_type, partition_source="dense", halting=True)
    config.update_settings(exit_thresholds=[1.0] * len(config.exit_layers))
    dtype = getattr(torch, args.dtype)
    model = StepForSemanticSegmentation(config).eval().to(args.device, dtype)
    side = args.image_size // config.patch_size
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    tokens = torch.randn(args.batch_size * side * side, config.hidden_size, device=args.device, dtype=dtype)
    batch = PackedBatch.of([side * side] * args.batch_size, args.device)
    sequence_batch = PackedBatch.of([side * side + 1] * args.batch_size, args.device)
    sequence = torch.randn(args.batch_size * (side * side + 1), config.hidden_size, device=args.device, dtype=dtype)
    flops = analytic_flops(config, (args.image_size,) * 2, [side * side] * args.batch_size, [1], policy_ran=False,
                           exit_survivors=[[side * side] * args.batch_size] * len(config.exit_layers), exits_ran=True)
    with torch.inference_mode():
        block_ms = median_ms(lambda: model.step.blocks[0](sequence, sequence_batch), args)
        head_ms = median_ms(lambda: model.step.exit_heads[0](tokens, batch), args)
        forward_ms = median_ms(lambda: model(pixels), args)
    exits = len(config.exit_layers)
    return {"num_labels": num_labels, "head": head_type, "exits": exits,
            "gflops_per_head": flops["exits"] / exits / 1e9 / args.batch_size,
            "exit_share_of_encoder_flops": flops["exits"] / flops["encoder"],
            "block_ms": block_ms, "head_ms": head_ms, "forward_ms": forward_ms,
            "exit_share_of_time": exits * head_ms / forward_ms}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"{args.preset} at {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.device}, "
          f"{args.dtype}, dense (every exit sees every token)")
    print("| classes | head | GFLOPs per head (per image) | exits' FLOPs / encoder's | one block (ms) | one head (ms) "
          "| forward (ms) | exits' share of the forward time |")
    print("|---|---|---|---|---|---|---|---|")
    for num_labels in args.num_labels:
        for head_type in ("mlp", "atm"):
            row = measure(args, num_labels, head_type)
            print(f"| {num_labels} | {head_type} | {row['gflops_per_head']:.2f} | "
                  f"{100 * row['exit_share_of_encoder_flops']:.2f}% | {row['block_ms']:.1f} | {row['head_ms']:.1f} | "
                  f"{row['forward_ms']:.0f} | {100 * row['exit_share_of_time']:.2f}% |")


if __name__ == "__main__":
    run_command(main)
