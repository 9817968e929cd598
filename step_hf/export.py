"""
Export a saved STEP model for deployment through `transformers.exporters`: one fixed set of run-time settings is
traced into the program (the model's saved ones, with the overrides given here), and the output folder holds the
program (`model.onnx`, `openvino_model.xml`, `model.pt2` or `model.pte`), the config, the image processor's config
and a short README saying what was exported.

    python -m step_hf.export --model_name_or_path DIR --format onnx --output_dir OUT \
        --partition_source policy --token_budget 40 --exit_keep_tokens 30 20 --halting

The batch is dynamic; height and width too for the dense model. A policy's partition is exported for one input
size: `--image_size`, by default the size the model's own processor feeds (its fixed height and width, else the
model's `image_size`), and the processor saved beside the program resizes every image to it. ExecuTorch programs
take one batch size (`--batch_size`) and input size, and fixed token counts: its memory planner sizes every tensor
ahead of the run. The output folder holds one export: an earlier one there is replaced only with `--overwrite`.
"""

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.export import Dim
from transformers.utils import logging as transformers_logging

from .cli import UserError, refusing, run_command
from .configuration_step import RUN_SETTINGS, StepSettings, resolve_settings
from .image_processing_step import StepImageProcessor
from .modeling_step import StepForSemanticSegmentation

PROGRAM_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml", "dynamo": "model.pt2",
                 "executorch": "model.pte"}
FORMATS = tuple(PROGRAM_FILES)


class ExportRefused(UserError):
    """Settings, an input size or an output folder the export cannot take; the message names the fix."""


def exporter_and_config(export_format: str, dynamic_shapes: dict, quantize: str | None = None):
    """The `transformers.exporters` exporter of `export_format` and its config with `dynamic_shapes`; with
    `quantize="int8"` (ONNX only), weights quantized to int8 and activations at run time (ONNX Runtime's dynamic
    quantization, through `OnnxRuntimeQuantizer`)."""
    from transformers import exporters

    if quantize is not None:
        if (export_format, quantize) != ("onnx", "int8"):
            raise ValueError(f"Quantization {quantize!r} is offered for the ONNX format as 'int8', not for "
                             f"{export_format!r}.")
        quantizer = exporters.OnnxRuntimeQuantizer(exporters.OnnxRuntimeDynamicConfig())
        return exporters.OnnxExporter(), exporters.OnnxConfig(dynamic_shapes=dynamic_shapes, quantizer=quantizer)

    classes = {
        "onnx": (exporters.OnnxExporter, exporters.OnnxConfig),
        "openvino": (exporters.OpenVINOExporter, exporters.OpenVINOConfig),
        "dynamo": (exporters.DynamoExporter, exporters.DynamoConfig),
        "executorch": (exporters.ExecutorchExporter, exporters.ExecutorchConfig),
    }
    exporter_class, config_class = classes[export_format]
    return exporter_class(), config_class(dynamic_shapes=dynamic_shapes)


def image_dependent_counts(model: StepForSemanticSegmentation, settings: StepSettings) -> list[str]:
    """The thresholds in use under `settings` that make token counts depend on the image, each with the setting
    that fixes its count instead."""
    in_use = []
    if model.step.policy_chooses(settings, None) and settings.token_budget is None:
        in_use.append("`policy_thresholds` (a `token_budget` fixes the count)")
    if settings.halting and model.config.exit_layers and settings.exit_keep_tokens is None:
        in_use.append("`exit_thresholds` (`exit_keep_tokens` fix the counts)")
    return in_use


def takes_one_input_size(model: StepForSemanticSegmentation, settings: StepSettings,
                         export_format: str) -> bool:
    """Whether the program of `settings` takes only the input size traced: a policy's partition is traced for one
    grid, and ExecuTorch plans every tensor's size ahead of the run. Dense programs elsewhere take any size."""
    return export_format == "executorch" or model.step.policy_chooses(settings, None)


def export_model(model: StepForSemanticSegmentation, export_format: str, image_size: tuple[int, int],
                 settings_overrides: dict, quantize: str | None = None, batch_size: int = 1) -> tuple["object", dict]:
    """
    Export `model` running its saved settings with `settings_overrides` (checked by `resolve_settings`). Returns the
    `ExportedModel` and the settings traced into it. The model's config is changed to hold them as its saved
    defaults, so that the exported folder's config says what the program runs. `batch_size` is the one batch an
    ExecuTorch program takes; the other formats take any.
    """
    settings = resolve_settings(model.config, None, **settings_overrides)
    if export_format == "executorch" and (in_use := image_dependent_counts(model, settings)):
        raise ValueError(
            f"ExecuTorch cannot run token counts that depend on the image: its memory planner sizes every tensor "
            f"ahead of the run. In use: {'; '.join(in_use)}. Export with fixed counts, or to onnx, openvino or dynamo."
        )
    model.config.update_settings(settings)
    if export_format == "executorch":  # its planner fixes the sizes a dynamic batch would need to change
        axes, sample_batch = {}, batch_size
    else:
        axes, sample_batch = {0: Dim("batch", min=1, max=256)}, 2  # a traced batch of one would be specialised
        if not takes_one_input_size(model, settings, export_format):
            axes.update({2: Dim.AUTO, 3: Dim.AUTO})
    exporter, config = exporter_and_config(export_format, {"pixel_values": axes}, quantize)
    sample = torch.randn(sample_batch, model.config.num_channels, *image_size,
                         generator=torch.Generator().manual_seed(0))
    try:
        return exporter.export(model.eval(), {"pixel_values": sample}, config), settings.to_dict()
    except Exception as error:
        if not (in_use := image_dependent_counts(model, settings)):
            raise
        raise ExportRefused(
            f"The {export_format} export failed on token counts that depend on the image ({'; '.join(in_use)}): "
            f"{str(error).strip().splitlines()[0][:300]}. Export with fixed counts instead."
        ) from error


def check_fits_grid(model: StepForSemanticSegmentation, settings_overrides: dict, image_size: tuple[int, int]) -> None:
    """Refuse, before tracing, an input size that is not a whole grid of patches, and a token budget or exit keep
    count larger than the traced grid holds, naming the grid's cell count and the largest valid value."""
    patch = model.config.patch_size
    height, width = image_size
    if height % patch or width % patch or height < patch or width < patch:
        fit = "x".join(str(max(patch, side // patch * patch)) for side in image_size)
        raise ExportRefused(f"--image_size {height} {width}: height and width must be multiples of the patch size "
                            f"{patch} (e.g. {fit}).")
    try:
        settings = resolve_settings(model.config, None, **settings_overrides)
    except ValueError as error:  # settings this architecture cannot run, named by `check_against`
        raise ExportRefused(str(error)) from None
    rows, cols = height // patch, width // patch
    grid = f"the {rows}x{cols} grid of a {height}x{width} input ({rows * cols} cells)"
    budget = settings.token_budget if model.step.policy_chooses(settings, None) else None
    if budget is not None and budget > rows * cols:
        raise ExportRefused(f"--token_budget {budget} does not fit {grid}: use at most {rows * cols}, or a larger "
                            "--image_size.")
    most = budget or rows * cols
    if settings.halting and settings.exit_keep_tokens and max(settings.exit_keep_tokens) > most:
        reaching = f"the budget of {budget} tokens" if budget else grid
        raise ExportRefused(f"--exit_keep_tokens {' '.join(map(str, settings.exit_keep_tokens))} keeps more tokens "
                            f"than {reaching} holds: use counts of at most {most}.")


def processor_input_size(processor: StepImageProcessor, config) -> tuple[tuple[int, int], str]:
    """The input size the model's own processor feeds, and where it comes from: the processor's fixed height and
    width, else the model's stored `image_size`."""
    if processor.do_resize and processor.size.height and processor.size.width:
        return (processor.size.height, processor.size.width), "the processor's fixed size"
    stored = config.image_size
    size = tuple(stored if isinstance(stored, (list, tuple)) else (stored, stored))
    return size, ("the model's image_size; its processor keeps each image's aspect ratio, so give --image_size "
                  "HEIGHT WIDTH of your frames' shape to run them unsquashed")


def quiet_known_warnings() -> None:
    """For our commands (not library calls): silence what the exporters print on every export and that says nothing
    about the model at hand, so that the command's own lines are read: the version-drift notice of
    `transformers.exporters` (our export tests are what validate these versions), torch.onnx's registry notes on
    operators it skips, and pytree deprecation notices."""
    transformers_logging.get_logger("transformers.exporters.utils").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*(treespec|LeafSpec)", category=FutureWarning)


def load_exported(folder: str | Path, device=None, **runner_kwargs):
    """
    The `transformers.exporters.ExportedModel` saved in `folder`, loaded on its runtime. An OpenVINO program runs in
    fp32 unless `config` (its compile properties) says otherwise: the CPU plugin picks bf16 by itself on CPUs that
    have it and does not read the precision the exporter recorded in the graph. A `torch.export` program
    (`model.pt2`) rebuilds our output classes from the folder's code, so it is loaded with `trust_remote_code`.
    """
    from transformers.exporters import ExportedModel

    folder = Path(folder)
    if (folder / PROGRAM_FILES["openvino"]).is_file():
        runner_kwargs["config"] = {"INFERENCE_PRECISION_HINT": "f32", **runner_kwargs.get("config", {})}
    if (folder / PROGRAM_FILES["dynamo"]).is_file():
        runner_kwargs.setdefault("trust_remote_code", True)
    return ExportedModel.from_pretrained(folder, device=device, **runner_kwargs)


README = """# Exported STEP model

Format: {format}{quantized}; program: `{program}`, with `export.json` (what `transformers.exporters` recorded), `config.json`,
`preprocessor_config.json` (the image processor: resize and normalisation) and `image_reading.py` (how the processor
reads an image into 8-bit RGB, with numpy and PIL only, for runners without torch).

Run-time settings traced into the program (they cannot change without exporting again):

```json
{settings}
```

Input `pixel_values` `(batch, 3, height, width)`, normalised as the processor does; {shapes}. Outputs: `logits`
`(batch, num_labels, height / 16, width / 16)`, `superpatch_map`, `token_counts`{halting}.

Exported with `{command}`.
"""


def export_readme(export_format: str, traced_settings: dict, image_size: tuple[int, int], one_size: bool,
                  command: str, quantize: str | None = None, batch_size: int = 1) -> str:
    """The README of an exported folder: the program, the settings traced into it, its input shapes and the
    command that wrote it."""
    batch = f"a batch of {batch_size}" if export_format == "executorch" else "any batch"
    shapes = f"{batch}, {image_size[0]}x{image_size[1]}" if one_size else f"{batch}, height and width (multiples of 16)"
    return README.format(
        format=export_format, quantized=" (int8 dynamic quantization)" if quantize else "",
        program=PROGRAM_FILES[export_format], settings=json.dumps(traced_settings, indent=2), shapes=shapes,
        halting=", `exit_map`, `halted_share`" if traced_settings["halting"] else "", command=command,
    )


def check_output_dir(output: Path, overwrite: bool, marker: str = "export.json", holds: str = "an export") -> None:
    """Refuse an output folder that holds anything but an earlier output of the same command (`holds`, known by its
    `marker` file), and that earlier output without `overwrite`: one folder holds one output (a loader would
    otherwise pick a stale program beside the new one), and `--overwrite` never removes unrelated files."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        earlier = output.is_dir() and (output / marker).is_file()
        if not (earlier and overwrite):
            raise ExportRefused(
                f"--output_dir {output} already holds " + (f"{holds}: add --overwrite to replace it" if earlier
                else "other files: choose an empty or new folder") + f" (one folder holds one {holds.split()[-1]})."
            )


@contextlib.contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A new folder beside `output` to write into: when the block ends it replaces `output` whole, and when the block
    fails it is removed, so that a failure leaves nothing half-written (`check_output_dir` says what may be
    replaced)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_export(exported, processor: StepImageProcessor, output: Path, overwrite: bool, readme: str) -> None:
    """Save the program, the processor and the README into `output` as one consistent export (`check_output_dir`,
    `staged_folder`)."""
    check_output_dir(output, overwrite)
    with staged_folder(output) as staging:
        exported.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(readme)
        # The image reader (numpy and PIL only), so that a torch-free runner reads images as the processor does.
        shutil.copyfile(Path(__file__).with_name("image_reading.py"), staging / "image_reading.py")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output_dir")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="the input size traced (default: the size the model's processor feeds: its fixed height "
                             "and width, else the model's image_size)")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="ExecuTorch only: the batch size the program takes (the other formats take any)")
    parser.add_argument("--quantize", choices=("int8",), help="ONNX only: int8 weights, activations quantized at run "
                        "time (ONNX Runtime's dynamic quantization)")
    settings = parser.add_argument_group("run-time settings traced into the program (default: the saved ones)")
    settings.add_argument("--partition_source", choices=("dense", "policy"))
    settings.add_argument("--policy_thresholds", type=float, nargs="+")
    settings.add_argument("--token_budget", type=int)
    settings.add_argument("--exit_thresholds", type=float, nargs="+")
    settings.add_argument("--exit_keep_tokens", type=int, nargs="+")
    settings.add_argument("--halting", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)

    overrides = {name: getattr(args, name) for name in RUN_SETTINGS
                 if getattr(args, name, None) is not None}
    quiet_known_warnings()
    with refusing(f"the model {args.model_name_or_path}", "a folder saved by examples/train.py, or a Hub id"):
        model = StepForSemanticSegmentation.from_pretrained(args.model_name_or_path)
        processor = StepImageProcessor.from_pretrained(args.model_name_or_path)
    if args.image_size:
        image_size, source = tuple(args.image_size), "--image_size"
    else:
        image_size, source = processor_input_size(processor, model.config)
    check_fits_grid(model, overrides, image_size)
    output = Path(args.output_dir)
    check_output_dir(output, args.overwrite)  # before the minutes a trace takes
    print(f"Tracing {args.format} at {image_size[0]}x{image_size[1]} ({source})", flush=True)
    exported, traced_settings = export_model(model, args.format, image_size, overrides, args.quantize,
                                             args.batch_size)

    one_size = takes_one_input_size(model, model.config.settings, args.format)  # the settings now traced
    if one_size:  # the program takes one input size: the processor saved beside it resizes every image to it
        processor.size = {"height": image_size[0], "width": image_size[1]}
    command = "python -m step_hf.export " + " ".join(argv if argv is not None else sys.argv[1:])
    readme = export_readme(args.format, traced_settings, image_size, one_size, command, args.quantize,
                           args.batch_size)
    write_export(exported, processor, output, args.overwrite, readme)
    resized = f"; its processor resizes every image to {image_size[0]}x{image_size[1]}" if one_size else ""
    print(f"Wrote {output / PROGRAM_FILES[args.format]} with settings {traced_settings}{resized}")


if __name__ == "__main__":
    run_command(main)
