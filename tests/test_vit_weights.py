import pytest
import torch
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from step_hf import StepModel, load_vit_weights
from step_hf.vit_weights import convert_vit_state_dict

from .conftest import tiny_config


def tiny_vit(image_size=64, eps=1e-12, classifier=False):
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=image_size, patch_size=16, layer_norm_eps=eps, num_labels=3,
    )
    if classifier:
        return ViTForImageClassification(config).eval()
    return ViTModel(config, add_pooling_layer=True).eval()


def assert_same_features(vit, step, size):
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = vit(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        output = step(pixel_values)
    torch.testing.assert_close(output.last_hidden_state, expected, rtol=1e-5, atol=1e-5)  # class token and patches
    assert output.sequence_mask.all()


def timm_names_from_hf(vit):
    """An independent timm-style state dict built from a HF ViT by hand (what a timm checkpoint holds)."""
    sd, out = vit.state_dict(), {}
    out["cls_token"] = sd["embeddings.cls_token"]
    out["pos_embed"] = sd["embeddings.position_embeddings"]
    out["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
    for i in range(vit.config.num_hidden_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[p + f"attention.{x}_proj.{kind}"] for x in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[p + f"attention.o_proj.{kind}"]
            out[f"blocks.{i}.norm1.{kind}"] = sd[p + f"layernorm_before.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[p + f"layernorm_after.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[p + f"mlp.fc1.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
    out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    out["head.weight"], out["head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    return out


@pytest.mark.parametrize("size", [(64, 64), (96, 48)])
def test_hf_vit_in_memory_v5_names(size):
    vit = tiny_vit()
    step = StepModel(tiny_config(layer_norm_eps=1e-12)).eval()
    assert load_vit_weights(step, vit.state_dict()) == []  # the pooler is dropped, nothing left over
    assert_same_features(vit, step, size)


def test_hf_vit_saved_folder_v4_names(tmp_path):
    vit = tiny_vit(classifier=True)
    vit.save_pretrained(tmp_path)
    step = StepModel(tiny_config(layer_norm_eps=1e-12)).eval()
    load_vit_weights(step, str(tmp_path))
    assert_same_features(vit.vit, step, (64, 80))


def test_timm_named_safetensors_with_position_grid_resized(tmp_path):
    vit = tiny_vit(image_size=32, eps=1e-6)  # a 2x2 stored grid, resized to the STEP config's 4x4
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_names_from_hf(vit).items()}, path)
    step = StepModel(tiny_config()).eval()
    load_vit_weights(step, str(path))
    assert step.pos_embed.shape == (1, 17, 32)
    assert_same_features(vit, step, (64, 64))  # HF resizes its 2x2 grid to the input's 4x4 grid: the same


def test_converter_keeps_timm_names():
    timm = timm_names_from_hf(tiny_vit())
    converted = convert_vit_state_dict(timm)
    assert set(converted) == set(timm) - {"head.weight", "head.bias"}


def test_refuses_pickles_and_mismatches(tmp_path):
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"not read")
    step = StepModel(tiny_config(layer_norm_eps=1e-12))
    with pytest.raises(ValueError, match="Pickled checkpoints are refused"):
        load_vit_weights(step, str(pickle))
    vit = tiny_vit()
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="layer_norm_eps"):
        load_vit_weights(StepModel(tiny_config()), str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="lacks"):
        load_vit_weights(StepModel(tiny_config(num_hidden_layers=3)), vit.state_dict())
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_vit_weights(StepModel(tiny_config(intermediate_size=48)), vit.state_dict())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_vit_weights(step, str(tmp_path))
