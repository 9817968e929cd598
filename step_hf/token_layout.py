"""Packed token state: where every token of a batch sits, and the small stateless operations on it.

The encoder never works on a fixed `(batch, rows * cols, dim)` grid. The tokens of all images are concatenated
into one packed sequence `(num_tokens, dim)`, image after image, and a `TokenLayout` says for each token which image
it belongs to and which square block of grid cells it covers. Dense ViT inference is the special case where every
cell is its own token; supertokens (dCTS) and halted tokens (early exits) only change the layout.

Shipped as Hub code next to saved weights: imports only torch.
"""

import json
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

def state_pytree(cls: type) -> type:
    """
    Register a frozen state dataclass as a pytree node, so that `torch.export` (and other pytree users) can carry it
    through a forward: its tensors (and nested states) are the node's children, its plain Python values (lengths
    known on the host, the attention mode) the node's fixed context.
    """
    names = [item.name for item in fields(cls)]

    def is_context(value) -> bool:
        plain = (int, float, str, bool)
        return isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(v, plain) for v in value))

    def flatten(state):
        values = {name: getattr(state, name) for name in names}
        children = [name for name in names if not is_context(values[name])]
        return [values[name] for name in children], (children, {n: v for n, v in values.items() if n not in children})

    def unflatten(children_values, context):
        children, constants = context
        state = object.__new__(cls)
        for name, value in [*zip(children, children_values), *constants.items()]:
            object.__setattr__(state, name, value)
        return state

    def to_json(context) -> str:  # a saved program's spec holds the context as JSON
        return json.dumps(context)

    def from_json(dumped: str):  # JSON has no tuples: every list among the constants was one (lists are children)
        children, constants = json.loads(dumped)
        return children, {name: tuple(v) if isinstance(v, list) else v for name, v in constants.items()}

    try:
        pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__name__}",
                                    to_dumpable_context=to_json, from_dumpable_context=from_json)
    except ValueError:  # already registered: the module was imported again
        pass
    return cls


try:  # a variable-length flash-attention kernel (CUDA builds of recent torch)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


@state_pytree
@dataclass(frozen=True)
class PackedBatch:
    """
    Segment lengths of a packed sequence holding several images, and how to attend within them.

    Attributes:
        lengths (`torch.LongTensor` of shape `(batch_size,)`): tokens per image, on the tokens' device.
        host_lengths (`tuple[int, ...]` or `None`): the same numbers on the host, known when the layout was built (so
            that attention never has to ask the device); `None` inside an exported graph, which knows sizes only as
            symbols (`equal_length`, `max_length`).
        attention_mode (`str`): `"packed"` (a variable-length kernel on GPU, one attention call per image
            elsewhere) or `"padded"` (images padded to the longest with a key mask). Images of equal length always
            run as one plain batch; an exported graph pads unequal ones.
        offsets (`torch.LongTensor` of shape `(batch_size + 1,)`): start of each image's segment, then the total;
            derived from `lengths` when not given.
        cu_seqlens (`torch.IntTensor`): `offsets` in int32, as variable-length attention kernels take them.
        equal_length (`int` or `None`): the length of every image when they are all equal (a dense layout, a token
            budget, exit keep counts), else `None`; derived from `host_lengths` when those are given.
        max_length (`int`): the longest image's length; derived from `host_lengths` when those are given.
    """

    lengths: torch.Tensor
    host_lengths: tuple[int, ...] | None
    attention_mode: str = "packed"
    offsets: torch.Tensor | None = field(default=None, compare=False, repr=False)
    cu_seqlens: torch.Tensor | None = field(default=None, compare=False, repr=False)
    equal_length: int | None = field(default=None, compare=False, repr=False)
    max_length: int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        # Derived once per batch, not per use: every encoder block needs them (values of the frozen lengths).
        if self.offsets is None:
            object.__setattr__(self, "offsets", F.pad(self.lengths.cumsum(0), (1, 0)))
        if self.cu_seqlens is None:
            object.__setattr__(self, "cu_seqlens", self.offsets.to(torch.int32))
        if self.host_lengths is not None:
            equal = len(set(self.host_lengths)) == 1
            object.__setattr__(self, "equal_length", self.host_lengths[0] if equal else None)
            object.__setattr__(self, "max_length", max(self.host_lengths))
        elif self.max_length is None:
            object.__setattr__(self, "max_length", self.equal_length)

    @classmethod
    def of(cls, host_lengths: list[int], device: torch.device | str, attention_mode: str = "packed") -> "PackedBatch":
        return cls(torch.tensor(host_lengths, device=device), tuple(host_lengths), attention_mode)

    @classmethod
    def equal(cls, length: int, batch_size: int, device: torch.device | str, attention_mode: str = "packed"
              ) -> "PackedBatch":
        """`batch_size` images of `length` tokens each (sizes that may be symbols in an exported graph)."""
        lengths = torch.full((batch_size,), length, dtype=torch.long, device=device)
        host_lengths = None if torch.compiler.is_exporting() else (length,) * batch_size
        return cls(lengths, host_lengths, attention_mode, equal_length=length)

    @classmethod
    def counted(cls, lengths: torch.Tensor, attention_mode: str = "packed") -> "PackedBatch":
        """Lengths that only the device knows (a partition or an exit by thresholds): one host sync reads them; an
        exported graph computes the longest in the graph instead (a data-dependent size) and pads to it."""
        if not torch.compiler.is_exporting():
            return cls(lengths, tuple(lengths.tolist()), attention_mode)
        # At least 1 (padding to one empty place is harmless), so that the tracer knows a padded image never has
        # exactly one place with its class token, a case SDPA's decomposition branches on.
        longest = lengths.max().clamp(min=1).item()
        torch._check(longest >= 1)
        return cls(lengths, None, attention_mode, max_length=longest)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def all_equal(self) -> bool:
        return self.equal_length is not None

    @property
    def num_tokens(self) -> int | None:
        """All images' tokens together, when known without reading the device (else `None`)."""
        if self.host_lengths is not None:
            return sum(self.host_lengths)
        return None if self.equal_length is None else self.equal_length * self.batch_size

    def image_index(self, num_tokens: int) -> torch.Tensor:
        """`(num_tokens,)` the image each token belongs to: how many segments end at or before it (no host sync, and
        plain comparisons, which every exporter knows). The last end, the total, is never reached; leaving it in keeps
        the shapes free of `batch_size - 1`, on which a dynamic batch would specialise."""
        token = torch.arange(num_tokens, device=self.lengths.device)
        return (token[:, None] >= self.offsets[None, 1:]).sum(1)

    def image_positions(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each of the `num_tokens` packed tokens, its image and its position within that image's segment."""
        image = self.image_index(num_tokens)
        return image, torch.arange(num_tokens, device=self.lengths.device) - self.offsets[image]

    def places(self, num_tokens: int) -> "PaddedPlaces":
        """The places of the packed tokens in a grid padded to the longest image, segment order kept."""
        image, position = self.image_positions(num_tokens)
        filled = torch.arange(self.max_length, device=self.lengths.device) < self.lengths[:, None]
        return PaddedPlaces(image, position, filled)

    def grow(self, extra_per_image: int) -> "PackedBatch":
        """The batch after `extra_per_image` tokens are added to every image."""
        host = None if self.host_lengths is None else tuple(length + extra_per_image for length in self.host_lengths)
        equal = None if self.equal_length is None else self.equal_length + extra_per_image
        return PackedBatch(self.lengths + extra_per_image, host, self.attention_mode, equal_length=equal,
                           max_length=self.max_length + extra_per_image)

    def clamp(self, most: int) -> "PackedBatch":
        """The batch after every image keeps at most `most` tokens."""
        host = None if self.host_lengths is None else tuple(min(most, length) for length in self.host_lengths)
        equal = None if self.equal_length is None else torch.sym_min(most, self.equal_length)
        return PackedBatch(self.lengths.clamp(max=most), host, self.attention_mode, equal_length=equal,
                           max_length=torch.sym_min(most, self.max_length))


def top_count_first_on_ties(values: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """
    Bool, the shape of `values`: along `dim`, the `count` largest values, ties broken by position (the earlier
    first), i.e. exactly the first `count` of a stable descending sort, from a top-k (which every exporter has, and a
    stable sort not; top-k alone breaks ties as each backend likes). The `count`-th largest value is the cut: every
    value above it is in, and of those equal to it the earliest fill the places left. `-inf` is never picked.
    """
    if count == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    cut = values.topk(count, dim=dim).values.narrow(dim, count - 1, 1)
    above, at_cut = values > cut, values == cut
    # An entry at the cut is in while the entries above plus those at the cut up to it fit in `count`. (Written as
    # a sum against `count`: OpenVINO computed `count - above.sum(...)` wrongly for every image but the first.)
    fills = at_cut & (at_cut.cumsum(dim) + above.sum(dim, keepdim=True) <= count)
    return (above | fills) & (values > float("-inf"))


def first_true_positions(mask: torch.Tensor, count: int | None) -> torch.Tensor:
    """
    The indices of the true entries of a 1-D `mask`, in increasing order. With their `count` known (a token budget,
    exit keep counts) the shape is static: a top-k over a key that ranks the true entries first, earlier before
    later (unique keys, so ties cannot reorder them; every exporter has top-k, none a stable sort). With `count`
    `None` (thresholds inside an exported graph) the size is data-dependent: `nonzero`.
    """
    if count is None:
        return torch.nonzero(mask)[:, 0]
    position = torch.arange(mask.shape[0], device=mask.device)
    key = torch.where(mask, mask.shape[0] - position, -position)
    return key.topk(count).indices


@state_pytree
@dataclass(frozen=True)
class TokenLayout:
    """
    Where each (super)token of a packed batch sits on the patch grid. Class tokens are not part of it.

    Attributes:
        batch (`PackedBatch`): tokens per image.
        image_index (`torch.LongTensor` of shape `(num_tokens,)`): the image of each token.
        cell_row, cell_col (`torch.LongTensor` of shape `(num_tokens,)`): the top-left grid cell each token covers.
        block_side (`torch.LongTensor` of shape `(num_tokens,)`): side, in cells, of the square block it covers
            (1 = a plain 16x16 patch).
        cell_to_token (`torch.LongTensor` of shape `(batch_size, grid_rows, grid_cols)`): for every grid cell, the
            index of the token covering it in the packed sequence. Drives un-sharing of per-token outputs.
    """

    batch: PackedBatch
    image_index: torch.Tensor
    cell_row: torch.Tensor
    cell_col: torch.Tensor
    block_side: torch.Tensor
    cell_to_token: torch.Tensor

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.cell_to_token.shape[1:])

    @property
    def num_tokens(self) -> int:
        return self.image_index.shape[0]


def refuse_in_export(what: str) -> None:
    """Refuse, inside `torch.export`, what an exported graph cannot compute, saying which settings to change (`what`
    names the problem and the fix) instead of failing deep in the tracer."""
    if torch.compiler.is_exporting():
        raise ValueError(f"This cannot be exported: {what}")


def dense_token_layout(
    batch_size: int, grid_size: tuple[int, int], device: torch.device, attention_mode: str = "packed"
) -> TokenLayout:
    """The layout of a plain ViT: one token per cell, in raster order, for every image."""
    rows, cols = grid_size
    # Broadcast aranges rather than `%` and `//` of a token index: the sizes may be symbols (an export with dynamic
    # shapes), which the ONNX exporter cannot take as the divisor of a tensor.
    shape = (batch_size, rows, cols)
    image = torch.arange(batch_size, device=device)[:, None, None].expand(shape)
    row = torch.arange(rows, device=device)[None, :, None].expand(shape)
    col = torch.arange(cols, device=device)[None, None, :].expand(shape)
    return TokenLayout(
        batch=PackedBatch.equal(rows * cols, batch_size, device, attention_mode),
        image_index=image.flatten(),
        cell_row=row.flatten(),
        cell_col=col.flatten(),
        block_side=torch.ones(batch_size * rows * cols, dtype=torch.long, device=device),
        cell_to_token=torch.arange(batch_size * rows * cols, device=device).view(shape),
    )


class PackedSequence(NamedTuple):
    """Packed tokens with extra tokens per image (class tokens, class embeddings) inserted: the combined
    `sequence` `(num_tokens + batch_size * num_extra, dim)`, where the original tokens went (`token_positions`,
    `(num_tokens,)`), where the extra tokens went (`extra_positions`, `(batch_size, num_extra)`), and its lengths
    (`batch`)."""

    sequence: torch.Tensor
    token_positions: torch.Tensor
    extra_positions: torch.Tensor
    batch: PackedBatch

    @property
    def tokens(self) -> torch.Tensor:
        """The original tokens, as they are now in `sequence`."""
        return self.sequence[self.token_positions]

    @property
    def extras(self) -> torch.Tensor:
        """The extra tokens, `(batch_size, num_extra, dim)`."""
        return self.sequence[self.extra_positions]


class PaddedPlaces(NamedTuple):
    """Where each row of a packed sequence goes in a padded `(batch_size, length)` grid (`image`, `position`, each
    `(num_rows,)`), and which places of the grid are filled (`filled`, `(batch_size, length)` bool)."""

    image: torch.Tensor
    position: torch.Tensor
    filled: torch.Tensor

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """Packed `(num_rows, ...)` values in the grid, zeros elsewhere: `(batch_size, length, ...)`."""
        padded = values.new_zeros(*self.filled.shape, *values.shape[1:])
        padded[self.image, self.position] = values
        return padded

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """The packed rows back out of the grid (differentiable: gradients reach `padded`)."""
        return padded[self.image, self.position]


def places_by_layout(sequence: "PackedSequence", token_index: torch.Tensor, layout: TokenLayout) -> PaddedPlaces:
    """The places of a sequence holding, per image, its class token (the one extra token) and the layout tokens
    `token_index`: the class token at position 0, token i of an image's layout at position 1 + i, in a grid of
    `1 + max_tokens` positions (so halted tokens leave their places empty)."""
    rows, batch_size = sequence.sequence.shape[0], layout.batch.batch_size
    token_image = layout.image_index[token_index]
    class_rows = sequence.extra_positions[:, 0]
    image = torch.empty(rows, dtype=torch.long, device=token_index.device)
    image = put_rows(image, sequence.token_positions, token_image)
    image = put_rows(image, class_rows, torch.arange(batch_size, device=image.device))
    position = put_rows(torch.zeros_like(image), sequence.token_positions,
                        1 + token_index - layout.batch.offsets[token_image])
    filled = torch.zeros(batch_size, 1 + layout.batch.max_length, dtype=torch.bool, device=image.device)
    filled[image, position] = True
    return PaddedPlaces(image, position, filled)


def put_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`target` with `rows` written at the positions `index` of its first dimension (`target[index] = rows`, out of
    place). A scatter, not an index assignment or `index_copy`: the ONNX exporter's rewrite of those guards on the
    number of values written, which a data-dependent count of rows (thresholds) does not allow."""
    return target.scatter(0, index.view(-1, *[1] * (rows.ndim - 1)).expand_as(rows), rows)


def insert_per_image(tokens: torch.Tensor, extra: torch.Tensor, batch: PackedBatch, at_start: bool) -> PackedSequence:
    """
    Add `extra` tokens to every image of a packed sequence, before or after its own tokens.

    Args:
        tokens: `(num_tokens, dim)` packed tokens described by `batch`.
        extra: `(batch_size, num_extra, dim)`, e.g. the class token (1, at the start) or the decoder's class
            embeddings (num_labels, at the end).
        batch: segment lengths of `tokens`.
        at_start: put the extra tokens first in each segment (else last).

    Returns:
        A `PackedSequence`.
    """
    num_tokens, num_extra = tokens.shape[0], extra.shape[1]
    new_batch = batch.grow(num_extra)
    image = batch.image_index(num_tokens)
    token_positions = torch.arange(num_tokens, device=tokens.device) + num_extra * (image + int(at_start))
    segment_start = new_batch.offsets[:-1] if at_start else new_batch.offsets[:-1] + batch.lengths
    extra_positions = segment_start[:, None] + torch.arange(num_extra, device=tokens.device)
    sequence = tokens.new_empty(num_tokens + extra_positions.numel(), tokens.shape[1])
    sequence = put_rows(sequence, token_positions, tokens)
    sequence = put_rows(sequence, extra_positions.flatten(), extra.reshape(-1, tokens.shape[1]).to(tokens.dtype))
    return PackedSequence(sequence, token_positions, extra_positions, new_batch)


def packed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: PackedBatch, dropout_p: float = 0.0
) -> torch.Tensor:
    """
    Scaled dot-product attention restricted to each image of a packed sequence.

    `query`, `key`, `value`: `(num_tokens, num_heads, head_dim)`. Returns the same shape. Equal-length images run
    as one ordinary batch. Otherwise, in `"packed"` mode, a variable-length flash kernel runs on the packed tokens
    where the build has one (CUDA, half precision, no dropout), else one call per image; in `"padded"` mode images
    are padded to the longest with a key mask (padding queries are computed and thrown away).
    """
    num_tokens, num_heads, head_dim = query.shape
    batch_size, length = batch.batch_size, batch.max_length
    if batch.all_equal:
        q, k, v = (x.view(batch_size, length, num_heads, head_dim).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
    if batch.attention_mode == "packed" and batch.host_lengths is not None:
        half = query.dtype in (torch.float16, torch.bfloat16)
        if varlen_attn is not None and query.is_cuda and half and not dropout_p:
            return varlen_attn(query, key, value, batch.cu_seqlens, batch.cu_seqlens, length, length)
        pieces = zip(*(x.split(batch.host_lengths) for x in (query, key, value)))
        return torch.cat([
            F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           dropout_p=dropout_p).transpose(0, 1)
            for q, k, v in pieces
        ])

    places = batch.places(num_tokens)
    query, key, value = (places.pad(x).transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=places.filled[:, None, None, :],
                                         dropout_p=dropout_p)
    return places.unpad(out.transpose(1, 2))


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, places: PaddedPlaces, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Attention computed explicitly, softmax of the scaled scores, for when its weights are wanted. The packed rows
    `(num_rows, num_heads, head_dim)` are laid in the padded grid of `places` (each image attends to its own filled
    places only). Returns the output, packed as the input, and the weights `(batch_size, num_heads, length, length)`
    that computed it, zero at empty places.
    """
    query, key, value = (places.pad(x).transpose(1, 2) for x in (query, key, value))
    filled = places.filled
    scores = (query @ key.transpose(-1, -2)).float() * query.shape[-1] ** -0.5
    weights = scores.masked_fill(~filled[:, None, None, :], float("-inf")).softmax(-1)
    weights = (weights * filled[:, None, :, None]).to(query.dtype)  # empty places attend to nothing
    out = F.dropout(weights, dropout_p) @ value
    return places.unpad(out.transpose(1, 2)), weights


def unshare(token_values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Copy each token's values `(num_tokens, channels)` onto every cell it covers: `(batch, channels, rows, cols)`."""
    return token_values[layout.cell_to_token].permute(0, 3, 1, 2)


__all__ = [
    "PackedBatch",
    "PackedSequence",
    "PaddedPlaces",
    "TokenLayout",
    "dense_token_layout",
    "eager_attention",
    "first_true_positions",
    "insert_per_image",
    "put_rows",
    "packed_attention",
    "places_by_layout",
    "refuse_in_export",
    "state_pytree",
    "top_count_first_on_ties",
    "unshare",
]
