"""The image-segmentation pipeline, with STEP's run-time settings per call.

`import step_hf` makes `pipeline("image-segmentation", model=...)` build a `StepSegmentationPipeline`: for every
model it is `transformers`' `ImageSegmentationPipeline`, and for a STEP model it also takes `settings=` (a
`StepSettings`, or a dict of overrides of the model's saved settings), at construction (this pipeline's default) or
per call:

    segmenter = pipeline("image-segmentation", model="org/step-vit-large")
    segmenter(image, settings={"policy_thresholds": [0.9] * 4})   # this call only; nothing shared changes

The settings travel with the call to the model's forward, so one pipeline may serve calls with different settings
from several threads at once.

Images given by URL or path are loaded by `step_hf.load_image` (errors name the URL and the HTTP status, and a
server that does not answer is given up after `URL_TIMEOUT_S` seconds, or the call's `timeout=`).

Batches (`batch_size=N`) of a STEP model are made of whole images, whatever their sizes, modes or windows: the
images of one input size run as one forward (all their windows together), and each image's logits and window
offsets are cut back out for its own post-processing, so a batched result is exactly the single-image result.
"""

import inspect
from functools import cached_property
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers.pipelines import SUPPORTED_TASKS
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator
from transformers.utils import ModelOutput

from .image_processing_step import URL_TIMEOUT_S, load_image

# The key of a batch's per-image outputs: the pipeline's iterator hands out one entry of its list per image.
IMAGE_OUTPUTS = "image_outputs"


class StepSegmentationPipeline(ImageSegmentationPipeline):
    """`ImageSegmentationPipeline`, plus STEP's `settings` for the model's forward (see the module)."""

    def _sanitize_parameters(self, settings: Any = None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if settings is not None:
            if not self.takes_settings:
                raise ValueError(
                    f"`settings` are STEP's run-time settings; {type(self.model).__name__} does not take them."
                )
            forward = {**forward, "settings": settings}
        return preprocess, forward, postprocess

    @cached_property
    def takes_settings(self) -> bool:
        """Whether the model is a STEP model (its forward takes `settings`); read once, not per image."""
        return "settings" in inspect.signature(self.model.forward).parameters

    def preprocess(self, image, subtask=None, timeout=None):
        """As the parent's; for a STEP model an image given by URL or path is loaded by `step_hf`'s `load_image`
        (the same decoding, errors that name the URL and the status, `URL_TIMEOUT_S` unless `timeout` is given)."""
        if self.takes_settings:
            image = load_image(image, timeout=URL_TIMEOUT_S if timeout is None else timeout)
        return super().preprocess(image, subtask=subtask, timeout=timeout)

    def get_iterator(self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params,
                     postprocess_params):
        """As the parent's, but a batch of a STEP model is the list of its images' inputs (no collating: images
        of different sizes, or cut into windows, cannot be stacked), run by `_forward`."""
        if not self.takes_settings or batch_size == 1 or not hasattr(inputs, "__len__"):
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=list)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs: dict | list[dict], settings: Any = None):
        if isinstance(model_inputs, list):
            return {IMAGE_OUTPUTS: self.forward_images(model_inputs, settings)}
        if settings is None:
            return super()._forward(model_inputs)
        target_size = model_inputs.pop("target_size")
        model_outputs = self.model(**model_inputs, settings=settings)
        model_outputs["target_size"] = target_size
        return model_outputs

    def forward_images(self, images: list[dict], settings: Any) -> list[dict]:
        """Each image's outputs for post-processing (`logits`, `window_offsets`, `target_size`), the images of one
        input size run as one forward."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image["pixel_values"].shape[-2:]), []).append(index)
        outputs = [None] * len(images)
        for indices in by_size.values():
            pixel_values = torch.cat([images[index]["pixel_values"] for index in indices])
            logits = self.model(pixel_values=pixel_values, settings=settings).logits
            for index, image_logits in zip(indices, logits.split([len(images[i]["pixel_values"]) for i in indices])):
                outputs[index] = {"logits": image_logits, "window_offsets": images[index].get("window_offsets"),
                                  "target_size": images[index]["target_size"]}
        return outputs

    def postprocess(self, model_outputs, **kwargs):
        if IMAGE_OUTPUTS in model_outputs:  # one image of a batch (see `forward_images`)
            model_outputs = ModelOutput(**{key: value for key, value in model_outputs[IMAGE_OUTPUTS].items()
                                           if value is not None})
        return super().postprocess(model_outputs, **kwargs)


def register_pipeline() -> None:
    """Make `pipeline("image-segmentation")` build a `StepSegmentationPipeline` (the same pipeline for every other
    model). Set in the task table directly: `PIPELINE_REGISTRY.register_pipeline` would log that it overwrites."""
    SUPPORTED_TASKS["image-segmentation"]["impl"] = StepSegmentationPipeline


__all__ = ["StepSegmentationPipeline", "register_pipeline"]
