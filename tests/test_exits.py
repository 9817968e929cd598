import pytest
import torch

from step_hf import StepForSemanticSegmentation
from step_hf.accounting import analytic_flops, count_flops
from step_hf.exits import ExitRule, exit_log_probabilities, keep_topk_per_class, protected_tokens, tokens_to_keep
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
        if fields.get("exit_head_type") == "atm":
            head.class_embed.weight.data.normal_(0, 2.0)
            head.layers[-1].cross_attn.k.weight.data.normal_(0, 1.0)
        else:
            head.fc2.weight.data.normal_(0, 2.0)
    return model


# ATM scores (presence times mask sigmoid) run lower than a softmax over 4 classes.
ATM_THRESHOLDS = {"atm": dict(exit_thresholds=[0.4, 0.35])}


PIXELS = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("merge", ["probabilities", "logits"])
def test_thresholds_of_one_give_exactly_the_model_without_exits(merge):
    """Nothing halts: the decoder's logits (merged in probabilities: their log-softmax, the same classes)."""
    halting = exit_model(exit_thresholds=[1.0, 1.0], exit_merge=merge)
    plain = exit_model(halting=False)
    plain.load_state_dict(halting.state_dict())
    with torch.no_grad():
        a, b = halting(PIXELS), plain(PIXELS)
    assert torch.equal(a.logits, b.logits.log_softmax(1) if merge == "probabilities" else b.logits)
    assert (a.exit_map == 4).all() and (a.halted_share == 0).all()


@pytest.mark.parametrize("head", ["mlp", "atm"])
@pytest.mark.parametrize("merge", ["probabilities", "logits"])
def test_halted_cells_carry_their_exit_heads_predictions(head, merge):
    """Halted cells carry their exit head's log-probabilities (or, merging logits, an MLP head's raw logits), the
    others the decoder's (log-softmax)."""
    if head == "atm" and merge == "logits":
        pytest.skip("refused by the configuration (test_bad_exit_configs)")
    model = exit_model(exit_head_type=head, exit_merge=merge, **ATM_THRESHOLDS.get(head, {}))
    with torch.no_grad():
        output = model(PIXELS)
        encoded = model.step(PIXELS, return_encoder_state=True)[1]
        decoder_logits = model.decoder(encoded.tokens, encoded.survivors.batch)
    shares = output.halted_share
    assert (shares.sum(1) > 0).all() and (shares.sum(1) < 1).all()  # some, not all, tokens halt
    layout = encoded.layout
    for exit_number, layer in enumerate(model.config.exit_layers):
        prediction = encoded.exit_predictions[exit_number]
        scores = prediction.token_logits if merge == "logits" else exit_log_probabilities(prediction,
                                                                                            layout.image_index)
        halted = output.exit_map == layer
        expected = unshare(scores, layout)
        assert torch.equal(output.logits.permute(0, 2, 3, 1)[halted], expected.permute(0, 2, 3, 1)[halted])
    if merge == "probabilities":
        decoder_logits = decoder_logits.log_softmax(-1)
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
    with torch.no_grad():
        exit_layer = model.step(PIXELS, return_encoder_state=True)[1].survivors.exit_layer
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
        encoded = model.step(PIXELS, return_encoder_state=True)[1]
    layout = encoded.layout
    probabilities = encoded.exit_predictions[0].token_logits.softmax(-1)  # the first exit saw every token
    confidence, predicted = probabilities.max(-1)
    checked = 0
    for image in range(3):
        for label in range(4):
            tokens = ((layout.image_index == image) & (predicted == label)).nonzero()[:, 0]
            top = tokens[confidence[tokens].topk(min(2, len(tokens))).indices]
            assert (encoded.survivors.exit_layer[top] > 1).all()
            checked += len(top)
    assert checked > 0 and (encoded.survivors.exit_layer == 1).any()


def dtop_halted(scores: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
    """DToP's halting decision for one image (`PruneHead.forward` in zbwxp/Dynamic-Token-Pruning), written out
    here as its loops do it: `scores` `(num_classes, num_tokens)`; the confident tokens halt except, for every
    predicted class among them, its k most confident."""
    value, index = scores.max(dim=0)
    halted = value > threshold
    for label in index[halted].unique():
        of_label = halted.nonzero()[:, 0][index[halted] == label]
        count = min(k, len(of_label))
        top = value[of_label].topk(count).indices
        halted[of_label[top]] = False
    return halted


@pytest.mark.parametrize("num_classes, k", [(150, 5), (11, 1), (19, 3), (4, 0)])
def test_keep_rule_is_dtops(num_classes, k):
    """Many-class synthetic scores, images of different lengths, thresholds that halt part of them: the packed,
    loop-free rule halts exactly what DToP's per-image loops halt."""
    generator = torch.Generator().manual_seed(num_classes)
    lengths = [300, 17, 1, 120]
    # Peaked scores: each token leans to one of a few classes, some strongly (so that many are confident).
    logits = torch.randn(sum(lengths), num_classes, generator=generator)
    logits[torch.arange(sum(lengths)), torch.randint(0, min(6, num_classes), (sum(lengths),), generator=generator)] += \
        torch.rand(sum(lengths), generator=generator) * 12
    probabilities = logits.softmax(-1)
    batch = PackedBatch.of(lengths, "cpu")
    for threshold in (0.5, 0.9, 0.99):
        keep, kept_batch = tokens_to_keep(probabilities, batch, ExitRule(threshold, None, k, "predicted_class"))
        expected, start = [], 0
        for length in lengths:
            expected.append(~dtop_halted(probabilities[start:start + length].T, threshold, k))
            start += length
        expected = torch.cat(expected)
        assert torch.equal(keep, expected)
        assert kept_batch.host_lengths == tuple(int(part.sum()) for part in expected.split(lengths))
        assert 0 < int((~keep).sum()) < len(keep)  # the case halts some tokens, not all


def test_keep_rules_differ_with_many_classes():
    """The class-column rule protects, for every class, its k highest-probability tokens whatever they predict:
    with 150 classes and every token confidently one class, k=5 keeps far more than DToP's rule, which keeps k."""
    num_tokens, num_classes = 1024, 150
    logits = torch.zeros(num_tokens, num_classes)
    logits[:, 0] = 12.0  # every token: class 0, confidently
    logits += torch.randn(num_tokens, num_classes, generator=torch.Generator().manual_seed(0)) * 0.5
    probabilities = logits.softmax(-1)
    batch = PackedBatch.of([num_tokens], "cpu")
    kept = {rule: int(protected_tokens(probabilities, batch, ExitRule(0.9, None, 5, rule)).sum())
            for rule in ("predicted_class", "class_column")}
    assert kept["predicted_class"] == 5
    assert kept["class_column"] > 100


@pytest.mark.parametrize("rule", ["predicted_class", "class_column"])
def test_fixed_keep_counts_keep_the_protected_tokens_without_a_sync(rule):
    """The static path (a fixed count per image) keeps every protected token first, then the least confident."""
    generator = torch.Generator().manual_seed(3)
    lengths = [40, 9, 25]
    probabilities = (torch.randn(sum(lengths), 30, generator=generator) * 3).softmax(-1)
    batch = PackedBatch.of(lengths, "cpu")
    protected = protected_tokens(probabilities, batch, ExitRule(0.5, 12, 2, rule))
    keep, kept_batch = tokens_to_keep(probabilities, batch, ExitRule(0.5, 12, 2, rule))
    assert kept_batch.host_lengths == (12, 9, 12)
    start = 0
    for length in lengths:
        mine, kept = protected[start:start + length], keep[start:start + length]
        assert int(kept.sum()) == min(12, length)
        if int(mine.sum()) <= 12:
            assert kept[mine].all()
        start += length


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
        state = model.step(PIXELS, return_encoder_state=True)[1]
    assert (output.token_counts < 24).all()  # supertokens present
    layout = state.layout
    halted_sizes = layout.block_side[state.survivors.exit_layer < 4]
    assert (halted_sizes > 1).any()  # supertokens halt too
    for token in range(layout.num_tokens):  # one exit block per superpatch
        b, r, c, s = (int(x[token]) for x in (layout.image_index, layout.cell_row, layout.cell_col, layout.block_side))
        block = output.exit_map[b, r:r + s, c:c + s]
        assert (block == block[0, 0]).all()
    torch.testing.assert_close(output.logits, torch.cat([s.logits for s in singles]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.halted_share, torch.cat([s.halted_share for s in singles]))
    exit_layer = state.survivors.exit_layer
    for image in range(3):
        mine = exit_layer[layout.image_index == image]
        expected = [float((mine == layer).float().mean()) for layer in (1, 2)]
        torch.testing.assert_close(output.halted_share[image], torch.tensor(expected))


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
        exit_layer = by_threshold.step(PIXELS[:1], return_encoder_state=True)[1].survivors.exit_layer
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


# ---- DToP's ATM exit head


def test_atm_score_is_presence_times_mask_sigmoid():
    """DToP's score (`PruneHead.per_img_forward`): `cls.softmax(-1)[..., :-1] * attn.sigmoid()`, per class and token."""
    model = exit_model(exit_head_type="atm", halting=False)
    head = model.step.exit_heads[0]
    tokens, batch = torch.randn(10, 32), PackedBatch.of([6, 4], "cpu")
    with torch.no_grad():
        prediction = head(tokens, batch)
    image = batch.image_index(10)
    dtop = prediction.presence_logits.softmax(-1)[..., 0][image] * prediction.token_logits.sigmoid()
    torch.testing.assert_close(exit_log_probabilities(prediction, image).exp(), dtop)


def test_atm_head_on_packed_images_equals_each_image_alone():
    """Padding the images' tokens for the cross-attention changes nothing: packed = one image at a time."""
    model = exit_model(exit_head_type="atm", halting=False)
    head = model.step.exit_heads[1]
    lengths = [7, 2, 12]
    tokens = torch.randn(sum(lengths), 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = head(tokens, PackedBatch.of(lengths, "cpu"))
        alone = [head(part, PackedBatch.of([len(part)], "cpu")) for part in tokens.split(lengths)]
    torch.testing.assert_close(packed.token_logits, torch.cat([a.token_logits for a in alone]))
    torch.testing.assert_close(packed.presence_logits, torch.cat([a.presence_logits for a in alone]))


def dtop_atm_loss(mask_logits: torch.Tensor, presence_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DToP's `ATMLoss` (`SetCriterion` with query i matched to class i) for one image without void, written out
    here from its code: presence cross-entropy (absent weighs 0.1), 20 x focal + 1 x dice over the present classes,
    both divided by their number."""
    present = labels.unique()
    target_classes = torch.ones(presence_logits.shape[1], dtype=torch.long)
    target_classes[present] = 0
    loss_ce = torch.nn.functional.cross_entropy(presence_logits.transpose(1, 2), target_classes[None],
                                                torch.tensor([1.0, 0.1]))
    masks = torch.nn.functional.interpolate(mask_logits[:, present], size=labels.shape[-2:], mode="bilinear",
                                            align_corners=False)[0].flatten(1)
    targets = torch.stack([(labels[0] == c).flatten().float() for c in present])
    prob = masks.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(masks, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    focal = (0.25 * targets + 0.75 * (1 - targets)) * ce * (1 - p_t) ** 2
    focal = focal.mean(1).sum() / len(present)
    dice = 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)
    return loss_ce + 20 * focal + dice.sum() / len(present)


def test_atm_loss_is_dtops():
    from step_hf.exits import atm_loss

    generator = torch.Generator().manual_seed(5)
    mask_logits = torch.randn(1, 6, 4, 5, generator=generator) * 3
    presence_logits = torch.randn(1, 6, 2, generator=generator)
    labels = torch.randint(0, 4, (1, 64, 80), generator=generator)  # classes 4 and 5 absent
    torch.testing.assert_close(atm_loss(mask_logits, presence_logits, labels, 255),
                               dtop_atm_loss(mask_logits, presence_logits, labels))
    # A batch is the mean of its images, so a batch split across processes averages to the same loss.
    other = torch.randint(2, 6, (1, 64, 80), generator=generator)
    both = atm_loss(mask_logits.repeat(2, 1, 1, 1), presence_logits.repeat(2, 1, 1), torch.cat([labels, other]), 255)
    torch.testing.assert_close(both, (atm_loss(mask_logits, presence_logits, labels, 255)
                                      + atm_loss(mask_logits, presence_logits, other, 255)) / 2)
    # Void pixels are no class's negatives: relabelling void pixels leaves them out of every mask term.
    void = labels.clone()
    void[:, :8] = 255
    assert not torch.isclose(atm_loss(mask_logits, presence_logits, void, 255),
                             atm_loss(mask_logits, presence_logits, labels, 255))


def test_atm_heads_train_and_halt():
    model = exit_model(exit_head_type="atm", **ATM_THRESHOLDS["atm"]).train()
    labels = torch.randint(0, 4, (3, 64, 96), generator=torch.Generator().manual_seed(0))
    output = model(PIXELS, labels=labels)
    output.loss.backward()
    assert output.exit_loss is not None and output.exit_loss > 0
    for head in model.step.exit_heads:
        assert all(p.grad is not None for p in head.parameters())
    assert (output.halted_share.sum(1) > 0).all()


@pytest.mark.parametrize("head", ["mlp", "atm"])
def test_exit_head_flops_match_the_analytic_formula(head):
    """Both heads, images of different lengths after halting (the ATM head pads its keys to the longest)."""
    model = exit_model(exit_head_type=head, **ATM_THRESHOLDS.get(head, {}))
    with torch.no_grad():
        counted = count_flops(model, pixel_values=PIXELS)
        encoded, state = model.step(PIXELS, return_encoder_state=True)
    exit_layer = state.survivors.exit_layer
    image_index = state.layout.image_index
    alive, survivors = encoded.token_counts.tolist(), []
    for layer in model.config.exit_layers:
        alive = [alive[i] - int(((exit_layer == layer) & (image_index == i)).sum()) for i in range(len(alive))]
        survivors.append(alive)
    assert len(set(survivors[0])) > 1  # the images keep different numbers of tokens
    expected = analytic_flops(model.config, (64, 96), encoded.token_counts.tolist(), [1], policy_ran=False,
                              exit_survivors=survivors, exits_ran=True)
    assert counted == expected and counted["exits"] > 0
