"""Choose what to deploy: the fastest program within a given mIoU of a trained STEP model, measured in the runtime
that will serve it.

    python -m step_hf.calibrate --model outputs/camvid384/step --dataset_name ../shared/datasets/camvid \
        --split validation --runtime onnxruntime --threads 2 --batch_size 8 --image_size 384 512 \
        --max_miou_drop 1 --output_dir outputs/camvid384/deploy --export

At one input size (`--image_size`; by default the processor's fixed height and width, else the model's `image_size`,
so give it for a processor that keeps the aspect ratio, whose frames a square size would squash) it measures, on a
labelled split:

- `dense`: no token sharing, no halting;
- `adaptive`: the model's own thresholds (policy and exits), image-dependent token counts;
- a ladder of static configurations derived from the adaptive one: token budgets from the policy's own token counts
  on the split (`--budgets`: their mean, percentiles `pNN`, or counts), each alone (`static dCTS`) and with exits
  keeping fixed counts (`static STEP`) at the adaptive exits' mean halting rates.

A model without a trained policy, or without trained exit heads, is calibrated in the parts it has. Each row gets
mIoU, per-class IoU, tokens per image, the share halted per exit and GFLOPs per image (`step_hf.evaluation.measure`,
eager), and ms per image in the runtime at batch 1 and at `--batch_size` (`step_hf.runtime_benchmark.deploy`: the
row exported and loaded in ONNX Runtime or OpenVINO, or torch). The table marks the rows on the accuracy-latency
front and the chosen row: the cheapest (`--cost`) within `--max_miou_drop` mIoU points of `--reference`.

`--output_dir` receives, all at once (written beside it, then renamed): a copy of the model whose saved settings and
processor are the chosen row's (`from_pretrained` and `python -m step_hf.evaluation --model OUT` reproduce it), the
rows (`calibration.json`, `calibration.md`), mIoU against ms (`calibration.png`), and with `--export` the chosen
row's program for the runtime in `OUT/<format>` (`step_hf.export`). The chosen row is always measured again as
deployed (its exported program in its runtime, or the saved copy in torch) and must give the eager row's mIoU
within 0.05 points.
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .charts import COLOURS, Curve, draw_chart
from .cli import UserError, refusing, run_command
from .configuration_step import StepSettings, resolve_settings
from .evaluation import EvalTransform, check_dataset_classes, exported_predictions, load_split, measure, predictions
from .export import (
    PROGRAM_FILES, check_fits_grid, check_output_dir, export_model, export_readme, processor_input_size,
    quiet_known_warnings, staged_folder, takes_one_input_size, write_export,
)
from .image_processing_step import StepImageProcessor
from .model_card import model_card
from .superpatch import budget_token_count

RUNTIMES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}  # runtime: module it needs
COSTS = {"latency": "ms_per_image_batch_1", "throughput": "ms_per_image_batch", "gflops": "gflops_per_image"}
# The deployed program's mIoU may differ from the eager row's by at most this (points): kernels round differently.
DEPLOYED_MIOU_TOLERANCE = 0.05


def calibrated_parts(config) -> tuple[bool, bool, list[str]]:
    """Whether the model has a policy and exits to calibrate (present, and trained where that is recorded), and a
    sentence for each part it lacks."""
    trained = config.trained_components
    policy = bool(config.shared_sizes) and (trained is None or "policy" in trained)
    exits = bool(config.exit_layers) and (trained is None or "exit_heads" in trained)
    missing = []
    if not policy:
        missing.append("no token sharing (superpatch_sizes [1])" if not config.shared_sizes
                       else "its policy never trained: no token budgets")
    if not exits:
        missing.append("no exits (exit_layers [])" if not config.exit_layers
                       else "its exit heads never trained: no halting")
    return policy, exits, missing


def reference_settings(config, policy: bool, exits: bool) -> dict[str, StepSettings]:
    """`dense` (no sharing, no halting) and `adaptive` (the model's thresholds, in the parts it has)."""
    base = resolve_settings(config, None, token_budget=None, exit_keep_tokens=None)
    return {"dense": base.replace(partition_source="dense", halting=False),
            "adaptive": base.replace(partition_source="policy" if policy else "dense", halting=exits)}


def budget_ladder(specs: list[str], counts: torch.Tensor, num_cells: int) -> list[int]:
    """Token budgets, largest first, from `specs`: `mean`, a percentile `pNN` of the adaptive token `counts`, or a
    count; each rounded to a count the grid of `num_cells` reaches (`budget_token_count`), duplicates dropped."""
    budgets = []
    for spec in specs:
        if spec == "mean":
            value = float(counts.double().mean())
        elif re.fullmatch(r"p\d{1,2}(\.\d+)?|p100", spec):
            value = float(torch.quantile(counts.double(), float(spec[1:]) / 100))
        elif spec.isdigit():
            value = int(spec)
            if value > num_cells:
                raise UserError(f"--budgets {spec} does not fit the input's grid of {num_cells} cells: give budgets of "
                                f"at most {num_cells}, percentiles (p90) or mean, or a larger --image_size.")
        else:
            raise UserError(f"--budgets takes mean, percentiles such as p90, or token counts; got {spec!r}.")
        count = budget_token_count(num_cells, min(num_cells, math.ceil(value)))
        if count < 1:
            raise UserError(f"--budgets {spec} leaves no token on the input's grid of {num_cells} cells: give larger "
                            "budgets, or percentiles (p90) or mean.")
        budgets.append(count)
    return sorted(set(budgets), reverse=True)


def relative_halt_shares(halted_share: list[float]) -> list[float]:
    """The share of the tokens reaching each exit that halt there, from the shares of all tokens halted at each exit
    (`measure`'s `halted_share`)."""
    shares, left = [], 1.0
    for share in halted_share:
        shares.append(share / left if left > 0 else 0.0)
        left -= share
    return shares


def keep_counts(count: int, halt_shares: list[float]) -> list[int]:
    """Tokens kept at each exit (`exit_keep_tokens`) when `count` tokens enter the encoder and `halt_shares` of
    those reaching each exit halt there."""
    kept = []
    for share in halt_shares:
        count = max(1, round(count * (1 - share)))
        kept.append(count)
    return kept


def static_ladder(adaptive: StepSettings, budgets: list[int], num_cells: int, halted_share: list[float],
                  policy: bool, exits: bool) -> list[tuple[str, StepSettings]]:
    """The static rows: each budget alone and with exits keeping fixed counts (a model without a policy: the dense
    grid with exits), all with the adaptive row's other settings."""
    counts = budgets if policy else [num_cells]
    rows = []
    for count in counts:
        static = adaptive.replace(token_budget=count if policy else None, halting=False, exit_keep_tokens=None)
        if policy:
            rows.append((f"static dCTS, budget {count}", static))
        if exits:
            kept = keep_counts(count, relative_halt_shares(halted_share))
            name = f"static STEP, budget {count}, keeping {kept}" if policy else f"dense, exits keeping {kept}"
            rows.append((name, static.replace(halting=True, exit_keep_tokens=kept)))
    return rows


def recording(stream, counts: list):
    """`stream` (`predictions`'), appending each batch's token counts to `counts` on the way."""
    for batch, outputs, prediction in stream:
        counts.append(outputs.token_counts.cpu())
        yield batch, outputs, prediction


def time_row(model, settings: StepSettings, frames: list[torch.Tensor], args) -> dict:
    """ms per image of `settings` deployed in the runtime (`runtime_benchmark.deploy`): the frames one at a time,
    then in batches of `args.batch_size`."""
    from .benchmark import timed
    from .runtime_benchmark import deploy

    saved = model.config.settings  # export writes the traced settings into the config: put the model's back
    with tempfile.TemporaryDirectory(prefix="step-calibrate-") as folder:
        run = deploy(model, settings, None, folder, args)
        model.config.update_settings(saved)
        singles = [{"pixel_values": frame[None]} for frame in frames]
        batched = [{"pixel_values": torch.stack(frames[start:start + args.batch_size])}
                   for start in range(0, len(frames) - args.batch_size + 1, args.batch_size)]
        ms_one, _ = timed(run, singles, args)
        ms_batch, _ = timed(run, batched, args) if batched else (float("nan"), None)
        del run  # a session may map its weights from the folder
    return {"ms_per_image_batch_1": ms_one, "ms_per_image_batch": ms_batch / args.batch_size}


def accuracy_latency_front(rows: list[dict], cost: str) -> list[int]:
    """Indices of the rows no other row beats: none at most as costly and at least as accurate, better in one."""
    def beaten(row: dict) -> bool:
        return any(other[cost] <= row[cost] and other["mean_iou"] >= row["mean_iou"]
                   and (other[cost] < row[cost] or other["mean_iou"] > row["mean_iou"]) for other in rows)
    return [index for index, row in enumerate(rows) if not beaten(row)]


def cheapest_within(rows: list[dict], reference_miou: float, max_drop: float, cost: str) -> int:
    """Index of the cheapest row (lowest `cost`) whose mIoU is at most `max_drop` points below `reference_miou`
    (mIoU in [0, 1], the drop in points); ties go to the more accurate row."""
    allowed = [index for index, row in enumerate(rows) if row["mean_iou"] >= reference_miou - max_drop / 100 - 1e-12]
    if not allowed:
        raise ValueError(f"No row is within {max_drop} mIoU points of the reference ({100 * reference_miou:.2f}).")
    return min(allowed, key=lambda index: (rows[index][cost], -rows[index]["mean_iou"]))


def table(rows: list[dict], front: list[int], chosen: int, reference: str, batch_size: int) -> str:
    """The rows as Markdown (mIoU and its change against the reference row in points, the costs, the front, the
    chosen row), then per-class IoU."""
    ref = next(row for row in rows if row["name"] == reference)["mean_iou"]
    lines = [f"| row | mIoU | vs {reference} | tokens/image | halted per exit | GFLOPs/image | ms/image, batch 1 | "
             f"ms/image, batch {batch_size} | front | chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
    for index, row in enumerate(rows):
        halted = ", ".join(f"{100 * share:.1f}%" for share in row["halted_share"]) if row["settings"]["halting"] \
            else "-"
        lines.append(f"| {row['name']} | {100 * row['mean_iou']:.2f} | {100 * (row['mean_iou'] - ref):+.2f} | "
                     f"{row['tokens_per_image']:.1f} | {halted} | {row['gflops_per_image']:.3f} | "
                     f"{row['ms_per_image_batch_1']:.2f} | {row['ms_per_image_batch']:.2f} | "
                     f"{'*' if index in front else ''} | {'<-' if index == chosen else ''} |")
    classes = list(rows[0]["per_category_iou"])
    lines += ["", "| row | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for row in rows:
        ious = ["-" if row["per_category_iou"][name] is None else f"{100 * row['per_category_iou'][name]:.1f}"
                for name in classes]
        lines.append(f"| {row['name']} | " + " | ".join(ious) + " |")
    return "\n".join(lines)


def draw(rows: list[dict], chosen: int, cost: str, path: Path) -> None:
    """mIoU against the cost: the static ladders as curves, the adaptive and dense models and the chosen row as
    points, with a legend."""
    groups = {"static dCTS (token budget)": [r for r in rows if r["name"].startswith("static dCTS")],
              "static STEP (budget + exits)": [r for r in rows if r["name"].startswith("static STEP")
                                               or r["name"].startswith("dense, exits")],
              "adaptive (the model's thresholds)": [r for r in rows if r["name"] == "adaptive"],
              "dense": [r for r in rows if r["name"] == "dense"],
              f"chosen: {rows[chosen]['name']}": [rows[chosen]]}
    curves = [Curve(label, sorted((row[cost], 100 * row["mean_iou"]) for row in members), COLOURS[index],
                    dots=True, width=1 if index == 4 else 2)
              for index, (label, members) in enumerate(groups.items()) if members]
    xs, ys = [row[cost] for row in rows], [100 * row["mean_iou"] for row in rows]
    pad = max(0.5, (max(ys) - min(ys)) * 0.1)
    unit = {"ms_per_image_batch_1": "ms per image (batch 1)", "ms_per_image_batch": "ms per image (batched)",
            "gflops_per_image": "GFLOPs per image"}[cost]
    draw_chart(curves, str(path), unit, "mIoU (%)", x_range=(0.0, max(xs) * 1.05),
               y_range=(min(ys) - pad, max(ys) + pad))


def save_copy(model, processor: StepImageProcessor, output: Path, settings: StepSettings, row: dict,
              source: str, notes: str) -> None:
    """Write into `output` a copy of `model` whose saved settings are `settings` and whose processor is
    `processor`, with `row` (its measured numbers) in `metrics.json` and its model card, so that `from_pretrained`
    and `pipeline` reproduce the row."""
    model.config.update_settings(settings)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    (output / "metrics.json").write_text(json.dumps(
        {"final_eval": row, "settings": model.config.settings.to_dict(), "source_model": source}, indent=1))
    source_card = Path(source) / "README.md"
    found = re.search(r"```bash\n(.*?)\n```", source_card.read_text(), re.S) if source_card.is_file() else None
    dataset_name = row.get("dataset_name") or "built-in procedural scenes"
    if os.path.isdir(dataset_name):
        dataset_name = os.path.basename(os.path.normpath(dataset_name))
    model_card(output.name, model.config, found.group(1) if found else None, dataset_name, row, notes,
               input_size=f"processor size {processor.to_dict()['size']}").save(output / "README.md")


def check_runtime(runtime: str) -> None:
    """Refuse a runtime whose package is not installed, naming what to install."""
    if importlib.util.find_spec(RUNTIMES[runtime]) is None:
        raise UserError(f"--runtime {runtime}: the {runtime} package is not installed; install it (pip install "
                        f"{runtime}) or choose another --runtime ({', '.join(r for r in RUNTIMES if r != runtime)}).")


def deployed_measure(folder: Path, exported: bool, loader_for, config, args) -> dict:
    """The chosen row measured as deployed: the exported program in `folder`, loaded in its runtime, or the saved
    copy in `folder` run by torch."""
    from .modeling_step import StepForSemanticSegmentation
    from .runtime_benchmark import load_program

    processor = StepImageProcessor.from_pretrained(folder)
    loader = loader_for(processor)
    if exported:
        program = load_program(str(folder), args)
        return measure(exported_predictions(program, loader), config, torch.device("cpu"))
    model = StepForSemanticSegmentation.from_pretrained(folder).eval()
    return measure(predictions(model, loader, torch.device("cpu")), config, torch.device("cpu"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved STEP model (examples/train.py's output folder)")
    parser.add_argument("--dataset_name", required=True, help="a `datasets` folder or Hub id, with labels")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image_column_name", default="image")
    parser.add_argument("--label_column_name", default="label")
    parser.add_argument("--max_samples", type=int, help="the first N images of the split")
    parser.add_argument("--reduce_labels", action="store_true", help="label 0 is void and the others move down one")
    parser.add_argument("--runtime", choices=tuple(RUNTIMES), default="onnxruntime")
    parser.add_argument("--torch_export", action="store_true",
                        help="with --runtime torch: time and export the torch.export program instead of eager")
    parser.add_argument("--openvino_precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="the one input size (default: the model's processor's fixed size, else its image_size)")
    parser.add_argument("--budgets", nargs="+", default=["p95", "p75", "mean", "p25", "p5"],
                        help="token budgets of the static ladder: mean, percentiles pNN of the adaptive token counts "
                             "on the split, or counts")
    parser.add_argument("--max_miou_drop", type=float, default=1.0, help="in mIoU points below the reference")
    parser.add_argument("--reference", choices=("adaptive", "dense"), default="adaptive")
    parser.add_argument("--cost", choices=tuple(COSTS), default="latency",
                        help="what the chosen row minimises: ms/image at batch 1 (latency), at --batch_size "
                             "(throughput), or GFLOPs")
    parser.add_argument("--batch_size", type=int, default=8, help="the batch timed besides batch 1")
    parser.add_argument("--timing_images", type=int, default=16, help="frames of the split that are timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the frames (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of the runtime")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier calibration in --output_dir")
    parser.add_argument("--export", action="store_true",
                        help="also write the chosen row's program for the runtime into OUTPUT_DIR/<format>")
    args = parser.parse_args(argv)
    if args.torch_export and args.runtime != "torch":
        parser.error("--torch_export exports the torch.export program: use it with --runtime torch.")
    if args.batch_size < 1 or args.timing_images < 1 or args.repeats < 1:
        parser.error("--batch_size, --timing_images and --repeats must be at least 1.")
    args.device = "cpu"
    return args


@torch.no_grad()
def calibrate(args) -> dict:
    """Measure every row, choose one, and write the output folder (`write_calibration`; see the module's
    docstring); returns what `calibration.json` holds."""
    from .modeling_step import StepForSemanticSegmentation

    check_runtime(args.runtime)
    output = Path(args.output_dir)
    check_output_dir(output, args.overwrite, marker="calibration.json", holds="a calibration")
    with refusing(f"the model {args.model}", "a folder saved by examples/train.py"):
        model = StepForSemanticSegmentation.from_pretrained(args.model).eval()
        processor = StepImageProcessor.from_pretrained(args.model)
    config = model.config
    policy, exits, missing = calibrated_parts(config)
    if not (policy or exits):
        raise UserError(f"{args.model} has {' and '.join(missing)}: nothing to calibrate (it runs dense). Calibrate a "
                        "model trained with a policy (--stage policy or all) or exit heads.")
    if missing:
        print(f"{args.model}: {'; '.join(missing)}; calibrating the rest.", flush=True)
    image_size, source = ((tuple(args.image_size), "--image_size") if args.image_size
                          else processor_input_size(processor, config))
    print(f"Calibrating at {image_size[0]}x{image_size[1]} ({source})", flush=True)
    check_fits_grid(model, {}, image_size)  # a whole grid of patches
    args.image_size = image_size
    processor.size = {"height": image_size[0], "width": image_size[1]}  # every row, and the copy, at this size
    processor.do_reduce_labels = args.reduce_labels or processor.do_reduce_labels
    check_dataset_classes(config, args.model, args.dataset_name)
    dataset = load_split(args.dataset_name, args.split, args.image_column_name, args.label_column_name,
                         args.max_samples)

    def loader_for(this_processor: StepImageProcessor) -> DataLoader:
        return DataLoader(EvalTransform(dataset, this_processor))  # label maps keep their own sizes: batch 1

    if not len(dataset):
        raise UserError(f"{args.dataset_name} [{args.split}] holds no image: choose a split with labelled images.")
    loader = loader_for(processor)
    frames = [loader.dataset[index]["pixel_values"] for index in range(min(args.timing_images, len(dataset)))]
    if len(frames) < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} is timed on whole batches of --timing_images frames, but "
                        f"{len(frames)} are there ({len(dataset)} images in the split): lower --batch_size.")
    num_cells = (image_size[0] // config.patch_size) * (image_size[1] // config.patch_size)
    if policy:  # refuse a malformed or oversized budget before minutes of measuring
        budget_ladder(args.budgets, torch.tensor([num_cells]), num_cells)
    cpu = torch.device("cpu")

    def measured(name: str, settings: StepSettings, counts: list | None = None) -> dict:
        stream = predictions(model, loader, cpu, settings)
        try:
            results = measure(recording(stream, counts) if counts is not None else stream, config, cpu)
        except ValueError as error:  # an empty split, or one without a labelled pixel
            raise UserError(str(error)) from None
        row = {"name": name, **results, "settings": settings.to_dict(), **time_row(model, settings, frames, args)}
        print(f"{name}: mIoU {100 * row['mean_iou']:.2f}, {row['tokens_per_image']:.1f} tokens, "
              f"{row['ms_per_image_batch_1']:.2f} ms/image", flush=True)
        return row

    references = reference_settings(config, policy, exits)
    rows, counts = [measured("dense", references["dense"])], []
    rows.append(measured("adaptive", references["adaptive"], counts))
    budgets = budget_ladder(args.budgets, torch.cat(counts), num_cells) if policy else []
    for budget in budgets:  # a budget the policy cannot reach on this grid (too few tokens) is refused here
        try:
            model.step(frames[0][None], settings=references["adaptive"].replace(token_budget=budget),
                       policy_only=True)
        except ValueError as error:
            raise UserError(f"--budgets: {error} Give larger budgets or percentiles.") from None
    for name, settings in static_ladder(references["adaptive"], budgets, num_cells, rows[1]["halted_share"],
                                        policy, exits):
        rows.append(measured(name, settings))

    cost = COSTS[args.cost]
    reference = next(row for row in rows if row["name"] == args.reference)
    chosen = cheapest_within(rows, reference["mean_iou"], args.max_miou_drop, cost)
    front = accuracy_latency_front(rows, cost)
    for index, row in enumerate(rows):
        row.update(front=index in front, chosen=index == chosen, dataset_name=args.dataset_name, split=args.split)
    report = table(rows, front, chosen, args.reference, args.batch_size)
    print(f"\n{args.model} at {image_size[0]}x{image_size[1]}, {len(dataset)} images of {args.dataset_name} "
          f"[{args.split}], {args.runtime} with {args.threads} threads\n\n{report}\n\nchosen: {rows[chosen]['name']}, "
          f"the cheapest ({args.cost}) within {args.max_miou_drop} mIoU of {args.reference}; on the accuracy-"
          f"{args.cost} front: {', '.join(rows[index]['name'] for index in front)}", flush=True)

    result = {"model": args.model, "image_size": list(image_size), "runtime": args.runtime, "threads": args.threads,
              "batch_size": args.batch_size, "cost": args.cost, "reference": args.reference,
              "max_miou_drop": args.max_miou_drop, "calibrated_missing": missing, "budgets": budgets, "rows": rows,
              "chosen": chosen}
    write_calibration(output, model, processor, result, report, loader_for, args)
    return result


def write_calibration(output: Path, model, processor: StepImageProcessor, result: dict, report: str, loader_for,
                      args) -> None:
    """Write the output folder: the copy with the chosen row's settings, its program (with `--export`), the rows,
    the table and the picture, into a folder beside `output` that replaces it only once the chosen row, measured
    again as deployed, reproduces the eager row; `result` gains what the deployed program measured."""
    from .runtime_benchmark import FORMATS as RUNTIME_FORMATS

    row = result["rows"][result["chosen"]]
    settings = StepSettings(**row["settings"])
    # The runtime serves an exported program (torch: the saved copy, or with --torch_export its program); the program
    # goes into the output with --export, else into a scratch folder only to be measured.
    export_format = RUNTIME_FORMATS[args.runtime]
    exported = args.runtime != "torch" or args.torch_export
    where = f"{PROGRAM_FILES[export_format]} in {args.runtime}" if exported else "the saved copy in torch"
    with staged_folder(output) as staging, tempfile.TemporaryDirectory(prefix="step-calibrate-") as scratch:
        notes = (f"The weights of `{args.model}`, with the run-time settings `python -m step_hf.calibrate` chose: "
                 f"{row['name']}, the cheapest ({args.cost}) in {args.runtime} within {args.max_miou_drop} mIoU of "
                 f"the {args.reference} model.")
        save_copy(copy.deepcopy(model), processor, staging, settings, row, args.model, notes)
        export_folder = Path(staging if args.export else scratch) / export_format
        if exported or args.export:
            program, traced = export_model(copy.deepcopy(model), export_format, tuple(args.image_size),
                                           settings.to_dict())
            argv = getattr(args, "argv", None)
            command = "python -m step_hf.calibrate " + " ".join(sys.argv[1:] if argv is None else argv)
            one_size = takes_one_input_size(model, settings, export_format)
            write_export(program, processor, export_folder, False,
                         export_readme(export_format, traced, args.image_size, one_size, command))
        check = deployed_measure(export_folder if exported else staging, exported, loader_for, model.config, args)
        difference = 100 * abs(check["mean_iou"] - row["mean_iou"])
        print(f"deployed ({where}): mIoU {100 * check['mean_iou']:.2f}, {difference:.3f} points from the eager row")
        if difference > DEPLOYED_MIOU_TOLERANCE:
            raise RuntimeError(f"The deployed program ({where}) measures mIoU {100 * check['mean_iou']:.2f} but the "
                               f"eager row {100 * row['mean_iou']:.2f}: they must agree within "
                               f"{DEPLOYED_MIOU_TOLERANCE} points. Nothing was written.")
        result["deployed"] = {"measured": where, **{key: check[key] for key in (
            "mean_iou", "per_category_iou", "tokens_per_image", "halted_share")}}
        (staging / "calibration.json").write_text(json.dumps(result, indent=1))
        (staging / "calibration.md").write_text(report + "\n")
        draw(result["rows"], result["chosen"], COSTS[args.cost], staging / "calibration.png")
    exported_note = f" and its {export_format} program in {output / export_format}" if args.export else ""
    print(f"Wrote {output}: the model with the chosen row's settings{exported_note}, calibration.json/.md/.png")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = argv  # the command line the export's README records
    quiet_known_warnings()
    import datasets

    datasets.disable_progress_bars()  # they would bury a refusal's one line
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # torch's threads for the run, given back to an in-process caller
    try:
        calibrate(args)
    finally:
        torch.set_num_threads(threads)


__all__ = ["accuracy_latency_front", "budget_ladder", "calibrate", "cheapest_within", "keep_counts",
           "relative_halt_shares", "save_copy", "static_ladder"]


if __name__ == "__main__":
    run_command(main)
