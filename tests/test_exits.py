import pytest
import torch

from step_hf import StepForSemanticSegmentation
from step_hf.accounting import analytic_flops, count_flops
from step_hf.exits import keep_topk_per_class
from step_hf.token_layout import PackedBatch, unshare

from .conftest import tiny_config


def exit_model(**overrides) -> StepForSemanticSegmentation:
    """Four blocks, exits after blocks 1 and 2, heads with strong opinions so that some tokens halt."""
    fields = dict(num_hidden_layers=4, exit_layers=[1, 2], exit_thresholds=[0.5, 0.45], halting=True,
                  exit_keep_topk_per_class=1)
    fields.update(overrides)
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(**fields)).eval()
    for head in model.step.exit_heads:
        head.fc2.weight.data.normal_(0, 2.0)
    return model


PIXELS = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def test_thresholds_of_one_give_exactly_the_model_without_exits():
    halting = exit_model(exit_thresholds=[1.0, 1.0])
    plain = exit_model(halting=False)
    plain.load_state_dict(halting.state_dict())
    with torch.no_grad():
        a, b = halting(PIXELS), plain(PIXELS)
    assert torch.equal(a.logits, b.logits)
    assert (a.exit_map == 4).all() and (a.halted_share == 0).all()


def test_halted_cells_carry_exit_logits_and_survivors_decoder_logits():
    model = exit_model()
    with torch.no_grad():
        output = model(PIXELS)
        encoded = model.step(PIXELS).encoder_state
        decoder_logits = model.decoder(encoded.tokens, encoded.survivors.batch)
    shares = output.halted_share
    assert (shares.sum(1) > 0).all() and (shares.sum(1) < 1).all()  # some, not all, tokens halt
    layout = output.encoder_state.layout
    for exit_number, layer in enumerate(model.config.exit_layers):
        halted = output.exit_map == layer
        expected = unshare(encoded.exit_logits[exit_number], layout)
        assert torch.equal(output.logits.permute(0, 2, 3, 1)[halted], expected.permute(0, 2, 3, 1)[halted])
    survivors = torch.zeros(layout.num_tokens, decoder_logits.shape[1]).index_copy(
        0, encoded.survivors.index, decoder_logits)
    alive = output.exit_map == 4
    expected = unshare(survivors, layout).permute(0, 2, 3, 1)[alive]
    torch.testing.assert_close(output.logits.permute(0, 2, 3, 1)[alive], expected)


def test_later_blocks_process_exactly_the_surviving_tokens():
    model = exit_model()
    seen = []
    hooks = [block.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
             for block in model.step.blocks]
    with torch.no_grad():
        output = model(PIXELS)
    for hook in hooks:
        hook.remove()
    exit_layer = output.encoder_state.survivors.exit_layer
    total = output.token_counts.sum().item()
    after_first = total - int((exit_layer == 1).sum())
    after_second = after_first - int((exit_layer == 2).sum())
    assert after_second < after_first < total
    assert seen == [total + 3, after_first + 3, after_second + 3, after_second + 3]  # + one class token per image


def test_keep_topk_per_class_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 12]
    probabilities = torch.rand(sum(lengths), 3, generator=generator).softmax(-1)
    batch = PackedBatch.of(lengths, "cpu")
    for k in (0, 1, 2, 5):
        keep = keep_topk_per_class(probabilities, batch, k)
        expected, start = torch.zeros_like(keep), 0
        for length in lengths:
            for label in range(3):
                top = probabilities[start:start + length, label].topk(min(k, length)).indices
                expected[start + top] = True
            start += length
        assert torch.equal(keep, expected)


def test_topk_per_class_tokens_stay_in():
    model = exit_model(exit_keep_topk_per_class=2, exit_thresholds=[0.3, 0.3])
    with torch.no_grad():
        encoded = model.step(PIXELS).encoder_state
    layout = encoded.layout
    probabilities = encoded.exit_logits[0].softmax(-1)  # the first exit saw every token
    for image in range(3):
        tokens = (layout.image_index == image).nonzero()[:, 0]
        for label in range(4):
            top = tokens[probabilities[tokens, label].topk(2).indices]
            assert (encoded.survivors.exit_layer[top] > 1).all()


def test_gradients_reach_exit_heads_and_modes_agree():
    for halting in (False, True):
        model = exit_model(halting=halting).train()
        labels = torch.randint(0, 4, (3, 64, 96))
        output = model(PIXELS, labels=labels)
        assert output.exit_loss is not None
        output.loss.backward()
        for head in model.step.exit_heads:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    model = exit_model()
    with torch.no_grad():
        eval_map = model.eval()(PIXELS).exit_map
        train_map = model.train()(PIXELS).exit_map
    assert torch.equal(eval_map, train_map)


def test_exits_with_supertokens_and_batching():
    model = exit_model(partition_source="policy", policy_thresholds=[0.45] * 4)
    for head in model.step.policy.heads.values():
        head.weight.data.normal_(0, 1)
    with torch.no_grad():
        output = model(PIXELS)
        singles = [model(image[None]) for image in PIXELS]
    assert (output.token_counts < 24).all()  # supertokens present
    layout = output.encoder_state.layout
    halted_sizes = layout.block_side[output.encoder_state.survivors.exit_layer < 4]
    assert (halted_sizes > 1).any()  # supertokens halt too
    for token in range(layout.num_tokens):  # one exit block per superpatch
        b, r, c, s = (int(x[token]) for x in (layout.image_index, layout.cell_row, layout.cell_col, layout.block_side))
        block = output.exit_map[b, r:r + s, c:c + s]
        assert (block == block[0, 0]).all()
    torch.testing.assert_close(output.logits, torch.cat([s.logits for s in singles]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.halted_share, torch.cat([s.halted_share for s in singles]))
    exit_layer = output.encoder_state.survivors.exit_layer
    for image in range(3):
        mine = exit_layer[layout.image_index == image]
        expected = [float((mine == layer).float().mean()) for layer in (1, 2)]
        torch.testing.assert_close(output.halted_share[image], torch.tensor(expected))


def test_exit_flops_match_the_analytic_formula():
    model = exit_model()
    with torch.no_grad():
        encoded = model.step(PIXELS)
    exit_layer = encoded.encoder_state.survivors.exit_layer
    counts = encoded.token_counts.tolist()
    survivors, alive = [], list(counts)
    for layer in (1, 2):
        alive = [alive[i] - int(((exit_layer == layer) & (encoded.encoder_state.layout.image_index == i)).sum())
                 for i in range(3)]
        survivors.append(alive)
    counted = count_flops(model, pixel_values=PIXELS)
    expected = analytic_flops(model.config, (64, 96), counts, [1], policy_ran=False, exit_survivors=survivors,
                              exits_ran=True)
    assert counted == expected and counted["exits"] > 0


def test_exit_heads_cost_under_three_percent_of_vit_large():
    from step_hf import StepConfig

    config = StepConfig.from_preset("large", image_size=1024, num_labels=19)
    flops = analytic_flops(config, (1024, 1024), [4096], [1], policy_ran=False, exits_ran=True)
    assert flops["exits"] < 0.03 * flops["encoder"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(exit_layers=[2, 1]), "exit_layers"),
        (dict(exit_layers=[2]), "exit_layers"),  # after the last block
        (dict(exit_layers=[0]), "exit_layers"),
        (dict(exit_layers=[1], exit_thresholds=[0.9, 0.9]), "exit_thresholds"),
        (dict(exit_layers=[1], exit_thresholds=[0.0]), "positive"),
        (dict(exit_keep_topk_per_class=-1), "exit_keep_topk_per_class"),
        (dict(exit_layers=[1], exit_thresholds=[0.9], exit_keep_tokens=[5, 3]), "exit_keep_tokens"),
        (dict(exit_layers=[1], exit_thresholds=[0.9], exit_keep_tokens=[0]), "exit_keep_tokens"),
        (dict(exit_layers=[], exit_thresholds=[], halting=True), "halting"),
    ],
)
def test_bad_exit_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_fixed_exit_counts_equal_the_thresholds_that_keep_as_many():
    """Keeping k tokens per exit halts what a threshold halts when k is the count that threshold keeps: the
    protected top-k per class, then the least confident."""
    by_threshold = exit_model()
    with torch.no_grad():
        reference = by_threshold(PIXELS[:1])
        exit_layer = by_threshold.step(PIXELS[:1]).encoder_state.survivors.exit_layer
    kept = [int((exit_layer > layer).sum()) for layer in (1, 2)]
    assert kept[0] < len(exit_layer) and kept[1] < kept[0]  # both exits halt something
    by_count = exit_model(exit_keep_tokens=kept)
    with torch.no_grad():
        output = by_count(PIXELS[:1])
    assert torch.equal(output.exit_map, reference.exit_map)
    torch.testing.assert_close(output.logits, reference.logits)


def test_fixed_exit_counts_with_a_token_budget_compile_whole():
    """A token budget and fixed exit counts: every shape follows from the input, so the whole forward, exits
    included, traces as one graph (no host sync, no graph break), and every image keeps exactly the counts."""
    model = exit_model(partition_source="policy", token_budget=15, exit_keep_tokens=[9, 4])
    with torch.no_grad():
        eager = model(PIXELS)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(PIXELS)  # fails on any graph break
    assert eager.token_counts.tolist() == [15] * 3
    expected_halted = torch.tensor([[6 / 15, 5 / 15]] * 3)
    torch.testing.assert_close(eager.halted_share, expected_halted)
    assert torch.equal(compiled.logits, eager.logits) and torch.equal(compiled.exit_map, eager.exit_map)


def test_model_card_states_the_exit_rule():
    from step_hf.model_card import model_card

    def card_text(**overrides) -> str:
        return str(model_card("org/x", tiny_config(exit_layers=[1], exit_thresholds=[0.8], **overrides), None,
                              "scenes", None, "").content)

    assert "thresholds [0.8]" in card_text() and "keeping [7] tokens per image" in card_text(exit_keep_tokens=[7])
