"""mIoU of a saved model run on whole frames against the same model run in sliding windows.

    python examples/windows_vs_full_frame.py --model_name_or_path outputs/camvid720/dense \
        --dataset_name ../shared/datasets/camvid --window_size 720 --window_stride 480

Both go through `pipeline("image-segmentation")` with the model's own processor: once as saved (whole frames), once
with `window_size` / `window_stride` set (the processor cuts each resized frame into windows and
`post_process_semantic_segmentation` stitches their logits). mIoU as the Hub's `mean_iou` computes it.
"""

import argparse

import numpy as np
import torch
from transformers import AutoImageProcessor, pipeline

from data import load_data
from step_hf.cli import refusing, run_command
from step_hf.evaluation import confusion_matrices, segmentation_metrics
from step_hf.image_processing_step import reduce_labels


def mean_iou(segmenter, dataset, reduce: bool) -> float:
    """mIoU of the maps the pipeline returns (one mask per class found) over `dataset`."""
    config = segmenter.model.config
    confusion = 0
    for example in dataset:
        labels = np.asarray(example["label"]).astype(np.int64)
        labels = torch.from_numpy(reduce_labels(labels) if reduce else labels)
        prediction = np.zeros(labels.shape, dtype=np.int64)
        for segment in segmenter(example["image"]):
            prediction[np.array(segment["mask"]) > 0] = config.label2id[segment["label"]]
        confusion = confusion + confusion_matrices(labels[None], torch.from_numpy(prediction)[None],
                                                   config.num_labels, config.semantic_loss_ignore_index)[0]
    return segmentation_metrics(confusion, config.id2label)["mean_iou"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name")
    parser.add_argument("--window_size", type=int, required=True)
    parser.add_argument("--window_stride", type=int, help="default: two thirds of the window")
    parser.add_argument("--max_eval_samples", type=int)
    args = parser.parse_args(argv)
    with refusing(f"the model {args.model_name_or_path}", "a folder saved by examples/train.py, or a Hub id"):
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    if processor.window_size is not None:
        raise SystemExit("The saved processor already cuts windows; give a model saved for whole frames.")
    dataset = load_data(args.dataset_name, reduce_labels=processor.do_reduce_labels,
                        max_eval_samples=args.max_eval_samples)[0]["validation"]
    results = {}
    for name, windows in (("full frame", {}), ("windows", {"window_size": args.window_size,
                                                           "window_stride": args.window_stride})):
        for key, value in windows.items():
            setattr(processor, key, value)
        segmenter = pipeline("image-segmentation", model=args.model_name_or_path, image_processor=processor)
        results[name] = mean_iou(segmenter, dataset, processor.do_reduce_labels)
        print(f"{name}: mIoU {100 * results[name]:.2f}", flush=True)
    print(f"windows - full frame: {100 * (results['windows'] - results['full frame']):+.2f} mIoU")


if __name__ == "__main__":
    run_command(main)
