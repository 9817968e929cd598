"""How STEP's cost grows with the input resolution: tokens, FLOPs and peak memory per image, counted on real frames.

    python -m step_hf.resolution_costs --dataset_name ../shared/datasets/camvid --policy_model outputs/policy \
        --presets small large --sizes 512 768 1024 1536 2048 1024x2048 --output docs/figures/resolution_costs

For each ViT preset and input size, frames of the dataset resized to that size go through: `dense` (one token per
cell), `dCTS oracle` (ground-truth partitions), `dCTS policy` (the partitions of a trained policy network, loaded from
`--policy_model`; the policy does not depend on the ViT's size) and `STEP` (dCTS policy with tokens halted at the
exits in the shares `--halted_share`, which come from a trained model: say where in the report). FLOPs are the
analytic counts (checked against `FlopCounterMode` in the tests), split into encoder, decoder and policy. Peak
activation memory is measured for one image (batch 1, inference): the peak of the tensors the forward creates (the
PyTorch profiler's memory timeline on CPU, `max_memory_allocated` on GPU). Inference frees each block's activations
before the next, so the peak does not depend on the depth: it is measured on the preset's width with two blocks.
Writes `OUTPUT.json` and a log-log plot `OUTPUT.png`, and prints the growth exponent
of each variant's FLOPs and tokens against the pixel count.
"""

import argparse
import json
import math

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

from .accounting import flops_for_token_counts
from .charts import Curve, draw_chart
from .cli import refusing, run_command
from .configuration_step import StepConfig
from .image_processing_step import StepImageProcessor
from .modeling_step import StepForSemanticSegmentation

VARIANTS = ("dense", "dCTS oracle", "dCTS policy", "STEP")


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def frames(dataset_name: str, count: int) -> list[tuple]:
    from datasets import load_dataset

    with refusing(f"{dataset_name} [validation]", "a Hub id or a local folder laid out like one"):
        split = load_dataset(dataset_name, split="validation")
    return [(split[index]["image"].convert("RGB"), split[index]["label"]) for index in range(count)]


@torch.no_grad()
def token_counts(model, images, labels, size: tuple[int, int]) -> dict[str, list[int]]:
    """Tokens per image for each partition source, on the frames resized to `size`."""
    processor = StepImageProcessor(size={"height": size[0], "width": size[1]},
                                   superpatch_sizes=model.config.superpatch_sizes)
    counts = {"dense": [], "dCTS oracle": [], "dCTS policy": []}
    for image, label in zip(images, labels):
        inputs = processor(image, segmentation_maps=label, return_tensors="pt")
        cells = inputs["pixel_values"].shape[-2] * inputs["pixel_values"].shape[-1] // model.config.patch_size**2
        counts["dense"].append(cells)
        for name, source in (("dCTS oracle", "oracle"), ("dCTS policy", "policy")):
            output = model.step(inputs["pixel_values"], superpatch_targets=inputs["superpatch_targets"],
                                settings={"partition_source": source}, policy_only=True)
            counts[name].append(int(output.token_counts[0]))
    return counts


def flops(config: StepConfig, size: tuple[int, int], counts: list[int], variant: str, halted: list[float]) -> dict:
    """Mean analytic FLOPs per image (2 per multiply-add) of a variant, by part."""
    sides = [1] if variant == "dense" else [1, *config.shared_sizes]
    policy_ran, halted_shares = variant in ("dCTS policy", "STEP"), [halted] * len(counts) if variant == "STEP" else None
    return {part: sum(flops_for_token_counts(config, size, counts, halted_shares, sides, policy_ran,
                                             exits_ran=variant == "STEP", part=part)) / len(counts)
            for part in ("total", "encoder", "decoder", "policy")}


@torch.no_grad()
def peak_memory(preset: str, size: tuple[int, int], tokens: int, variant: str, halted: list[float]) -> float:
    """MiB: the peak of the tensors one forward of one image creates (its activations; the weights excluded), on a
    two-block model of `preset`'s width (see the module), with a partition of `tokens` tokens (a token budget) for
    the dCTS variants and the first exit keeping the `halted` share for STEP. Measured by the PyTorch profiler's
    memory timeline on CPU (tensors created and destroyed), by `max_memory_allocated` on GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = dict(image_size=list(size), num_hidden_layers=2, exit_layers=[1], exit_thresholds=[1.0], num_labels=11,
                  partition_source="dense")
    if variant != "dense":
        fields.update(partition_source="policy", token_budget=tokens)
    if variant == "STEP":
        fields.update(halting=True, exit_keep_tokens=[max(1, round(tokens * (1 - halted[0])))])
    model = StepForSemanticSegmentation(StepConfig.from_preset(preset, **fields)).to(device).eval()
    pixels = torch.randn(1, 3, *size, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(pixels)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as run:
        model(pixels)
    # The profiler's own memory timeline (a private module, as `export_memory_timeline` uses it): tensors that
    # existed before (weights, the input) are PREEXISTING and left out.
    live = peak = 0
    for _, action, _, size_bytes in sorted(MemoryProfileTimeline(run._memory_profile()).timeline, key=lambda e: e[0]):
        live += size_bytes if action == Action.CREATE else -size_bytes if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak / 2**20


def growth_exponent(pixels: list[float], values: list[float]) -> float:
    """The slope of log(value) against log(pixels), least squares."""
    xs, ys = [math.log(p) for p in pixels], [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def plot(rows: list[dict], path: str) -> None:
    """GFLOPs per image against pixels, log-log, one line per preset and variant (square inputs)."""
    colours = {"dense": (0, 0, 0), "dCTS oracle": (31, 119, 180), "dCTS policy": (44, 160, 44), "STEP": (214, 39, 40)}
    curves = [Curve(f"ViT-{preset} {variant}",
                    sorted((row["pixels"], row["gflops"]) for row in rows
                           if (row["preset"], row["variant"]) == (preset, variant) and row["square"]),
                    colours[variant], width=2 if preset == "large" else 1)
              for preset, variant in sorted({(row["preset"], row["variant"]) for row in rows})]
    sides = sorted({row["pixels"] for row in rows if row["square"]})
    draw_chart(curves, path, "pixels per image (log), square inputs", "GFLOPs per image (log)", log_x=True,
               log_y=True, x_ticks=[(pixels, f"{math.isqrt(pixels)}x{math.isqrt(pixels)}") for pixels in sides])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="../shared/datasets/camvid")
    parser.add_argument("--policy_model", help="a saved STEP model whose policy trained (train.py --stage policy)")
    parser.add_argument("--presets", nargs="+", default=["small", "large"])
    parser.add_argument("--sizes", nargs="+", default=["512", "768", "1024", "1536", "2048", "1024x2048"])
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--halted_share", type=float, nargs="+", default=[0.535, 0.111])
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--output", default="resolution_costs")
    args = parser.parse_args(argv)
    if not args.policy_model:
        parser.error("--policy_model is needed: a saved model whose policy trained (train.py --stage policy)")
    images, labels = zip(*frames(args.dataset_name, args.num_images))
    with refusing(f"the model {args.policy_model}", "a folder saved by examples/train.py"):
        policy_model = StepForSemanticSegmentation.from_pretrained(args.policy_model).eval()
    sizes = [parse_size(size) for size in args.sizes]
    counts_at = {size: token_counts(policy_model, images, labels, size) for size in sizes}  # the same for any ViT
    rows = []
    for preset in args.presets:
        config = StepConfig.from_preset(preset, num_labels=11)
        for size in sizes:
            counts = {**counts_at[size], "STEP": counts_at[size]["dCTS policy"]}
            for variant in VARIANTS:
                cost = flops(config, size, counts[variant], variant, args.halted_share)
                tokens = round(sum(counts[variant]) / len(counts[variant]))
                memory = None if args.skip_memory else peak_memory(preset, size, tokens, variant, args.halted_share)
                rows.append({"preset": preset, "size": list(size), "pixels": size[0] * size[1],
                             "square": size[0] == size[1], "variant": variant,
                             "tokens": sum(counts[variant]) / len(counts[variant]), "gflops": cost["total"] / 1e9,
                             **{f"{part}_gflops": cost[part] / 1e9 for part in ("encoder", "decoder", "policy")},
                             "peak_memory_mib": memory})
                print(json.dumps(rows[-1]), flush=True)
    exponents = {}
    for preset in args.presets:
        for variant in VARIANTS:
            square = [row for row in rows if (row["preset"], row["variant"]) == (preset, variant) and row["square"]]
            pixels = [row["pixels"] for row in square]
            exponents[f"{preset} {variant}"] = {
                key: growth_exponent(pixels, [row[value] for row in square])
                for key, value in (("tokens", "tokens"), ("gflops", "gflops"), ("memory", "peak_memory_mib"))
                if all(row[value] for row in square)
            }
    with open(f"{args.output}.json", "w") as f:
        json.dump({"args": vars(args), "rows": rows, "growth_exponents": exponents}, f, indent=1)
    plot(rows, f"{args.output}.png")
    for name, values in exponents.items():
        print(name, {key: round(value, 2) for key, value in values.items()})


if __name__ == "__main__":
    run_command(main)
