import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    pipeline,
)

from step_hf import StepConfig, StepForSemanticSegmentation, StepImageProcessor, StepModel

from .conftest import tiny_config
from .reference import REMOTE_SCRIPT, check_pipeline_output


@pytest.fixture
def model():
    """With the policy on, so that the saved code's whole dCTS path runs."""
    torch.manual_seed(0)
    return StepForSemanticSegmentation(tiny_config(partition_source="policy")).eval()


@pytest.fixture
def saved(model, tmp_path):
    model.save_pretrained(tmp_path)
    StepImageProcessor(size={"height": 64, "width": 64}, num_labels=4).save_pretrained(tmp_path)
    return tmp_path


def test_auto_classes_in_process(saved, model):
    assert isinstance(AutoConfig.from_pretrained(saved), StepConfig)
    assert type(AutoModel.from_pretrained(saved)) is StepModel
    loaded = AutoModelForSemanticSegmentation.from_pretrained(saved).eval()
    assert type(loaded) is StepForSemanticSegmentation
    assert type(AutoImageProcessor.from_pretrained(saved)) is StepImageProcessor
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # same weights; CPU kernels may round differently for differently placed tensors
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=1e-5, atol=1e-5)


def test_saved_folder_carries_the_code(saved):
    files = set(os.listdir(saved))
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "configuration_step.py",
            "modeling_step.py", "token_layout.py", "superpatch.py", "exits.py", "fast_ops.py",
            "image_processing_step.py"} <= files
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSemanticSegmentation"}
    for name in files:
        if name.endswith(".py"):
            imports = re.findall(r"^\s*(?:from|import)\s+step_hf", (saved / name).read_text(), re.MULTILINE)
            assert not imports, f"{name} must not import step_hf"


def test_pipeline_in_process(saved, monkeypatch):
    def no_prompt(*args):
        raise AssertionError(f"pipeline asked the user: {args}")

    monkeypatch.setattr("builtins.input", no_prompt)  # with step_hf imported, nothing is remote code
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(saved))
    check_pipeline_output(segmenter(image), image, segmenter.model.config.id2label)


def test_remote_code_without_step_hf(saved, model, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(saved)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is not supported for image-segmentation" not in result.stderr  # the Hub code names its model type
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["classes"] == ["StepConfig", "StepModel", "StepForSemanticSegmentation", "StepImageProcessor"]

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    processor = StepImageProcessor.from_pretrained(saved)
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(remote["logits"]), logits, rtol=1e-5, atol=1e-5)
    local = pipeline("image-segmentation", model=str(saved))(image)
    assert [[s["label"], list(s["mask"].size), np.array(s["mask"]).tolist()] for s in local] == remote["segments"]


def test_pipeline_with_sliding_windows(model, tmp_path):
    """A frame larger than the model's window (as Cityscapes' 1024x2048 are): windows in, one map out."""
    model.save_pretrained(tmp_path)
    StepImageProcessor(size={"shortest_edge": 64}, window_size=64, num_labels=4).save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 150, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    inputs = segmenter.image_processor(image, return_tensors="pt")
    windows = inputs["window_offsets"]  # 64x192 after resizing: overlapping 64x64 windows across the width
    assert inputs["pixel_values"].shape[1:] == (3, 64, 64) and len(windows) == len(inputs["pixel_values"]) > 2
    assert windows[:, 2].min() == 0 and windows[:, 2].max() == 192 - 64
    check_pipeline_output(segmenter(image), image, segmenter.model.config.id2label)


@pytest.mark.parametrize("window_size", [None, 64])
def test_batched_pipeline_equals_one_image_at_a_time(model, tmp_path, window_size):
    """Images of different sizes and modes (and, with windows, of several windows each) in batches of 4: every
    result equals the image's own single-image result, with the saved settings or a call's."""
    model.save_pretrained(tmp_path)
    StepImageProcessor(size={"shortest_edge": 64}, num_labels=4, window_size=window_size).save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(60, 90), (80, 80), (64, 200), (60, 90), (50, 50)]]
    images[1], images[4] = images[1].convert("L"), images[4].convert("RGBA")

    def maps(results):
        return [[(segment["label"], np.array(segment["mask"]).tobytes()) for segment in result] for result in results]

    for settings in (None, {"partition_source": "dense"}):
        call = {} if settings is None else {"settings": settings}
        single = maps([segmenter(image, **call) for image in images])
        assert maps(segmenter(images, batch_size=4, **call)) == single
        assert maps(segmenter(images, batch_size=2, **call)) == single
        for result, image in zip(segmenter(images, batch_size=4, **call), images):
            check_pipeline_output(result, image, model.config.id2label)
