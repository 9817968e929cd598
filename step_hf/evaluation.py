"""Evaluation of a STEP segmenter over a dataset: mIoU as the Hub's `mean_iou` computes it, per-class IoU, pixel
accuracy, tokens per image, share halted per exit and FLOPs per image; correct across Accelerate processes.

The one prediction loop over a dataset (`predictions`), which `evaluate`, `step_hf.analysis` and the examples share,
so that a saved model is measured exactly as its training run measured it; `EvalTransform` makes the batches it
reads; `measure` turns predictions into metrics, for a model or for an exported program (`exported_predictions`).

    python -m step_hf.evaluation --model FOLDER --dataset_name ../shared/datasets/camvid --split validation

measures a saved model (with its saved settings) or a folder written by `python -m step_hf.export` (the program in
its runtime: ONNX Runtime, OpenVINO or torch.export), each with the processor saved beside it.
"""

import argparse
import json
import math
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .accounting import flops_per_image
from .cli import UserError, refusing, run_command
from .configuration_step import StepSettings
from .image_processing_step import StepImageProcessor, reduce_labels


class EvalTransform:
    """A dataset with `image` and `label` columns as the batches `predictions` reads: the processor's `pixel_values`
    and `superpatch_targets` (when it makes them), and the label map at its original size (`original_labels`, reduced as the processor
    reduces labels)."""

    def __init__(self, dataset, processor: StepImageProcessor):
        if processor.window_size is not None:  # one item per image: the first window alone would be measured
            raise ValueError(
                f"The processor cuts images into windows (window_size={processor.window_size}), but evaluation runs "
                "one input per image: evaluate with `window_size=None`, or predict window by window and stitch "
                "with `post_process_semantic_segmentation`."
            )
        self.dataset, self.processor = dataset, processor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset[index]
        try:
            inputs = self.processor(example["image"], segmentation_maps=example["label"], return_tensors="pt")
        except ValueError as error:  # the processor numbers the images of its call: here always 0, not the row
            split = getattr(self.dataset, "split", None)
            row = f"Row {index}" + (f" of the {split} split" if split else " of the dataset")
            message = str(error).replace("Segmentation map 0 ", "its label map ", 1).replace("Image 0 ", "its image ", 1)
            raise ValueError(f"{row}: {message}") from None
        original = np.asarray(example["label"]).astype(np.int64)
        if self.processor.do_reduce_labels:
            original = reduce_labels(original)
        item = {"pixel_values": inputs["pixel_values"][0], "original_labels": torch.from_numpy(original)}
        if "superpatch_targets" in inputs:  # a processor without superpatch sizes above 1 makes none
            item["superpatch_targets"] = inputs["superpatch_targets"][0]
        return item


@torch.no_grad()
def predictions(model, loader, device: torch.device, settings: StepSettings | dict | None = None,
                policy_only: bool = False) -> Iterator[tuple[dict, object, torch.Tensor | None]]:
    """
    Run `model` on every batch of `loader` (batches as `EvalTransform` makes them) and yield `(batch, outputs,
    prediction)`: the batch moved to `device`, the model's outputs, and the class-id map `(batch, H, W)` at the size
    of `original_labels` (`class_map`). With `policy_only` only the policy and the partition run, and `prediction`
    is `None`. `settings` are the forward's (default: the model's saved ones).
    """
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        outputs = model(pixel_values=batch["pixel_values"], superpatch_targets=batch.get("superpatch_targets"),
                        settings=settings, policy_only=policy_only)
        yield batch, outputs, None if policy_only else class_map(outputs.logits, batch["original_labels"].shape[-2:])


def class_map(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The class ids `(batch, *size)` of `(batch, classes, rows, cols)` logits bilinearly upsampled to `size`."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).argmax(1)


@torch.no_grad()
def evaluate(model, loader, accelerator=None, settings: StepSettings | dict | None = None) -> dict:
    """
    Evaluate `model` (a `StepForSemanticSegmentation`, possibly wrapped by Accelerate) on `loader`, whose batches
    are `EvalTransform`'s (predictions are made at the size of the original label maps: see `predictions`).
    `settings` (a `StepSettings`, or a dict of overrides) are this evaluation's alone; `None` measures the model as
    it would run when loaded: with its configuration's saved settings. Returns `measure`'s results.
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    gather = accelerator.gather_for_metrics if accelerator is not None else None
    device = next(unwrapped.parameters()).device
    was_training = model.training
    model.eval()
    results = measure(predictions(model, loader, device, settings), unwrapped.config, device, gather)
    model.train(was_training)
    return results


def measure(stream: Iterator[tuple[dict, object, torch.Tensor]], config, device: torch.device,
            gather=None) -> dict:
    """
    mIoU, per-class IoU, pixel accuracy, tokens per image (mean, 5th and 95th percentiles), the share halted per exit
    and FLOPs per image over the `(batch, outputs, prediction)` triples of `stream` (`predictions`' or
    `exported_predictions`'), with `config`'s classes. `gather` collects a tensor from every process (Accelerate's
    `gather_for_metrics`; default: one process).

    FLOPs count each image as if run alone, policy included (2 FLOPs per multiply-add), from what the outputs say ran.
    """
    gather = gather or (lambda tensor: tensor)
    num_labels, ignore = config.num_labels, config.semantic_loss_ignore_index
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)
    tokens, halted, flops = [], [], []
    images_seen = 0
    for batch, outputs, prediction in stream:
        # Per-image matrices, so that gather_for_metrics can drop the duplicates even batches add at the end.
        labels = batch["original_labels"]
        confusion += gather(confusion_matrices(labels, prediction, num_labels, ignore, images_seen)).sum(0)
        images_seen += len(labels)
        tokens.append(gather(outputs.token_counts.float()))
        if outputs.halted_share is not None:
            halted.append(gather(outputs.halted_share.float()))
        image_flops = flops_per_image(config, batch["pixel_values"].shape[-2:], outputs)
        flops.append(gather(torch.tensor(image_flops, dtype=torch.float64, device=device)))
    if not tokens:
        raise ValueError("The evaluation loader yielded no batch: the evaluation split is empty.")
    if not confusion.any():
        raise ValueError(
            f"No pixel of the {len(torch.cat(tokens))} evaluation images is labelled (every label is the ignore index "
            f"{ignore}), so there is nothing to measure. Check the label column, and `do_reduce_labels` (which "
            "makes 0 void), or evaluate on a split with labels."
        )
    tokens = torch.cat(tokens).double()
    return {
        **segmentation_metrics(confusion, config.id2label),
        "tokens_per_image": float(tokens.mean()),
        "tokens_p5": float(torch.quantile(tokens, 0.05)),
        "tokens_p95": float(torch.quantile(tokens, 0.95)),
        "halted_share": torch.cat(halted).mean(0).tolist() if halted else [],
        "gflops_per_image": float(torch.cat(flops).mean()) / 1e9,
    }


def exported_predictions(program, loader) -> Iterator[tuple[dict, object, torch.Tensor]]:
    """`predictions` of an exported program (`transformers.exporters.ExportedModel`, its run-time settings traced
    in): its outputs for each batch's `pixel_values`, and the class-id map at the size of `original_labels`."""
    for batch in loader:
        outputs = program(pixel_values=batch["pixel_values"])
        yield batch, outputs, class_map(outputs.logits, batch["original_labels"].shape[-2:])


def confusion_matrices(labels: torch.Tensor, prediction: torch.Tensor, num_labels: int, ignore: int,
                       first_image: int = 0) -> torch.Tensor:
    """`(batch, num_labels, num_labels)` per-image confusion matrices (row: label, column: prediction) of integer
    `(batch, height, width)` label and prediction maps; pixels labelled `ignore` are left out. Maps of different
    shapes, and values that are not class ids in `[0, num_labels)` (nor `ignore`, for labels), are refused, naming the
    image (numbered from `first_image`) and the value: counted, they would land in another image's or class's
    cells."""
    if prediction.shape != labels.shape or labels.ndim != 3:
        raise ValueError(
            f"`prediction` has shape {tuple(prediction.shape)} and `labels` {tuple(labels.shape)}: pass one "
            "prediction per label map, both (batch, height, width) and of the same size."
        )
    if labels.is_floating_point() or prediction.is_floating_point():
        raise ValueError(f"`labels` ({labels.dtype}) and `prediction` ({prediction.dtype}) must be integer class ids.")
    valid = labels != ignore
    for name, values, bad in (("labels", labels, valid & ((labels < 0) | (labels >= num_labels))),
                              ("prediction", prediction, (prediction < 0) | (prediction >= num_labels))):
        if bad.any():  # one host sync per batch: a clear error instead of counts in the wrong cells
            image = int(bad.flatten(1).any(1).nonzero()[0])
            value = int(values[image][bad[image]][0])
            void = f" nor the ignore index {ignore}; map it to a class or to {ignore}" if name == "labels" else ""
            raise ValueError(
                f"The {name} of image {first_image + image} hold the value {value}, which is not a class id in "
                f"[0, {num_labels}){void}."
            )
    image = torch.arange(len(labels), device=labels.device)[:, None, None].expand_as(labels)
    cells = (image * num_labels + labels) * num_labels + prediction
    return torch.bincount(cells[valid], minlength=len(labels) * num_labels**2).view(-1, num_labels, num_labels)


def segmentation_metrics(confusion: torch.Tensor, id2label: dict[int, str]) -> dict:
    """mIoU, per-class IoU and pixel accuracy from a confusion matrix summed over the dataset, as the Hub's
    `mean_iou` computes them: per class intersection / union of areas over the whole dataset, then the mean over the
    classes present in labels or predictions. Where the Hub's gives NaN, this gives `None`: the IoU of a class
    absent from both, and every metric when no pixel is labelled; so the values are floats or `None`, which
    `json.dump` writes as valid JSON."""
    area_label, area_prediction = confusion.sum(1).double(), confusion.sum(0).double()
    intersection = confusion.diag().double()
    iou = [None if math.isnan(value) else value  # 0 / 0 for absent classes
           for value in (intersection / (area_label + area_prediction - intersection)).tolist()]
    present = [value for value in iou if value is not None]
    labelled = float(area_label.sum())
    return {
        "mean_iou": float(np.mean(present)) if present else None,
        "per_category_iou": {id2label[i]: iou[i] for i in range(len(iou))},
        "overall_accuracy": float(intersection.sum()) / labelled if labelled else None,
    }


def load_for_evaluation(folder: str) -> tuple[object, object, StepImageProcessor, bool]:
    """`(model or program, config, processor, exported)` of a saved model or an exported folder (`export.json`)."""
    from .configuration_step import StepConfig
    from .modeling_step import StepForSemanticSegmentation

    processor = StepImageProcessor.from_pretrained(folder)
    if not (Path(folder) / "export.json").is_file():
        model = StepForSemanticSegmentation.from_pretrained(folder).eval()
        return model, model.config, processor, False
    from .export import load_exported

    return load_exported(folder), StepConfig.from_pretrained(folder), processor, True


def check_dataset_classes(config, model_name: str, dataset_name: str) -> None:
    """Refuse a dataset whose classes (its folder's `id2label.json`) are not as many as the model's: every label
    beyond the model's classes would be refused image by image, without naming the cause."""
    path = Path(dataset_name) / "id2label.json"
    if not path.is_file():
        return
    classes = json.loads(path.read_text())
    if len(classes) != config.num_labels:
        ours = ", ".join(config.id2label[i] for i in range(config.num_labels))
        raise UserError(
            f"{model_name} predicts {config.num_labels} classes ({ours}) but {dataset_name} labels {len(classes)} "
            f"({', '.join(classes[key] for key in sorted(classes, key=int))}): evaluate the model on a dataset with "
            "its classes (for a model trained on the built-in scenes, write them with `python examples/data.py "
            "--output_dir outputs/scenes` and pass --dataset_name outputs/scenes)."
        )


def load_split(dataset_name: str, split: str, image_column: str = "image", label_column: str = "label",
               max_samples: int | None = None):
    """The split of a `datasets` folder or Hub id with its columns renamed `image` and `label`, its first
    `max_samples` images when given; refused in one line (`UserError`) when it cannot load or has no labels."""
    from datasets import load_dataset

    with refusing(f"{dataset_name} [{split}]", "a Hub id or a local folder laid out like one"):  # or no such split
        dataset = load_dataset(dataset_name, split=split)
    missing = {image_column, label_column} - set(dataset.column_names)
    if missing:
        raise UserError(f"{dataset_name} [{split}] has no column {sorted(missing)} (it has {dataset.column_names}): "
                        "accuracy is measured against labels, so name the columns with --image_column_name / "
                        "--label_column_name, or choose a split that has labels with --split.")
    dataset = dataset.rename_columns({image_column: "image", label_column: "label"})
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved STEP model, or a folder of python -m step_hf.export")
    parser.add_argument("--dataset_name", required=True,
                        help="a Hub id or a local folder laid out like one (`python examples/data.py --output_dir "
                             "outputs/scenes` writes the built-in scenes as one)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image_column_name", default="image")
    parser.add_argument("--label_column_name", default="label")
    parser.add_argument("--max_samples", type=int, help="the first N images of the split")
    parser.add_argument("--reduce_labels", action="store_true",
                        help="label 0 is void and the other ids move down by one (as training's --reduce_labels)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    with refusing(f"the model {args.model}", "a folder saved by examples/train.py or python -m step_hf.export, "
                  "or a Hub id"):
        model, config, processor, exported = load_for_evaluation(args.model)
    check_dataset_classes(config, args.model, args.dataset_name)
    dataset = load_split(args.dataset_name, args.split, args.image_column_name, args.label_column_name,
                         args.max_samples)
    processor.do_reduce_labels = args.reduce_labels or processor.do_reduce_labels
    loader = torch.utils.data.DataLoader(EvalTransform(dataset, processor))  # label maps keep their own sizes
    with torch.no_grad():
        stream = exported_predictions(model, loader) if exported else predictions(model, loader, torch.device("cpu"))
        results = measure(stream, config, torch.device("cpu"))
    print(f"{args.model} on {args.dataset_name} [{args.split}], {len(dataset)} images: mIoU "
          f"{100 * results['mean_iou']:.2f}, pixel accuracy {100 * results['overall_accuracy']:.2f}, tokens/image "
          f"{results['tokens_per_image']:.1f}, halted {[round(s, 3) for s in results['halted_share']]}, "
          f"{results['gflops_per_image']:.2f} GFLOPs/image")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


__all__ = [
    "EvalTransform", "class_map", "confusion_matrices", "evaluate", "exported_predictions", "load_split", "measure",
    "predictions", "segmentation_metrics",
]


if __name__ == "__main__":
    run_command(main)
