import pytest
import torch

from step_hf import StepConfig, StepForSemanticSegmentation
from step_hf.configuration_step import VIT_PRESETS

from .conftest import tiny_config


def test_json_round_trip(tmp_path):
    config = tiny_config(image_size=[64, 96])
    config.save_pretrained(tmp_path)
    loaded = StepConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.id2label == config.id2label and loaded.image_grid_size == (4, 6)


@pytest.mark.parametrize(
    "preset, sizes",
    [("tiny", (192, 3, 12, 768)), ("small", (384, 6, 12, 1536)), ("base", (768, 12, 12, 3072)),
     ("vit-large", (1024, 16, 24, 4096))],
)
def test_presets(preset, sizes):
    config = StepConfig.from_preset(preset, num_labels=19)
    got = (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.intermediate_size)
    assert got == sizes
    assert config.num_labels == 19
    assert config.decoder_hidden_size == config.hidden_size  # Segmenter's default: decoder as wide as encoder
    assert config.decoder_num_attention_heads == config.hidden_size // 64


def test_preset_overrides_and_unknown():
    assert StepConfig.from_preset("small", image_size=1024, hidden_dropout_prob=0.1).image_size == 1024
    assert set(VIT_PRESETS) == {"tiny", "small", "base", "large"}
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        StepConfig.from_preset("huge")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=100, num_attention_heads=3), "hidden_size"),
        (dict(decoder_hidden_size=30, decoder_num_attention_heads=4), "decoder_hidden_size"),
        (dict(image_size=500), "image_size"),
        (dict(image_size=[64, 72]), "image_size"),
        (dict(id2label={}, label2id={}), "id2label"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(patch_size=0), "patch_size"),
        (dict(semantic_loss_ignore_index=2), "semantic_loss_ignore_index"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_run_time_settings_are_checked_again_when_changed_and_nothing_changes_on_error():
    config = tiny_config(superpatch_sizes=[2, 8], exit_layers=[1])
    before = config.settings()
    with pytest.raises(ValueError, match="consecutive powers of two"):
        config.update_settings(partition_source="policy", token_budget=10)  # sizes 2, 8 cannot give a budget
    with pytest.raises(ValueError, match="at least one exit"):
        tiny_config(exit_layers=[], exit_thresholds=[]).update_settings(halting=True)
    with pytest.raises(ValueError, match="cannot change on a built model"):
        config.update_settings(hidden_size=64)
    assert config.settings() == before
    config.update_settings(halting=True, exit_thresholds=(0.5,))
    assert config.halting and config.exit_thresholds == [0.5]


def test_forward_settings_override_the_saved_ones_for_one_call_only():
    config = tiny_config(exit_layers=[1], exit_thresholds=[0.255], exit_keep_topk_per_class=0)
    model = StepForSemanticSegmentation(config).eval()
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        halted = model(pixels, halting=True)
        plain = model(pixels)
    assert not model.config.halting and (plain.exit_map == 2).all()  # the saved default: no halting
    assert halted.halted_share.sum() > 0 and (halted.exit_map == 1).any()
    with pytest.raises(ValueError, match="attention_mode"):
        model(pixels, attention_mode="sparse")
    with pytest.raises(ValueError, match="at least one exit"):
        StepForSemanticSegmentation(tiny_config(exit_layers=[], exit_thresholds=[]))(pixels, halting=True)
