from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSemanticSegmentation

from step_hf import StepForSemanticSegmentation, StepModel
from step_hf.fast_ops import ImageNorm, PatchConv2d, resize_grid_bicubic
from step_hf.token_layout import PackedBatch, dense_token_layout, insert_per_image, packed_attention

from .conftest import tiny_config
from .reference import reference_vit_segmenter


@pytest.mark.parametrize("size", [(64, 64), (48, 96), (80, 32)])
def test_equals_plain_vit_segmenter(model, size):
    pixel_values = torch.randn(3, 3, *size)
    with torch.no_grad():
        output = model(pixel_values)
        expected = reference_vit_segmenter(model, pixel_values)
    assert output.logits.shape == (3, 4, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(output.logits, expected, rtol=1e-5, atol=1e-5)


def test_batch_equals_one_image_at_a_time(model):
    pixel_values = torch.randn(3, 3, 48, 64)
    with torch.no_grad():
        batched = model(pixel_values).logits
        single = torch.cat([model(image[None]).logits for image in pixel_values])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_packed_attention_with_unequal_lengths_equals_per_image(mode):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    query, key, value = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    batch = PackedBatch.of(lengths, "cpu", attention_mode=mode)
    packed = packed_attention(query, key, value, batch)
    pieces, start = [], 0
    for length in lengths:
        q, k, v = (x[start:start + length].transpose(0, 1) for x in (query, key, value))
        pieces.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1))
        start += length
    torch.testing.assert_close(packed, torch.cat(pieces), rtol=1e-5, atol=1e-6)


def test_insert_per_image_places_tokens_and_extras():
    batch = PackedBatch.of([2, 3], "cpu")
    tokens = torch.arange(5.0)[:, None]
    extra = torch.tensor([[[10.0], [11.0]], [[20.0], [21.0]]])
    first, _, _, new_batch = insert_per_image(tokens, extra, batch, at_start=True)
    last, token_positions, extra_positions, _ = insert_per_image(tokens, extra, batch, at_start=False)
    assert first[:, 0].tolist() == [10, 11, 0, 1, 20, 21, 2, 3, 4]
    assert last[:, 0].tolist() == [0, 1, 10, 11, 2, 3, 4, 20, 21]
    assert new_batch.lengths.tolist() == [4, 5] and new_batch.host_lengths == (4, 5) and new_batch.max_length == 5
    assert token_positions.tolist() == [0, 1, 4, 5, 6] and extra_positions.tolist() == [[2, 3], [7, 8]]


def test_dense_layout_covers_every_cell_once():
    layout = dense_token_layout(2, (3, 5), torch.device("cpu"))
    assert layout.cell_to_token.flatten().sort().values.tolist() == list(range(30))
    token = layout.cell_to_token[1, 2, 4]
    assert (layout.image_index[token], layout.cell_row[token], layout.cell_col[token]) == (1, 2, 4)


def test_loss_ignores_void(model):
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    void = torch.rand(2, 64, 64) < 0.5
    with torch.no_grad():
        logits = model(pixel_values).logits
        loss = model(pixel_values, labels=labels.masked_fill(void, 255)).loss
    upsampled = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(upsampled, labels, reduction="none")
    torch.testing.assert_close(loss, torch.stack([per_pixel[i][~void[i]].mean() for i in range(2)]).mean())
    # Changing the labels under void changes nothing.
    with torch.no_grad():
        other = model(pixel_values, labels=torch.where(void, 255, labels)).loss
    torch.testing.assert_close(loss, other)


def test_loss_at_label_resolution_and_gradients(model):
    model.train()
    output = model(torch.randn(2, 3, 32, 48), labels=torch.randint(0, 4, (2, 45, 70)))
    output.loss.backward()
    assert model.step.pos_embed.grad is not None and model.decoder.cls_emb.grad is not None


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(3, 64, 64), "4-D tensor"),
        (torch.randn(1, 1, 64, 64), "1 channels but the model expects 3"),
        (torch.randn(1, 3, 60, 64), "multiples of the patch size 16"),
        (torch.randn(1, 3, 0, 64), "multiples of the patch size 16"),
    ],
)
def test_bad_inputs(model, pixel_values, message):
    with pytest.raises(ValueError, match=message):
        model(pixel_values)


def test_labels_out_of_range_name_value_and_image(model):
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[1, 3, 3] = 7
    with pytest.raises(ValueError, match="image 1 hold the value 7"):
        model(torch.randn(2, 3, 32, 32), labels=labels)
    with pytest.raises(ValueError, match="must have shape"):
        model(torch.randn(2, 3, 32, 32), labels=labels[0])


def test_save_load_identical_logits(model, tmp_path):
    pixel_values = torch.randn(2, 3, 64, 80)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = StepForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, loaded(pixel_values).logits)
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(encoder, StepModel)
    with torch.no_grad():
        assert torch.equal(encoder(pixel_values).last_hidden_state, model.step(pixel_values).last_hidden_state)


def test_return_tuple_and_hidden_states(model):
    output = model(torch.randn(1, 3, 32, 32), output_hidden_states=True)
    assert len(output.hidden_states) == 1 + model.config.num_hidden_layers
    assert all(state.shape == (1, 1 + 4, 32) for state in output.hidden_states)  # class token, then the 2x2 cells
    logits = model(torch.randn(1, 3, 32, 32), return_dict=False)[0]
    assert logits.shape == (1, 4, 2, 2)
    encoder_tuple = model.step(torch.randn(1, 3, 32, 32), return_dict=False)
    assert encoder_tuple[0].shape == (1, 5, 32) and encoder_tuple[1].shape == (1, 5)  # last_hidden_state first


def test_non_square_stored_grid():
    model = StepForSemanticSegmentation(tiny_config(image_size=[32, 64])).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 64)).logits.shape == (1, 4, 2, 4)
        expected = reference_vit_segmenter(model, torch.zeros(1, 3, 48, 48))
        torch.testing.assert_close(model(torch.zeros(1, 3, 48, 48)).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid, size", [((14, 14), (64, 64)), ((45, 45), (45, 60)), ((60, 60), (45, 60)),
                                        ((8, 8), (3, 5))])
def test_position_grid_resize_equals_bicubic_interpolate(grid, size):
    """The separable (two matrix products) resize gives what `F.interpolate` bicubic does, up and down."""
    values = torch.randn(*grid, 32, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(values.permute(2, 0, 1)[None], size=size, mode="bicubic", align_corners=False)
    torch.testing.assert_close(resize_grid_bicubic(values, size), expected[0].permute(1, 2, 0), rtol=1e-5, atol=1e-5)


def test_patch_convolution_and_image_norm_equal_the_torch_modules():
    """The matrix-product patch convolution and the one-group norm by reduction (their CUDA paths) compute what
    `nn.Conv2d` and `nn.GroupNorm(1)` do, with the same parameters (so checkpoints load unchanged), also on sizes
    that do not tile exactly."""
    torch.manual_seed(0)
    patch_conv, norm = PatchConv2d(3, 16, 4), ImageNorm(16)
    norm.weight.data.normal_(), norm.bias.data.normal_()
    reference_norm = torch.nn.GroupNorm(1, 16)
    reference_norm.load_state_dict(norm.state_dict())
    for images in (torch.randn(2, 3, 32, 48), torch.randn(2, 3, 35, 50)):
        expected = F.conv2d(images, patch_conv.weight, patch_conv.bias, stride=4)
        torch.testing.assert_close(patch_conv.as_matrix_product(images).permute(0, 3, 1, 2), expected,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patch_conv(images), expected)
        torch.testing.assert_close(norm.by_reduction(expected), reference_norm(expected), rtol=1e-5, atol=1e-5)
    assert set(patch_conv.state_dict()) == {"weight", "bias"} and set(norm.state_dict()) == {"weight", "bias"}


def test_parameter_groups_split_every_parameter_once_by_part():
    model = StepForSemanticSegmentation(tiny_config(partition_source="policy"))
    groups = model.parameter_groups()
    names = [name for group in groups.values() for name in group]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())  # each exactly once
    assert all(name.startswith("step.policy.") for name in groups["policy"]) and groups["policy"]
    assert all(name.startswith("step.exit_heads.") for name in groups["exit_heads"]) and groups["exit_heads"]
    assert all(name.startswith("decoder.") for name in groups["decoder"]) and groups["decoder"]
    assert "step.cls_token" in groups["encoder"] and "step.blocks.0.attn.qkv.weight" in groups["encoder"]
    encoder_groups = model.step.parameter_groups()
    assert encoder_groups["decoder"] == [] and "policy.heads.2.weight" in encoder_groups["policy"]


def test_a_model_saved_by_the_earlier_layout_loads_and_gives_the_same_outputs():
    """Saved before the encoder's state, the exits and the fast operators moved into their own modules (policy
    partitions of unequal sizes, tokens halted at both exits)."""
    folder = Path(__file__).parent / "fixtures" / "step_tiny_9bd5012"
    expected = load_file(folder / "expected_outputs.safetensors")
    for load in (StepForSemanticSegmentation, AutoModelForSemanticSegmentation):
        loaded = load.from_pretrained(folder)
        with torch.no_grad():
            outputs = loaded.eval()(expected["pixel_values"])
        assert torch.equal(outputs.superpatch_map, expected["superpatch_map"])
        assert torch.equal(outputs.exit_map, expected["exit_map"]) and (outputs.exit_map < 3).any()
        torch.testing.assert_close(outputs.logits, expected["logits"], rtol=1e-5, atol=1e-6)
