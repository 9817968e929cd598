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
    before = config.settings
    with pytest.raises(ValueError, match="consecutive powers of two"):
        config.update_settings(partition_source="policy", token_budget=10)  # sizes 2, 8 cannot give a budget
    with pytest.raises(ValueError, match="at least one exit"):
        tiny_config(exit_layers=[], exit_thresholds=[]).update_settings(halting=True)
    with pytest.raises(ValueError, match="cannot change on a built model"):
        config.update_settings(hidden_size=64)
    assert config.settings == before
    larger_inputs = tiny_config()  # a 4x4 stored grid: a budget is checked against each input's grid instead
    larger_inputs.update_settings(partition_source="policy", token_budget=17)
    assert larger_inputs.token_budget == 17
    config.update_settings(halting=True, exit_thresholds=(0.5,))
    assert config.halting and config.exit_thresholds == [0.5]


def test_forward_settings_override_the_saved_ones_for_one_call_only():
    config = tiny_config(exit_layers=[1], exit_thresholds=[0.255], exit_keep_topk_per_class=0)
    model = StepForSemanticSegmentation(config).eval()
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        halted = model(pixels, halting=True)
        plain = model(pixels)
    assert not model.config.halting and plain.exit_map is None and not plain.run.halting  # the saved default
    assert halted.halted_share.sum() > 0 and (halted.exit_map == 1).any()
    with pytest.raises(ValueError, match="attention_mode"):
        model(pixels, attention_mode="sparse")
    with pytest.raises(ValueError, match="at least one exit"):
        StepForSemanticSegmentation(tiny_config(exit_layers=[], exit_thresholds=[]))(pixels, halting=True)


@pytest.mark.parametrize("depth, exits", [(12, [6, 8]), (24, [8, 16]), (6, [3, 4]), (18, [9, 12]), (32, [10, 21]),
                                          (3, [1, 2]), (2, [1]), (1, [])])
def test_default_exit_placement_follows_dtop(depth, exits):
    """DToP's blocks 6 and 8 of 12 and 8 and 16 of 24; other depths by the rule the docstring states."""
    assert tiny_config(num_hidden_layers=depth).exit_layers == exits


def test_configs_saved_before_the_exit_rules_load_with_the_rules_they_ran_with(tmp_path):
    """A saved configuration without `exit_keep_rule` / `exit_merge` is an older one: it gets the class-column rule
    and logit merging it ran with; a new one keeps what it saved, and new configurations get DToP's rules."""
    import json

    assert (tiny_config().exit_keep_rule, tiny_config().exit_merge) == ("predicted_class", "probabilities")
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert StepConfig.from_pretrained(tmp_path).exit_keep_rule == "predicted_class"
    for field in ("exit_keep_rule", "exit_merge"):
        del saved[field]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = StepConfig.from_pretrained(tmp_path)
    assert (old.exit_keep_rule, old.exit_merge) == ("class_column", "logits")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(exit_head_type="conv"), "exit_head_type"),
        (dict(exit_keep_rule="per_column"), "exit_keep_rule"),
        (dict(exit_merge="average"), "exit_merge"),
        (dict(exit_head_type="atm", exit_merge="logits"), "needs MLP exit heads"),
        (dict(exit_head_type="atm", exit_hidden_size=48, exit_num_attention_heads=5), "divisible"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(drop_path_rate=-0.1), "drop_path_rate"),
    ],
)
def test_bad_exit_and_drop_path_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_drop_path_drops_whole_images_in_training_only():
    """Per image, not per row of the packed sequence: every row of an image is dropped or scaled by 1 / (1 - rate)
    together; the rate rises linearly over the blocks; evaluation never drops."""
    from step_hf.modeling_step import drop_path
    from step_hf.token_layout import PackedBatch

    torch.manual_seed(0)
    batch = PackedBatch.of([3, 5, 1, 4] * 25, "cpu")
    branch = torch.ones(sum(batch.host_lengths), 2)
    dropped = drop_path(branch, batch, 0.5, training=True)
    per_image = [rows.unique() for rows in dropped.split(list(batch.host_lengths))]
    assert all(len(values) == 1 and float(values) in (0.0, 2.0) for values in per_image)
    kept = sum(float(values) == 2.0 for values in per_image)
    assert 30 < kept < 70  # about half of 100 images
    assert torch.equal(drop_path(branch, batch, 0.5, training=False), branch)
    model = StepForSemanticSegmentation(tiny_config(num_hidden_layers=3, drop_path_rate=0.2)).eval()
    assert [block.drop_path_rate for block in model.step.blocks] == pytest.approx([0.0, 0.1, 0.2])
    plain = StepForSemanticSegmentation(tiny_config(num_hidden_layers=3)).eval()
    plain.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, plain(pixels).logits)
