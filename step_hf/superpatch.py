"""Superpatch partitions (dCTS): small stateless operations on per-image maps of the patch grid.

A partition of an image's `(rows, cols)` patch grid is one integer map, `superpatch_map`, holding for every cell the
side (in cells) of the square superpatch covering it: 1 for a plain patch, else 2, 4, 8 or 16. A superpatch of side
s is aligned to the s-grid and lies entirely inside the image grid, so blocks of different sizes are nested or
disjoint. Every source of partitions (the policy's thresholds, a fixed token budget, ground-truth targets, a caller)
produces per-size *decisions* — "this aligned block may be one token" — and `partition_from_decisions` turns them
into a map, larger sizes first.

Shipped as Hub code next to saved weights: imports only torch and its siblings.
"""

import torch
import torch.nn.functional as F

from .token_layout import PackedBatch, TokenLayout, first_true_positions, top_count_first_on_ties

TARGET_MIXED, TARGET_UNIFORM, TARGET_IGNORE = 0, 1, 255


def block_grid(grid_size: tuple[int, int], size: int) -> tuple[int, int]:
    """Number of whole aligned blocks of side `size` along each axis of the grid."""
    return grid_size[0] // size, grid_size[1] // size


def blocks_to_cells(block_values: torch.Tensor, size: int, grid_size: tuple[int, int], fill) -> torch.Tensor:
    """Spread block-level values `(..., rows // size, cols // size)` onto the cells they cover, `(..., rows, cols)`;
    cells in no whole block (a ragged right or bottom edge) get `fill`."""
    if 0 in block_grid(grid_size, size):  # no whole block; exporters cannot reshape an empty grid
        return block_values.new_full((*block_values.shape[:-2], *grid_size), fill)
    cells = block_values.repeat_interleave(size, dim=-2).repeat_interleave(size, dim=-1)
    pad_rows, pad_cols = grid_size[0] - cells.shape[-2], grid_size[1] - cells.shape[-1]
    if pad_rows or pad_cols:
        cells = F.pad(cells, (0, pad_cols, 0, pad_rows), value=fill)
    return cells


def block_reduce(values: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """Minimum (`how="min"`) or maximum over each whole aligned `size` x `size` block of the last two dimensions."""
    rows, cols = block_grid(values.shape[-2:], size)
    blocks = values[..., : rows * size, : cols * size].unflatten(-1, (cols, size)).unflatten(-3, (rows, size))
    return blocks.amin((-3, -1)) if how == "min" else blocks.amax((-3, -1))


def cells_to_blocks(cell_values: torch.Tensor, size: int) -> torch.Tensor:
    """The value at each whole block's top-left cell: `(..., rows, cols)` -> `(..., rows // size, cols // size)`."""
    rows, cols = block_grid(cell_values.shape[-2:], size)
    return cell_values[..., : rows * size : size, : cols * size : size]


def partition_from_decisions(block_decisions: dict[int, torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
    """
    Turn per-size block decisions into a partition.

    Args:
        block_decisions: for each superpatch size s > 1 (at least one), a boolean `(batch, rows // s, cols // s)`:
            may this whole aligned block be one token?
        grid_size: the patch grid `(rows, cols)`.

    Returns:
        `superpatch_map` `(batch, rows, cols)` (int64). Larger sizes are decided first; a block is used when its
        decision is true and no larger chosen block already covers it.
    """
    first = next(iter(block_decisions.values()))
    batch, device = first.shape[0], first.device
    superpatch_map = torch.ones(batch, *grid_size, dtype=torch.long, device=device)
    covered = torch.zeros(batch, *grid_size, dtype=torch.bool, device=device)
    for size in sorted(block_decisions, reverse=True):
        # Aligned blocks are nested or disjoint, so a block is either wholly inside a larger chosen one or free.
        chosen = blocks_to_cells(block_decisions[size], size, grid_size, False) & ~covered
        superpatch_map = torch.where(chosen, size, superpatch_map)
        covered |= chosen
    return superpatch_map


def decisions_from_targets(superpatch_targets: torch.Tensor, sizes: list[int]) -> dict[int, torch.Tensor]:
    """Oracle decisions: a block is shared when its ground-truth target says it holds a single label."""
    return {
        size: cells_to_blocks(superpatch_targets[:, index], size) == TARGET_UNIFORM
        for index, size in enumerate(sizes)
    }


def decisions_from_thresholds(
    block_logits: dict[int, torch.Tensor], thresholds: list[float]
) -> dict[int, torch.Tensor]:
    """A block is shared when the policy's probability that it is uniform exceeds that size's threshold."""
    sizes = sorted(block_logits)
    return {size: block_logits[size].sigmoid() > threshold for size, threshold in zip(sizes, thresholds)}


def budget_token_count(num_cells: int, token_budget: int) -> int:
    """The token count a budget yields on a grid of `num_cells` cells: the budget itself when reachable, else the
    largest reachable count below it. Each quadtree merge (four blocks into one) removes exactly 3 tokens, so only
    counts congruent to `num_cells` modulo 3 exist."""
    return token_budget - (token_budget - num_cells) % 3


def decisions_for_budget(
    block_logits: dict[int, torch.Tensor], grid_size: tuple[int, int], token_budget: int
) -> dict[int, torch.Tensor]:
    """
    Decisions that leave exactly `budget_token_count(rows * cols, token_budget)` tokens in every image, merging the
    most confident blocks. Sizes must be 2, 4, ... (consecutive powers of two): each chosen block is then one merge
    of four children into one token. A block's priority is the smallest logit in its quadtree (its own and all its
    descendants'), so a parent never outranks a child; a stable sort with smaller sizes first breaks ties the same
    way (`top_count_first_on_ties`). The top-k blocks by priority are therefore closed under "children of a chosen
    block are chosen", which makes every chosen block remove exactly 3 tokens.
    """
    decisions = {size: torch.zeros_like(logits, dtype=torch.bool) for size, logits in block_logits.items()
                 if 0 in block_grid(grid_size, size)}  # sizes with no whole block choose none
    sizes = sorted(size for size in block_logits if size not in decisions)
    num_cells = grid_size[0] * grid_size[1]
    target = budget_token_count(num_cells, token_budget)
    num_merges = (num_cells - target) // 3
    available = sum(block_logits[size][0].numel() for size in sizes)
    if target < 1 or num_merges > available:
        raise ValueError(
            f"A budget of {token_budget} tokens cannot be reached on a {grid_size[0]}x{grid_size[1]} grid with "
            f"superpatch sizes {sizes}: at least {num_cells - 3 * available} tokens remain."
        )
    if not sizes:  # no block fits the grid: it stays dense, which the check above says is within the budget
        return decisions
    priorities, child_priority = [], None
    for size in sizes:
        priority = block_logits[size].float()
        if child_priority is not None:
            priority = torch.minimum(priority, block_reduce(child_priority, 2, "min"))
        priorities.append(priority)
        child_priority = priority
    flat = torch.cat([priority.flatten(1) for priority in priorities], dim=1)
    selected = top_count_first_on_ties(flat, num_merges, dim=1)
    start = 0
    for size, priority in zip(sizes, priorities):
        count = priority[0].numel()
        decisions[size] = selected[:, start : start + count].view_as(priority)
        start += count
    return decisions


def partition_from_policy(
    block_logits: dict[int, torch.Tensor], grid_size: tuple[int, int], thresholds: list[float],
    token_budget: int | None = None,
) -> tuple[torch.Tensor, int | None]:
    """
    The policy's partition: `(superpatch_map, tokens_per_image)`. With a `token_budget`, every image keeps the same
    number of tokens (`tokens_per_image`, known without a host sync); otherwise a block is shared when its
    probability exceeds its size's threshold and `tokens_per_image` is `None` (it differs between images).
    """
    if token_budget is not None:
        decisions = decisions_for_budget(block_logits, grid_size, token_budget)
        return partition_from_decisions(decisions, grid_size), budget_token_count(grid_size[0] * grid_size[1],
                                                                                  token_budget)
    return partition_from_decisions(decisions_from_thresholds(block_logits, thresholds), grid_size), None


def check_superpatch_targets(
    targets: torch.Tensor | None, batch_size: int, num_sizes: int, grid_size: tuple[int, int]
) -> None:
    """Refuse missing or mis-shaped `superpatch_targets`, saying where they come from."""
    expected = (batch_size, num_sizes, *grid_size)
    if targets is None:
        raise ValueError(
            "The 'oracle' partition and the policy loss need `superpatch_targets`; `StepImageProcessor` emits them "
            "when given segmentation maps."
        )
    if tuple(targets.shape) != expected:
        raise ValueError(
            f"`superpatch_targets` must have shape {expected} (batch, superpatch sizes above 1, grid), got "
            f"{tuple(targets.shape)}; build them with the model's `superpatch_sizes`."
        )


def check_superpatch_map(
    superpatch_map: torch.Tensor, sizes: list[int], grid_size: tuple[int, int], batch_size: int | None = None
) -> None:
    """Raise a `ValueError` saying what is wrong unless `superpatch_map` is a valid partition: shape
    `(batch, rows, cols)` (`batch_size` images when given), values in {1} ∪ `sizes`, and every value s forming
    whole, aligned s x s blocks inside the grid."""
    if superpatch_map.ndim != 3 or tuple(superpatch_map.shape[1:]) != tuple(grid_size):
        raise ValueError(
            f"`superpatch_map` must have shape (batch, {grid_size[0]}, {grid_size[1]}) for this input, got "
            f"{tuple(superpatch_map.shape)}."
        )
    if batch_size is not None and superpatch_map.shape[0] != batch_size:
        raise ValueError(
            f"`superpatch_map` holds {superpatch_map.shape[0]} maps but `pixel_values` holds {batch_size} images; "
            "give one map per image."
        )
    allowed = sorted({1, *sizes})
    in_whole_block = torch.zeros_like(superpatch_map, dtype=torch.bool)
    for size in allowed:
        is_size = superpatch_map == size
        whole_blocks = block_reduce(is_size, size, "min")  # aligned blocks made only of this size
        in_whole_block |= blocks_to_cells(whole_blocks, size, grid_size, False) & is_size
    bad = ~in_whole_block  # a size not allowed is in no whole block either
    if not bad.any():  # the check's one host sync; the details below only on failure
        return
    unknown = ~torch.isin(superpatch_map, torch.tensor(allowed, device=superpatch_map.device))
    if unknown.any():
        image = int(unknown.flatten(1).any(1).nonzero()[0])
        raise ValueError(
            f"`superpatch_map` of image {image} holds the size {superpatch_map[image][unknown[image]][0].item()}; "
            f"allowed sizes are {allowed}."
        )
    image, row, col = (int(i) for i in bad.nonzero()[0])
    size = int(superpatch_map[image, row, col])
    raise ValueError(
        f"`superpatch_map` of image {image} is not a partition at cell ({row}, {col}): size {size} there is not "
        f"part of a whole {size}x{size} block aligned to multiples of {size} inside the grid."
    )


def layout_from_superpatch_map(
    superpatch_map: torch.Tensor, tokens_per_image: int | None = None, attention_mode: str = "packed"
) -> TokenLayout:
    """
    The token layout of a (valid) partition: one token per superpatch, in raster order of its top-left cell,
    image after image. One host sync (the number of tokens per image), or none when `tokens_per_image` is known
    (a token budget): then shapes are static, as `torch.compile` and CUDA graphs need. `attention_mode` goes to its
    `PackedBatch`.
    """
    batch, rows, cols = superpatch_map.shape
    device = superpatch_map.device
    row = torch.arange(rows, device=device)[:, None]
    col = torch.arange(cols, device=device)
    origin_row, origin_col = row - row % superpatch_map, col - col % superpatch_map
    is_origin = (origin_row == row) & (origin_col == col)
    if tokens_per_image is None:
        packed = PackedBatch.counted(is_origin.flatten(1).sum(1), attention_mode)
    else:
        packed = PackedBatch.equal(tokens_per_image, batch, device, attention_mode)
    origins = first_true_positions(is_origin.flatten(), packed.num_tokens)
    image_index, cell = origins // (rows * cols), origins % (rows * cols)
    cell_row, cell_col = cell // cols, cell % cols
    token_of_origin = (is_origin.flatten().cumsum(0) - 1).view(batch, rows, cols)
    images = torch.arange(batch, device=device)[:, None, None]
    return TokenLayout(
        batch=packed,
        image_index=image_index,
        cell_row=cell_row,
        cell_col=cell_col,
        block_side=superpatch_map[image_index, cell_row, cell_col],
        cell_to_token=token_of_origin[images, origin_row, origin_col],
    )


def superpatch_targets_from_labels(
    labels: torch.Tensor, sizes: list[int], patch_size: int = 16, ignore_index: int = 255
) -> torch.Tensor:
    """
    Ground-truth sharing targets from label maps, as the image processor emits them.

    Args:
        labels: `(..., height, width)` integer label maps; height and width multiples of `patch_size`.
        sizes: superpatch sizes (in patches per side) to build targets for.

    Returns:
        uint8 `(..., len(sizes), height / patch_size, width / patch_size)`: every cell holds the target of the
        aligned block of that size containing it: 1 = the block holds a single label (an all-void block counts as
        uniform), 0 = several labels, 255 = not supervised (one class mixed with void, or a block that does not fit
        inside the grid).
    """
    height, width = labels.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"Label maps of {height}x{width} are not multiples of the patch size {patch_size}.")
    rows, cols = height // patch_size, width // patch_size
    void = labels == ignore_index
    # Smallest and largest non-void label per block; void makes min large and max small, so an all-void block ends
    # with min > max.
    low = torch.where(void, torch.iinfo(torch.int32).max, labels.int())
    high = torch.where(void, -1, labels.int())

    cell_low, cell_high = block_reduce(low, patch_size, "min"), block_reduce(high, patch_size, "max")
    cell_void = block_reduce(void, patch_size, "max")
    targets = []
    for size in sizes:
        block_low, block_high = block_reduce(cell_low, size, "min"), block_reduce(cell_high, size, "max")
        block_void = block_reduce(cell_void, size, "max")
        one_label = block_low >= block_high  # equal: one class; greater: all void
        target = torch.where(one_label, TARGET_UNIFORM, TARGET_MIXED)
        target = torch.where(one_label & (block_low == block_high) & block_void, TARGET_IGNORE, target)
        targets.append(blocks_to_cells(target.to(torch.uint8), size, (rows, cols), TARGET_IGNORE))
    return torch.stack(targets, dim=-3)


__all__ = [
    "block_grid",
    "block_reduce",
    "blocks_to_cells",
    "budget_token_count",
    "cells_to_blocks",
    "check_superpatch_map",
    "check_superpatch_targets",
    "decisions_for_budget",
    "decisions_from_targets",
    "decisions_from_thresholds",
    "layout_from_superpatch_map",
    "partition_from_decisions",
    "partition_from_policy",
    "superpatch_targets_from_labels",
]
