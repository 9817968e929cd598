"""Early exits (STEP's early pruning): everything about them in one place.

After the blocks of `config.exit_layers` a light `ExitHead` classifies every token still in the sequence. With
halting on, the confident ones leave (`halt`): their class scores are frozen there and later blocks never see them.
At the end, `merge_exit_logits` puts the halted tokens' exit scores beside the decoder's scores of the survivors,
`exit_statistics` says where each cell halted, and `exit_loss` trains the heads by deep supervision.

The state carried through the blocks is a `Survivors`: which tokens of the layout are still in, their lengths per
image, and the block after which every token halted. Survivors keep their order (stable), so the sequence stays
packed image after image in raster order.

Shipped as Hub code next to saved weights: imports only torch and its siblings.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .token_layout import PackedBatch, TokenLayout, refuse_in_export, state_pytree, unshare


class ExitHead(nn.Module):
    """A light per-token classifier run after an encoder block: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, hidden_size: int, exit_hidden_size: int, num_labels: int, layer_norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.fc1 = nn.Linear(hidden_size, exit_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(exit_hidden_size, num_labels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(tokens))))


@dataclass(frozen=True)
class ExitRule:
    """
    Which tokens stay in at one exit. Every image's `topk_per_class` most confident tokens per class stay; of the
    others, those whose top class probability is at most `threshold`, or, with `keep_tokens`, the least confident up
    to that many per image.
    """

    threshold: float
    keep_tokens: int | None
    topk_per_class: int


@state_pytree
@dataclass(frozen=True)
class Survivors:
    """
    The tokens still in the sequence.

    Attributes:
        index (`torch.LongTensor` of shape `(num_survivors,)`): each survivor's index in the token layout, in order.
        batch (`PackedBatch`): survivors per image.
        exit_layer (`torch.LongTensor` of shape `(num_tokens,)`): for every token of the layout, the block after
            which it halted; `num_hidden_layers` while it has not.
    """

    index: torch.Tensor
    batch: PackedBatch
    exit_layer: torch.Tensor

    @classmethod
    def all_of(cls, batch: PackedBatch, num_tokens: int, num_layers: int, device: torch.device) -> "Survivors":
        """Every token of a layout, none halted yet."""
        return cls(torch.arange(num_tokens, device=device), batch,
                   torch.full((num_tokens,), num_layers, dtype=torch.long, device=device))


def keep_topk_per_class(scores: torch.Tensor, batch: PackedBatch, k: int) -> torch.Tensor:
    """
    `(num_tokens,)` bool: for every image and every column of `scores` `(num_tokens, columns)` (a class's
    probability, say), its `k` tokens with the highest score. Images are padded to a common length for one `topk`;
    no host sync.
    """
    num_tokens, num_columns = scores.shape
    k = min(k, batch.max_length)
    keep = torch.zeros(num_tokens + 1, dtype=torch.bool, device=scores.device)
    if k == 0 or num_tokens == 0:
        return keep[:num_tokens]
    image, position = batch.image_positions(num_tokens)
    padded = scores.new_full((batch.batch_size, batch.max_length, num_columns), float("-inf"))
    padded[image, position] = scores
    top = padded.topk(k, dim=1).indices  # (batch, k, columns), positions within each image
    real = top < batch.lengths[:, None, None]  # an image with fewer than k tokens picks padding: drop it
    packed = torch.where(real, batch.offsets[:-1, None, None] + top, num_tokens)
    return keep.index_fill_(0, packed.flatten(), True)[:num_tokens]


def tokens_to_keep(probabilities: torch.Tensor, batch: PackedBatch, rule: ExitRule) -> tuple[torch.Tensor, PackedBatch]:
    """
    Which tokens `(num_tokens,)` stay in at an exit under `rule`, and the batch they make. By threshold this costs
    one host sync (the new lengths); with `rule.keep_tokens` none: the lengths follow from the old ones, so shapes
    stay static.
    """
    protected = keep_topk_per_class(probabilities, batch, rule.topk_per_class)
    confidence = probabilities.amax(-1)
    if rule.keep_tokens is None:
        refuse_in_export("the number of tokens an exit keeps by threshold")
        keep = (confidence <= rule.threshold) | protected
        image = batch.image_index(keep.shape[0])
        lengths = torch.zeros_like(batch.lengths).index_add_(0, image, keep.long())
        return keep, PackedBatch(lengths, tuple(lengths.tolist()), batch.attention_mode)
    priority = torch.where(protected, 2.0, 1.0 - confidence)  # the protected first, then the least confident
    keep = keep_topk_per_class(priority[:, None], batch, rule.keep_tokens)
    host_lengths = tuple(min(rule.keep_tokens, length) for length in batch.host_lengths)
    return keep, PackedBatch(batch.lengths.clamp(max=rule.keep_tokens), host_lengths, batch.attention_mode)


@torch.no_grad()  # the decision to halt carries no gradient
def halt(survivors: Survivors, exit_logits: torch.Tensor, layer: int, rule: ExitRule) -> tuple[Survivors, torch.Tensor]:
    """
    Apply an exit's `rule` to the survivors' exit logits `(num_survivors, num_labels)` after block `layer`. Returns
    the new survivors and `order`, the rows of the old survivors that stay, in their old order: take
    `tokens[order]` to re-pack the sequence.
    """
    keep, batch = tokens_to_keep(exit_logits.float().softmax(-1), survivors.batch, rule)
    order = torch.argsort((~keep).to(torch.int8), stable=True)[: sum(batch.host_lengths)]
    halted_here = torch.where(keep, survivors.exit_layer[survivors.index], layer)
    exit_layer = survivors.exit_layer.index_copy(0, survivors.index, halted_here)
    return Survivors(survivors.index[order], batch, exit_layer), order


def merge_exit_logits(
    survivor_logits: torch.Tensor, survivors: Survivors, exit_logits: tuple[torch.Tensor, ...] | None,
    exit_layers: list[int],
) -> torch.Tensor:
    """Per-token logits for every token of the layout `(num_tokens, num_labels)`: the decoder's
    (`survivor_logits`, one row per survivor) where a token reached the end, the exit head's where it halted."""
    num_tokens = survivors.exit_layer.shape[0]
    merged = survivor_logits.new_zeros(num_tokens, survivor_logits.shape[1])
    merged = merged.index_copy(0, survivors.index, survivor_logits)
    for layer, logits in zip(exit_layers, exit_logits or ()):
        halted_here = (survivors.exit_layer == layer)[:, None]
        merged = torch.where(halted_here, logits.to(merged.dtype), merged)
    return merged


def exit_statistics(
    exit_layer: torch.Tensor, layout: TokenLayout, exit_layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`exit_map` `(batch, rows, cols)`: the block after which each cell's token halted (`num_hidden_layers` where it
    never did); `halted_share` `(batch, len(exit_layers))`: the share of each image's tokens halted at each exit."""
    exit_map = unshare(exit_layer[:, None], layout)[:, 0]
    counts = layout.batch.lengths[:, None].float()
    halted_share = counts.new_zeros(counts.shape[0], len(exit_layers))
    if exit_layers:  # `torch.stack` refuses an empty list: a model without exits halts nothing
        halted = torch.stack([exit_layer == layer for layer in exit_layers], dim=1).float()
        halted_share = halted_share.index_add_(0, layout.image_index, halted) / counts
    return exit_map, halted_share


def exit_loss(
    exit_logits: tuple[torch.Tensor, ...], exit_layer: torch.Tensor, layout: TokenLayout, labels: torch.Tensor,
    exit_layers: list[int], loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ignore_index: int,
) -> torch.Tensor:
    """Deep supervision: the sum over exits of each head's `loss_function(cell_logits, labels)` on the cells whose
    token was still in the sequence at that exit (the others are marked `ignore_index`)."""
    total = 0
    for layer, logits in zip(exit_layers, exit_logits):
        seen = unshare((exit_layer >= layer)[:, None].float(), layout)
        seen = torch.nn.functional.interpolate(seen, size=labels.shape[-2:], mode="nearest")[:, 0] > 0
        total = total + loss_function(unshare(logits, layout), torch.where(seen, labels, ignore_index))
    return total


__all__ = [
    "ExitHead",
    "ExitRule",
    "Survivors",
    "exit_loss",
    "exit_statistics",
    "halt",
    "keep_topk_per_class",
    "merge_exit_logits",
    "tokens_to_keep",
]
