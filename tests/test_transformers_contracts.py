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


def gradients(model, **inputs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**inputs).loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("halting", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(halting):
    torch.manual_seed(0)
    config = tiny_config(exit_layers=[1], halting=halting, exit_thresholds=[0.255],
                         exit_keep_topk_per_class=0, hidden_dropout_prob=0.1)
    model = StepForSemanticSegmentation(config).train()
    labels = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    plain = gradients(model, pixel_values=PIXELS, labels=labels)
    if halting:
        assert model(pixel_values=PIXELS).halted_share.sum() > 0  # tokens do leave at the exit
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and all(block.gradient_checkpointing for block in model.step.blocks)
    torch.manual_seed(2)  # the same dropout masks: checkpointing replays them in the backward pass
    checkpointed = gradients(model, pixel_values=PIXELS, labels=labels)
    assert plain.keys() == checkpointed.keys() and any("exit_heads" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_input_embeddings_are_the_patch_embedding_and_can_require_grads():
    model = StepForSemanticSegmentation(tiny_config())
    assert model.get_input_embeddings() is model.step.patch_embed is model.step.get_input_embeddings()
    model.requires_grad_(False)
    model.enable_input_require_grads()  # what PEFT does so that adapters deep in a frozen model get gradients
    assert model(PIXELS).logits.requires_grad


def test_policy_logits_are_finite_where_no_block_fits():
    model = StepForSemanticSegmentation(tiny_config(partition_source="policy")).eval()
    with torch.no_grad():
        policy_logits = model(torch.randn(1, 3, 80, 48)).policy_logits  # a 5x3 grid: no whole 4x4 or larger block
    assert torch.isfinite(policy_logits).all() and (policy_logits[:, 1:] == torch.finfo(torch.float32).min).all()
