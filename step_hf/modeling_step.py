"""STEP: a plain ViT encoder on a packed token state, and a Segmenter mask-transformer decoder.

Parameter names follow timm's `VisionTransformer` (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so timm checkpoints load into `StepModel`
without renaming. Shipped as Hub code next to saved weights: imports only torch, transformers and its siblings.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .configuration_step import PARTITION_SOURCES, TRAINABLE_COMPONENTS, StepConfig
from .superpatch import (
    TARGET_IGNORE,
    blocks_to_cells,
    budget_token_count,
    cells_to_blocks,
    check_superpatch_map,
    decisions_for_budget,
    decisions_from_targets,
    decisions_from_thresholds,
    layout_from_superpatch_map,
    partition_from_decisions,
)
from .token_layout import PackedBatch, TokenLayout, dense_token_layout, insert_per_image, packed_attention, unshare

logger = logging.get_logger(__name__)

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
        superpatch_map (`torch.LongTensor` of shape `(batch_size, height / 16, width / 16)`):
            The partition used: the side, in cells, of the superpatch covering each cell (1 = a plain patch).
        token_counts (`torch.LongTensor` of shape `(batch_size,)`):
            Tokens embedded per image (class token excluded).
        policy_logits (`torch.FloatTensor` of shape `(batch_size, len(config.shared_sizes), height / 16, width / 16)`,
            *optional*, returned when the policy ran): for each superpatch size above 1, the policy's logit that
            the aligned block containing each cell holds a single class (the block's value repeated on its cells;
            `-inf` where no whole block fits).
        survivor_index (`torch.LongTensor` of shape `(num_survivors,)`):
            For each row of `last_hidden_state`, the index of its token in `token_layout`. With halting off every
            token survives and this is `arange(num_tokens)`.
        survivor_batch (`PackedBatch`):
            Tokens per image that reached the last block.
        token_exit_layer (`torch.LongTensor` of shape `(num_tokens,)`):
            For each token of `token_layout`, the block after which it halted; `num_hidden_layers` if it never did.
        exit_logits (`tuple(torch.FloatTensor)`, *optional*, returned when the exit heads ran):
            One `(num_tokens, num_labels)` tensor per exit: the exit head's class logits for every token of
            `token_layout` that was still in the sequence at that exit (zeros for the others).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The packed (super)token features after the embedding and after each block (only the tokens still in the
            sequence), each `(tokens, dim)`.

    `last_hidden_state` holds the tokens that reached the end of the encoder: all of them unless `config.halting` is
    on, in which case halted tokens have left (see `survivor_index`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    class_token_state: torch.FloatTensor | None = None
    token_layout: TokenLayout | None = None
    superpatch_map: torch.LongTensor | None = None
    token_counts: torch.LongTensor | None = None
    policy_logits: torch.FloatTensor | None = None
    survivor_index: torch.LongTensor | None = None
    survivor_batch: PackedBatch | None = None
    token_exit_layer: torch.LongTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class StepSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`StepForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` or `superpatch_targets` are
            given): the segmentation loss plus `config.policy_loss_weight` times the policy loss.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / 16, width / 16)`):
            Per-cell class scores on the patch grid; a supertoken's scores are copied onto every cell it covers.
            Upsample them (or use the image processor's `post_process_semantic_segmentation`) to get
            full-resolution maps. `None` with `policy_only=True`.
        segmentation_loss (`torch.FloatTensor`, *optional*): cross-entropy between the logits, bilinearly upsampled
            to the label resolution, and `labels`, averaged over each image's pixels, then over images; pixels equal
            to `config.semantic_loss_ignore_index` are ignored.
        exit_loss (`torch.FloatTensor`, *optional*, in training with `labels` and exit heads): the sum over exits of
            each head's cross-entropy on the cells whose token it saw (deep supervision), before
            `config.exit_loss_weight`.
        policy_loss (`torch.FloatTensor`, *optional*): binary cross-entropy of the policy against
            `superpatch_targets` (targets 255 ignored), averaged per size, then over sizes.
        token_layout (`TokenLayout`):
            The token layout the encoder and decoder used.
        superpatch_map, token_counts, policy_logits:
            As in [`StepModelOutput`].
        exit_map (`torch.LongTensor` of shape `(batch_size, height / 16, width / 16)`):
            The block after which each cell's token halted; `num_hidden_layers` where it never halted. A halted
            cell's logits are its exit head's; the others' are the decoder's.
        halted_share (`torch.FloatTensor` of shape `(batch_size, len(config.exit_layers))`):
            The share of each image's tokens halted at each exit.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            As in [`StepModelOutput`].
        window_offsets (`torch.LongTensor` of shape `(num_windows, 5)`, *optional*):
            Passed through from the image processor when it cut images into sliding windows, so that
            `post_process_semantic_segmentation` can stitch the windows back together.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    segmentation_loss: torch.FloatTensor | None = None
    policy_loss: torch.FloatTensor | None = None
    exit_loss: torch.FloatTensor | None = None
    token_layout: TokenLayout | None = None
    superpatch_map: torch.LongTensor | None = None
    token_counts: torch.LongTensor | None = None
    policy_logits: torch.FloatTensor | None = None
    exit_map: torch.LongTensor | None = None
    halted_share: torch.FloatTensor | None = None
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


class PatchConv2d(nn.Conv2d):
    """
    A convolution whose stride equals its kernel (no padding, no overlap). On CUDA it runs as one matrix product
    over the image's patches (same parameters, same numbers): cuDNN takes these shapes (3 input channels, large
    kernels) through a slow implicit-GEMM kernel, 2.9 ms for a ViT-L patch embedding of 8 images at 1024x1024 on an
    H200 (docs/BENCHMARKS.md); on CPU the convolution is the faster. `patches_last` returns `(batch, rows, cols,
    out_channels)`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=kernel_size, bias=bias)

    def patches_last(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_cuda:
            return super().forward(images).permute(0, 2, 3, 1)
        return self.as_matrix_product(images)

    def as_matrix_product(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        (kernel_rows, kernel_cols), weight = self.kernel_size, self.weight
        rows, cols = height // kernel_rows, width // kernel_cols
        patches = images[:, :, : rows * kernel_rows, : cols * kernel_cols]
        patches = patches.reshape(batch, channels, rows, kernel_rows, cols, kernel_cols).permute(0, 2, 4, 1, 3, 5)
        return F.linear(patches.flatten(3), weight.flatten(1), self.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patches_last(images).permute(0, 3, 1, 2)


class ImageNorm(nn.GroupNorm):
    """
    GroupNorm with a single group: each image normalised over all its channels and pixels, then scaled per channel.
    On CUDA computed with a plain reduction: PyTorch's GroupNorm kernel spreads its statistics over batch x groups
    thread blocks only (8 for a batch of 8), 0.24 ms per call on the policy's 256x256 stem on an H200
    (docs/BENCHMARKS.md); on CPU the GroupNorm kernel is the faster.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.by_reduction(features) if features.is_cuda else super().forward(features)

    def by_reduction(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(1).float()
        variance, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        normalized = ((flat - mean) * torch.rsqrt(variance + self.eps)).view(features.shape)
        return (normalized * self.weight[:, None, None] + self.bias[:, None, None]).to(features.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, config: StepConfig):
        super().__init__()
        self.proj = PatchConv2d(config.num_channels, config.hidden_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, channels, H, W)` -> `(batch, H / patch, W / patch, hidden_size)`."""
        return self.proj.patches_last(pixel_values)


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    # Strided convolutions tile the image exactly, like patches; the others keep its size.
    if stride == 1:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    elif stride == kernel_size:
        conv = PatchConv2d(in_channels, out_channels, kernel_size, bias=False)
    else:
        raise ValueError(f"A strided policy convolution must have its stride equal its kernel, got {stride}.")
    # GroupNorm, not BatchNorm: per-image statistics, so a partition never depends on the rest of the batch or on
    # train/eval mode, and the coarsest levels (often 1x1) train at any batch size.
    return nn.Sequential(conv, ImageNorm(out_channels), nn.ReLU(inplace=True))


def bicubic_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """`(out_size, in_size)`: the weights 1-D bicubic resizing (align_corners=False, no antialias) applies, read off
    by resizing the identity with `F.interpolate` itself (the width axis, 1 -> 1, is left as it is)."""
    identity = torch.eye(in_size, device=device)[:, None, :, None]
    return F.interpolate(identity, size=(out_size, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T


def resize_grid_bicubic(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    Resize a `(rows, cols, dim)` grid as `F.interpolate(..., mode="bicubic", align_corners=False)` does, as two
    small matrix products (bicubic resizing is separable), computed in float32. Same numbers up to rounding, but
    the CUDA bicubic kernel walks every channel in one thread per output cell: 3.6 ms for a 45x60x384 grid on an
    H200, a third of a ViT-S forward at batch 8 (docs/BENCHMARKS.md).
    """
    (rows, cols, dim), device = grid.shape, grid.device
    resized = bicubic_weights(rows, size[0], device) @ grid.float().reshape(rows, cols * dim)  # rows first
    resized = bicubic_weights(cols, size[1], device) @ resized.view(size[0], cols, dim)  # then columns
    return resized.to(grid.dtype)


class PolicyNetwork(nn.Module):
    """
    The dCTS policy: a small CNN scoring, for every superpatch size s, each aligned s x s block of patches with the
    logit that it holds a single class. A patch-aligned stem reaches the patch grid; each further level halves the
    grid with a 2x2 stride-2 convolution, so the level for size s has exactly one output per whole aligned block.
    """

    def __init__(self, config: StepConfig):
        super().__init__()
        width, patch = config.policy_hidden_size, config.patch_size
        self.stem = nn.Sequential(
            conv_norm_relu(config.num_channels, width // 4, 4, stride=4),
            conv_norm_relu(width // 4, width // 2, 3),
            conv_norm_relu(width // 2, width, patch // 4, stride=patch // 4),
            conv_norm_relu(width, width, 3),
        )
        self.sizes = config.shared_sizes
        num_levels = max(self.sizes).bit_length() - 1
        self.levels = nn.ModuleList(
            nn.Sequential(conv_norm_relu(width, width, 2, stride=2), conv_norm_relu(width, width, 3))
            for _ in range(num_levels)
        )
        self.heads = nn.ModuleDict({str(size): nn.Conv2d(width, 1, 1) for size in self.sizes})

    def forward(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """`(batch, channels, H, W)` -> for each size s, logits `(batch, H / 16 // s, W / 16 // s)`."""
        features = self.stem(pixel_values)
        block_logits = {}
        for level, layer in enumerate(self.levels, start=1):
            if min(features.shape[-2:]) < 2:  # no whole block of this size or larger fits
                break
            features = layer(features)
            if 2**level in self.sizes:
                block_logits[2**level] = self.heads[str(2**level)](features)[:, 0]
        for size in self.sizes:  # sizes larger than the grid: no blocks at all
            if size not in block_logits:
                block_logits[size] = features.new_zeros(features.shape[0], 0, 0)
        return block_logits


class ExitHead(nn.Module):
    """A light per-token classifier run after an encoder block: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, config: StepConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.exit_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.exit_hidden_size, config.num_labels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(tokens))))


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
    image = batch.image_index(num_tokens)
    position = torch.arange(num_tokens, device=scores.device) - batch.offsets[image]
    padded = scores.new_full((batch.batch_size, batch.max_length, num_columns), float("-inf"))
    padded[image, position] = scores
    top = padded.topk(k, dim=1).indices  # (batch, k, columns), positions within each image
    real = top < batch.lengths[:, None, None]  # an image with fewer than k tokens picks padding: drop it
    packed = torch.where(real, batch.offsets[:-1, None, None] + top, num_tokens)
    return keep.index_fill_(0, packed.flatten(), True)[:num_tokens]


def tokens_to_keep(
    probabilities: torch.Tensor, batch: PackedBatch, threshold: float, keep_tokens: int | None, topk_per_class: int
) -> tuple[torch.Tensor, PackedBatch]:
    """
    Which tokens `(num_tokens,)` stay in at an exit, and the batch they make. Every image's `topk_per_class` most
    confident tokens per class stay; of the others, those whose top class probability is at most `threshold` (one
    host sync: the new lengths), or, with `keep_tokens`, the least confident up to that many per image (no sync:
    the lengths follow from the old ones, so shapes stay static).
    """
    protected = keep_topk_per_class(probabilities, batch, topk_per_class)
    confidence = probabilities.amax(-1)
    if keep_tokens is None:
        keep = (confidence <= threshold) | protected
        image = batch.image_index(keep.shape[0])
        lengths = torch.zeros_like(batch.lengths).index_add_(0, image, keep.long())
        return keep, PackedBatch(lengths, tuple(lengths.tolist()), batch.attention_mode)
    priority = torch.where(protected, 2.0, 1.0 - confidence)  # the protected first, then the least confident
    keep = keep_topk_per_class(priority[:, None], batch, keep_tokens)
    host_lengths = tuple(min(keep_tokens, length) for length in batch.host_lengths)
    return keep, PackedBatch(batch.lengths.clamp(max=keep_tokens), host_lengths, batch.attention_mode)


# The `from_pretrained` arguments that locate `config.json` (local folder, cache or Hub).
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class StepPreTrainedModel(PreTrainedModel):
    config_class = StepConfig
    config: StepConfig
    base_model_prefix = "step"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["Block"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """
        As [`PreTrainedModel.from_pretrained`], but without a `config` object the checkpoint's `config.json` must
        exist and describe a STEP model: otherwise `transformers` builds a default config (no file) or reads
        another model type's fields (e.g. a ViT's `layer_norm_eps`), and the weights load into the wrong model.
        """
        if not isinstance(config, PreTrainedConfig):
            source = config if config is not None else pretrained_model_name_or_path
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config_dict, _ = cls.config_class.get_config_dict(source, **hub_kwargs)
            model_type = config_dict.get("model_type")
            if not config_dict:
                raise OSError(
                    f"{source} has no config.json, so `from_pretrained` cannot know the architecture; save the "
                    "model with `save_pretrained` or pass `config=StepConfig(...)`."
                )
            if model_type != cls.config_class.model_type:
                raise ValueError(
                    f"The config.json of {source} is for model type {model_type!r}, not "
                    f"{cls.config_class.model_type!r}. To start a STEP model from ViT weights, build a StepConfig "
                    "and use `step_hf.load_vit_weights`; or pass `config=` explicitly."
                )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    def parameter_groups(self) -> dict[str, list[str]]:
        """
        The names of this model's parameters by part, keyed as `config.trained_components`: `"encoder"` (the ViT:
        embeddings, blocks, final norm), `"policy"`, `"exit_heads"` and `"decoder"` (empty for a bare `StepModel`).
        The one place that says which parameter belongs to which part: training stages, optimiser groups and ViT
        weight loading all use it.
        """
        encoder = self.base_model
        parts = {"policy": encoder.policy, "exit_heads": encoder.exit_heads, "decoder": getattr(self, "decoder", None)}
        part_of = {id(parameter): part for part, module in parts.items() if module is not None
                   for parameter in module.parameters()}
        groups = {part: [] for part in TRAINABLE_COMPONENTS}
        for name, parameter in self.named_parameters():
            groups[part_of.get(id(parameter), "encoder")].append(name)
        return groups

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
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
    if not pixel_values.is_floating_point():  # raw 0..255 pixels would run, unnormalised, without an error
        raise TypeError(
            f"`pixel_values` must be floating-point normalised images, got {pixel_values.dtype}; prepare the images "
            "with `StepImageProcessor`."
        )
    batch_size, channels, height, width = pixel_values.shape
    if batch_size == 0:
        raise ValueError(
            f"`pixel_values` is an empty batch (shape {tuple(pixel_values.shape)}): pass at least one image."
        )
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


def warn_if_untrained(config: StepConfig, parts: list[str]) -> None:
    """Log (once) when an inference forward uses parts that `config.trained_components` does not list. The message
    names every untrained part of the model, so that the encoder's and the segmenter's checks log it once."""
    trained = config.trained_components
    if trained is None or all(part in trained for part in parts):
        return
    present = {"policy": bool(config.shared_sizes), "exit_heads": bool(config.exit_layers)}
    untrained = [part for part in TRAINABLE_COMPONENTS if part not in trained and present.get(part, True)]
    advice = {
        "policy": "run without the policy (`partition_source=\"dense\"`, or `config.update_settings`) or train it",
        "encoder": "train the segmenter (e.g. `examples/train.py --stage segmenter`)",
        "exit_heads": "switch halting off (`config.update_settings(halting=False)`) or train the exit heads",
    }
    fixes = "; ".join(advice[part] for part in untrained if part in advice)
    logger.warning_once(
        f"This model's {', '.join(untrained)} never trained (config.trained_components = {trained}), so outputs that "
        f"use them are arbitrary: {fixes}."
    )


class StepModel(StepPreTrainedModel):
    """
    The STEP encoder: the dCTS policy chooses a partition of the patch grid into superpatches, each superpatch is
    embedded as one token, and a plain ViT runs on the packed tokens (see `token_layout.py`).
    """

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
        self.policy = PolicyNetwork(config) if config.shared_sizes else None
        self.exit_heads = nn.ModuleList(ExitHead(config) for _ in config.exit_layers)
        self.post_init()

    def position_grid(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings `(rows, cols, dim)` for an input grid, resized bicubically (no antialias,
        like `transformers`' ViT) from the stored grid when the sizes differ."""
        stored_rows, stored_cols = self.config.image_grid_size
        grid = self.pos_embed[0, 1:].view(stored_rows, stored_cols, -1)
        return resize_grid_bicubic(grid, tuple(grid_size)) if (stored_rows, stored_cols) != tuple(grid_size) else grid

    def embed_tokens(self, pixel_values: torch.Tensor, layout: TokenLayout, sizes: list[int]) -> torch.Tensor:
        """
        Embed every token of `layout`: `(num_tokens, hidden_size)`. A superpatch of side s is the image
        average-pooled by s, cut by the shared patch embedding; its position embedding is the mean of the ones it
        covers. At s = 1 this is the plain ViT embedding. One table of embeddings per size in `sizes`, then one
        gather: no loop over tokens or images.
        """
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)
        positions = self.position_grid(layout.grid_size).permute(2, 0, 1)
        sizes = [size for size in sizes if size <= min(layout.grid_size)]  # larger ones have no whole block
        tables = []
        for size in sizes:
            pooled_pixels = pixel_values if size == 1 else F.avg_pool2d(pixel_values, size)
            pooled_positions = positions if size == 1 else F.avg_pool2d(positions, size)
            tables.append((self.patch_embed(pooled_pixels) + pooled_positions.permute(1, 2, 0)).flatten(0, 2))

        rows, cols = layout.grid_size
        device = layout.cell_size.device
        size_of_level = torch.tensor(sizes, device=device)
        level = torch.searchsorted(size_of_level, layout.cell_size)
        level_rows, level_cols = rows // size_of_level[level], cols // size_of_level[level]
        table_start = F.pad(torch.tensor([len(table) for table in tables], device=device).cumsum(0), (1, 0))
        size = layout.cell_size
        row_in_table = (layout.image_index * level_rows + layout.cell_row // size) * level_cols
        row_in_table = row_in_table + layout.cell_col // size
        return torch.cat(tables)[table_start[level] + row_in_table]

    def choose_partition(
        self,
        pixel_values: torch.Tensor,
        grid_size: tuple[int, int],
        superpatch_map: torch.Tensor | None,
        superpatch_targets: torch.Tensor | None,
        partition_source: str,
        run_policy: bool,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor] | None, int | None]:
        """The partition to embed (`None` = dense), the policy's block logits (`None` if it did not run), and the
        tokens per image when a token budget fixes them (`None` otherwise)."""
        sizes, budget = self.config.shared_sizes, self.config.token_budget
        if budget is not None and budget > grid_size[0] * grid_size[1] and partition_source == "policy":
            raise ValueError(
                f"`token_budget` ({budget}) exceeds the {grid_size[0]}x{grid_size[1]} grid of this input; lower it or "
                "feed larger images."
            )
        block_logits = self.policy(pixel_values) if self.policy is not None and run_policy else None
        if superpatch_map is not None:
            check_superpatch_map(superpatch_map, self.config.superpatch_sizes, grid_size, pixel_values.shape[0])
            return superpatch_map.long(), block_logits, None
        if partition_source == "dense" or not sizes:
            return None, block_logits, None
        if partition_source == "oracle":
            check_superpatch_targets(superpatch_targets, pixel_values.shape[0], len(sizes), grid_size)
            decisions = decisions_from_targets(superpatch_targets, sizes)
            return partition_from_decisions(decisions, grid_size), block_logits, None
        if budget is not None:
            decisions = decisions_for_budget(block_logits, grid_size, budget)
            tokens_per_image = budget_token_count(grid_size[0] * grid_size[1], budget)
            return partition_from_decisions(decisions, grid_size), block_logits, tokens_per_image
        decisions = decisions_from_thresholds(block_logits, self.config.policy_thresholds)
        return partition_from_decisions(decisions, grid_size), block_logits, None

    def forward(
        self,
        pixel_values: torch.Tensor,
        superpatch_map: torch.LongTensor | None = None,
        superpatch_targets: torch.Tensor | None = None,
        partition_source: str | None = None,
        policy_only: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> StepModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.patch_size` (any aspect ratio).
            superpatch_map (`torch.LongTensor` of shape `(batch_size, height / 16, width / 16)`, *optional*):
                A partition chosen by the caller; checked, and used instead of `partition_source`.
            superpatch_targets (`torch.Tensor` of shape `(batch_size, len(config.shared_sizes), height / 16,
                width / 16)`, *optional*): ground-truth sharing targets from `StepImageProcessor`; needed by the
                `"oracle"` source and by the policy loss.
            partition_source (`str`, *optional*): `"policy"`, `"oracle"` or `"dense"`; defaults to
                `config.partition_source`.
            policy_only (`bool`, defaults to `False`): run only the policy and the partition (training stage 1,
                token-count analysis); the ViT does not run and `last_hidden_state` is `None`.
        """
        grid_size = check_pixel_values(pixel_values, self.config)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        partition_source = partition_source or self.config.partition_source
        if partition_source not in PARTITION_SOURCES:
            raise ValueError(f"`partition_source` must be 'policy', 'oracle' or 'dense', got {partition_source!r}.")

        if not self.training:  # a training forward is how a part gets trained
            uses_policy = partition_source == "policy" and superpatch_map is None and bool(self.config.shared_sizes)
            used = ["policy"] if uses_policy else []
            if not policy_only:
                used += ["encoder", "exit_heads"] if self.config.halting else ["encoder"]
            warn_if_untrained(self.config, used)
        superpatch_map, block_logits, tokens_per_image = self.choose_partition(
            pixel_values, grid_size, superpatch_map, superpatch_targets, partition_source,
            run_policy=policy_only or (partition_source == "policy" and superpatch_map is None),
        )
        batch_size, device = pixel_values.shape[0], pixel_values.device
        if superpatch_map is None:
            layout, sizes = dense_token_layout(batch_size, grid_size, device), [1]
            superpatch_map = torch.ones(batch_size, *grid_size, dtype=torch.long, device=device)
        else:  # a count fixed by a token budget needs no host sync: static shapes
            layout, sizes = layout_from_superpatch_map(superpatch_map, tokens_per_image), [1, *self.config.shared_sizes]
        layout = dataclasses.replace(
            layout, batch=dataclasses.replace(layout.batch, attention_mode=self.config.attention_mode)
        )
        policy_logits = None
        if block_logits is not None:
            policy_logits = torch.stack(
                [blocks_to_cells(block_logits[size], size, grid_size, float("-inf")) for size in sorted(block_logits)],
                dim=1,
            )
        output = StepModelOutput(
            token_layout=layout,
            superpatch_map=superpatch_map,
            token_counts=layout.batch.lengths,
            policy_logits=policy_logits,
        )
        if policy_only:
            return output if return_dict else output.to_tuple()

        tokens = self.embed_tokens(pixel_values, layout, sizes)
        class_token = (self.cls_token + self.pos_embed[:, :1]).expand(batch_size, -1, -1)
        run_exits = len(self.exit_heads) > 0 and (self.config.halting or self.training)
        encoded = self.encode(tokens, class_token, layout.batch, run_exits, output_hidden_states)
        output.last_hidden_state, output.class_token_state, output.survivor_index, output.survivor_batch = encoded[:4]
        output.token_exit_layer, output.exit_logits, output.hidden_states = encoded[4:]
        return output if return_dict else output.to_tuple()

    def encode(
        self,
        tokens: torch.Tensor,
        class_token: torch.Tensor,
        batch: PackedBatch,
        run_exits: bool,
        output_hidden_states: bool,
    ) -> tuple:
        """
        Run the blocks on packed tokens (plus one class token per image). After each exit block the exit head
        classifies the tokens; with `config.halting`, confident tokens (bar the top-k per class) leave the sequence,
        at the cost of one host sync per exit (the new lengths), or none with `config.exit_keep_tokens`. Returns the
        final tokens and class tokens, which tokens survived, their lengths, each token's exit block, the exit logits
        and the hidden states.
        """
        num_tokens, num_layers = tokens.shape[0], self.config.num_hidden_layers
        survivor_index = torch.arange(num_tokens, device=tokens.device)
        token_exit_layer = torch.full_like(survivor_index, num_layers)
        keep_counts = self.config.exit_keep_tokens or [None] * len(self.config.exit_layers)
        exit_of_layer = dict(zip(self.config.exit_layers, zip(self.exit_heads, self.config.exit_thresholds,
                                                              keep_counts)))
        exit_logits = []
        sequence, token_positions, class_positions, sequence_batch = insert_per_image(
            tokens, class_token, batch, at_start=True
        )
        hidden_states = (tokens,) if output_hidden_states else None
        for layer, block in enumerate(self.blocks, start=1):
            sequence = block(sequence, sequence_batch)
            if output_hidden_states:
                hidden_states += (sequence[token_positions],)
            if not run_exits or layer not in exit_of_layer:
                continue
            head, threshold, keep_tokens = exit_of_layer[layer]
            tokens = sequence[token_positions]
            logits = head(tokens)
            exit_logits.append(logits.new_zeros(num_tokens, logits.shape[1]).index_copy(0, survivor_index, logits))
            if not self.config.halting:
                continue
            with torch.no_grad():  # the decision to halt carries no gradient
                keep, batch = tokens_to_keep(
                    logits.float().softmax(-1), batch, threshold, keep_tokens, self.config.exit_keep_topk_per_class
                )
                order = torch.argsort((~keep).to(torch.int8), stable=True)[: sum(batch.host_lengths)]
                token_exit_layer[survivor_index] = torch.where(keep, num_layers, layer)
            survivor_index, tokens = survivor_index[order], tokens[order]
            sequence, token_positions, class_positions, sequence_batch = insert_per_image(
                tokens, sequence[class_positions], batch, at_start=True
            )
        sequence = self.norm(sequence)
        return (
            sequence[token_positions],
            sequence[class_positions[:, 0]],
            survivor_index,
            batch,
            token_exit_layer,
            tuple(exit_logits) if exit_logits else None,
            hidden_states,
        )


def check_superpatch_targets(targets: torch.Tensor | None, batch_size: int, num_sizes: int, grid_size) -> None:
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


def policy_loss(policy_logits: torch.Tensor, superpatch_targets: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Binary cross-entropy of the policy's block logits against the targets (255 ignored): the mean over each
    image's supervised blocks of a size, then over images, then over sizes, so large blocks weigh as much as small
    ones (and, as for the segmentation loss, split batches average exactly)."""
    per_size = []
    for index, size in enumerate(sizes):
        logits = cells_to_blocks(policy_logits[:, index], size)
        targets = cells_to_blocks(superpatch_targets[:, index], size)
        losses = F.binary_cross_entropy_with_logits(logits, (targets == 1).to(logits.dtype), reduction="none")
        per_size.append(per_image_mean(losses, targets != TARGET_IGNORE))
    return torch.stack(per_size).mean()


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

    def forward(self, tokens: torch.Tensor, tokens_batch: PackedBatch) -> torch.Tensor:
        """`tokens` `(num_tokens, hidden_size)`, packed as `tokens_batch` says -> per-token class scores
        `(num_tokens, num_labels)`."""
        batch_size, num_labels = tokens_batch.batch_size, self.cls_emb.shape[1]
        sequence, token_positions, class_positions, batch = insert_per_image(
            self.proj_dec(tokens), self.cls_emb.expand(batch_size, -1, -1), tokens_batch, at_start=False
        )
        for block in self.blocks:
            sequence = block(sequence, batch)
        sequence = self.decoder_norm(sequence)

        token_features = F.normalize(sequence[token_positions] @ self.proj_patch, dim=-1)
        class_features = F.normalize(sequence[class_positions.flatten()] @ self.proj_classes, dim=-1)
        # Score every token against the classes of every image, then keep its own image's: one matmul, no loop.
        all_scores = (token_features @ class_features.T).view(-1, batch_size, num_labels)
        image = tokens_batch.image_index(tokens.shape[0])
        scores = all_scores.gather(1, image[:, None, None].expand(-1, 1, num_labels))[:, 0]
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
        superpatch_targets: torch.Tensor | None = None,
        superpatch_map: torch.LongTensor | None = None,
        partition_source: str | None = None,
        policy_only: bool = False,
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
            superpatch_targets, superpatch_map, partition_source, policy_only:
                As in [`StepModel.forward`]. With `superpatch_targets` and a policy that ran, the policy loss is
                added to the loss.
            window_offsets (`torch.LongTensor`, *optional*):
                Sliding-window bookkeeping from `StepImageProcessor`, returned unchanged in the output.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoder_output = self.step(
            pixel_values,
            superpatch_map=superpatch_map,
            superpatch_targets=superpatch_targets,
            partition_source=partition_source,
            policy_only=policy_only,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        layout = encoder_output.token_layout
        logits = segmentation_loss = policy_term = exit_term = None
        if not policy_only and not self.training:
            warn_if_untrained(self.config, ["decoder"])
        if not policy_only:
            token_logits = self.merge_exits(
                self.decoder(encoder_output.last_hidden_state, encoder_output.survivor_batch), encoder_output
            )
            logits = unshare(token_logits, layout)
            if labels is not None:
                check_labels(labels, pixel_values.shape[0], self.config)  # once: the exit losses reuse the labels
                segmentation_loss = self.loss_function(logits, labels)
                if self.training and encoder_output.exit_logits is not None:
                    exit_term = self.exit_loss(encoder_output, labels)
        if superpatch_targets is not None and encoder_output.policy_logits is not None:
            check_superpatch_targets(
                superpatch_targets, pixel_values.shape[0], len(self.config.shared_sizes), layout.grid_size
            )
            policy_term = policy_loss(encoder_output.policy_logits, superpatch_targets, self.config.shared_sizes)
        losses = [segmentation_loss] if segmentation_loss is not None else []
        if policy_term is not None:
            losses.append(self.config.policy_loss_weight * policy_term)
        if exit_term is not None:
            losses.append(self.config.exit_loss_weight * exit_term)

        exit_map = halted_share = None
        if encoder_output.token_exit_layer is not None:
            exit_layer = encoder_output.token_exit_layer
            exit_map = unshare(exit_layer[:, None], layout)[:, 0]
            counts = layout.batch.lengths[:, None].float()
            halted_share = counts.new_zeros(counts.shape[0], len(self.config.exit_layers))
            if self.config.exit_layers:  # `torch.stack` refuses an empty list: a model without exits halts nothing
                halted = torch.stack([exit_layer == layer for layer in self.config.exit_layers], dim=1).float()
                halted_share = halted_share.index_add_(0, layout.image_index, halted) / counts
        output = StepSemanticSegmenterOutput(
            loss=sum(losses) if losses else None,
            logits=logits,
            segmentation_loss=segmentation_loss,
            policy_loss=policy_term,
            exit_loss=exit_term,
            token_layout=layout,
            superpatch_map=encoder_output.superpatch_map,
            token_counts=encoder_output.token_counts,
            policy_logits=encoder_output.policy_logits,
            exit_map=exit_map,
            halted_share=halted_share,
            hidden_states=encoder_output.hidden_states,
            window_offsets=window_offsets,
        )
        return output if return_dict else output.to_tuple()

    def merge_exits(self, survivor_logits: torch.Tensor, encoder_output: StepModelOutput) -> torch.Tensor:
        """Per-token logits for every token of the layout: the decoder's for survivors, the exit head's for the
        tokens that halted there."""
        num_tokens = encoder_output.token_exit_layer.shape[0]
        merged = survivor_logits.new_zeros(num_tokens, survivor_logits.shape[1])
        merged = merged.index_copy(0, encoder_output.survivor_index, survivor_logits)
        if encoder_output.exit_logits is None:
            return merged
        for layer, logits in zip(self.config.exit_layers, encoder_output.exit_logits):
            halted_here = (encoder_output.token_exit_layer == layer)[:, None]
            merged = torch.where(halted_here, logits.to(merged.dtype), merged)
        return merged

    def exit_loss(self, encoder_output: StepModelOutput, labels: torch.Tensor) -> torch.Tensor:
        """Deep supervision: each exit head's cross-entropy on the cells whose token was still in the sequence at
        that exit (the others are marked ignore)."""
        layout, ignore = encoder_output.token_layout, self.config.semantic_loss_ignore_index
        total = 0
        for layer, logits in zip(self.config.exit_layers, encoder_output.exit_logits):
            cell_logits = unshare(logits, layout)
            seen = unshare((encoder_output.token_exit_layer >= layer)[:, None].float(), layout)
            seen = F.interpolate(seen, size=labels.shape[-2:], mode="nearest")[:, 0] > 0
            total = total + self.loss_function(cell_logits, torch.where(seen, labels, ignore))
        return total

    def set_training_stage(self, stage: str) -> None:
        """
        Choose what trains (the STEP recipe): `"policy"` trains the policy network alone (stage 1, use
        `policy_only=True`); `"segmenter"` trains the encoder, exit heads and decoder with the policy frozen (stage 2,
        with the policy's or oracle partitions, halting off: the exit heads learn by deep supervision); `"prune"` is
        stage 2 with halting on (the pruning fine-tune); `"all"` trains everything.
        """
        if stage not in ("policy", "segmenter", "prune", "all"):
            raise ValueError(f"Unknown training stage {stage!r}; choose 'policy', 'segmenter', 'prune' or 'all'.")
        if stage in ("segmenter", "prune"):
            self.config.update_settings(halting=stage == "prune")
        policy = set(self.parameter_groups()["policy"])
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(stage == "all" or (stage == "policy") == (name in policy))

    def loss_function(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at label resolution, ignoring `semantic_loss_ignore_index`: the mean over each image's
        valid pixels, then over images. Averaging per image makes the loss of a batch split across processes (as
        data-parallel training splits it) average to exactly the loss of the whole batch. `labels` must have passed
        `check_labels`."""
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        ignore = self.config.semantic_loss_ignore_index
        losses = F.cross_entropy(upsampled, labels.long(), ignore_index=ignore, reduction="none")
        return per_image_mean(losses, labels != ignore)


def per_image_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the `valid` entries of each image (dimension 0), then over images."""
    valid = valid.flatten(1)
    sums = torch.where(valid, values.flatten(1), 0).sum(1)
    return (sums / valid.sum(1).clamp(min=1)).mean()


def check_labels(labels: torch.Tensor, batch_size: int, config: StepConfig) -> None:
    """Refuse label maps of the wrong shape or with values that are neither a class nor the ignore index. Labels
    are integer class ids: a floating-point tensor is accepted only when every value is a whole number (a map
    resized bilinearly, holding 1.5, is refused rather than truncated by the loss)."""
    if labels.ndim != 3 or labels.shape[0] != batch_size:
        raise ValueError(
            f"`labels` must have shape (batch_size={batch_size}, height, width), got {tuple(labels.shape)}."
        )
    ignore = config.semantic_loss_ignore_index
    invalid = ((labels < 0) | (labels >= config.num_labels)) & (labels != ignore)
    if labels.is_floating_point():
        invalid |= labels != labels.round()  # NaN too, since NaN != NaN
    if invalid.any():  # one host sync per forward with labels: a clear error instead of a device-side assert
        image = int(invalid.flatten(1).any(1).nonzero()[0])
        value = labels[image][invalid[image]][0].item()
        if not float(value).is_integer():  # a fraction, NaN or infinity
            raise ValueError(
                f"`labels` of image {image} hold the value {value}, which is not a whole number: labels are integer "
                "class ids. Resize label maps with nearest-neighbour interpolation (never bilinear) and pass them "
                "as an integer tensor."
            )
        value = int(value)
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
