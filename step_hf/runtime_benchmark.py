"""Speed where STEP is deployed: dense, static dCTS and static STEP exported through `transformers.exporters` and
timed in the runtime that serves them, beside the FLOPs they save.

    python -m step_hf.runtime_benchmark --runtime onnxruntime --presets small base --image_sizes 512 1024 \
        --dataset_name ../shared/datasets/camvid --output onnxruntime.json

For each model (`--presets`: ViT presets with random weights, as speed does not depend on them, or folders of saved
STEP models) and each input size (a side, or HEIGHTxWIDTH), in one run:

- `dense`: no token sharing;
- `static dCTS`: policy partitions under a token budget, the mean oracle token count of the real frames at that
  size (`--token_budget` overrides it): static shapes;
- `static STEP`: the same budget and exits keeping fixed counts (`exit_keep_tokens`, from `--halt_share`: 0.2 then
  0.25 of the rest, 40% halted), halting on;
- `int8 static STEP` (ONNX Runtime only): the same with int8 weights and activations quantized at run time.

Each variant is exported by `step_hf.export.export_model` to a temporary folder, loaded back as an `ExportedModel`
and timed in its runtime: an ONNX Runtime session (CPU, or CUDA with `--device cuda`), OpenVINO compiled for the CPU
(fp32 unless `--openvino_precision bf16`), or torch: the eager model, or its `torch.export` program with
`--torch_export`. Every runtime is handed the frames in host memory, as a service receives them.

Reported per variant: ms per image (median of `--repeats` passes over the frames, after `--warmup`), the speed-up
against dense in the same runtime, the FLOP ratio (dense GFLOPs / the variant's, `step_hf.accounting` on the eager
model's outputs), speed-up / FLOP ratio, tokens per image and the share halted as the runtime returned them, and the
share of cells whose class is the eager model's; then the targets beside the measured ratios. `--profile` (ONNX
Runtime or OpenVINO) adds where the time goes, by operator type, from the runtime's own profiler.

The frames come from `--dataset_name` (a `datasets` folder or Hub name): without them the command stops, since they
are what is timed and their ground truth sets the budget.
"""

import argparse
import copy
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from .benchmark import (Variant, add_oracle_partitions, exit_keep_counts, load_batches, make_model, oracle_budget,
                        row_for, timed)
from .cli import run_command
from .configuration_step import StepSettings
from .export import export_model, load_exported, quiet_known_warnings

RUNTIMES = ("onnxruntime", "openvino", "torch")
# The `step_hf.export` format each runtime runs.
FORMATS = {"onnxruntime": "onnx", "openvino": "openvino", "torch": "dynamo"}


@dataclass(frozen=True)
class Target:
    """A speed target, read against the rows it applies to (printed beside the measured value, never asserted)."""

    description: str
    applies: Callable[[dict], bool]
    field: str
    goal: float


TARGETS = (
    Target("static STEP >= 3x dense in ONNX Runtime (set at 1024)",
           lambda row: row["runtime"] == "onnxruntime" and row["variant"] == "static STEP", "speedup", 3.0),
    Target("speed-up >= 75% of the FLOP ratio", lambda row: row["variant"] != "dense", "speedup_per_flop_ratio", 0.75),
    Target("int8 static STEP >= 5x fp32 dense", lambda row: row["variant"] == "int8 static STEP", "speedup", 5.0),
)


def image_size(text: str) -> tuple[int, int]:
    """`512` -> (512, 512); `720x960` -> (720, 960)."""
    sides = [int(side) for side in text.lower().split("x")]
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"an input size is a side or HEIGHTxWIDTH, got {text!r}")
    return tuple(sides * 2)[:2] if len(sides) == 1 else tuple(sides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", required=True, choices=RUNTIMES)
    parser.add_argument("--presets", nargs="+", default=["small", "base"],
                        help="ViT presets (tiny, small, base, large; random weights) or folders of saved STEP models")
    parser.add_argument("--image_sizes", type=image_size, nargs="+", default=[(512, 512), (1024, 1024)],
                        help="input sizes: a side or HEIGHTxWIDTH")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_batches", type=int, default=4,
                        help="batches of real frames, timed in turn; their ground truth sets the budget")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the batches (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dataset_name", default="../shared/datasets/camvid")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--token_budget", type=int, help="the static budget instead of the mean oracle count")
    parser.add_argument("--halt_share", type=float, nargs="+", default=[0.2, 0.25],
                        help="share of the tokens reaching each exit that halt there (0.2 then 0.25 of the rest: 40%%)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: ONNX Runtime's CUDAExecutionProvider, or torch on the GPU")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads of every runtime (ONNX Runtime would otherwise take every core of the "
                             "machine, not those this process may use)")
    parser.add_argument("--torch_export", action="store_true",
                        help="with --runtime torch: time each variant's torch.export program instead of eager")
    parser.add_argument("--openvino_precision", default="f32", choices=["f32", "bf16"],
                        help="OpenVINO's inference precision hint (it picks bf16 by itself on CPUs that have it)")
    parser.add_argument("--profile", action="store_true",
                        help="ONNX Runtime or OpenVINO: also profile each variant and show the operator types that "
                             "take the time")
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.profile and args.runtime == "torch":
        parser.error("--profile reads the runtime's own profiler: use it with --runtime onnxruntime or openvino.")
    if args.torch_export and args.runtime != "torch":
        parser.error("--torch_export times the torch.export program: use it with --runtime torch.")
    if args.runtime == "openvino" and args.device != "cpu":
        parser.error("OpenVINO runs here on the CPU: leave --device at cpu.")
    return args


def runtime_description(args) -> str:
    """The runtime, its version and what it runs on."""
    if args.runtime == "onnxruntime":
        import onnxruntime

        provider = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
        return f"ONNX Runtime {onnxruntime.__version__} ({provider})"
    if args.runtime == "openvino":
        import openvino

        return f"OpenVINO {openvino.__version__} (CPU, precision hint {args.openvino_precision})"
    return f"torch {torch.__version__} ({'torch.export program' if args.torch_export else 'eager'}, {args.device})"


def session_options(args, profile_prefix: str | None = None):
    """ONNX Runtime session options: `args.threads` threads, and the profiler when given a file prefix."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return options


def load_program(folder: str, args, profiled: bool = False):
    """The exported program in `folder`, loaded on its runtime as `args` ask; `profiled`: with the runtime's
    profiler on."""
    if args.runtime == "onnxruntime":
        prefix = str(Path(folder) / "profile") if profiled else None
        return load_exported(folder, device=args.device, session_options=session_options(args, prefix))
    if args.runtime == "openvino":
        return load_exported(folder, device="cpu", config={
            "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": args.openvino_precision,
            "PERF_COUNT": profiled})
    return load_exported(folder, device=args.device)


def deploy(model, settings: StepSettings, quantize: str | None, folder: str, args) -> Callable[[dict], object]:
    """A function running a batch as deployed: the eager model (`--runtime torch`), or the variant exported to
    `folder` and loaded in its runtime."""
    if args.runtime == "torch" and not args.torch_export:
        target = model if args.device == "cpu" else copy.deepcopy(model).to(args.device)  # the CPU one exports
        return lambda batch: target(batch["pixel_values"].to(args.device), settings=settings)
    exported, _ = export_model(model, FORMATS[args.runtime], tuple(args.image_size), settings.to_dict(), quantize)
    exported.save_pretrained(folder)
    program = load_program(folder, args)
    return lambda batch: program(pixel_values=batch["pixel_values"].to(args.device))


def runtime_profile(folder: str, batch: dict, args, top: int = 8) -> dict:
    """Where the runtime spends its time over `warmup + repeats` runs of `batch`, from its own profiler: operator
    time summed by type, the `top` types with their share of it. ONNX Runtime's profiler logs every run (its
    kernels' time counts); OpenVINO's counters hold the last run's nodes, by the type it executed them as (after
    its fusions)."""
    program = load_program(folder, args, profiled=True)
    runs = args.warmup + args.repeats
    start = time.perf_counter()
    for _ in range(runs):
        program(pixel_values=batch["pixel_values"])
    wall_ms = (time.perf_counter() - start) * 1000 / runs
    runner, by_type = program.runners["model"], Counter()  # microseconds
    if args.runtime == "onnxruntime":
        for event in json.loads(Path(runner.session.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):  # not the fences around it
                by_type[event["args"]["op_name"]] += event["dur"] / runs
    else:
        for node in runner.request.get_profiling_info():
            by_type[node.node_type] += node.real_time.total_seconds() * 1e6
    total = sum(by_type.values()) or 1
    return {"ms_per_run": wall_ms, "operators_ms_per_run": total / 1000,
            "top": [{"op_type": name, "ms_per_run": us / 1000, "share": us / total}
                    for name, us in by_type.most_common(top)]}


def agreement(outputs: list, eager: list) -> dict:
    """The runtime's tokens and halted shares per image, whether they are the eager model's, and the share of cells
    given the eager model's class."""
    same_tokens = all(torch.equal(o.token_counts.cpu(), e.token_counts.cpu()) for o, e in zip(outputs, eager))
    same_halting = all((o.halted_share is None) == (e.halted_share is None) and (
        e.halted_share is None or torch.allclose(o.halted_share.cpu().float(), e.halted_share.cpu().float(), atol=1e-6))
        for o, e in zip(outputs, eager))
    classes = torch.cat([(o.logits.argmax(1).cpu() == e.logits.argmax(1).cpu()).flatten()
                         for o, e in zip(outputs, eager)])
    halted = [o.halted_share.float().cpu() for o in outputs if o.halted_share is not None]
    return {"runtime_tokens_mean": float(torch.cat([o.token_counts.float().cpu() for o in outputs]).mean()),
            "runtime_halted_share": torch.cat(halted).mean(0).tolist() if halted else [],
            "tokens_as_eager": same_tokens and same_halting, "classes_as_eager": float(classes.float().mean())}


def variants(model, budget: int, num_cells: int, args) -> list[tuple[str, StepSettings, str | None]]:
    """(name, settings, quantization) of each variant, in the order measured (dense first: the others' reference)."""
    config = model.config
    base = config.settings.replace(halting=False, attention_mode="packed")
    dcts = base.replace(partition_source="policy", token_budget=budget)
    measured = [("dense", base.replace(partition_source="dense"), None), ("static dCTS", dcts, None)]
    if config.exit_layers:
        kept = exit_keep_counts(num_cells, budget, args.halt_share, len(config.exit_layers))
        step = dcts.replace(exit_keep_tokens=kept, halting=True)
        measured.append(("static STEP", step, None))
        if args.runtime == "onnxruntime":
            measured.append(("int8 static STEP", step, "int8"))
    return measured


def measure_variant(name: str, settings: StepSettings, quantize: str | None, model, batches: list[dict], args,
                    dense: dict | None) -> dict:
    """Export, load and time one variant; its row, read against `dense` (this model and size's dense row; `None`
    for dense itself)."""
    eager = [model(batch["pixel_values"], settings=settings) for batch in batches]
    with tempfile.TemporaryDirectory(prefix="step-runtime-") as folder:
        run = deploy(model, settings, quantize, folder, args)
        ms_per_batch, outputs = timed(run, batches, args)
        profile = runtime_profile(folder, batches[0], args) if args.profile else None
        del run  # a session may map its weights from the folder
    dense_ms = dense["ms_per_image"] * args.batch_size if dense else 0
    row = row_for(Variant(name, run=None), ms_per_batch, eager, args, model.config, dense_ms)
    row.pop("peak_memory_gib")  # torch's allocator does not see a runtime's memory
    dense_gflops = dense["gflops_per_image"] if dense else row["gflops_per_image"]
    row.update(agreement(outputs, eager), runtime=args.runtime, model=args.model, image_size=list(args.image_size),
               token_budget=settings.token_budget,
               exit_keep_tokens=list(settings.exit_keep_tokens) if settings.halting else None,
               quantize=quantize, flop_ratio=dense_gflops / row["gflops_per_image"])
    row["halted_total"] = sum(row["runtime_halted_share"])
    row["speedup_per_flop_ratio"] = row["speedup"] / row["flop_ratio"]
    if profile is not None:
        row["profile"] = profile
    return row


@torch.no_grad()
def measure_model(preset_or_path: str, size: tuple[int, int], args) -> list[dict]:
    """Every variant's row for one model at one input size."""
    sized = argparse.Namespace(**{**vars(args), "image_size": size, "dtype": "fp32", "model": preset_or_path})
    model = make_model(preset_or_path, size)  # on the CPU, where it is exported
    try:
        batches = load_batches(sized, model.config, device="cpu")
    except Exception as error:
        raise SystemExit(
            f"Could not read {sized.batch_size * sized.num_batches} frames of {args.dataset_name!r} [{args.split}] "
            f"({type(error).__name__}: {error}). The frames are what is timed, and their ground truth sets the "
            "static budget: give --dataset_name a folder laid out like a Hub dataset (data/validation-*.parquet) "
            "or a Hub name.") from error
    add_oracle_partitions(model, batches)
    budget = args.token_budget or oracle_budget(batches)
    rows = []
    for name, settings, quantize in variants(model, budget, batches[0]["oracle_map"][0].numel(), args):
        rows.append(measure_variant(name, settings, quantize, model, batches, sized, rows[0] if rows else None))
        print(f"{preset_or_path} {size[0]}x{size[1]} {name}: {rows[-1]['ms_per_image']:.2f} ms/image", flush=True)
    return rows


def run_benchmark(args) -> list[dict]:
    """The rows of every model at every input size, in this run's runtime (torch with `args.threads` threads for
    the run, given back after it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return [row for preset in args.presets for size in args.image_sizes
                for row in measure_model(preset, size, args)]
    finally:
        torch.set_num_threads(threads)


def target_results(rows: list[dict]) -> list[dict]:
    """Each target against each row it applies to."""
    return [{"model": row["model"], "image_size": row["image_size"], "variant": row["variant"],
             "target": target.description, "goal": target.goal, "measured": row[target.field],
             "met": row[target.field] >= target.goal}
            for row in rows for target in TARGETS if target.applies(row)]


def header(args) -> str:
    """What ran: the runtime and its version, torch and transformers, threads, batch and timing."""
    frames = args.batch_size * args.num_batches
    return (f"{runtime_description(args)}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{args.threads} CPU threads (of {os.cpu_count()}); batch {args.batch_size}, fp32 export; median of "
            f"{args.repeats} passes over {frames} frames of {args.dataset_name} [{args.split}] after {args.warmup} "
            "warm-up passes")


def table(rows: list[dict], results: list[dict], args) -> str:
    """The rows as a Markdown table under the header line, then the targets against what was measured."""
    lines = [header(args), "",
             "| model | input | variant | ms/image | speed-up vs dense | GFLOPs/image | FLOP ratio | speed-up / FLOP "
             "ratio | tokens/image | halted per exit (total) | as eager: tokens, classes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        static = [f"budget {r['token_budget']}"] if r["token_budget"] else []
        static += [f"keeping {r['exit_keep_tokens']}"] if r["exit_keep_tokens"] else []
        name = r["variant"] + (f" ({', '.join(static)})" if static else "")
        halted = ", ".join(f"{100 * s:.1f}%" for s in r["runtime_halted_share"])
        halted = f"{halted} ({100 * r['halted_total']:.1f}%)" if halted else "-"
        lines.append(f"| {r['model']} | {r['image_size'][0]}x{r['image_size'][1]} | {name} | {r['ms_per_image']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['gflops_per_image']:.2f} | {r['flop_ratio']:.2f}x | "
                     f"{r['speedup_per_flop_ratio']:.2f} | {r['runtime_tokens_mean']:.0f} | {halted} | "
                     f"{'same' if r['tokens_as_eager'] else 'DIFFERENT'}, {100 * r['classes_as_eager']:.1f}% |")
    lines += ["", "| model | input | variant | target | measured | verdict |", "|---|---|---|---|---|---|"]
    for t in results:
        lines.append(f"| {t['model']} | {t['image_size'][0]}x{t['image_size'][1]} | {t['variant']} | {t['target']} | "
                     f"{t['measured']:.2f} (goal {t['goal']:.2f}) | {'met' if t['met'] else 'missed'} |")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            top = ", ".join(f"{op['op_type']} {op['ms_per_run']:.2f} ms ({100 * op['share']:.0f}%)" for op in p["top"])
            lines.append(f"\nprofile, {r['model']} {r['image_size'][0]}x{r['image_size'][1]} {r['variant']}: "
                         f"{p['operators_ms_per_run']:.2f} ms of operators in {p['ms_per_run']:.2f} ms per run; {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_known_warnings()
    rows = run_benchmark(args)
    results = target_results(rows)
    print(table(rows, results, args))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"runtime": runtime_description(args), "torch": torch.__version__,
                       "transformers": transformers.__version__, "args": vars(args), "rows": rows,
                       "targets": results}, f, indent=1)


if __name__ == "__main__":
    run_command(main)
