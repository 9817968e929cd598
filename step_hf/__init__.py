"""step-hf: STEP (SuperToken and Early-Pruning) ViT segmenters for Hugging Face Transformers.

Importing the package registers the model type "step" with the Auto classes and the image-segmentation pipeline.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
)
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

from .configuration_step import StepConfig, StepSettings
from .image_processing_step import InputSizing, StepImageProcessor, input_sizing, load_image
from .modeling_step import (
    StepForSemanticSegmentation,
    StepModel,
    StepModelOutput,
    StepPreTrainedModel,
    StepRun,
    StepSemanticSegmenterOutput,
)
from .pipeline_step import StepSegmentationPipeline, register_pipeline
from .token_layout import PackedBatch, TokenLayout
from .vit_weights import load_vit_weights

__version__ = "0.1.0"

AutoConfig.register(StepConfig.model_type, StepConfig, exist_ok=True)
AutoModel.register(StepConfig, StepModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(StepConfig, StepForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(
    StepConfig, image_processor_classes={"pil": StepImageProcessor, "torchvision": StepImageProcessor}, exist_ok=True
)
# STEP has no video processor. Saying so stops `pipeline()` from guessing a remote `StepVideoProcessor` from the
# image processor's `auto_map` and asking the user whether to trust it.
VIDEO_PROCESSOR_MAPPING.register(StepConfig, {}, exist_ok=True)
# The image-segmentation pipeline recognises the model type (modeling_step.py names it, for Hub code too) and takes
# STEP's run-time settings per call (`pipe(image, settings=...)`).
register_pipeline()

# `save_pretrained` copies the code files next to the weights and writes `auto_map`, so that a process without
# step_hf loads everything with `trust_remote_code=True`.
StepConfig.register_for_auto_class()
StepModel.register_for_auto_class("AutoModel")
StepForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
StepImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "StepConfig",
    "StepSettings",
    "StepRun",
    "StepModel",
    "StepForSemanticSegmentation",
    "StepPreTrainedModel",
    "StepModelOutput",
    "StepSemanticSegmenterOutput",
    "StepImageProcessor",
    "StepSegmentationPipeline",
    "TokenLayout",
    "PackedBatch",
    "load_vit_weights",
    "load_image",
    "input_sizing",
    "InputSizing",
]
