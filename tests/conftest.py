import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from step_hf import StepConfig, StepForSemanticSegmentation  # noqa: E402

LABELS = {0: "road", 1: "sky", 2: "car", 3: "tree"}


def tiny_config(**overrides) -> StepConfig:
    """A ViT small enough for CPU tests: 32 wide, 2 blocks, 64x64 stored grid, 4 classes, no token sharing unless
    asked (`partition_source="policy"` or `"oracle"`)."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        decoder_hidden_size=32,
        decoder_num_attention_heads=2,
        policy_hidden_size=8,
        partition_source="dense",
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    fields.update(overrides)
    return StepConfig(**fields)


@pytest.fixture
def config() -> StepConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> StepForSemanticSegmentation:
    torch.manual_seed(0)
    return StepForSemanticSegmentation(config).eval()
