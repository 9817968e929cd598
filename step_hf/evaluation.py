"""Evaluation of a STEP segmenter over a dataset: mIoU as the Hub's `mean_iou` computes it, per-class IoU, pixel
accuracy, tokens per image, share halted per exit and FLOPs per image; correct across Accelerate processes.

The one prediction loop over a dataset (`predictions`), which `evaluate`, `step_hf.analysis` and the examples share,
so that a saved model is measured exactly as its training run measured it; `EvalTransform` makes the batches it
reads.
"""

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .accounting import flops_per_image
from .configuration_step import StepSettings
from .image_processing_step import StepImageProcessor, reduce_labels


class EvalTransform:
    """A dataset with `image` and `label` columns as the batches `predictions` reads: the processor's `pixel_values`
    and `superpatch_targets`, and the label map at its original size (`original_labels`, reduced as the processor
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
        inputs = self.processor(example["image"], segmentation_maps=example["label"], return_tensors="pt")
        original = np.asarray(example["label"]).astype(np.int64)
        if self.processor.do_reduce_labels:
            original = reduce_labels(original)
        return {"pixel_values": inputs["pixel_values"][0], "superpatch_targets": inputs["superpatch_targets"][0],
                "original_labels": torch.from_numpy(original)}


@torch.no_grad()
def predictions(model, loader, device: torch.device, settings: StepSettings | dict | None = None,
                policy_only: bool = False) -> Iterator[tuple[dict, object, torch.Tensor | None]]:
    """
    Run `model` on every batch of `loader` (batches as `EvalTransform` makes them) and yield `(batch, outputs,
    prediction)`: the batch moved to `device`, the model's outputs, and the class-id map `(batch, H, W)` at the size
    of `original_labels` (the logits bilinearly upsampled, then the arg-max). With `policy_only` only the policy and
    the partition run, and `prediction` is `None`. `settings` are the forward's (default: the model's saved ones).
    """
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        outputs = model(pixel_values=batch["pixel_values"], superpatch_targets=batch["superpatch_targets"],
                        settings=settings, policy_only=policy_only)
        if policy_only:
            yield batch, outputs, None
            continue
        size = batch["original_labels"].shape[-2:]
        logits = F.interpolate(outputs.logits.float(), size=size, mode="bilinear", align_corners=False)
        yield batch, outputs, logits.argmax(1)


@torch.no_grad()
def evaluate(model, loader, accelerator=None, settings: StepSettings | dict | None = None) -> dict:
    """
    Evaluate `model` (a `StepForSemanticSegmentation`, possibly wrapped by Accelerate) on `loader`, whose batches
    are `EvalTransform`'s (predictions are made at the size of the original label maps: see `predictions`).
    `settings` (a `StepSettings`, or a dict of overrides) are this evaluation's alone; `None` measures the model as
    it would run when loaded: with its configuration's saved settings.

    FLOPs count each image as if run alone, policy included (2 FLOPs per multiply-add).
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda tensor: tensor)
    config = unwrapped.config
    num_labels, ignore = config.num_labels, config.semantic_loss_ignore_index
    device = next(unwrapped.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)
    tokens, halted, flops = [], [], []
    for batch, outputs, prediction in predictions(model, loader, device, settings):
        # Per-image matrices, so that gather_for_metrics can drop the duplicates even batches add at the end.
        confusion += gather(confusion_matrices(batch["original_labels"], prediction, num_labels, ignore)).sum(0)
        tokens.append(gather(outputs.token_counts.float()))
        if outputs.halted_share is not None:
            halted.append(gather(outputs.halted_share.float()))
        image_flops = flops_per_image(config, batch["pixel_values"].shape[-2:], outputs)
        flops.append(gather(torch.tensor(image_flops, dtype=torch.float64, device=device)))
    model.train(was_training)
    tokens = torch.cat(tokens).double()
    return {
        **segmentation_metrics(confusion, config.id2label),
        "tokens_per_image": float(tokens.mean()),
        "tokens_p5": float(torch.quantile(tokens, 0.05)),
        "tokens_p95": float(torch.quantile(tokens, 0.95)),
        "halted_share": torch.cat(halted).mean(0).tolist() if halted else [],
        "gflops_per_image": float(torch.cat(flops).mean()) / 1e9,
    }


def confusion_matrices(labels: torch.Tensor, prediction: torch.Tensor, num_labels: int, ignore: int) -> torch.Tensor:
    """`(batch, num_labels, num_labels)` per-image confusion matrices (row: label, column: prediction); pixels
    labelled `ignore` are left out."""
    valid = labels != ignore
    image = torch.arange(len(labels), device=labels.device)[:, None, None].expand_as(labels)
    cells = (image * num_labels + labels) * num_labels + prediction
    return torch.bincount(cells[valid], minlength=len(labels) * num_labels**2).view(-1, num_labels, num_labels)


def segmentation_metrics(confusion: torch.Tensor, id2label: dict[int, str]) -> dict:
    """mIoU, per-class IoU and pixel accuracy from a confusion matrix summed over the dataset, as the Hub's
    `mean_iou` computes them: per class intersection / union of areas over the whole dataset, then the mean over the
    classes present in labels or predictions (nan-mean)."""
    area_label, area_prediction = confusion.sum(1).double(), confusion.sum(0).double()
    intersection = confusion.diag().double()
    iou = (intersection / (area_label + area_prediction - intersection)).tolist()  # nan for absent classes
    return {
        "mean_iou": float(np.nanmean(iou)),
        "per_category_iou": {id2label[i]: iou[i] for i in range(len(iou))},
        "overall_accuracy": float(intersection.sum() / area_label.sum()),
    }


__all__ = [
    "EvalTransform", "confusion_matrices", "evaluate", "predictions", "segmentation_metrics",
]
