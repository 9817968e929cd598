import json

import pytest
from PIL import Image

from step_hf import StepForSemanticSegmentation, resolution_costs

from .conftest import tiny_config


def test_costs_against_resolution_are_counted_on_real_frames(tmp_path, scene_dataset):
    StepForSemanticSegmentation(tiny_config(partition_source="policy")).save_pretrained(tmp_path / "policy")
    output = tmp_path / "costs"
    resolution_costs.main(["--dataset_name", str(scene_dataset), "--policy_model", str(tmp_path / "policy"),
                           "--presets", "tiny", "--sizes", "64", "128", "64x128", "--num_images", "2",
                           "--skip_memory", "--output", str(output)])
    result = json.loads(output.with_suffix(".json").read_text())
    rows = {(row["variant"], tuple(row["size"])): row for row in result["rows"]}
    assert len(rows) == 4 * 3
    assert rows[("dense", (128, 128))]["tokens"] == 64 and rows[("dense", (64, 128))]["tokens"] == 32
    for size in ((64, 64), (128, 128), (64, 128)):
        assert rows[("dCTS oracle", size)]["tokens"] <= rows[("dense", size)]["tokens"]
        assert rows[("STEP", size)]["gflops"] < rows[("dCTS policy", size)]["gflops"]  # halted tokens cost less
        assert rows[("dCTS policy", size)]["policy_gflops"] > 0 == rows[("dense", size)]["policy_gflops"]
    exponents = result["growth_exponents"]["tiny dense"]
    assert exponents["tokens"] == pytest.approx(1.0)  # one token per cell: tokens grow with the pixels
    assert rows[("dense", (128, 128))]["gflops"] > 4 * rows[("dense", (64, 64))]["gflops"] * 0.9
    assert Image.open(output.with_suffix(".png")).size == (1240, 600)  # the axes, and the legend beside them


def test_peak_activation_memory_is_measured():
    """ViT-Tiny blocks at 512x512: a dense forward holds at least its 1024 tokens' 768-wide MLP activations (fp32);
    exits that halt half the tokens never need more than the same partition without them."""
    dense = resolution_costs.peak_memory("tiny", (512, 512), 1024, "dense", [0.5])
    shared = resolution_costs.peak_memory("tiny", (512, 512), 256, "dCTS policy", [0.5])
    halted = resolution_costs.peak_memory("tiny", (512, 512), 256, "STEP", [0.5])
    assert dense > 1024 * 768 * 4 / 2**20 and 0 < halted <= shared
