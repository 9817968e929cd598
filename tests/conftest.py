import os
import sys
import tempfile
from pathlib import Path

# Before any Hugging Face import: no network, and caches (datasets, remote code) away from the developer's own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="step-hf-tests-")

import pytest  # noqa: E402
import torch  # noqa: E402

from step_hf import StepConfig, StepForSemanticSegmentation  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

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


def tiny_model(**overrides) -> StepForSemanticSegmentation:
    """A `tiny_config` model in eval mode, its random weights fixed by seed 0."""
    torch.manual_seed(0)
    return StepForSemanticSegmentation(tiny_config(**overrides)).eval()


@pytest.fixture
def config() -> StepConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> StepForSemanticSegmentation:
    torch.manual_seed(0)
    return StepForSemanticSegmentation(config).eval()


@pytest.fixture(scope="session")
def scene_dataset(tmp_path_factory) -> Path:
    """A tiny segmentation dataset folder laid out like a Hub dataset repo (train and validation parquet)."""
    from datasets import Dataset, Image
    from scenes import SCENE_CLASSES, make_scene

    folder = tmp_path_factory.mktemp("scenes")
    (folder / "data").mkdir()
    for split, seeds in (("train", range(8)), ("validation", range(100, 104))):
        rows = [make_scene(96, 128, seed=seed) for seed in seeds]
        dataset = Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]})
        dataset = dataset.cast_column("image", Image()).cast_column("label", Image())
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    (folder / "id2label.json").write_text(__import__("json").dumps(SCENE_CLASSES))
    return folder
