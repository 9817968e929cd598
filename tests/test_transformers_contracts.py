"""The contracts of a `transformers` model that STEP keeps: big-model inference with offloading, gradient
checkpointing, input embeddings for PEFT, batch-first outputs with attentions, attention implementations,
`torch.export` of every configuration (eager's output fields and values), `transformers.Trainer` and LoRA adapters."""

import tempfile

import pytest
import torch

from step_hf import StepForSemanticSegmentation

from .cases import output_leaves
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


@pytest.mark.parametrize("fields", [dict(), dict(partition_source="policy", exit_layers=[1], halting=True)])
def test_models_build_on_the_meta_device_and_materialise(fields):
    """As sharded training sets a model up (FSDP2's `fully_shard` after building on the meta device): no parameter
    or buffer holds data until `to_empty`, and `init_weights` then gives a working model. Drop path's per-block
    rates, set at construction, rise linearly from 0 to the rate."""
    config = tiny_config(num_hidden_layers=3, drop_path_rate=0.2, **fields)
    with torch.device("meta"):
        model = StepForSemanticSegmentation(config)
    assert all(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    assert [block.drop_path_rate for block in model.step.blocks] == pytest.approx([0.0, 0.1, 0.2])
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.step.norm.weight, torch.ones(32)) and torch.equal(model.step.norm.bias, torch.zeros(32))
    torch.testing.assert_close(model.step.pos_embed.std(), torch.tensor(config.initializer_range), rtol=0.2, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(PIXELS).logits).all()


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


def halting_model(**overrides) -> StepForSemanticSegmentation:
    """Policy partitions of unequal sizes and tokens halting at the first exit: padding and absent tokens matter."""
    torch.manual_seed(0)
    fields = dict(partition_source="policy", policy_thresholds=[0.75] * 4, exit_layers=[1], halting=True,
                  exit_thresholds=[0.255], exit_keep_topk_per_class=0)
    model = StepForSemanticSegmentation(tiny_config(**{**fields, **overrides})).eval()
    for head in model.step.policy.heads.values():
        head.weight.data.normal_(0, 1.5)
    return model


def test_encoder_outputs_are_batch_first_with_the_class_token_first_and_padding_masked():
    model = halting_model()
    pixels = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output, state = model.step(pixels, output_hidden_states=True, output_attentions=True, return_encoder_state=True)
        as_tuple = model.step(pixels, return_dict=False)
    counts = output.token_counts.tolist()
    assert len(set(counts)) > 1 and state.survivors.batch.host_lengths != tuple(counts)  # unequal, some halted
    size = 1 + max(counts)
    assert output.last_hidden_state.shape == (3, size, 32)
    torch.testing.assert_close(as_tuple[0], output.last_hidden_state)  # (eager weights above, SDPA here)
    assert output.sequence_mask.sum(1).tolist() == [1 + n for n in state.survivors.batch.host_lengths]
    # Position p >= 1 of image b is layout token offsets[b] + p - 1: the packed final features land there.
    for token, row in zip(state.survivors.index.tolist(), state.tokens):
        image = int(state.layout.image_index[token])
        position = 1 + token - int(state.layout.batch.offsets[image])
        assert output.sequence_mask[image, position] and torch.equal(output.last_hidden_state[image, position], row)
    assert torch.equal(output.last_hidden_state[:, 0], state.class_tokens)
    assert (output.last_hidden_state[output.sequence_mask == 0] == 0).all()
    assert len(output.hidden_states) == 3 and len(output.attentions) == 2
    for weights, present in zip(output.attentions, (torch.arange(size) <= torch.tensor(counts)[:, None],
                                                    output.sequence_mask.bool())):
        assert weights.shape == (3, 2, size, size)
        torch.testing.assert_close(weights.sum(-1), present[:, None, :].float().expand(-1, 2, -1))  # rows sum to 1
        assert (weights[~present[:, None, None, :].expand_as(weights)] == 0).all()  # nothing attends to absent keys


def test_hidden_states_and_attentions_are_on_the_computation_path():
    """As the library's common tests require: a gradient from the output reaches the returned hidden states and
    attention weights (they are the tensors the model computes with, not copies)."""
    model = halting_model()
    output = model.step(torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(7)),
                        output_hidden_states=True, output_attentions=True)
    hidden, weights = output.hidden_states[0], output.attentions[0]
    hidden.retain_grad()
    weights.retain_grad()
    output.last_hidden_state[output.sequence_mask.bool()].sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert weights.grad is not None and weights.grad.abs().sum() > 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_implementations_load_and_agree(tmp_path, implementation):
    model = halting_model(attention_mode="padded")
    model.save_pretrained(tmp_path)
    loaded = StepForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert loaded.config._attn_implementation == implementation
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=1e-5, atol=1e-5)
        with_weights = loaded(pixels, output_attentions=True)
    torch.testing.assert_close(with_weights.logits, model(pixels).logits, rtol=1e-5, atol=1e-5)
    assert with_weights.attentions[0].shape[:2] == (2, 2)
    other = "eager" if implementation == "sdpa" else "sdpa"
    loaded.set_attn_implementation(other)  # after loading, too
    assert loaded.config._attn_implementation == other
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=1e-5, atol=1e-5)


def test_transformers_trainer_fine_tunes_saves_and_reloads(tmp_path, scene_dataset):
    from datasets import load_dataset
    from transformers import Trainer, TrainingArguments

    from step_hf import StepImageProcessor

    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(partition_source="oracle", num_labels=6,
                                                    id2label={i: str(i) for i in range(6)}))
    processor = StepImageProcessor(size={"height": 64, "width": 64}, superpatch_sizes=model.config.superpatch_sizes)
    dataset = load_dataset(str(scene_dataset), split="train")

    def transform(batch):  # the processor's labels and superpatch targets, as with SegFormer
        return dict(processor(batch["image"], segmentation_maps=batch["label"], return_tensors="pt"))

    dataset.set_transform(transform)
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                                  learning_rate=2e-3, logging_steps=1, report_to=[], save_strategy="no",
                                  remove_unused_columns=False, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # the loss falls
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = StepForSemanticSegmentation.from_pretrained(tmp_path / "saved").eval()
    inputs = processor(dataset.with_format(None)[0]["image"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs, partition_source="dense").logits,
                                   model.eval()(**inputs, partition_source="dense").logits)


# What `transformers`' `ExportTesterMixin` checks (`test_torch_export_static` / `_dynamic`; the sdist lacks its file):
# the program's outputs have eager's fields and values, for every configuration.
EXPORTED = {
    "dense": dict(),
    "dense + halting": dict(exit_layers=[1], halting=True, exit_thresholds=[0.3]),
    "policy thresholds": dict(partition_source="policy"),
    "policy thresholds + halting": dict(partition_source="policy", exit_layers=[1], halting=True,
                                        exit_thresholds=[0.3]),
    "token budget and fixed exit counts": dict(partition_source="policy", token_budget=12, exit_layers=[1],
                                               halting=True, exit_keep_tokens=[6]),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic batch"])
@pytest.mark.parametrize("name", EXPORTED)
def test_torch_export_gives_eager_outputs_field_for_field(name, dynamic):
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(**EXPORTED[name])).eval()  # default superpatch sizes
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    shapes = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=8)}} if dynamic else None
    program = torch.export.export(model, (), {"pixel_values": pixels}, dynamic_shapes=shapes)
    other = torch.randn(3 if dynamic else 2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        exported, eager = output_leaves(program.module()(pixel_values=other)), output_leaves(model(other))
    assert sorted(exported) == sorted(eager)
    for field, value in eager.items():
        torch.testing.assert_close(exported[field], value, rtol=1e-5, atol=1e-5, msg=field)


def test_lora_adapters_on_the_attention_projections_train_with_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config()).train()
    frozen = {name: value.clone() for name, value in model.state_dict().items()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*blocks\.\d+\.attn\.(qkv|proj)")
    model = peft.get_peft_model(model, lora)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(10):
        loss = model(pixel_values=PIXELS, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = model.merge_and_unload().state_dict()
    changed = [name for name in frozen if not torch.equal(merged[name], frozen[name])]
    assert changed and all(".attn." in name for name in changed)  # only the adapted projections moved


def test_the_dense_model_exports_to_onnx_and_onnxruntime_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")

    class Logits(torch.nn.Module):  # ONNX graphs return tensors: the logits
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values).logits

    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config()).eval()
    torch.onnx.export(Logits(model), (torch.randn(2, 3, 64, 96),), str(tmp_path / "step.onnx"), dynamo=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "step.onnx"))
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    (logits,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(pixels).logits, rtol=1e-4, atol=1e-4)
