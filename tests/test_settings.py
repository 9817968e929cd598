"""Run-time settings as a value: `StepSettings`, per-call settings on one shared model, outputs that say what ran."""

import copy
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from step_hf import StepForSemanticSegmentation, StepImageProcessor, StepSettings
from step_hf.accounting import analytic_flops, flops_per_image
from step_hf.configuration_step import RUN_SETTINGS, resolve_settings

from .conftest import tiny_config

PIXELS = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
# Settings a server might take per request, over a model with a policy and one exit: each changes the output.
REQUESTS = [
    {},
    {"partition_source": "dense"},
    {"policy_thresholds": [0.48] * 4},
    {"policy_thresholds": [0.49] * 4, "halting": True, "exit_thresholds": [0.26]},
    {"token_budget": 12},
    {"token_budget": 15, "halting": True, "exit_keep_tokens": [9]},
    {"halting": True, "exit_thresholds": [0.26], "attention_mode": "padded"},
    {"partition_source": "dense", "halting": True, "exit_thresholds": [0.26]},
]


@pytest.fixture(scope="module")
def model() -> StepForSemanticSegmentation:
    torch.manual_seed(0)
    config = tiny_config(partition_source="policy", policy_thresholds=[0.5] * 4, exit_layers=[1],
                         exit_thresholds=[0.3], exit_keep_topk_per_class=0)
    return StepForSemanticSegmentation(config).eval()


def test_settings_are_a_frozen_checked_value():
    settings = StepSettings(policy_thresholds=[0.5, 0.6], exit_keep_tokens=[3])
    assert settings.policy_thresholds == (0.5, 0.6) and settings.exit_keep_tokens == (3,)  # hashable tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.halting = True
    assert settings.replace(halting=True).halting and not settings.halting
    assert StepSettings(**settings.to_dict()) == settings and set(settings.to_dict()) == set(RUN_SETTINGS)
    for bad, message in [
        (dict(partition_source="random"), "partition_source"),
        (dict(attention_mode="nested"), "attention_mode"),
        (dict(halting="yes"), "halting"),
        (dict(policy_thresholds=[1.5]), "policy_thresholds"),
        (dict(exit_thresholds=[0.0]), "exit_thresholds"),
        (dict(exit_keep_tokens=[0]), "exit_keep_tokens"),
        (dict(token_budget=12.5), "token_budget"),
        (dict(exit_keep_topk_per_class=-1), "exit_keep_topk_per_class"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            StepSettings(**bad)
    with pytest.raises(ValueError, match="did you mean 'exit_thresholds'"):
        settings.replace(exit_threshold=0.5)


def test_settings_are_checked_against_the_architecture_where_they_meet_a_model(model):
    config = model.config
    assert config.settings == StepSettings(**{name: getattr(config, name) for name in RUN_SETTINGS})
    for overrides, message in [
        ({"policy_thresholds": [0.5]}, "one per size"),
        ({"exit_thresholds": [0.5, 0.5]}, "one per exit"),
        ({"exit_keep_tokens": [3, 3]}, "per exit"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_settings(config, overrides)
        with pytest.raises(ValueError, match=message):
            model(PIXELS[:1], settings=overrides)
    no_exits = tiny_config(exit_layers=[], exit_thresholds=[])
    with pytest.raises(ValueError, match="at least one exit"):
        resolve_settings(no_exits, StepSettings(halting=True))
    # Thresholds left None are the model's saved ones.
    assert resolve_settings(config, StepSettings()).exit_thresholds == (0.3,)


def test_a_value_a_dict_and_names_give_the_same_call_and_the_config_never_changes(model):
    saved = copy.deepcopy(model.config.to_dict())
    with torch.no_grad():
        by_dict = model(PIXELS, settings={"halting": True, "token_budget": 12})
        by_value = model(PIXELS, settings=model.config.settings.replace(halting=True, token_budget=12))
        by_name = model(PIXELS, halting=True, token_budget=12)
        default = model(PIXELS)
    for other in (by_value, by_name):
        assert torch.equal(other.logits, by_dict.logits) and torch.equal(other.exit_map, by_dict.exit_map)
    assert by_dict.run.settings.token_budget == 12 and (by_dict.token_counts == 12).all()
    assert default.run.settings == model.config.settings and not torch.equal(default.logits, by_dict.logits)
    assert model.config.to_dict() == saved


@pytest.mark.parametrize("forward", ["segmenter", "encoder"])
def test_unknown_forward_arguments_are_refused_with_the_closest_name(model, forward):
    call = model if forward == "segmenter" else model.step
    with pytest.raises(TypeError, match="'partiton_source'.*did you mean 'partition_source'"):
        call(PIXELS[:1], partiton_source="oracle")
    with pytest.raises(TypeError, match="'exit_threshold'.*did you mean 'exit_thresholds'"):
        call(PIXELS[:1], exit_threshold=0.5)
    with pytest.raises(ValueError, match="did you mean 'halting'"):
        call(PIXELS[:1], settings={"haltng": True})


def test_outputs_say_what_ran(model):
    with torch.no_grad():
        dense = model(PIXELS, partition_source="dense")
        policy = model(PIXELS)
        halting = model(PIXELS, halting=True)
        oracle_map = model(PIXELS, superpatch_map=policy.superpatch_map)
    assert dense.run.embedded_sides == (1,) and not dense.run.policy_ran and not dense.run.exits_ran
    assert policy.run.embedded_sides == (1, 2, 4, 8, 16) and policy.run.policy_ran
    assert not oracle_map.run.policy_ran  # a caller's partition: the policy is not needed
    assert policy.exit_map is None and policy.halted_share is None and not policy.run.halting
    assert halting.run.halting and halting.run.exits_ran and halting.exit_map is not None
    model.train()
    try:  # training runs the exits for their deep supervision, but nothing halts
        trained = model(PIXELS, labels=torch.zeros(3, 64, 96, dtype=torch.long))
        trained_state = model.step(PIXELS, return_encoder_state=True)[1]
    finally:
        model.eval()
    assert trained.run.exits_ran and not trained.run.halting and trained.exit_map is None
    assert trained_state.exit_predictions is not None


def test_flops_are_read_from_the_output(model):
    with torch.no_grad():
        outputs = {name: model(PIXELS, **settings) for name, settings in
                   [("dense", {"partition_source": "dense"}), ("policy", {}), ("halting", {"halting": True})]}
    for name, output in outputs.items():
        counts = output.token_counts.tolist()
        halted = output.halted_share.tolist() if output.halted_share is not None else None
        expected = []
        for image, count in enumerate(counts):
            survivors = None if halted is None else [[count - round(halted[image][0] * count)]]
            expected.append(analytic_flops(model.config, (64, 96), [count], list(output.run.embedded_sides),
                                           policy_ran=output.run.policy_ran, exit_survivors=survivors,
                                           exits_ran=output.run.exits_ran)["total"])
        assert flops_per_image(model.config, (64, 96), output) == expected, name
    policy_part = {name: flops_per_image(model.config, (64, 96), output, "policy") for name, output in outputs.items()}
    assert policy_part["dense"] == [0, 0, 0] and min(policy_part["policy"]) > 0


def test_training_stages_choose_what_trains_not_the_saved_settings(model):
    trainee = copy.deepcopy(model)
    before = trainee.config.settings
    for stage in ("policy", "segmenter", "prune", "all"):
        trainee.set_training_stage(stage)
        assert trainee.config.settings == before


def sequential_and_threaded(call, requests: list, threads: int = 4) -> tuple[list, list]:
    """Each request's result run one after another, then the same requests (repeated, shuffled) from `threads`
    threads at once."""
    sequential = [call(request) for request in requests]
    order = [index for _ in range(3) for index in np.random.default_rng(0).permutation(len(requests))]
    with ThreadPoolExecutor(threads) as pool:
        threaded = list(pool.map(lambda index: (index, call(requests[index])), order))
    return sequential, threaded


def test_one_model_serves_threads_with_different_settings_exactly_as_one_at_a_time(model):
    saved = copy.deepcopy(model.config.to_dict())

    def call(settings):
        with torch.no_grad():
            output = model(PIXELS, settings=settings)
        halted = output.halted_share if output.halted_share is not None else torch.zeros(0)
        return output.logits, output.token_counts, halted, output.run.settings

    sequential, threaded = sequential_and_threaded(call, REQUESTS)
    assert len({result[0].numpy().tobytes() for result in sequential}) == len(REQUESTS)  # each request differs
    for index, result in threaded:
        expected = sequential[index]
        assert result[3] == expected[3]
        for got, want in zip(result[:3], expected[:3]):
            assert torch.equal(got, want), REQUESTS[index]
    assert model.config.to_dict() == saved


def test_one_pipeline_serves_threads_with_different_settings(model, tmp_path):
    model.save_pretrained(tmp_path)
    StepImageProcessor(size={"height": 64, "width": 96}, num_labels=4).save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8))

    def call(settings):
        return [(segment["label"], np.array(segment["mask"]).tobytes()) for segment in segmenter(image, settings=settings)]

    requests = [{"partition_source": "dense"}, {"policy_thresholds": [0.0] * 4}, {"token_budget": 6},
                {"halting": True, "exit_thresholds": [0.26]}]
    sequential, threaded = sequential_and_threaded(call, requests)
    assert len({str(result) for result in sequential}) > 1  # the settings reach the model
    for index, result in threaded:
        assert result == sequential[index], requests[index]
    # The pipeline's settings equal the model's: the same map as the model called with them.
    processor = StepImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        outputs = segmenter.model(**processor(image, return_tensors="pt"), settings=requests[2])
    class_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(60, 90)])[0].numpy()
    for label, mask in sequential[2]:
        label_id = segmenter.model.config.label2id[label]
        assert (np.frombuffer(mask, dtype=np.uint8).reshape(60, 90) > 0).tolist() == (class_map == label_id).tolist()


def test_pipeline_settings_of_a_model_that_takes_none_are_refused():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], num_attention_heads=[1],
                             decoder_hidden_size=8, num_labels=2)
    segmenter = pipeline("image-segmentation", model=SegformerForSemanticSegmentation(config).eval(),
                         image_processor=SegformerImageProcessor(size={"height": 32, "width": 32}))
    image = Image.new("RGB", (40, 30))
    assert len(segmenter(image)) >= 1  # the pipeline of every other model is unchanged
    with pytest.raises(ValueError, match="does not take them"):
        segmenter(image, settings={"halting": True})
