"""The image-segmentation pipeline, with STEP's run-time settings per call.

`import step_hf` makes `pipeline("image-segmentation", model=...)` build a `StepSegmentationPipeline`: for every
model it is `transformers`' `ImageSegmentationPipeline`, and for a STEP model it also takes `settings=` (a
`StepSettings`, or a dict of overrides of the model's saved settings), at construction (this pipeline's default) or
per call:

    segmenter = pipeline("image-segmentation", model="org/step-vit-large")
    segmenter(image, settings={"policy_thresholds": [0.9] * 4})   # this call only; nothing shared changes

The settings travel with the call to the model's forward, so one pipeline may serve calls with different settings
from several threads at once.
"""

import inspect
from typing import Any

from transformers.pipelines import SUPPORTED_TASKS
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline


class StepSegmentationPipeline(ImageSegmentationPipeline):
    """`ImageSegmentationPipeline`, plus STEP's `settings` for the model's forward (see the module)."""

    def _sanitize_parameters(self, settings: Any = None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if settings is not None:
            if "settings" not in inspect.signature(self.model.forward).parameters:
                raise ValueError(
                    f"`settings` are STEP's run-time settings; {type(self.model).__name__} does not take them."
                )
            forward = {**forward, "settings": settings}
        return preprocess, forward, postprocess

    def _forward(self, model_inputs: dict, settings: Any = None):
        if settings is None:
            return super()._forward(model_inputs)
        target_size = model_inputs.pop("target_size")
        model_outputs = self.model(**model_inputs, settings=settings)
        model_outputs["target_size"] = target_size
        return model_outputs


def register_pipeline() -> None:
    """Make `pipeline("image-segmentation")` build a `StepSegmentationPipeline` (the same pipeline for every other
    model). Set in the task table directly: `PIPELINE_REGISTRY.register_pipeline` would log that it overwrites."""
    SUPPORTED_TASKS["image-segmentation"]["impl"] = StepSegmentationPipeline


__all__ = ["StepSegmentationPipeline", "register_pipeline"]
