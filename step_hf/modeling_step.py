"""STEP: a plain ViT encoder on a packed token state, and a Segmenter mask-transformer decoder.

Parameter names follow timm's `VisionTransformer` (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so timm checkpoints load into `StepModel`
without renaming. Shipped as Hub code next to saved weights: imports only torch, transformers and its siblings.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_step import StepConfig
from .token_layout import PackedBatch, TokenLayout, dense_token_layout, insert_per_image, packed_attention, unshare


@dataclass
class StepModelOutput(ModelOutput):
    """
    Output of [`StepModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(num_tokens, hidden_size)`):
            The encoder's final (layer-normed) features of every (super)token of every image, packed image after
            image; `token_layout` says where each sits. Class tokens are not included. With one token per cell (the
            dense model) this is `(batch_size * rows * cols, hidden_size)` in raster order.
        class_token_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The final features of each image's class token.
        token_layout (`TokenLayout`):
            Which image and which square block of grid cells each token covers, and the cell-to-token map.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The packed (super)token features after the embedding and after each block, each `(num_tokens, dim)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    class_token_state: torch.FloatTensor | None = None
    token_layout: TokenLayout | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class StepSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`StepForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Cross-entropy between the logits, bilinearly upsampled to the label resolution, and `labels`; pixels
            equal to `config.semantic_loss_ignore_index` are ignored.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / 16, width / 16)`):
            Per-cell class scores on the patch grid. Upsample them (or use the image processor's
            `post_process_semantic_segmentation`) to get full-resolution maps.
        token_layout (`TokenLayout`):
            The token layout the encoder and decoder used.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            As in [`StepModelOutput`].
        window_offsets (`torch.LongTensor` of shape `(num_windows, 5)`, *optional*):
            Passed through from the image processor when it cut images into sliding windows, so that
            `post_process_semantic_segmentation` can stitch the windows back together.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_layout: TokenLayout | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    window_offsets: torch.LongTensor | None = None


class Attention(nn.Module):
    """Multi-head self-attention over a packed sequence, each image attending only to itself."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        query, key, value = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        out = packed_attention(query, key, value, batch, self.dropout if self.training else 0.0)
        return self.proj(out.flatten(1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block (timm names) on packed tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, config: StepConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, num_heads, config.qkv_bias, config.attention_probs_dropout_prob)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, mlp_dim, config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), batch))
        return x + self.dropout(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, config: StepConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, channels, H, W)` -> `(batch, H / patch, W / patch, hidden_size)`."""
        return self.proj(pixel_values).permute(0, 2, 3, 1)


class StepPreTrainedModel(PreTrainedModel):
    config_class = StepConfig
    config: StepConfig
    base_model_prefix = "step"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["Block"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, StepModel):
            init.trunc_normal_(module.pos_embed, std=std)
            init.trunc_normal_(module.cls_token, std=std)
        elif isinstance(module, MaskTransformerDecoder):
            init.trunc_normal_(module.cls_emb, std=std)
            scale = module.proj_patch.shape[0] ** -0.5
            init.normal_(module.proj_patch, std=scale)
            init.normal_(module.proj_classes, std=scale)


def check_pixel_values(pixel_values: torch.Tensor, config: StepConfig) -> tuple[int, int]:
    """Validate the input shape; return the patch grid `(rows, cols)`."""
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` must be a 4-D tensor (batch, channels, height, width), got shape "
            f"{tuple(pixel_values.shape)}; add a batch dimension with `pixel_values[None]` for one image."
        )
    _, channels, height, width = pixel_values.shape
    if channels != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {channels} channels but the model expects {config.num_channels}; convert the "
            f"images (e.g. to RGB) with `StepImageProcessor`."
        )
    patch = config.patch_size
    if height < patch or width < patch or height % patch or width % patch:
        raise ValueError(
            f"Input height and width ({height}x{width}) must be positive multiples of the patch size {patch}; "
            f"resize or pad the images (`StepImageProcessor` does this)."
        )
    return height // patch, width // patch


class StepModel(StepPreTrainedModel):
    """The ViT encoder of STEP, working on a packed token state (see `token_layout.py`)."""

    def __init__(self, config: StepConfig):
        super().__init__(config)
        rows, cols = config.image_grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + rows * cols, config.hidden_size))
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(
            Block(config.hidden_size, config.num_attention_heads, config.intermediate_size, config)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def position_grid(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings `(rows, cols, dim)` for an input grid, resized bicubically (no antialias,
        like `transformers`' ViT) from the stored grid when the sizes differ."""
        stored_rows, stored_cols = self.config.image_grid_size
        grid = self.pos_embed[0, 1:].view(1, stored_rows, stored_cols, -1).permute(0, 3, 1, 2)
        if (stored_rows, stored_cols) != tuple(grid_size):
            grid = F.interpolate(grid, size=grid_size, mode="bicubic", align_corners=False)
        return grid[0].permute(1, 2, 0)

    def embed_tokens(self, pixel_values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Patch embedding plus position embedding of every token in `layout`: `(num_tokens, hidden_size)`."""
        patches = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        positions = self.position_grid(layout.grid_size)
        return (
            patches[layout.image_index, layout.cell_row, layout.cell_col]
            + positions[layout.cell_row, layout.cell_col]
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> StepModelOutput | tuple:
        grid_size = check_pixel_values(pixel_values, self.config)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        layout = dense_token_layout(pixel_values.shape[0], grid_size, pixel_values.device)
        tokens = self.embed_tokens(pixel_values, layout)
        class_token = (self.cls_token + self.pos_embed[:, :1]).expand(layout.batch.batch_size, -1, -1)
        sequence, token_positions, class_positions, batch = insert_per_image(
            tokens, class_token, layout.batch, at_start=True
        )

        hidden_states = (tokens,) if output_hidden_states else None
        for block in self.blocks:
            sequence = block(sequence, batch)
            if output_hidden_states:
                hidden_states += (sequence[token_positions],)
        sequence = self.norm(sequence)

        output = StepModelOutput(
            last_hidden_state=sequence[token_positions],
            class_token_state=sequence[class_positions[:, 0]],
            token_layout=layout,
            hidden_states=hidden_states,
        )
        return output if return_dict else output.to_tuple()


class MaskTransformerDecoder(nn.Module):
    """
    Segmenter's mask transformer on packed tokens: the (super)tokens of each image and one learned embedding per
    class go through a few transformer blocks together; a token's class score is the cosine similarity of its
    features with each class's features, followed by a LayerNorm over classes.
    """

    def __init__(self, config: StepConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.proj_dec = nn.Linear(config.hidden_size, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, config.num_labels, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.decoder_num_attention_heads, config.decoder_intermediate_size, config)
            for _ in range(config.decoder_num_hidden_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.proj_patch = nn.Parameter(torch.zeros(dim, dim))
        self.proj_classes = nn.Parameter(torch.zeros(dim, dim))
        self.mask_norm = nn.LayerNorm(config.num_labels, eps=config.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """`tokens` `(num_tokens, hidden_size)` -> per-token class scores `(num_tokens, num_labels)`."""
        batch_size, num_labels = layout.batch.batch_size, self.cls_emb.shape[1]
        sequence, token_positions, class_positions, batch = insert_per_image(
            self.proj_dec(tokens), self.cls_emb.expand(batch_size, -1, -1), layout.batch, at_start=False
        )
        for block in self.blocks:
            sequence = block(sequence, batch)
        sequence = self.decoder_norm(sequence)

        token_features = F.normalize(sequence[token_positions] @ self.proj_patch, dim=-1)
        class_features = F.normalize(sequence[class_positions.flatten()] @ self.proj_classes, dim=-1)
        # Score every token against the classes of every image, then keep its own image's: one matmul, no loop.
        all_scores = (token_features @ class_features.T).view(-1, batch_size, num_labels)
        scores = all_scores.gather(1, layout.image_index[:, None, None].expand(-1, 1, num_labels))[:, 0]
        return self.mask_norm(scores)


class StepForSemanticSegmentation(StepPreTrainedModel):
    """STEP encoder + Segmenter mask-transformer decoder, returning per-cell logits on the patch grid."""

    def __init__(self, config: StepConfig):
        super().__init__(config)
        self.step = StepModel(config)
        self.decoder = MaskTransformerDecoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        window_offsets: torch.LongTensor | None = None,
        **kwargs,
    ) -> StepSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.patch_size` (any aspect ratio).
            labels (`torch.LongTensor` of shape `(batch_size, label_height, label_width)`, *optional*):
                Class id per pixel, `config.semantic_loss_ignore_index` for void. Any resolution: the logits are
                upsampled to it for the loss.
            window_offsets (`torch.LongTensor`, *optional*):
                Sliding-window bookkeeping from `StepImageProcessor`, returned unchanged in the output.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoder_output = self.step(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        layout = encoder_output.token_layout
        token_logits = self.decoder(encoder_output.last_hidden_state, layout)
        logits = unshare(token_logits, layout)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels)

        output = StepSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            token_layout=layout,
            hidden_states=encoder_output.hidden_states,
            window_offsets=window_offsets,
        )
        return output if return_dict else output.to_tuple()

    def loss_function(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at label resolution, ignoring `semantic_loss_ignore_index`."""
        check_labels(labels, logits.shape[0], self.config)
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(upsampled, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)


def check_labels(labels: torch.Tensor, batch_size: int, config: StepConfig) -> None:
    """Refuse label maps of the wrong shape or with values that are neither a class nor the ignore index."""
    if labels.ndim != 3 or labels.shape[0] != batch_size:
        raise ValueError(
            f"`labels` must have shape (batch_size={batch_size}, height, width), got {tuple(labels.shape)}."
        )
    ignore = config.semantic_loss_ignore_index
    invalid = ((labels < 0) | (labels >= config.num_labels)) & (labels != ignore)
    if invalid.any():  # one host sync per loss: a clear error instead of a device-side assert
        image = int(invalid.flatten(1).any(1).nonzero()[0])
        value = int(labels[image][invalid[image]][0])
        raise ValueError(
            f"`labels` of image {image} hold the value {value}, which is not a class id in [0, {config.num_labels})"
            f" nor the ignore index {ignore}; map it to a class or to {ignore}."
        )


__all__ = [
    "StepPreTrainedModel",
    "StepModel",
    "StepForSemanticSegmentation",
    "StepModelOutput",
    "StepSemanticSegmenterOutput",
]
