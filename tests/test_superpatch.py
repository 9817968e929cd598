import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from step_hf import StepForSemanticSegmentation, StepImageProcessor
from step_hf.accounting import analytic_flops, count_flops, superpatch_area_shares
from step_hf.superpatch import (
    budget_token_count,
    check_superpatch_map,
    decisions_for_budget,
    decisions_from_targets,
    decisions_from_thresholds,
    layout_from_superpatch_map,
    partition_from_decisions,
    superpatch_targets_from_labels,
)
from step_hf.token_layout import unshare

from .conftest import tiny_config
from .reference import reference_vit_segmenter

SIZES = [2, 4, 8, 16]
GRIDS = [(5, 7), (16, 16), (17, 33), (3, 40), (1, 1)]


def random_block_logits(batch, grid, sizes=SIZES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {s: torch.randn(batch, grid[0] // s, grid[1] // s, generator=generator) for s in sizes}


def assert_partition(superpatch_map):
    """Brute force: every cell covered exactly once by aligned blocks inside the grid, and the layout agrees."""
    layout = layout_from_superpatch_map(superpatch_map)
    batch, rows, cols = superpatch_map.shape
    coverage = np.zeros((batch, rows, cols), dtype=int)
    owner = np.full((batch, rows, cols), -1)
    for token, (b, r, c, s) in enumerate(zip(layout.image_index.tolist(), layout.cell_row.tolist(),
                                             layout.cell_col.tolist(), layout.block_side.tolist())):
        assert r % s == 0 and c % s == 0 and r + s <= rows and c + s <= cols
        coverage[b, r:r + s, c:c + s] += 1
        owner[b, r:r + s, c:c + s] = token
        assert (superpatch_map[b, r:r + s, c:c + s] == s).all()
    assert (coverage == 1).all()
    assert (layout.cell_to_token.numpy() == owner).all()
    assert layout.batch.lengths.tolist() == [int((layout.image_index == b).sum()) for b in range(batch)]
    return layout


@pytest.mark.parametrize("grid", GRIDS)
def test_every_cell_covered_once_for_policies_budgets_and_oracle(grid):
    logits = random_block_logits(3, grid)
    for thresholds in ([0.5] * 4, [0.1, 0.3, 0.6, 0.9], [0.0] * 4, [1.0] * 4):
        assert_partition(partition_from_decisions(decisions_from_thresholds(logits, thresholds), grid))
    cells = grid[0] * grid[1]
    for budget in {cells, max(1, cells // 2), max(1, cells // 3 * 2)}:
        try:
            decisions = decisions_for_budget(logits, grid, budget)
        except ValueError:  # unreachable on tiny grids; the error is tested below
            continue
        layout = assert_partition(partition_from_decisions(decisions, grid))
        assert layout.batch.lengths.tolist() == [budget_token_count(cells, budget)] * 3
    labels = torch.randint(0, 2, (3, grid[0] * 16, grid[1] * 16))
    labels[:, : grid[0] * 8] = 0  # large uniform areas, so that big blocks occur
    targets = superpatch_targets_from_labels(labels, SIZES)
    assert_partition(partition_from_decisions(decisions_from_targets(targets, SIZES), grid))


def test_raising_a_threshold_never_lowers_the_token_count():
    logits = random_block_logits(4, (24, 40), seed=3)
    for size_index in range(4):
        counts = []
        for value in np.linspace(0, 1, 11):
            thresholds = [0.5] * 4
            thresholds[size_index] = float(value)
            superpatch_map = partition_from_decisions(decisions_from_thresholds(logits, thresholds), (24, 40))
            counts.append(layout_from_superpatch_map(superpatch_map).batch.lengths)
        assert all((a <= b).all() for a, b in zip(counts, counts[1:]))
    all_counts = [
        layout_from_superpatch_map(
            partition_from_decisions(decisions_from_thresholds(logits, [t] * 4), (24, 40))
        ).batch.lengths.sum()
        for t in np.linspace(0, 1, 11)
    ]
    assert all_counts == sorted(all_counts) and all_counts[0] < all_counts[-1] == 4 * 24 * 40


def test_budget_gives_exactly_that_count_and_prefers_confident_blocks():
    grid = (16, 24)
    logits = random_block_logits(2, grid, seed=5)
    for budget in (384, 300, 123, 100, 30):
        decisions = decisions_for_budget(logits, grid, budget)
        lengths = layout_from_superpatch_map(partition_from_decisions(decisions, grid)).batch.lengths
        assert lengths.tolist() == [budget_token_count(384, budget)] * 2
    assert budget_token_count(4096, 1638) == 1636 and budget_token_count(4096, 1639) == 1639
    # With only size 2 allowed, the chosen blocks are the most confident ones.
    only_two = {2: logits[2]}
    chosen = decisions_for_budget(only_two, grid, 384 - 3 * 10)[2]
    top = logits[2].flatten(1).topk(10).indices
    assert chosen.flatten(1).gather(1, top).all() and chosen.flatten(1).sum(1).tolist() == [10, 10]
    with pytest.raises(ValueError, match="cannot be reached"):
        decisions_for_budget(random_block_logits(1, (4, 4), sizes=[2]), (4, 4), 1)


def brute_force_targets(labels, sizes, ignore=255):
    rows, cols = labels.shape[0] // 16, labels.shape[1] // 16
    out = np.full((len(sizes), rows, cols), 255, dtype=np.uint8)
    for k, s in enumerate(sizes):
        for i, j in itertools.product(range(rows // s), range(cols // s)):
            block = labels[i * s * 16:(i + 1) * s * 16, j * s * 16:(j + 1) * s * 16]
            values = np.unique(block)
            classes = values[values != ignore]
            if len(classes) == 0 or (len(classes) == 1 and len(values) == 1):
                target = 1
            elif len(classes) == 1:
                target = 255
            else:
                target = 0
            out[k, i * s:(i + 1) * s, j * s:(j + 1) * s] = target
    return out


@pytest.mark.parametrize("seed", range(4))
def test_targets_match_brute_force_with_void_borders(seed):
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(3, 11, size=2)
    labels = np.zeros((rows * 16, cols * 16), dtype=np.int64)
    for _ in range(6):  # a few rectangles of classes over a uniform background
        top, left = rng.integers(0, rows * 16), rng.integers(0, cols * 16)
        labels[top:top + rng.integers(4, 80), left:left + rng.integers(4, 80)] = rng.integers(0, 4)
    border = rng.integers(1, 40)
    labels[:border] = 255
    labels[:, -border:] = 255
    targets = superpatch_targets_from_labels(torch.from_numpy(labels), [1, *SIZES])
    assert targets.dtype == torch.uint8
    np.testing.assert_array_equal(targets.numpy(), brute_force_targets(labels, [1, *SIZES]))
    assert {0, 1, 255} >= set(np.unique(targets.numpy()))


def test_processor_emits_targets_with_the_same_resize():
    labels = np.zeros((60, 90), dtype=np.uint8)
    labels[:, 45:] = 2
    labels[:10] = 255
    processor = StepImageProcessor(size={"height": 64, "width": 96}, superpatch_sizes=[1, 2, 4])
    out = processor(Image.new("RGB", (90, 60)), segmentation_maps=Image.fromarray(labels), return_tensors="pt")
    assert out["superpatch_targets"].shape == (1, 2, 4, 6)
    expected = superpatch_targets_from_labels(out["labels"][0], [2, 4])
    assert torch.equal(out["superpatch_targets"][0], expected)
    windowed = StepImageProcessor(size={"height": 64, "width": 96}, window_size=64, window_stride=32)
    out = windowed(Image.new("RGB", (90, 60)), segmentation_maps=Image.fromarray(labels), return_tensors="pt")
    assert out["superpatch_targets"].shape == (2, 4, 4, 4)
    for window in range(2):
        expected = superpatch_targets_from_labels(out["labels"][window], SIZES)
        assert torch.equal(out["superpatch_targets"][window], expected)
    assert "superpatch_targets" not in StepImageProcessor(superpatch_sizes=[])(
        Image.new("RGB", (32, 32)), segmentation_maps=Image.new("L", (32, 32)))


def test_share_then_unshare_is_identity_on_piecewise_constant_maps():
    superpatch_map = partition_from_decisions(decisions_from_thresholds(random_block_logits(2, (17, 33)), [0.3] * 4),
                                              (17, 33))
    layout = layout_from_superpatch_map(superpatch_map)
    values = torch.randn(layout.num_tokens, 3)
    piecewise = unshare(values, layout)  # constant over every superpatch
    # Share by averaging the cells of each token, then un-share: the same map comes back.
    cells = piecewise.permute(0, 2, 3, 1).reshape(-1, 3)
    token_of_cell = layout.cell_to_token.flatten()
    sums = torch.zeros(layout.num_tokens, 3).index_add_(0, token_of_cell, cells)
    counts = torch.zeros(layout.num_tokens).index_add_(0, token_of_cell, torch.ones(len(cells)))
    torch.testing.assert_close(unshare(sums / counts[:, None], layout), piecewise)
    torch.testing.assert_close(counts, (layout.block_side ** 2).float())


@pytest.mark.parametrize("overrides", [dict(superpatch_sizes=[1]), dict(partition_source="dense"),
                                       dict(partition_source="policy", policy_thresholds=[1.0] * 4)])
def test_sharing_off_is_exactly_the_dense_model(overrides):
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(**overrides)).eval()
    pixel_values = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        output = model(pixel_values)
        torch.testing.assert_close(output.logits, reference_vit_segmenter(model, pixel_values), rtol=1e-5, atol=1e-5)
    assert output.token_counts.tolist() == [15, 15] and (output.superpatch_map == 1).all()


def test_supertoken_embedding_is_pooled_image_and_mean_position():
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config()).eval()
    encoder = model.step
    pixel_values = torch.randn(1, 3, 64, 96)
    superpatch_map = torch.ones(1, 4, 6, dtype=torch.long)
    superpatch_map[0, :4, :4] = 4
    superpatch_map[0, 2:4, 4:6] = 2
    layout = layout_from_superpatch_map(superpatch_map)
    with torch.no_grad():
        tokens = encoder.embed_superpatches(pixel_values, layout, [1, 2, 4, 8, 16])
        positions = encoder.position_grid((4, 6))
        for token in range(layout.num_tokens):
            r, c, s = (int(x[token]) for x in (layout.cell_row, layout.cell_col, layout.block_side))
            crop = pixel_values[:, :, r * 16:(r + s) * 16, c * 16:(c + s) * 16]
            pooled = torch.nn.functional.avg_pool2d(crop, s)  # 16x16 pixels
            expected = encoder.patch_embed.proj(pooled).flatten() + positions[r:r + s, c:c + s].mean((0, 1))
            torch.testing.assert_close(tokens[token], expected, rtol=1e-5, atol=1e-5)


def test_model_with_partitions_packs_unshares_and_batches_consistently():
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(partition_source="policy", policy_thresholds=[0.45] * 4)).eval()
    for head in model.step.policy.heads.values():  # a policy with opinions
        head.weight.data.normal_(0, 1)
    pixel_values = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True)
        singles = [model(image[None]) for image in pixel_values]
        state = model.step(pixel_values, return_encoder_state=True)[1]
    counts = output.token_counts.tolist()
    assert len(set(counts)) > 1 and max(counts) < 24  # mixed batch, some sharing
    assert all(state.shape == (3, 1 + max(counts), 32) for state in output.hidden_states)  # the blocks saw only these
    mask = state.layout.batch.lengths[:, None] >= torch.arange(1 + max(counts))  # class token + tokens
    assert all((state.abs().sum(-1) > 0).equal(mask) for state in output.hidden_states)  # padding stays zero
    torch.testing.assert_close(output.logits, torch.cat([single.logits for single in singles]), rtol=1e-5, atol=1e-5)
    assert torch.equal(output.superpatch_map, torch.cat([single.superpatch_map for single in singles]))
    # Every cell of a superpatch carries its token's logits.
    layout = state.layout
    for token in range(layout.num_tokens):
        b, r, c, s = (int(x[token]) for x in (layout.image_index, layout.cell_row, layout.cell_col, layout.block_side))
        block = output.logits[b, :, r:r + s, c:c + s]
        assert (block == block[:, :1, :1]).all()
    # The same partition passed in by the caller gives the same logits.
    with torch.no_grad():
        again = model(pixel_values, superpatch_map=output.superpatch_map).logits
    torch.testing.assert_close(again, output.logits)


def test_oracle_partition_and_policy_training_hooks():
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config())
    labels = torch.zeros(2, 64, 96, dtype=torch.long)
    labels[:, :, 48:] = 1
    labels[1, :16, :16] = 255
    targets = superpatch_targets_from_labels(labels, SIZES)
    with torch.no_grad():
        output = model.eval()(torch.randn(2, 3, 64, 96), superpatch_targets=targets, partition_source="oracle")
    # Cells 0-2 hold class 0, cells 3-5 class 1: the 2x2 blocks over cells (2, 3) mix them, 4x4 blocks all do.
    assert output.superpatch_map[0].tolist() == [[2, 2, 1, 1, 2, 2]] * 4
    # In image 1 the top-left 2x2 block mixes class 0 with a void cell: not shared.
    assert output.superpatch_map[1, :2].tolist() == [[1, 1, 1, 1, 2, 2]] * 2
    assert output.token_counts.tolist() == [12, 15]
    with pytest.raises(ValueError, match="need `superpatch_targets`"):
        model(torch.randn(2, 3, 64, 96), partition_source="oracle")

    model.train()
    model.set_training_stage("policy")
    big_labels = torch.zeros(2, 256, 256, dtype=torch.long)
    big_labels[:, 100:] = 2
    big_targets = superpatch_targets_from_labels(big_labels, SIZES)  # a 16x16 grid: every policy level runs
    output = model(torch.randn(2, 3, 256, 256), superpatch_targets=big_targets, policy_only=True)
    assert output.logits is None and output.policy_loss is not None and torch.equal(output.loss, output.policy_loss)
    output.loss.backward()
    assert all(p.grad is not None for p in model.step.policy.parameters())
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if "policy" not in n)
    model.set_training_stage("segmenter")
    assert not any(p.requires_grad for p in model.step.policy.parameters())
    output = model(torch.randn(2, 3, 64, 96), labels=labels, superpatch_targets=targets, partition_source="oracle")
    assert output.policy_loss is None and output.exit_loss is not None  # exit heads are deep-supervised
    torch.testing.assert_close(output.loss, output.segmentation_loss + 0.4 * output.exit_loss)


def test_area_shares_and_token_counts():
    superpatch_map = torch.ones(1, 4, 8, dtype=torch.long)
    superpatch_map[0, :, :4] = 4
    superpatch_map[0, :2, 4:6] = 2
    shares = superpatch_area_shares(superpatch_map)
    assert shares.tolist() == [[12 / 32, 4 / 32, 16 / 32, 0.0, 0.0]]
    assert layout_from_superpatch_map(superpatch_map).batch.lengths.tolist() == [1 + 1 + 12]


@pytest.mark.parametrize("source", ["dense", "policy", "oracle"])
def test_counted_flops_match_the_analytic_formula(source):
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(partition_source=source)).eval()
    labels = torch.zeros(2, 64, 96, dtype=torch.long)
    labels[0, :, 60:] = 1  # different partitions per image: the padded attention path
    inputs = dict(pixel_values=torch.randn(2, 3, 64, 96),
                  superpatch_targets=superpatch_targets_from_labels(labels, SIZES))
    with torch.no_grad():
        counts = model(**inputs).token_counts.tolist()
    counted = count_flops(model, **inputs)
    expected = analytic_flops(model.config, (64, 96), counts, [1] if source == "dense" else [1, *SIZES],
                              policy_ran=source == "policy")
    assert counted == expected
    assert (counted["policy"] > 0) == (source == "policy")


def test_policy_costs_well_under_five_percent_of_vit_large_at_1024():
    from step_hf import StepConfig

    config = StepConfig.from_preset("large", image_size=1024, num_labels=19)
    flops = analytic_flops(config, (1024, 1024), [4096], [1], policy_ran=True, with_decoder=False)
    assert flops["policy"] < 0.05 * flops["encoder"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(superpatch_sizes=[3, 4]), "superpatch_sizes"),
        (dict(superpatch_sizes=[2, 2]), "superpatch_sizes"),
        (dict(superpatch_sizes=[32]), "superpatch_sizes"),
        (dict(superpatch_sizes=[2, 4], policy_thresholds=[0.5]), "policy_thresholds"),
        (dict(policy_thresholds=[0.5, 0.5, 0.5, 1.5]), "probabilities"),
        (dict(token_budget=0), "token_budget"),
        (dict(token_budget=8, superpatch_sizes=[4, 8]), "consecutive"),
        (dict(partition_source="random"), "partition_source"),
        (dict(policy_hidden_size=6), "policy_hidden_size"),
    ],
)
def test_bad_token_sharing_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_superpatch_maps():
    sizes, grid = SIZES, (4, 6)
    good = torch.ones(2, 4, 6, dtype=torch.long)
    check_superpatch_map(good, sizes, grid)
    cases = []
    cases.append((good[:, :3], "shape"))
    def bad_map(*changes):
        superpatch_map = good.clone()
        for index, value in changes:
            superpatch_map[index] = value
        return superpatch_map

    cases.append((bad_map(((1, 0, 0), 3)), "image 1 holds the size 3"))
    cases.append((bad_map(((0, slice(1, 3), slice(1, 3)), 2)), r"cell \(1, 1\)"))  # not aligned to the 2-grid
    cases.append((bad_map(((0, slice(0, 2), slice(4, 6)), 2), ((0, 1, 5), 1)), "not a partition"))  # a cell missing
    cases.append((bad_map(((0, slice(0, 4), slice(4, 6)), 4)), "not a partition"))  # sticking out of the grid
    for superpatch_map, message in cases:
        with pytest.raises(ValueError, match=message):
            check_superpatch_map(superpatch_map, sizes, grid)
    model = StepForSemanticSegmentation(tiny_config())
    with pytest.raises(ValueError, match="not a partition"):
        model(torch.randn(2, 3, 64, 96), superpatch_map=cases[3][0])
    with pytest.raises(ValueError, match="exceeds"):
        StepForSemanticSegmentation(tiny_config(partition_source="policy", token_budget=16))(torch.randn(1, 3, 32, 32))
