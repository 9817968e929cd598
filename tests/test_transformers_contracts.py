"""The contracts of a `transformers` model that STEP keeps: big-model inference with offloading, ..."""

import tempfile

import pytest
import torch

from step_hf import StepForSemanticSegmentation

from .conftest import tiny_config

PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved_step_model(tmp_path_factory):
    """A tiny model with policy partitions and halting, saved; and its logits in memory."""
    torch.manual_seed(0)
    config = tiny_config(partition_source="policy", exit_layers=[1], halting=True, exit_thresholds=[0.3])
    model = StepForSemanticSegmentation(config).eval()
    folder = tmp_path_factory.mktemp("offload")
    model.save_pretrained(folder)
    with torch.no_grad():
        return folder, model(PIXELS).logits


@pytest.mark.parametrize("device_map, max_memory", [
    ("auto", {"cpu": "60KB"}),  # everything on disk
    ("auto", {"cpu": "150KB"}),  # the encoder's blocks on disk, its own parameters in memory
    ("auto", {"cpu": "300KB"}),  # the decoder split between memory and disk
    ({"step": "disk", "decoder": "cpu"}, None),
    ({"step.cls_token": "cpu", "step.pos_embed": "cpu", "step.patch_embed": "disk", "step.blocks": "cpu",
      "step.norm": "disk", "step.policy": "disk", "step.exit_heads": "cpu", "decoder": "disk"}, None),
])
def test_offloaded_models_give_the_same_logits(saved_step_model, device_map, max_memory):
    folder, expected = saved_step_model
    model = StepForSemanticSegmentation.from_pretrained(folder, device_map=device_map, max_memory=max_memory,
                                                        offload_folder=tempfile.mkdtemp()).eval()
    assert "disk" in set(model.hf_device_map.values())
    with torch.no_grad():
        torch.testing.assert_close(model(PIXELS).logits, expected, rtol=0, atol=0)


def test_encoder_parameters_offloaded_apart_from_the_encoder_are_refused(saved_step_model):
    folder, _ = saved_step_model
    device_map = {"step.cls_token": "disk", "step.pos_embed": "disk", "step.patch_embed": "cpu", "step.blocks": "cpu",
                  "step.norm": "cpu", "step.policy": "cpu", "step.exit_heads": "cpu", "decoder": "cpu"}
    model = StepForSemanticSegmentation.from_pretrained(folder, device_map=device_map,
                                                        offload_folder=tempfile.mkdtemp()).eval()
    with pytest.raises(ValueError, match="step.cls_token, step.pos_embed were offloaded to disk on their own"):
        model(PIXELS)
