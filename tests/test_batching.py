"""Packed, padded and one-image-at-a-time forwards give the same logits; the token-budget mode has static shapes."""

import dataclasses

import pytest
import torch

from step_hf import StepForSemanticSegmentation
from step_hf.token_layout import PackedBatch, packed_attention

from .conftest import tiny_config

PIXELS = torch.randn(4, 3, 64, 96, generator=torch.Generator().manual_seed(2))


def opinionated(**overrides) -> StepForSemanticSegmentation:
    """A random model whose policy and exit heads make varied decisions, so that images keep different counts."""
    fields = dict(num_hidden_layers=4, exit_layers=[1, 2], exit_thresholds=[0.5, 0.45], exit_keep_topk_per_class=1,
                  partition_source="policy", policy_thresholds=[0.45] * 4)
    fields.update(overrides)
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(**fields)).eval()
    for head in [*model.step.policy.heads.values(), *(h.fc2 for h in model.step.exit_heads)]:
        head.weight.data.normal_(0, 1.5)
    return model


@pytest.mark.parametrize("halting", [False, True])
def test_packed_padded_and_per_image_agree_on_mixed_batches(halting):
    model = opinionated(halting=halting)
    with torch.no_grad():
        packed = model(PIXELS, attention_mode="packed")
        padded = model(PIXELS, attention_mode="padded").logits
        single = torch.cat([model(image[None], attention_mode="packed").logits for image in PIXELS])
    counts = packed.token_counts.tolist()
    assert len(set(counts)) > 1, counts  # a mixed batch
    if halting:
        assert 0 < packed.halted_share.sum() and len({tuple(s) for s in packed.halted_share.tolist()}) > 1
    torch.testing.assert_close(packed.logits, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.logits, single, rtol=1e-5, atol=1e-5)


def test_token_budget_has_static_shapes_and_compiles_whole():
    model = opinionated(token_budget=13, halting=False)
    with torch.no_grad():
        eager = model(PIXELS)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(PIXELS)  # fails on any graph break
    assert eager.token_counts.tolist() == [12] * 4  # 24 cells: 12 is the reachable count at or below 13
    assert torch.equal(compiled.logits, eager.logits)


def test_invalid_attention_mode():
    with pytest.raises(ValueError, match="attention_mode"):
        tiny_config(attention_mode="nested")


def test_layout_batch_carries_the_configured_mode():
    model = opinionated(attention_mode="padded")
    with torch.no_grad():
        layout = model.step(PIXELS[:1], return_encoder_state=True)[1].layout
    assert layout.batch.attention_mode == "padded"
    assert dataclasses.is_dataclass(layout.batch)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_packed_attention_gradients_equal_padded(device):
    """Training backpropagates through packed attention (the varlen kernel on CUDA in half precision, one call per
    image elsewhere): its outputs and gradients must equal those of padded attention with a key mask."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(14, 2, 64, generator=generator).to(device, dtype).requires_grad_() for _ in range(3)]
    results = {}
    for mode in ("packed", "padded"):
        out = packed_attention(*inputs, PackedBatch.of([5, 9], device, mode))
        results[mode] = [out, *torch.autograd.grad(out.float().square().sum(), inputs)]
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-5
    for packed, padded in zip(results["packed"], results["padded"]):
        torch.testing.assert_close(packed.float(), padded.float(), rtol=tolerance, atol=tolerance)
