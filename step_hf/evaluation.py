"""Evaluation of a STEP segmenter over a dataset: mIoU as the Hub's `mean_iou` computes it, per-class IoU, pixel
accuracy, tokens per image, share halted per exit and FLOPs per image; correct across Accelerate processes.

The one prediction loop that `examples/train.py`, `examples/sweep.py` and the tests share, so that a saved model is
measured exactly as its training run measured it.
"""

import numpy as np
import torch
import torch.nn.functional as F

from .accounting import flops_per_image
from .configuration_step import StepConfig


@torch.no_grad()
def evaluate(model, loader, accelerator=None, partition_source: str | None = None) -> dict:
    """
    Evaluate `model` (a `StepForSemanticSegmentation`, possibly wrapped by Accelerate) on `loader`, whose batches
    hold `pixel_values`, `superpatch_targets` and `original_labels` (the label maps at their original size; the
    logits are bilinearly upsampled to them). `partition_source` overrides the model's for this evaluation only;
    `None` measures the model as it would run when loaded: with its configuration's saved settings.

    FLOPs count each image as if run alone, policy included (2 FLOPs per multiply-add).
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda tensor: tensor)
    config = unwrapped.config
    source = partition_source or config.partition_source
    num_labels, ignore = config.num_labels, config.semantic_loss_ignore_index
    device = next(unwrapped.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)
    tokens, halted, flops = [], [], []
    for batch in loader:
        outputs = model(pixel_values=batch["pixel_values"].to(device),
                        superpatch_targets=batch["superpatch_targets"].to(device), partition_source=source)
        labels = batch["original_labels"].to(device)
        logits = F.interpolate(outputs.logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        # Per-image matrices, so that gather_for_metrics can drop the duplicates even batches add at the end.
        confusion += gather(confusion_matrices(labels, logits.argmax(1), num_labels, ignore)).sum(0)
        tokens.append(gather(outputs.token_counts.float()))
        if outputs.halted_share is not None:
            halted.append(gather(outputs.halted_share.float()))
        flops.append(gather(image_flops(config, batch["pixel_values"].shape[-2:], outputs, source)))
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


def image_flops(config: StepConfig, image_size, outputs, partition_source: str) -> torch.Tensor:
    """FLOPs of each image of a batch, from its token counts and halted shares (analytic formula)."""
    sharing = partition_source != "dense" and bool(config.shared_sizes)
    halted = outputs.halted_share.tolist() if config.halting and outputs.halted_share is not None else None
    flops = flops_per_image(config, tuple(image_size), outputs.token_counts.tolist(), halted, sharing,
                            policy_ran=sharing and partition_source == "policy")
    return torch.tensor(flops, dtype=torch.float64, device=outputs.token_counts.device)


__all__ = ["confusion_matrices", "evaluate", "image_flops", "segmentation_metrics"]
