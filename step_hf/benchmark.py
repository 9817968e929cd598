"""Wall-clock benchmark of the STEP ladder: dense -> dCTS -> dCTS + exits, every speed-up measured in the same run.

    python -m step_hf.benchmark --preset large --image_size 1024 --batch_size 8 --dtype bf16 \
        --dataset_name ../shared/datasets/camvid --output benchmark.json

Real, heterogeneous images (frames of a `datasets` folder, resized to the input size) go through each variant:

- `ViTModel + decoder`: `transformers`' ViT (SDPA) at the same size, with STEP's decoder on its patch tokens;
- `dense`: STEP with no token sharing (a plain ViT + Segmenter);
- `dCTS`: superpatch partitions (`--partition_source oracle` from ground truth, or `policy`), the policy network always
  run and timed (its cost is included even when oracle partitions are used);
- `dCTS + exits`: the same with halting, exit thresholds calibrated on the first batch so that `--halt_share` of
  the tokens halt at each exit (random weights do not halt by themselves);
- `dCTS budget`: a fixed token budget (the mean oracle count): static shapes, optionally `--compile`d;
- `dCTS budget + exits keeping [k, ...]`: the same with exits that keep fixed counts (`exit_keep_tokens`, from
  `--halt_share`): static shapes all through, exits included;
- `--peers segformer-b5 eomt-large`: the `transformers` segmenters users would pick instead (random weights, the
  same images, batch and dtype), their FLOPs counted by `FlopCounterMode`.

It reports ms per image, images per second, speed-up against `dense`, peak GPU memory, tokens per image, the share
halted per exit, and FLOPs per image (analytic, checked against `FlopCounterMode` in the tests; 2 FLOPs per
multiply-add), the policy's own share included and shown apart. Weights are random unless `--model_name_or_path` is
given: speed does not depend on them.
"""

import argparse
import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .accounting import analytic_flops, flops_per_image, transformer_macs
from .cli import UserError, refusing, run_command
from .configuration_step import ATTENTION_MODES, VIT_PRESETS, StepConfig, StepSettings
from .image_processing_step import StepImageProcessor
from .modeling_step import StepForSemanticSegmentation, StepRun
from .superpatch import budget_token_count
from .token_layout import PackedBatch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "base", "large"])
    parser.add_argument("--model_name_or_path", help="a saved STEP model instead of random weights of --preset")
    parser.add_argument("--image_size", type=int, nargs="+", default=[512],
                        help="input side, or height and width (e.g. 720 960)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_batches", type=int, default=2, help="distinct batches of real images, timed in turn")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the batches (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention_mode", default="packed", choices=ATTENTION_MODES)
    parser.add_argument("--dataset_name", default="../shared/datasets/camvid")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--partition_source", default="oracle", choices=["oracle", "policy"])
    parser.add_argument("--peers", nargs="*", default=[], choices=sorted(PEERS),
                        help="also time these transformers segmenters (random weights) on the same batches; EoMT "
                             "needs scipy")
    parser.add_argument("--halt_share", type=float, nargs="+", default=[0.2, 0.25],
                        help="share of the tokens reaching each exit that halt there (0.2 then 0.25 of the rest: 40%%)")
    parser.add_argument("--exit_thresholds", type=float, nargs="+",
                        help="use these exit thresholds (e.g. a trained model's) instead of calibrating --halt_share")
    parser.add_argument("--compile", action="store_true", help="torch.compile the budget variant (static shapes)")
    parser.add_argument("--compile_mode", default="default",
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs: no launch overhead at batch 1)")
    parser.add_argument("--skip_vit", action="store_true", help="leave out the transformers ViTModel row")
    parser.add_argument("--profile", action="store_true",
                        help="also show where the time goes: host issue time against GPU time, top operators")
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if len(args.image_size) > 2:
        parser.error("--image_size takes a side or a height and a width.")
    args.image_size = (args.image_size * 2)[:2]
    return args


def read_images(dataset_name: str, split: str, count: int) -> tuple[list, list]:
    """The first `count` images and label maps of a split: through `datasets`, or straight from the parquet files
    of a local folder laid out like a Hub dataset."""
    try:
        from datasets import load_dataset
    except ImportError:  # scripts/gpu_env.sh removes a `datasets` that cannot import on some GPU images
        import glob
        import io

        import pyarrow.parquet as parquet
        from PIL import Image

        files = sorted(glob.glob(f"{dataset_name}/data/{split}-*.parquet"))
        table = parquet.read_table(files[0]) if files else None
        if table is None or table.num_rows < count:
            raise ValueError(f"{dataset_name}/data/{split}-*.parquet has fewer than {count} images.") from None
        rows = table.slice(0, count).to_pylist()
        return ([Image.open(io.BytesIO(row["image"]["bytes"])) for row in rows],
                [Image.open(io.BytesIO(row["label"]["bytes"])) for row in rows])
    with refusing(f"{dataset_name} [{split}]", "a Hub id or a local folder laid out like one"):
        dataset = load_dataset(dataset_name, split=split)
    if len(dataset) < count:
        raise UserError(f"{dataset_name} [{split}] has {len(dataset)} images; {count} are needed.")
    rows = dataset[:count]
    return rows["image"], rows["label"]


def load_batches(args, config: StepConfig, device: str | None = None) -> list[dict]:
    """Batches of real frames resized to the input size, with their ground-truth superpatch targets, on `device`
    (default `args.device`)."""
    device = device or args.device
    images, labels = read_images(args.dataset_name, args.split, args.batch_size * args.num_batches)
    processor = StepImageProcessor(size={"height": args.image_size[0], "width": args.image_size[1]},
                                   superpatch_sizes=config.superpatch_sizes)
    batches = []
    for start in range(0, len(images), args.batch_size):
        end = start + args.batch_size
        inputs = processor(images[start:end], segmentation_maps=labels[start:end], return_tensors="pt")
        batches.append({"pixel_values": inputs["pixel_values"].to(device, DTYPES[args.dtype]),
                        "superpatch_targets": inputs["superpatch_targets"].to(device)})
    return batches


def make_model(preset_or_path: str, image_size: tuple[int, int]) -> StepForSemanticSegmentation:
    """A saved STEP model, or a ViT preset's (`tiny` ... `large`) with random weights (seed 0) stored at the input's
    longer side, 11 classes (CamVid's): speed does not depend on the weights. In eval mode (in training the exit
    heads run at every forward)."""
    if preset_or_path not in VIT_PRESETS:
        with refusing(f"the model {preset_or_path}", f"a saved STEP model's folder, or a preset: {list(VIT_PRESETS)}"):
            return StepForSemanticSegmentation.from_pretrained(preset_or_path).eval()
    torch.manual_seed(0)
    return StepForSemanticSegmentation(StepConfig.from_preset(preset_or_path, image_size=max(image_size),
                                                              num_labels=11)).eval()


@torch.no_grad()
def add_oracle_partitions(model, batches: list[dict]) -> None:
    """Add each batch's ground-truth partition (`oracle_map`) and token counts (`oracle_counts`), as the model's
    "oracle" source builds them."""
    for batch in batches:
        oracle = model.step(batch["pixel_values"], superpatch_targets=batch["superpatch_targets"],
                            settings={"partition_source": "oracle"}, policy_only=True)
        batch["oracle_map"], batch["oracle_counts"] = oracle.superpatch_map, oracle.token_counts


def oracle_budget(batches: list[dict]) -> int:
    """The static token budget: the mean oracle token count of the batches' frames (`add_oracle_partitions`)."""
    return int(torch.cat([batch["oracle_counts"] for batch in batches]).float().mean())


def exit_keep_counts(num_cells: int, budget: int, halt_shares: list[float], num_exits: int) -> list[int]:
    """Tokens kept at each exit (`exit_keep_tokens`) so that `halt_shares` of the tokens reaching each exit halt
    there, starting from the count a budget reaches on a grid of `num_cells`; exits past the shares keep as many
    as the last one."""
    kept, count = [], budget_token_count(num_cells, budget)
    for share in halt_shares[:num_exits]:
        count = max(1, round(count * (1 - share)))
        kept.append(count)
    return kept + kept[-1:] * (num_exits - len(kept))


def synchronizer(args):
    """A function that waits for the device to finish its queued work (a no-op on CPU)."""
    return torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)


def timed(run, batches: list[dict], args) -> tuple[float, list]:
    """Median milliseconds per batch over `repeats` passes (after warm-up), and the last outputs per batch."""
    synchronize = synchronizer(args)
    outputs = [run(batch) for batch in batches for _ in range(args.warmup)][-len(batches):]
    times = []
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        outputs = [run(batch) for batch in batches]
        synchronize()
        times.append((time.perf_counter() - start) * 1000 / len(batches))
    return statistics.median(times), outputs


def share_halted_at_exit(model, batch: dict, thresholds: list[float], exit_index: int) -> float:
    """The share of the tokens reaching exit `exit_index` that halt there under `thresholds` (halting on)."""
    state = model.step(batch["pixel_values"], superpatch_map=batch["oracle_map"],
                       settings={"exit_thresholds": thresholds, "halting": True}, return_encoder_state=True)[1]
    exit_layer = state.survivors.exit_layer
    layer = model.config.exit_layers[exit_index]
    return float((exit_layer[exit_layer >= layer] == layer).float().mean())


def calibrate_exits(model, batch: dict, shares: list[float], steps: int = 16) -> list[float]:
    """Exit thresholds, one per exit, under which about `shares` of the tokens reaching each exit halt there on this
    batch (its oracle partition), exit after exit; exits without a share get 1 (never halt). Halting keeps every
    image's top tokens per class, and those are the most confident ones, so a confidence quantile halts too few:
    the threshold is bisected on the halted share itself."""
    thresholds, num_exits = [], len(model.config.exit_layers)
    for index, share in enumerate(shares[:num_exits]):
        later = [1.0] * (num_exits - index - 1)  # 1 never halts
        low, high = 0.0, 1.0  # a token halts when its top class probability exceeds the threshold
        for _ in range(steps if share > 0 else 0):
            middle = (low + high) / 2
            if share_halted_at_exit(model, batch, [*thresholds, middle, *later], index) > share:
                low = middle
            else:
                high = middle
        thresholds.append(high if share > 0 else 1.0)
    return thresholds + [1.0] * (num_exits - len(thresholds))


def where_time_goes(run, batch: dict, args) -> dict:
    """One batch, after the timed runs: how long the host takes to issue the work (until the call returns, host
    syncs included) against how long until the device is done, the kernel launches, and the busiest operators.
    Issue time close to the total means the host, not the device, sets the pace."""
    cuda, synchronize = args.device.startswith("cuda"), synchronizer(args)
    synchronize()
    start = time.perf_counter()
    run(batch)
    issued = time.perf_counter()
    synchronize()
    summary = {"issue_ms": (issued - start) * 1000, "total_ms": (time.perf_counter() - start) * 1000}
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
            run(batch)
            synchronize()
        events = profiler.key_averages()
        summary["kernel_launches"] = sum(e.count for e in events if "LaunchKernel" in e.key)
        summary["table"] = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=10)
    except Exception as error:  # a diagnostic: never lose the timings to the profiler
        summary["table"] = f"profiler failed: {error!r}"
    return summary


def batching_logits(model, pixels: torch.Tensor, maps: torch.Tensor, mode: str) -> torch.Tensor:
    """The fp32 logits of a batch in attention mode `mode`, or, for `"one image at a time"`, of its images run
    alone (a reference loop, off any timed path); halting off."""
    if mode != "one image at a time":
        return model(pixels, superpatch_map=maps, halting=False, attention_mode=mode).logits.float()
    return torch.cat([model(image[None], superpatch_map=superpatch_map[None], halting=False,
                            attention_mode="packed").logits.float() for image, superpatch_map in zip(pixels, maps)])


def check_batching(model, batch: dict, args) -> float:
    """Correctness before speed: on this device and dtype, packed and padded attention and one image at a time give
    the same logits for a mixed batch (oracle partitions); raises if not. In fp32 they must agree to 1e-3. In half
    precision every mode rounds differently through every block, and a deep random model amplifies rounding, so each
    is compared with the same model in fp32 instead: no mode may be more than 3x as far from it as the closest one
    (a mode that mixed images or dropped tokens would be off by the logits' whole spread)."""
    pixels, maps = batch["pixel_values"], batch["oracle_map"]
    results = {mode: batching_logits(model, pixels, maps, mode) for mode in (*ATTENTION_MODES, "one image at a time")}
    packed, others = results["packed"], [results["padded"], results["one image at a time"]]
    difference = max(float((packed - other).abs().max()) for other in others)
    mean_difference = max(float((packed - other).abs().mean()) for other in others)
    agreement = min(float((packed.argmax(1) == other.argmax(1)).float().mean()) for other in others)
    print(f"check: packed vs padded vs one image at a time: max |logit difference| {difference:.2e}, mean "
          f"{mean_difference:.2e} (logits spread {float(packed.std()):.2f}), same class on {100 * agreement:.2f}% of "
          "cells")
    if args.dtype == "fp32":
        ok = difference <= 1e-3
    else:
        reference_model = copy.deepcopy(model).float()
        reference = batching_logits(reference_model, pixels.float(), maps, "one image at a time")
        del reference_model
        errors = {mode: float((result - reference).abs().mean()) for mode, result in results.items()}
        print("check: mean |logit error| against fp32: " + ", ".join(f"{m} {e:.2e}" for m, e in errors.items()))
        ok = max(errors.values()) <= 3 * min(errors.values())
    if not ok:
        raise RuntimeError(f"Batching modes disagree on {args.device} in {args.dtype} (see the check lines).")
    return difference


@dataclass
class Variant:
    """One rung of the ladder: how a batch runs (with its own settings), returning outputs that say what ran
    (`token_counts`, `halted_share`, `run`), and, for models other than STEP, their FLOPs per image as
    `FlopCounterMode` counted them."""

    name: str
    run: Callable[[dict], object]
    counted_flops: float | None = None


def row_for(variant: Variant, ms_per_batch: float, outputs: list, args, config: StepConfig, dense_ms: float) -> dict:
    """One result row: time, throughput, tokens, halting and FLOPs per image, read from the outputs."""
    tokens = torch.cat([o.token_counts.float().cpu() for o in outputs])
    halting = outputs[0].halted_share is not None
    halted = torch.cat([o.halted_share.float().cpu() for o in outputs]) if halting else None
    image_size, policy_ran = tuple(args.image_size), outputs[0].run is not None and outputs[0].run.policy_ran
    flops = [variant.counted_flops] if variant.counted_flops is not None else [
        flops for output in outputs for flops in flops_per_image(config, image_size, output)]
    policy_flops = analytic_flops(config, image_size, [1], [1], policy_ran=policy_ran)["policy"] if policy_ran else 0
    ms_per_image = ms_per_batch / args.batch_size
    return {
        "variant": variant.name, "ms_per_image": ms_per_image, "images_per_second": 1000 / ms_per_image,
        "speedup": dense_ms / ms_per_batch if dense_ms else 1.0,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
        "tokens_mean": float(tokens.mean()), "tokens_min": int(tokens.min()), "tokens_max": int(tokens.max()),
        "halted_share": halted.mean(0).tolist() if halting else [],
        "gflops_per_image": statistics.mean(flops) / 1e9, "policy_gflops_per_image": policy_flops / 1e9,
    }


def measure(variant: Variant, model, batches: list[dict], rows: list[dict], args) -> dict:
    """Time `variant` and return its row."""
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ms, outputs = timed(variant.run, batches, args)
    dense_ms = rows[0]["ms_per_image"] * args.batch_size if rows else ms
    row = row_for(variant, ms, outputs, args, model.config, dense_ms)
    if args.profile:
        row["profile"] = where_time_goes(variant.run, batches[0], args)
    return row


def vit_variant(model, args) -> Variant:
    """`transformers`' ViTModel (SDPA) of the same size, with STEP's decoder on its patch tokens."""
    from transformers import ViTConfig, ViTModel

    config = model.config
    vit_config = ViTConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                           num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                           image_size=tuple(args.image_size), patch_size=config.patch_size,
                           layer_norm_eps=config.layer_norm_eps)
    vit_config._attn_implementation = "sdpa"
    vit = ViTModel(vit_config, add_pooling_layer=False).to(args.device, DTYPES[args.dtype]).eval()

    def run(batch):
        features = vit(batch["pixel_values"]).last_hidden_state[:, 1:]
        images, tokens, dim = features.shape
        model.decoder(features.reshape(images * tokens, dim), PackedBatch.of([tokens] * images, args.device))
        return SimpleNamespace(token_counts=torch.full((images,), tokens), halted_share=None, run=dense_run(model))

    return Variant("transformers ViTModel + decoder", run)


def segformer_b5(num_labels: int, image_size: tuple[int, int]):
    """SegFormer-B5 (MiT-B5 encoder, 768-wide all-MLP decoder), random weights."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768,
                             num_labels=num_labels)
    return SegformerForSemanticSegmentation(config), lambda height, width: (height // 4) * (width // 4)


def eomt_large(num_labels: int, image_size: tuple[int, int]):
    """EoMT-L (ViT-L/16 with 200 queries in its last 4 blocks), random weights, position grid for the input."""
    from transformers import EomtConfig, EomtForUniversalSegmentation

    if image_size[0] != image_size[1]:
        raise ValueError("EoMT runs square inputs (it slides square windows over larger frames): give a square "
                         "--image_size for the eomt-large peer.")
    config = EomtConfig(num_labels=num_labels, image_size=image_size[0])
    return EomtForUniversalSegmentation(config), lambda height, width: (height // 16) * (width // 16)


PEERS = {"segformer-b5": segformer_b5, "eomt-large": eomt_large}


def peer_variant(name: str, batches: list[dict], num_labels: int, args) -> Variant:
    """A `transformers` segmenter that users would pick instead, on the same images, batch and dtype; its FLOPs
    counted on the first batch, its tokens those of its first stage."""
    from .accounting import flop_counter

    peer, tokens_per_image = PEERS[name](num_labels, tuple(args.image_size))
    peer = peer.to(args.device, DTYPES[args.dtype]).eval()
    pixels = batches[0]["pixel_values"]
    counter = flop_counter()
    with counter:
        peer(pixel_values=pixels)
    tokens = tokens_per_image(*pixels.shape[-2:])

    def run(batch):
        peer(pixel_values=batch["pixel_values"])
        return SimpleNamespace(token_counts=torch.full((len(batch["pixel_values"]),), tokens), halted_share=None,
                               run=None)

    return Variant(f"{name} (transformers)", run, counted_flops=counter.get_total_flops() / len(pixels))


def dense_run(model) -> StepRun:
    """What a plain ViT + decoder runs, for rows of models that are not STEP's forward (its FLOPs formula)."""
    return StepRun(model.config.settings.replace(partition_source="dense", halting=False), False, (1,), False)


def dcts_run(model, settings: StepSettings) -> Callable[[dict], object]:
    """A dCTS forward: policy partitions, or oracle ones with the policy still run and timed (a deployed model always
    runs its policy, so its outputs say it ran)."""
    if settings.partition_source == "policy":
        return lambda batch: model(batch["pixel_values"], settings=settings)

    def run(batch):
        model.step.policy(batch["pixel_values"])
        outputs = model(batch["pixel_values"], superpatch_map=batch["oracle_map"], settings=settings)
        outputs.run = dataclasses.replace(outputs.run, policy_ran=True)
        return outputs

    return run


def budget_run(model, settings: StepSettings, args) -> Callable[[dict], object]:
    """A forward under a token budget (static shapes), optionally `torch.compile`d; its outputs are copied out
    because CUDA graphs (reduce-overhead) reuse their output buffers."""
    budget_model = torch.compile(model, fullgraph=True, mode=args.compile_mode) if args.compile else model

    def run(batch):
        torch.compiler.cudagraph_mark_step_begin()
        outputs = budget_model(batch["pixel_values"], settings=settings)
        halted = outputs.halted_share.clone() if outputs.halted_share is not None else None
        return SimpleNamespace(token_counts=outputs.token_counts.clone(), halted_share=halted, run=outputs.run)

    return run


def ladder(model, batches: list[dict], args):
    """The variants in the order they are measured, each with its own settings over the ladder's (`args`'
    attention mode, halting off). A generator: each is built when its turn comes (the exits are calibrated after
    the dCTS row, and the ViT is freed before the next variant runs)."""
    config = model.config
    base = model.config.settings.replace(attention_mode=args.attention_mode, halting=False)
    dense = base.replace(partition_source="dense")
    yield Variant("dense", lambda batch: model(batch["pixel_values"], settings=dense))
    if not args.skip_vit:
        yield vit_variant(model, args)
    for name in args.peers:
        try:
            yield peer_variant(name, batches, config.num_labels, args)
        except ImportError as error:  # e.g. EoMT needs scipy, which a bare GPU image may lack: the other rows still run
            print(f"skipping the {name} row: {error}")
    dcts = base.replace(partition_source=args.partition_source)
    yield Variant("dCTS", dcts_run(model, dcts))
    if config.exit_layers:
        thresholds = args.exit_thresholds or calibrate_exits(model, batches[0], args.halt_share)
        yield Variant(f"dCTS + exits (thresholds {[round(t, 3) for t in thresholds]})",
                      dcts_run(model, dcts.replace(halting=True, exit_thresholds=thresholds)))
    budget = oracle_budget(batches)
    compiled = f" (compiled, {args.compile_mode})" if args.compile else ""
    static = base.replace(partition_source="policy", token_budget=budget)
    yield Variant(f"dCTS budget {budget}{compiled}", budget_run(model, static, args))
    if config.exit_layers:  # the same with exits keeping fixed counts: static shapes all through
        kept = exit_keep_counts(batches[0]["oracle_map"][0].numel(), budget, args.halt_share, len(config.exit_layers))
        yield Variant(f"dCTS budget {budget} + exits keeping {kept}{compiled}",
                      budget_run(model, static.replace(exit_keep_tokens=kept, halting=True), args))


@torch.no_grad()
def run_ladder(args) -> tuple[list[dict], dict]:
    """Every variant's row, and the encoder's FLOP rates on packed unequal images against equal ones."""
    model = make_model(args.model_name_or_path or args.preset, args.image_size)
    model = model.to(args.device, DTYPES[args.dtype]).eval()
    batches = load_batches(args, model.config)
    add_oracle_partitions(model, batches)
    check_batching(model, batches[0], args)
    rows = []
    for variant in ladder(model, batches, args):
        rows.append(measure(variant, model, batches, rows, args))
    oracle_counts = torch.cat([batch["oracle_counts"] for batch in batches])
    return rows, encoder_flop_rates(model, oracle_counts[: args.batch_size].tolist(), args)


def encoder_flop_rates(model, lengths: list[int], args) -> dict:
    """The encoder blocks' FLOP rate on a packed batch of unequal images (oracle token counts) against the same
    total of tokens split into equal images (plain batched attention): packing costs what this ratio says."""
    config, device, dtype = model.config, args.device, DTYPES[args.dtype]
    equal = [round(sum(lengths) / len(lengths))] * len(lengths)
    rates = {}
    for name, counts in (("packed, unequal", lengths), ("equal lengths", equal)):
        batch = PackedBatch.of([n + 1 for n in counts], device, args.attention_mode)
        tokens = torch.randn(sum(batch.host_lengths), config.hidden_size, device=device, dtype=dtype)

        def blocks(inputs):
            x, packed = inputs
            for block in model.step.blocks:
                x = block(x, packed)[0]
            return x

        ms, _ = timed(blocks, [(tokens, batch)], args)
        flops = 2 * transformer_macs(list(batch.host_lengths), config.hidden_size, config.intermediate_size,
                                      config.num_hidden_layers, args.attention_mode)
        rates[name] = {"tokens": list(batch.host_lengths), "ms": ms, "tflops_per_second": flops / ms / 1e9}
    rates["ratio"] = rates["packed, unequal"]["tflops_per_second"] / rates["equal lengths"]["tflops_per_second"]
    return rates


def ladder_table(rows: list[dict], args) -> str:
    """The rows as a Markdown table under a line saying what ran."""
    header = (f"{args.model_name_or_path or args.preset}, {args.image_size[0]}x{args.image_size[1]}, batch "
              f"{args.batch_size}, {args.dtype}, {args.device}, attention {args.attention_mode}, "
              f"{args.partition_source} partitions")
    lines = [header, "",
             "| variant | ms/image | images/s | speed-up vs dense | peak GiB | tokens/image (min..max) | halted per "
             "exit | GFLOPs/image (policy) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        halted = ", ".join(f"{100 * s:.1f}%" for s in r["halted_share"]) or "-"
        lines.append(f"| {r['variant']} | {r['ms_per_image']:.2f} | {r['images_per_second']:.1f} | "
                     f"{r['speedup']:.2f}x | {memory} | {r['tokens_mean']:.0f} ({r['tokens_min']}..{r['tokens_max']})"
                     f" | {halted} | {r['gflops_per_image']:.1f} ({r['policy_gflops_per_image']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows, rates = run_ladder(args)
    print(ladder_table(rows, args))
    packed, equal = rates["packed, unequal"], rates["equal lengths"]
    print(f"\nencoder FLOP rate: packed unequal images ({min(packed['tokens'])}..{max(packed['tokens'])} tokens) "
          f"{packed['tflops_per_second']:.3f} TFLOP/s in {packed['ms']:.2f} ms; equal images of "
          f"{equal['tokens'][0]} tokens {equal['tflops_per_second']:.3f} TFLOP/s in {equal['ms']:.2f} ms; "
          f"ratio {rates['ratio']:.2f}")
    for row in rows:
        if "profile" in row:
            p = row["profile"]
            print(f"\nprofile of {row['variant']}: the host issues a batch in {p['issue_ms']:.2f} ms, the device is "
                  f"done at {p['total_ms']:.2f} ms; {p.get('kernel_launches', '?')} kernel launches\n{p['table']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows, "encoder_flop_rates": rates,
                       "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
                      f, indent=1)


if __name__ == "__main__":
    run_command(main)
