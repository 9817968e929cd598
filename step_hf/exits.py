"""Early exits (STEP's early pruning): everything about them in one place.

After the blocks of `config.exit_layers` a light exit head classifies every token still in the sequence: an
`ExitHead` (per-token MLP, scored by its softmax) or DToP's `AtmExitHead` (one query per class attends to the tokens;
a class's probability is its presence times the sigmoid of its attention logit). Both return an `ExitPrediction`,
and `exit_log_probabilities` scores either. With halting on, the confident ones leave (`halt`): their class scores
are frozen there and later blocks never see them. At the end, `merge_exit_predictions` puts the halted tokens'
predictions beside the decoder's of the survivors, `exit_statistics` says where each cell halted, and `exit_loss`
trains the heads by deep supervision (cross-entropy for MLP heads, DToP's presence, focal and dice losses for ATM).

The state carried through the blocks is a `Survivors`: which tokens of the layout are still in, their lengths per
image, and the block after which every token halted. Survivors keep their order (stable), so the sequence stays
packed image after image in raster order.

Shipped as Hub code next to saved weights: imports only torch and its siblings.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .token_layout import (
    PackedBatch, PackedSequence, TokenLayout, first_true_positions, insert_per_image, put_rows, state_pytree,
    top_count_first_on_ties, unshare,
)


class ExitPrediction(NamedTuple):
    """
    What an exit head says about the tokens it sees.

    Attributes:
        token_logits (`torch.FloatTensor` of shape `(num_tokens, num_labels)`): an MLP head's class logits, or an ATM
            head's mask logits (each class query's attention logit on the token).
        presence_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, 2)` or `None`): an ATM head's
            per-image logits of each class being present (index 0) or absent (index 1); `None` for MLP heads.
    """

    token_logits: torch.Tensor
    presence_logits: torch.Tensor | None = None


# A saved `torch.export` program names every pytree node of its outputs (an `EncoderState` holds these).
torch.utils._pytree._register_namedtuple(ExitPrediction, serialized_type_name=f"{__name__}.ExitPrediction")


class ExitHead(nn.Module):
    """A light per-token classifier run after an encoder block: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, hidden_size: int, exit_hidden_size: int, num_labels: int, layer_norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.fc1 = nn.Linear(hidden_size, exit_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(exit_hidden_size, num_labels)

    def forward(self, tokens: torch.Tensor, batch: PackedBatch) -> ExitPrediction:
        """Per-token logits; `batch` goes unused (an ATM head needs it: both heads are called alike)."""
        return ExitPrediction(self.fc2(self.act(self.fc1(self.norm(tokens)))))


class AtmAttention(nn.Module):
    """Multi-head attention that also returns its logits (before the softmax), averaged over heads: the ATM head's
    masks. Keys may be padded (`key_valid`)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`queries` `(batch, n, dim)`, `keys` `(batch, m, dim)` -> `(batch, n, dim)` and logits `(batch, n, m)`."""
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        query, key, value = heads(self.q(queries)), heads(self.k(keys)), heads(self.v(keys))
        logits = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
        masked = logits if key_valid is None else logits.masked_fill(~key_valid[:, None, None], float("-inf"))
        attended = (self.attn_drop(masked.softmax(-1)) @ value).transpose(1, 2).flatten(2)
        return self.proj(attended), logits.mean(1)


class AtmDecoderLayer(nn.Module):
    """DToP's ATM decoder layer (post-norm, as `nn.TransformerDecoderLayer`): the class queries attend to each other,
    then to the tokens, then an MLP (ReLU); dropout 0.1 throughout, as there."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = AtmAttention(dim, num_heads, dropout)
        self.cross_attn = AtmAttention(dim, num_heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, queries: torch.Tensor, tokens: torch.Tensor, token_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new queries and the cross-attention logits `(batch, num_queries, num_tokens)`."""
        queries = self.norm1(queries + self.dropout(self.self_attn(queries, queries)[0]))
        attended, mask_logits = self.cross_attn(queries, tokens, token_valid)
        queries = self.norm2(queries + self.dropout(attended))
        mlp = self.fc2(self.dropout(F.relu(self.fc1(queries))))
        return self.norm3(queries + self.dropout(mlp)), mask_logits


class AtmExitHead(nn.Module):
    """
    DToP's exit head, an ATM (attention-to-mask) decoder: the tokens are projected and normed, one learned query per
    class goes through a few `AtmDecoderLayer`s attending to them, and each query says whether its class is present;
    its last cross-attention logits on a token are that class's mask logit there.
    """

    def __init__(self, hidden_size: int, dim: int, num_heads: int, num_layers: int, num_labels: int):
        super().__init__()
        self.input_proj = nn.Linear(hidden_size, dim)
        self.proj_norm = nn.LayerNorm(dim)
        self.class_queries = nn.Parameter(torch.zeros(num_labels, dim))
        self.layers = nn.ModuleList(AtmDecoderLayer(dim, num_heads) for _ in range(num_layers))
        self.class_embed = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor, batch: PackedBatch) -> ExitPrediction:
        """`tokens` `(num_tokens, hidden_size)` packed as `batch` says. Each image's tokens are padded to the longest
        for the cross-attention (a key mask hides the padding)."""
        places = batch.places(tokens.shape[0])
        padded = places.pad(self.proj_norm(self.input_proj(tokens)))
        # A copy, not an `expand` view: a view of a parameter made under `no_grad` still requires grad, which module
        # hooks (the FLOP counter's) refuse.
        queries = self.class_queries.repeat(batch.batch_size, 1, 1)
        mask_logits = None
        for layer in self.layers:
            queries, mask_logits = layer(queries, padded, places.filled)
        return ExitPrediction(places.unpad(mask_logits.transpose(1, 2)), self.class_embed(queries))


def exit_log_probabilities(prediction: ExitPrediction, image_index: torch.Tensor) -> torch.Tensor:
    """`(num_tokens, num_labels)` log class probabilities of the tokens of an exit's `prediction` (`image_index`:
    each token's image): an MLP head's log-softmax, or an ATM head's log(presence * sigmoid(mask logit)), DToP's
    score (not normalised over classes)."""
    if prediction.presence_logits is None:
        return prediction.token_logits.float().log_softmax(-1)
    presence = prediction.presence_logits.float().log_softmax(-1)[..., 0]  # (batch, num_labels)
    return presence[image_index] + F.logsigmoid(prediction.token_logits.float())


@dataclass(frozen=True)
class ExitRule:
    """
    Which tokens stay in at one exit. A token is confident when its top class probability exceeds `threshold`.
    Protected from halting are, in every image, the `topk_per_class` most confident tokens of each class: with
    `keep_rule="predicted_class"` (DToP's rule) the most confident among the tokens *predicted* as that class, with
    `"class_column"` the tokens with the highest probability of that class, predicted or not. The others stay when
    they are not confident or, with `keep_tokens`, the least confident up to that many per image.
    """

    threshold: float
    keep_tokens: int | None
    topk_per_class: int
    keep_rule: str = "predicted_class"


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
    probability, say), its `k` tokens with the highest score, ties broken toward the earlier token (the same choice
    in every runtime); a score of `-inf` is never picked, so a column with fewer finite scores keeps fewer. Images
    are padded to a common length for one `topk`; no host sync.
    """
    num_tokens, num_columns = scores.shape
    image, position = batch.image_positions(num_tokens)
    # At least k places per image, so that `topk` never asks for more than there are (the padding is never picked).
    padded = scores.new_full((batch.batch_size, torch.sym_max(k, batch.max_length), num_columns), float("-inf"))
    padded[image, position] = scores
    return top_count_first_on_ties(padded, k, dim=1)[image, position].any(-1)


def protected_tokens(probabilities: torch.Tensor, batch: PackedBatch, rule: ExitRule) -> torch.Tensor:
    """`(num_tokens,)` bool: the tokens `rule` protects from halting, per class (see `ExitRule`). For the predicted
    class, the top k by confidence among all tokens predicted as a class are, among its confident tokens, exactly
    the k most confident ones (a confident token outranks an unconfident one): DToP's rule."""
    if rule.keep_rule == "class_column":
        return keep_topk_per_class(probabilities, batch, rule.topk_per_class)
    confidence, predicted = probabilities.max(-1)
    scores = torch.full_like(probabilities, float("-inf")).scatter_(1, predicted[:, None], confidence[:, None])
    return keep_topk_per_class(scores, batch, rule.topk_per_class)


def tokens_to_keep(probabilities: torch.Tensor, batch: PackedBatch, rule: ExitRule) -> tuple[torch.Tensor, PackedBatch]:
    """
    Which tokens `(num_tokens,)` stay in at an exit under `rule`, and the batch they make. By threshold this costs
    one host sync (the new lengths); with `rule.keep_tokens` none: the lengths follow from the old ones, so shapes
    stay static.
    """
    protected = protected_tokens(probabilities, batch, rule)
    confidence = probabilities.amax(-1)
    if rule.keep_tokens is None:
        keep = (confidence <= rule.threshold) | protected
        image = batch.image_index(keep.shape[0])
        lengths = torch.zeros_like(batch.lengths).index_add_(0, image, keep.long())
        return keep, PackedBatch.counted(lengths, batch.attention_mode)
    priority = torch.where(protected, 2.0, 1.0 - confidence)  # the protected first, then the least confident
    keep = keep_topk_per_class(priority[:, None], batch, rule.keep_tokens)
    return keep, batch.clamp(rule.keep_tokens)


@torch.no_grad()  # the decision to halt carries no gradient
def halt(
    survivors: Survivors, log_probabilities: torch.Tensor, layer: int, rule: ExitRule
) -> tuple[Survivors, torch.Tensor]:
    """
    Apply an exit's `rule` to the survivors' log class probabilities `(num_survivors, num_labels)` after block
    `layer` (`exit_log_probabilities`). Returns the new survivors and `order`, the rows of the old survivors that
    stay, in their old order: take `tokens[order]` to re-pack the sequence.
    """
    keep, batch = tokens_to_keep(log_probabilities.exp(), survivors.batch, rule)
    order = first_true_positions(keep, batch.num_tokens)
    halted_here = torch.where(keep, survivors.exit_layer[survivors.index], layer)
    exit_layer = put_rows(survivors.exit_layer, survivors.index, halted_here)
    return Survivors(survivors.index[order], batch, exit_layer), order


def run_exit(
    head: nn.Module, rule: ExitRule, packed: PackedSequence, survivors: Survivors, layer: int, halting: bool
) -> tuple[PackedSequence, Survivors, ExitPrediction]:
    """
    One exit after block `layer`: `head` classifies the survivors' tokens of `packed`; with `halting`, the confident
    ones leave under `rule` (`halt`) and the rest are re-packed behind their class tokens. Returns the new sequence,
    the new survivors and the head's prediction with its token logits on the rows of the whole layout (zeros for the
    tokens that had left before), as `merge_exit_predictions` and `exit_loss` read them.
    """
    tokens = packed.tokens
    prediction = head(tokens, survivors.batch)
    on_layout = prediction.token_logits.new_zeros(survivors.exit_layer.shape[0], prediction.token_logits.shape[1])
    recorded = prediction._replace(token_logits=put_rows(on_layout, survivors.index, prediction.token_logits))
    if halting:
        log_probabilities = exit_log_probabilities(prediction, survivors.batch.image_index(tokens.shape[0]))
        survivors, order = halt(survivors, log_probabilities, layer, rule)
        packed = insert_per_image(tokens[order], packed.extras, survivors.batch, at_start=True)
    return packed, survivors, recorded


def merge_exit_predictions(
    decoder_logits: torch.Tensor, survivors: Survivors, exit_predictions: tuple[ExitPrediction, ...] | None,
    exit_layers: list[int], image_index: torch.Tensor, merge: str,
) -> torch.Tensor:
    """
    Per-token scores for every token of the layout `(num_tokens, num_labels)`: the decoder's (`decoder_logits`, one
    row per survivor) where a token reached the end, its exit head's where it halted (`exit_predictions` hold every
    token of the layout, `image_index` their images). `merge="probabilities"` puts both in log-probabilities (the
    decoder's log-softmax, `exit_log_probabilities`): one scale, as DToP merges probabilities; `"logits"` writes an
    MLP head's raw logits beside the decoder's.
    """
    num_tokens = survivors.exit_layer.shape[0]
    if merge == "probabilities":
        decoder_logits = decoder_logits.float().log_softmax(-1).to(decoder_logits.dtype)
    merged = decoder_logits.new_zeros(num_tokens, decoder_logits.shape[1])
    merged = put_rows(merged, survivors.index, decoder_logits)
    for layer, prediction in zip(exit_layers, exit_predictions or ()):
        halted_here = (survivors.exit_layer == layer)[:, None]
        scores = prediction.token_logits if merge == "logits" else exit_log_probabilities(prediction, image_index)
        merged = torch.where(halted_here, scores.to(merged.dtype), merged)
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
    exit_predictions: tuple[ExitPrediction, ...], exit_layer: torch.Tensor, layout: TokenLayout, labels: torch.Tensor,
    exit_layers: list[int], loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ignore_index: int,
) -> torch.Tensor:
    """Deep supervision: the sum over exits of each head's loss on the cells whose token was still in the sequence
    at that exit (the others are marked `ignore_index`): `loss_function(cell_logits, labels)` for MLP heads,
    `atm_loss` for ATM heads."""
    total = 0
    for layer, prediction in zip(exit_layers, exit_predictions):
        seen = unshare((exit_layer >= layer)[:, None].float(), layout)
        seen = torch.nn.functional.interpolate(seen, size=labels.shape[-2:], mode="nearest")[:, 0] > 0
        seen_labels = torch.where(seen, labels, ignore_index)
        cell_logits = unshare(prediction.token_logits, layout)
        if prediction.presence_logits is None:
            total = total + loss_function(cell_logits, seen_labels)
        else:
            total = total + atm_loss(cell_logits, prediction.presence_logits, seen_labels, ignore_index)
    return total


def atm_loss(
    mask_logits: torch.Tensor, presence_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
    absent_weight: float = 0.1, focal_weight: float = 20.0, dice_weight: float = 1.0,
) -> torch.Tensor:
    """
    DToP's loss for an ATM head (its `ATMLoss`, query i standing for class i, no matching): a weighted
    cross-entropy of each class's presence (absent classes weigh `absent_weight`), plus, for every class present
    in the image, a sigmoid focal loss (alpha 0.25, gamma 2) and a dice loss of its mask upsampled to the labels.
    Unlike DToP, void pixels (`ignore_index`) count in no mask: they are no class's negatives. Each term is a
    per-image mean (over classes, over present classes), then a mean over images, so that a batch split across
    processes averages to the whole batch's loss.

    Args:
        mask_logits: `(batch, num_labels, rows, cols)` on the patch grid.
        presence_logits: `(batch, num_labels, 2)`, present (index 0) or absent (index 1).
        labels: `(batch, height, width)` class ids, `ignore_index` where void.
    """
    num_labels = mask_logits.shape[1]
    valid = labels != ignore_index
    targets = F.one_hot(torch.where(valid, labels, num_labels).long(), num_labels + 1)[..., :num_labels]
    targets = targets.permute(0, 3, 1, 2).float()  # (batch, num_labels, height, width)
    present = targets.flatten(2).amax(-1)  # (batch, num_labels)
    weights = torch.where(present > 0, 1.0, absent_weight)
    presence = F.cross_entropy(presence_logits.float().transpose(1, 2), (present == 0).long(), reduction="none")
    presence = (presence * weights).sum(1) / weights.sum(1)

    logits = F.interpolate(mask_logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = valid[:, None].float()
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    num_valid = valid.flatten(2).sum(-1).clamp(min=1)
    focal = (alpha_t * cross_entropy * (1 - p_t) ** 2 * valid).flatten(2).sum(-1) / num_valid
    overlap = (probabilities * targets * valid).flatten(2).sum(-1)
    dice = 1 - (2 * overlap + 1) / ((probabilities * valid).flatten(2).sum(-1) + targets.flatten(2).sum(-1) + 1)
    num_present = present.sum(1).clamp(min=1)
    masks = ((focal_weight * focal + dice_weight * dice) * present).sum(1) / num_present
    return (presence + masks).mean()


__all__ = [
    "AtmExitHead",
    "ExitHead",
    "ExitPrediction",
    "ExitRule",
    "Survivors",
    "atm_loss",
    "exit_log_probabilities",
    "exit_loss",
    "exit_statistics",
    "halt",
    "keep_topk_per_class",
    "merge_exit_predictions",
    "protected_tokens",
    "run_exit",
    "tokens_to_keep",
]
