"""Token and compute accounting for STEP models: where tokens go and what a forward pass costs.

FLOPs here count a multiply-add as **two** FLOPs (the convention of `torch.utils.flop_counter`); halve them for
MACs. Only matrix products and convolutions are counted (norms, activations, softmax and pooling are not).
"""

import re

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .configuration_step import SUPERPATCH_SIZES, StepConfig
from .modeling_step import StepForSemanticSegmentation, StepModel


def superpatch_area_shares(superpatch_map: torch.Tensor, sizes: tuple[int, ...] = SUPERPATCH_SIZES) -> torch.Tensor:
    """`(batch, len(sizes))`: the share of each image's grid cells covered by superpatches of each size."""
    return torch.stack([(superpatch_map == size).float().mean((1, 2)) for size in sizes], dim=1)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    # The CPU flash-attention kernel has no formula in torch's registry; its work is that of any SDPA.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` that also counts the CPU flash-attention operator."""
    return FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOP_FORMULAS)


@torch.no_grad()
def count_flops(model: StepForSemanticSegmentation | StepModel, **inputs) -> dict[str, int]:
    """
    Run one forward pass under `FlopCounterMode` and return FLOPs (2 per multiply-add) for the whole pass and for
    the parts: `policy`, `exits` (the exit heads), `encoder` (the ViT without policy and exit heads) and `decoder`
    (zero for a bare `StepModel`).
    """
    counter = flop_counter()
    with counter:
        model(**inputs)
    by_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    root = type(model).__name__
    prefix = f"{root}.step" if isinstance(model, StepForSemanticSegmentation) else root
    total = counter.get_total_flops()
    policy = by_module.get(f"{prefix}.policy", 0)
    # A ModuleList never runs itself: add up its heads.
    exits = sum(flops for name, flops in by_module.items() if re.fullmatch(rf"{prefix}\.exit_heads\.\d+", name))
    decoder = by_module.get(f"{root}.decoder", 0)
    return {"total": total, "policy": policy, "exits": exits, "encoder": total - policy - exits - decoder,
            "decoder": decoder}


def transformer_macs(lengths: list[int], dim: int, mlp_dim: int, layers: int, attention_mode: str) -> int:
    """Multiply-adds of `layers` pre-norm blocks over images of the given lengths; in `"padded"` attention mode
    unequal images are padded to the longest for attention, as `packed_attention` does."""
    padded = attention_mode == "padded" and len(set(lengths)) > 1
    attended = [max(lengths)] * len(lengths) if padded else lengths
    macs = sum(length * dim * 3 * dim + length * dim * dim + 2 * length * dim * mlp_dim for length in lengths)
    macs += sum(2 * length * length * dim for length in attended)  # scores and mixing
    return layers * macs


def analytic_flops(
    config: StepConfig,
    image_size: tuple[int, int],
    token_counts: list[int],
    embedding_sizes: list[int],
    policy_ran: bool,
    exit_survivors: list[list[int]] | None = None,
    exits_ran: bool = False,
    with_decoder: bool = True,
    attention_mode: str = "packed",
) -> dict[str, int]:
    """
    The FLOPs (2 per multiply-add) of one forward pass written out by hand, part by part, as `count_flops` reports
    them: for checking the counter, and for estimates without running a model.

    Args:
        image_size: the input (height, width) in pixels.
        token_counts: tokens embedded per image (class token excluded).
        embedding_sizes: the superpatch sizes whose embedding tables were built (`[1]` for the dense model).
        policy_ran: whether the policy network ran.
        exit_survivors: with halting, for each exit the tokens per image left after it.
        exits_ran: whether the exit heads ran (halting, or training).
        attention_mode: the run's attention mode (`"padded"` attends over each image padded to the longest).
    """
    grid = (image_size[0] // config.patch_size, image_size[1] // config.patch_size)
    encoder = embedding_macs(config, grid, len(token_counts), embedding_sizes)
    blocks, exits, alive = encoder_block_macs(config, token_counts, exit_survivors, exits_ran, attention_mode)
    policy = len(token_counts) * policy_macs(config, image_size) if policy_ran else 0
    decoder = decoder_macs(config, alive, attention_mode) if with_decoder else 0
    flops = {"policy": 2 * policy, "exits": 2 * exits, "encoder": 2 * (encoder + blocks), "decoder": 2 * decoder}
    flops["total"] = sum(flops.values())
    return flops


def embedding_macs(config: StepConfig, grid: tuple[int, int], batch: int, embedding_sizes: list[int]) -> int:
    """The patch embeddings of every size's table (the whole grid, as `embed_superpatches` builds them), and the
    position grid's bicubic resize when the input's grid is not the stored one (rows first, then columns)."""
    rows, cols = grid
    patch, channels, dim = config.patch_size, config.num_channels, config.hidden_size
    macs = sum(batch * (rows // size) * (cols // size) * dim * channels * patch * patch
               for size in embedding_sizes if size <= min(rows, cols))
    stored_rows, stored_cols = config.image_grid_size
    if (stored_rows, stored_cols) != (rows, cols):
        macs += rows * stored_rows * stored_cols * dim + rows * cols * stored_cols * dim
    return macs


def encoder_block_macs(config: StepConfig, token_counts: list[int], exit_survivors: list[list[int]] | None,
                       exits_ran: bool, attention_mode: str = "packed") -> tuple[int, int, list[int]]:
    """The ViT blocks' and exit heads' multiply-adds, block by block as tokens halt, and the tokens per image left
    for the decoder."""
    dim, blocks, exits, alive, previous_layer = config.hidden_size, 0, 0, list(token_counts), 0
    exit_points = list(zip(config.exit_layers, exit_survivors or [None] * len(config.exit_layers)))
    for layer, survivors in (exit_points if exits_ran else []):
        blocks += transformer_macs([n + 1 for n in alive], dim, config.intermediate_size, layer - previous_layer,
                                   attention_mode)
        exits += exit_head_macs(config, alive)
        alive, previous_layer = survivors or alive, layer
    blocks += transformer_macs([n + 1 for n in alive], dim, config.intermediate_size,
                               config.num_hidden_layers - previous_layer, attention_mode)
    return blocks, exits, alive


def exit_head_macs(config: StepConfig, alive: list[int]) -> int:
    """One exit head's multiply-adds on `alive` tokens per image. An MLP head's are per token. An ATM head projects
    the tokens, then each of its layers runs self-attention among the class queries, cross-attention from them to
    the tokens (keys and values over each image padded to the longest, as it runs), and an MLP of width 4x."""
    width, classes = config.exit_hidden_size, config.num_labels
    if config.exit_head_type == "mlp":
        return sum(alive) * (config.hidden_size * width + width * classes)
    images, longest = len(alive), max(alive)
    per_layer = (14 * classes * width * width + 2 * classes * classes * width + 2 * longest * width * width
                 + 2 * classes * longest * width)
    return (sum(alive) * config.hidden_size * width + images * config.exit_num_hidden_layers * per_layer
            + images * classes * width * 2)


def policy_macs(config: StepConfig, image_size: tuple[int, int]) -> int:
    """The policy network's multiply-adds on one image, layer by layer as `PolicyNetwork` is built: a stride-4 stem,
    a convolution to the patch grid, then one stride-2 level per superpatch size with a head where a size is
    shared."""
    height, width = image_size
    rows, cols = height // config.patch_size, width // config.patch_size
    width_p, channels = config.policy_hidden_size, config.num_channels
    quarter = (height // 4) * (width // 4)
    macs = quarter * (width_p // 4) * channels * 16  # 4x4 stride-4 stem
    macs += quarter * (width_p // 2) * (width_p // 4) * 9
    macs += rows * cols * width_p * (width_p // 2) * (config.patch_size // 4) ** 2
    macs += rows * cols * width_p * width_p * 9
    level_rows, level_cols = rows, cols
    for level in range(1, max(config.shared_sizes).bit_length()):
        if min(level_rows, level_cols) < 2:
            break
        level_rows, level_cols = level_rows // 2, level_cols // 2
        macs += level_rows * level_cols * width_p * width_p * (4 + 9)
        if 2**level in config.shared_sizes:
            macs += level_rows * level_cols * width_p
    return macs


def decoder_macs(config: StepConfig, alive: list[int], attention_mode: str = "packed") -> int:
    """The Segmenter decoder's multiply-adds on `alive` tokens per image, class embeddings included."""
    d, labels, tokens, batch = config.decoder_hidden_size, config.num_labels, sum(alive), len(alive)
    macs = tokens * config.hidden_size * d  # proj_dec
    macs += transformer_macs([n + labels for n in alive], d, config.decoder_intermediate_size,
                             config.decoder_num_hidden_layers, attention_mode)
    macs += tokens * d * d + batch * labels * d * d  # proj_patch, proj_classes
    return macs + tokens * batch * labels * d  # every token against every image's classes


def flops_per_image(config: StepConfig, image_size: tuple[int, int], outputs, part: str = "total") -> list[int]:
    """FLOPs of each image of a forward's `outputs` as if run alone, from what the output says ran (`outputs.run`:
    policy, embedded sides, exits, attention mode; `token_counts`; `halted_share` when halting ran). `part` picks
    one of `analytic_flops`' parts instead of the total."""
    run = outputs.run
    halted_share = outputs.halted_share.tolist() if outputs.halted_share is not None else None
    return flops_for_token_counts(config, image_size, outputs.token_counts.tolist(), halted_share,
                                  list(run.embedded_sides), run.policy_ran, run.exits_ran, run.settings.attention_mode,
                                  part)


def flops_for_token_counts(
    config: StepConfig, image_size: tuple[int, int], token_counts: list[int], halted_share: list[list[float]] | None,
    embedding_sizes: list[int], policy_ran: bool, exits_ran: bool, attention_mode: str = "packed",
    part: str = "total",
) -> list[int]:
    """FLOPs of images with these token counts, each as if run alone, and the share of its tokens halted at each exit
    (`halted_share`, with halting): the analytic formula, for a forward's outputs (`flops_per_image`) or a
    what-if estimate."""
    flops = []
    for index, count in enumerate(token_counts):
        survivors = None
        if halted_share is not None:
            alive, survivors = count, []
            for share in halted_share[index]:
                alive -= round(share * count)
                survivors.append([alive])
        flops.append(analytic_flops(
            config, tuple(image_size), [count], embedding_sizes, policy_ran=policy_ran, exit_survivors=survivors,
            exits_ran=exits_ran, attention_mode=attention_mode,
        )[part])
    return flops


__all__ = [
    "analytic_flops", "count_flops", "flops_for_token_counts", "flops_per_image", "superpatch_area_shares",
    "transformer_macs",
]
