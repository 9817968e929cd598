import pytest

from step_hf import StepConfig
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
