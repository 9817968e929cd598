"""STEP: a plain ViT encoder on a packed token state, and a Segmenter mask-transformer decoder.

Read top-down: outputs, layers, the dCTS policy, the encoder (partition -> token layout -> supertoken embedding ->
blocks with early exits), the decoder, the segmentation head, losses and input checks. Early exits live in
`exits.py`, partitions in `superpatch.py`, the packed token state in `token_layout.py`.

Parameter names follow timm's `VisionTransformer` (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so timm checkpoints load into `StepModel`
without renaming. Shipped as Hub code next to saved weights: imports only torch, transformers and its siblings.
"""

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, TransformersKwargs, logging

from .configuration_step import (
    RUN_SETTINGS, TRAINABLE_COMPONENTS, StepConfig, StepSettings, check_drop_path_rate, closest_name, resolve_settings,
)
from .exits import (
    AtmExitHead, ExitHead, ExitPrediction, ExitRule, Survivors, exit_loss, exit_statistics, merge_exit_predictions,
    run_exit,
)
from .fast_ops import ImageNorm, PatchConv2d, resize_grid_bicubic
from .superpatch import (
    TARGET_IGNORE,
    block_grid,
    blocks_to_cells,
    cells_to_blocks,
    check_superpatch_map,
    check_superpatch_targets,
    decisions_from_targets,
    layout_from_superpatch_map,
    partition_from_decisions,
    partition_from_policy,
)
from .token_layout import (
    PackedBatch,
    PackedSequence,
    PaddedPlaces,
    TokenLayout,
    dense_token_layout,
    eager_attention,
    insert_per_image,
    packed_attention,
    places_by_layout,
    refuse_in_export,
    state_pytree,
    unshare,
)

logger = logging.get_logger(__name__)
# The image-segmentation pipeline checks the model's class name against this table and logs an error (then works)
# for any other; named here so that Hub code loaded with `trust_remote_code=True`, without step_hf, is recognised.
MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault("step", "StepForSemanticSegmentation")

# Keyword arguments of the library's calling convention (`TransformersKwargs`) that a forward accepts and has no
# use for; any other unknown keyword is refused (a misspelt setting would otherwise run with the saved one).
_IGNORED_FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__) - {"output_attentions", "output_hidden_states"}


# ---------------------------------------------------------------------------------------------------- outputs


@state_pytree
@dataclass(frozen=True)
class EncoderState:
    """
    The encoder's packed token state, the wiring between `StepModel` and the segmentation head.

    Attributes:
        layout (`TokenLayout`): which image and which block of grid cells each token covers.
        tokens (`torch.FloatTensor` of shape `(num_survivors, hidden_size)`): the final (layer-normed) features of the
            tokens that reached the end, packed image after image (`survivors` says which).
        class_tokens (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): the final class tokens.
        survivors (`Survivors`): which tokens of the layout reached the end, their lengths per image, and the block
            after which every token halted.
        exit_predictions (`tuple(ExitPrediction)` or `None`): one per exit that ran: its head's `token_logits`
            `(num_tokens, num_labels)` for every token of the layout still in at that exit (zeros for the others),
            and, for ATM heads, its `presence_logits` `(batch_size, num_labels, 2)`.
    """

    layout: TokenLayout
    tokens: torch.Tensor
    class_tokens: torch.Tensor
    survivors: Survivors
    exit_predictions: tuple[ExitPrediction, ...] | None


state_pytree(StepSettings)  # a value in every output: `torch.export` carries it as a constant


@state_pytree
@dataclass(frozen=True, slots=True)  # no `__dict__`: exporters that walk outputs for tensors pass it as a constant
class StepRun:
    """
    What a forward ran, read from its output rather than the configuration.

    Attributes:
        settings (`StepSettings`): the settings it ran with (the saved defaults, or the call's own).
        policy_ran (`bool`): whether the policy network ran (it chose the partition, or trained alone).
        embedded_sides (`tuple[int, ...]`): the superpatch sides whose embedding tables were built (`(1,)` when
            every token is a plain patch).
        exits_ran (`bool`): whether the exit heads ran (with halting, or for their deep supervision in training).
    """

    settings: StepSettings
    policy_ran: bool
    embedded_sides: tuple[int, ...]
    exits_ran: bool

    @property
    def halting(self) -> bool:
        """Whether confident tokens left the sequence at the exits."""
        return self.settings.halting


@dataclass
class StepModelOutput(ModelOutput):
    """
    Output of [`StepModel`].

    Sequences are laid out as `transformers` users expect, `(batch_size, sequence_length, ...)`: for each image its
    class token at position 0, then its (super)tokens in the order of the token layout (raster order of their
    top-left cells), padded to the image with the most tokens. Position p >= 1 of image b is token
    `state.layout.batch.offsets[b] + p - 1` of the layout (`state` from `forward(..., return_encoder_state=True)`),
    whose cells are `layout.cell_row`, `cell_col` and `block_side` at that index. Padding, and tokens that halted at
    an exit, hold zeros.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + max_tokens, hidden_size)`):
            The encoder's final (layer-normed) features. With one token per cell (the dense model) this is exactly a
            ViT's `(batch_size, 1 + rows * cols, hidden_size)`.
        sequence_mask (`torch.LongTensor` of shape `(batch_size, 1 + max_tokens)`):
            1 where `last_hidden_state` holds a token that reached the end (class tokens included), 0 elsewhere, as
            an `attention_mask` is.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The features after the embedding and after each block, each `(batch_size, 1 + max_tokens, hidden_size)`;
            a token that halted is zero from the block after its exit on.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Each block's attention weights, `(batch_size, num_heads, 1 + max_tokens, 1 + max_tokens)` (rows: queries,
            columns: keys), zero where a token is absent.
        superpatch_map (`torch.LongTensor` of shape `(batch_size, height / 16, width / 16)`):
            The partition used: the side, in cells, of the superpatch covering each cell (1 = a plain patch).
        token_counts (`torch.LongTensor` of shape `(batch_size,)`):
            Tokens embedded per image (class token excluded).
        policy_logits (`torch.FloatTensor` of shape `(batch_size, len(config.shared_sizes), height / 16, width / 16)`,
            *optional*, returned when the policy ran): for each superpatch size above 1, the policy's logit that
            the aligned block containing each cell holds a single class (the block's value repeated on its cells;
            the dtype's lowest finite value where no whole block fits).
        policy_loss (`torch.FloatTensor` of shape `()`, *optional*, returned with `superpatch_targets` when the
            policy ran): binary cross-entropy of the policy's block logits against the targets (255 ignored),
            averaged per size, then over sizes.
        run (`StepRun`):
            What ran: the settings used, whether the policy ran, the superpatch sides embedded, whether exits ran.
    """

    last_hidden_state: torch.FloatTensor | None = None
    sequence_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    superpatch_map: torch.LongTensor | None = None
    token_counts: torch.LongTensor | None = None
    policy_logits: torch.FloatTensor | None = None
    policy_loss: torch.FloatTensor | None = None
    run: StepRun | None = None


@dataclass
class StepSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`StepForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` or `superpatch_targets` are
            given): the segmentation loss plus `config.policy_loss_weight` times the policy loss (and, in training,
            `config.exit_loss_weight` times the exit loss).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / 16, width / 16)`):
            Per-cell class scores on the patch grid; a supertoken's scores are copied onto every cell it covers.
            Upsample them (or use the image processor's `post_process_semantic_segmentation`) to get
            full-resolution maps. `None` with `policy_only=True`.
        segmentation_loss (`torch.FloatTensor`, *optional*): cross-entropy between the logits, bilinearly upsampled
            to the label resolution, and `labels`, averaged over each image's pixels, then over images; pixels equal
            to `config.semantic_loss_ignore_index` are ignored.
        policy_loss (`torch.FloatTensor`, *optional*): binary cross-entropy of the policy against
            `superpatch_targets` (targets 255 ignored), averaged per size, then over sizes.
        exit_loss (`torch.FloatTensor`, *optional*, in training with `labels` and exit heads): the sum over exits of
            each head's cross-entropy on the cells whose token it saw (deep supervision), before
            `config.exit_loss_weight`.
        hidden_states, attentions, superpatch_map, token_counts, policy_logits, run:
            As in [`StepModelOutput`].
        exit_map (`torch.LongTensor` of shape `(batch_size, height / 16, width / 16)`, *optional*, returned when
            halting ran): the block after which each cell's token halted; `num_hidden_layers` where it never halted.
            A halted cell's logits are its exit head's; the others' are the decoder's.
        halted_share (`torch.FloatTensor` of shape `(batch_size, len(config.exit_layers))`, *optional*, returned when
            halting ran): the share of each image's tokens halted at each exit.
        window_offsets (`torch.LongTensor` of shape `(num_windows, 5)`, *optional*):
            Passed through from the image processor when it cut images into sliding windows, so that
            `post_process_semantic_segmentation` can stitch the windows back together.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    segmentation_loss: torch.FloatTensor | None = None
    policy_loss: torch.FloatTensor | None = None
    exit_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    superpatch_map: torch.LongTensor | None = None
    token_counts: torch.LongTensor | None = None
    policy_logits: torch.FloatTensor | None = None
    exit_map: torch.LongTensor | None = None
    halted_share: torch.FloatTensor | None = None
    window_offsets: torch.LongTensor | None = None
    run: StepRun | None = None


class EncoderOutputs(NamedTuple):
    """What `StepModel.encode` returns: the packed state the head reads, and the outputs laid out batch-first as
    `StepModelOutput` documents them."""

    state: EncoderState
    last_hidden_state: torch.Tensor
    sequence_mask: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


@dataclass(frozen=True)
class Partition:
    """How an input's patch grid is cut into tokens: `superpatch_map` `(batch, rows, cols)` (`None`: one token per
    cell, the plain ViT), the policy's block logits (`None` when it did not run) and, when a token budget fixes it,
    the number of tokens per image (known without a host sync)."""

    superpatch_map: torch.Tensor | None
    block_logits: dict[int, torch.Tensor] | None
    tokens_per_image: int | None = None


# ---------------------------------------------------------------------------------------------------- layers


class Attention(nn.Module):
    """
    Multi-head self-attention over a packed sequence, each image attending only to itself. The kernel follows
    `config._attn_implementation` (`from_pretrained(..., attn_implementation=...)`): `"sdpa"` (the default) runs
    `packed_attention` (PyTorch's SDPA, and its variable-length flash kernel on GPU in half precision), `"eager"`
    computes the softmax explicitly and can return the weights; a call that asks for the weights runs eagerly.
    """

    def __init__(self, dim: int, num_heads: int, config: StepConfig):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, batch: PackedBatch, output_attentions: bool = False, places: PaddedPlaces | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`places` lays the rows out for the weights returned with `output_attentions` (default: each image's
        segment, padded to the longest)."""
        query, key, value = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            places = places if places is not None else batch.places(x.shape[0])
            out, weights = eager_attention(query, key, value, places, dropout)
        else:
            out = packed_attention(query, key, value, batch, dropout)
        return self.proj(out.flatten(1)), weights if output_attentions else None


class Mlp(nn.Module):
    """The block's MLP: Linear, activation, Linear (timm's `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(branch: torch.Tensor, batch: PackedBatch, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a packed sequence: in training, drop a residual `branch` for whole images with
    probability `rate` and scale the kept ones by `1 / (1 - rate)` (timm's `DropPath`, per image, not per row)."""
    if not training or rate == 0:
        return branch
    kept = (torch.rand(batch.batch_size, device=branch.device) >= rate).to(branch.dtype) / (1 - rate)
    return branch * kept[batch.image_index(branch.shape[0])][:, None]


class Block(GradientCheckpointingLayer):
    """A pre-norm transformer block (timm names) on packed tokens, with stochastic depth `drop_path_rate`. With
    gradient checkpointing on (the library's `gradient_checkpointing_enable()`), its activations are recomputed in
    the backward pass instead of kept."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, config: StepConfig, eps: float | None = None):
        super().__init__()
        self.drop_path_rate = 0.0  # the encoder's blocks: `StepModel.set_drop_path_rate`
        eps = config.layer_norm_eps if eps is None else eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, config)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, x: torch.Tensor, batch: PackedBatch, output_attentions: bool = False, places: PaddedPlaces | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new tokens and, with `output_attentions`, the attention weights (see `Attention`)."""
        attended, weights = self.attn(self.norm1(x), batch, output_attentions, places)
        x = x + drop_path(self.dropout(attended), batch, self.drop_path_rate, self.training)
        mlp = self.dropout(self.mlp(self.norm2(x)))
        return x + drop_path(mlp, batch, self.drop_path_rate, self.training), weights


class PatchEmbed(nn.Module):
    """The patch embedding (timm's `patch_embed.proj`): one strided convolution, a patch per output."""

    def __init__(self, config: StepConfig):
        super().__init__()
        self.proj = PatchConv2d(config.num_channels, config.hidden_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, channels, H, W)` -> `(batch, H / patch, W / patch, hidden_size)`. The convolution is called as a
        module (never through its weights), so that Accelerate's offload hooks load its weights first."""
        return self.proj(pixel_values).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------------- policy


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """A policy layer: convolution, per-image group norm, ReLU."""
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
        grid_size = tuple(features.shape[-2:])
        block_logits = {}
        for level, layer in enumerate(self.levels, start=1):
            if min(features.shape[-2:]) < 2:  # no whole block of this size or larger fits
                break
            features = layer(features)
            if 2**level in self.sizes:
                block_logits[2**level] = self.heads[str(2**level)](features)[:, 0]
        for size in self.sizes:  # sizes larger than the grid: no whole block, an empty block grid
            if size not in block_logits:
                block_logits[size] = features.new_zeros(features.shape[0], *block_grid(grid_size, size))
        return block_logits


def policy_loss(
    block_logits: dict[int, torch.Tensor], superpatch_targets: torch.Tensor, sizes: list[int]
) -> torch.Tensor:
    """Binary cross-entropy of the policy's block logits (`PolicyNetwork`'s output) against the targets (255
    ignored): the mean over each image's supervised blocks of a size, then over images, then over sizes, so large
    blocks weigh as much as small ones (and, as for the segmentation loss, split batches average exactly)."""
    per_size = []
    for index, size in enumerate(sizes):
        logits = block_logits[size]
        targets = cells_to_blocks(superpatch_targets[:, index], size)
        losses = F.binary_cross_entropy_with_logits(logits, (targets == 1).to(logits.dtype), reduction="none")
        per_size.append(per_image_mean(losses, targets != TARGET_IGNORE))
    return torch.stack(per_size).mean()


# ---------------------------------------------------------------------------------------------------- encoder


# The `from_pretrained` arguments that locate `config.json` (local folder, cache or Hub).
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class StepPreTrainedModel(PreTrainedModel):
    """The base of STEP models: configuration class, weight initialisation, the parameter groups by part, and a
    `from_pretrained` that refuses folders that are not STEP models."""

    config_class = StepConfig
    config: StepConfig
    base_model_prefix = "step"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["Block", "AtmExitHead"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # `transformers` looks for its attention-function registry in the source to decide whether the kernel may
        # change after loading; `Attention` reads `config._attn_implementation` at every call, so it may.
        return True

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding: the module every (super)token's embedding goes through (PEFT's
        `enable_input_require_grads` hooks it)."""
        return self.base_model.patch_embed

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
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **kwargs
        )
        cls._refuse_lost_weights(model, loading_info, pretrained_model_name_or_path)
        return (model, loading_info) if wants_loading_info else model

    @staticmethod
    def _refuse_lost_weights(model: nn.Module, loading_info: dict, source) -> None:
        """
        Refuse a checkpoint that lacks some weights of a part it holds (a renamed or damaged entry): `transformers`
        would run them re-initialised at random and only say so in its load report. A part missing whole is new by
        design and loads as `transformers` loads a new head: the decoder on a saved encoder (`StepModel`), the
        policy, or an exit head added by `exit_layers=`. The ViT encoder must always be there.
        """
        missing = set(loading_info["missing_keys"])
        if not missing:
            return
        state_keys = model.state_dict().keys()
        if missing >= set(state_keys):  # nothing loaded: built afresh on purpose (`state_dict={}`)
            return
        encoder = model.base_model
        module_names = {id(module): name for name, module in model.named_modules()}
        for part in (getattr(model, "decoder", None), encoder.policy, *encoder.exit_heads):
            if part is None:
                continue
            prefix = module_names[id(part)] + "."
            keys = {key for key in state_keys if key.startswith(prefix)}
            if keys <= missing:
                missing -= keys
        if not missing:
            return
        lost = sorted(missing)
        roots = {key.split(".")[0] for key in lost}  # entries of the same top-level module may be them, renamed
        strays = sorted(key for key in loading_info["unexpected_keys"] if key.split(".")[0] in roots)
        renamed = f" It holds entries this model does not have, e.g. {strays[:3]}: renamed?" if strays else ""
        raise OSError(
            f"The checkpoint at {source} lacks weights of parts it holds ({len(lost)}: {lost[:5]}); loaded, they "
            f"would run re-initialised at random.{renamed} The weights file is damaged or was edited: restore it, or "
            "save the model again from where it came from. To start exactly these weights afresh on purpose, build "
            "the model from its config and load the rest with `model.load_state_dict(state_dict, strict=False)`."
        )

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
        elif isinstance(module, AtmExitHead):
            init.normal_(module.class_queries)  # DToP's class queries: an `nn.Embedding`, N(0, 1)
        elif isinstance(module, MaskTransformerDecoder):
            init.trunc_normal_(module.cls_emb, std=std)
            scale = module.proj_patch.shape[0] ** -0.5
            init.normal_(module.proj_patch, std=scale)
            init.normal_(module.proj_classes, std=scale)


def check_direct_parameters_placed(module: nn.Module, name: str) -> None:
    """Refuse a forward whose module's own (direct) parameters were offloaded to disk apart from the module:
    Accelerate loads offloaded weights through hooks on the module that owns them, and a module left out of the
    device map has none, so they would stay on the meta device."""
    offloaded = [key for key, parameter in module.named_parameters(recurse=False) if parameter.is_meta]
    if offloaded:
        raise ValueError(
            f"{', '.join(f'{name}.{key}' for key in offloaded)} were offloaded to disk on their own, apart from "
            f"`{name}`; map `{name}` as a whole (e.g. `device_map={{'{name}': 'disk', ...}}`, as `device_map=\"auto\"` "
            "does) or keep these parameters on a device."
        )


def warn_if_untrained(config: StepConfig, parts: list[str]) -> None:
    """Log (once) when an inference forward uses parts that `config.trained_components` does not list. The message
    names every untrained part of the model, so that the encoder's and the segmenter's checks log it once."""
    trained = config.trained_components
    if trained is None or all(part in trained for part in parts):
        return
    present = {"policy": bool(config.shared_sizes), "exit_heads": bool(config.exit_layers)}
    untrained = [part for part in TRAINABLE_COMPONENTS if part not in trained and present.get(part, True)]
    advice = {
        "policy": "run without the policy (`settings={\"partition_source\": \"dense\"}`) or train it",
        "encoder": "train the segmenter (e.g. `examples/train.py --stage segmenter`)",
        "exit_heads": "switch halting off (`settings={\"halting\": False}`) or train the exit heads",
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
        self.set_drop_path_rate(config.drop_path_rate)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.policy = PolicyNetwork(config) if config.shared_sizes else None
        self.exit_heads = nn.ModuleList(exit_head(config) for _ in config.exit_layers)
        self.post_init()

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth for training: rising linearly from 0 at the first block to `rate` at the last (timm,
        Segmenter). Recorded in `config.drop_path_rate`; inference never drops."""
        check_drop_path_rate(rate)
        self.config.drop_path_rate = rate
        # Plain Python, no tensor: a model built on the meta device has no data to read back.
        last = max(len(self.blocks) - 1, 1)
        for index, block in enumerate(self.blocks):
            block.drop_path_rate = rate * index / last

    def position_grid(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings `(rows, cols, dim)` for an input grid, resized from the stored grid when the
        sizes differ: bicubically (no antialias, like `transformers`' ViT) or, for models converted from the
        Segmenter authors' code, bilinearly as it does (`config.position_interpolation`)."""
        stored_rows, stored_cols = self.config.image_grid_size
        grid = self.pos_embed[0, 1:].view(stored_rows, stored_cols, -1)
        # Sizes that are symbols (an export with dynamic height and width) resize: at the stored size that is exact.
        if statically_known_true(grid_size[0] == stored_rows) and statically_known_true(grid_size[1] == stored_cols):
            return grid
        if self.config.position_interpolation == "bilinear":
            resized = F.interpolate(grid.permute(2, 0, 1)[None], size=tuple(grid_size), mode="bilinear",
                                    align_corners=False)
            return resized[0].permute(1, 2, 0)
        return resize_grid_bicubic(grid, tuple(grid_size))

    def embed_superpatches(self, pixel_values: torch.Tensor, layout: TokenLayout, sides: list[int]) -> torch.Tensor:
        """
        Embed every token of `layout`: `(num_tokens, hidden_size)`. A superpatch of side s (in cells) is the image
        average-pooled by s, cut by the shared patch embedding; its position embedding is the mean of the ones it
        covers. At s = 1 this is the plain ViT embedding.

        One table per side in `sides` holds the embeddings of every whole aligned block of that side (image after
        image, raster order); one gather then picks each token's row, with no loop over tokens or images. E.g. on a
        4x6 grid, the side-2 token at cell (2, 4) of image 1 is row 1 * 6 + (2 // 2) * 3 + 4 // 2 = 11 of the side-2
        table (6 blocks per image, 3 per row).
        """
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)
        positions = self.position_grid(layout.grid_size).permute(2, 0, 1)
        sides = [side for side in sides if side <= min(layout.grid_size)]  # larger ones have no whole block
        tables = []
        for side in sides:
            pooled_pixels = pixel_values if side == 1 else F.avg_pool2d(pixel_values, side)
            # Pooled as a batch of one: XNNPACK (ExecuTorch) pools 4-D tensors only.
            pooled_positions = positions if side == 1 else F.avg_pool2d(positions[None], side)[0]
            tables.append((self.patch_embed(pooled_pixels) + pooled_positions.permute(1, 2, 0)).flatten(0, 2))

        side, (rows, cols) = layout.block_side, layout.grid_size
        table = (side[:, None] > torch.tensor(sides, device=side.device)).sum(1)  # each token's table: its side's index
        table_start = F.pad(torch.stack([side.new_tensor(0) + rows_of.shape[0] for rows_of in tables]).cumsum(0), (1, 0))
        blocks_per_row, blocks_per_column = torch.full_like(side, cols) // side, torch.full_like(side, rows) // side
        row_in_table = (layout.image_index * blocks_per_column * blocks_per_row
                        + layout.cell_row // side * blocks_per_row + layout.cell_col // side)
        return torch.cat(tables)[table_start[table] + row_in_table]


    def forward(
        self,
        pixel_values: torch.Tensor,
        superpatch_map: torch.LongTensor | None = None,
        superpatch_targets: torch.Tensor | None = None,
        settings: StepSettings | dict | None = None,
        policy_only: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_encoder_state: bool = False,
        **kwargs,
    ) -> StepModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.patch_size` (any aspect ratio).
            superpatch_map (`torch.LongTensor` of shape `(batch_size, height / 16, width / 16)`, *optional*):
                A partition chosen by the caller; checked, and used instead of `settings.partition_source`.
            superpatch_targets (`torch.Tensor` of shape `(batch_size, len(config.shared_sizes), height / 16,
                width / 16)`, *optional*): ground-truth sharing targets from `StepImageProcessor`; needed by the
                `"oracle"` source, and for the policy loss.
            settings (`StepSettings` or `dict`, *optional*): the run-time settings of this call: a value, or a
                dict of overrides of the saved defaults (`config.settings`). Nothing shared changes, so calls with
                different settings may run at once from several threads. Single settings may also be given by
                name, e.g. `halting=True` or `partition_source="dense"`; any other keyword is refused.
            policy_only (`bool`, defaults to `False`): run only the policy and the partition (training stage 1,
                token-count analysis); the ViT does not run and `last_hidden_state` is `None`. It is a forward
                argument, not a call to `model.policy`, because data-parallel training must go through the wrapped
                model's forward.
            output_attentions, output_hidden_states, return_dict: as for every `transformers` model (attention
                weights are computed eagerly for the call that asks for them).
            return_encoder_state (`bool`, defaults to `False`): also return the packed token state the segmentation
                head reads, as `(output, state)` (`EncoderState`; `None` with `policy_only`). Internal wiring stays
                out of the output, so that eager and exported programs return the same fields.
        """
        grid_size = check_pixel_values(pixel_values, self.config)
        check_direct_parameters_placed(self, self.base_model_prefix)
        settings = resolve_settings(self.config, settings, **setting_overrides(kwargs, "StepModel"))
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if not self.training:  # a training forward is how a part gets trained
            warn_if_untrained(config, self.parts_in_use(settings, superpatch_map, policy_only))

        partition = self.choose_partition(pixel_values, grid_size, superpatch_map, superpatch_targets, settings,
                                          policy_only)
        layout, superpatch_map, sides = self.lay_out_tokens(partition, pixel_values, grid_size, settings)
        exits_ran = not policy_only and len(self.exit_heads) > 0 and (settings.halting or self.training)
        run = StepRun(settings, partition.block_logits is not None, tuple(sides), exits_ran)
        encoded = None
        if not policy_only:
            tokens = self.embed_superpatches(pixel_values, layout, sides)
            encoded = self.encode(tokens, layout, settings, exits_ran, output_hidden_states, output_attentions)
        output = StepModelOutput(
            last_hidden_state=encoded.last_hidden_state if encoded else None,
            sequence_mask=encoded.sequence_mask if encoded else None,
            hidden_states=encoded.hidden_states if encoded else None,
            attentions=encoded.attentions if encoded else None,
            superpatch_map=superpatch_map,
            token_counts=layout.batch.lengths,
            policy_logits=policy_logits_on_cells(partition.block_logits, grid_size),
            policy_loss=self.policy_loss(partition, superpatch_targets, grid_size),
            run=run,
        )
        output = output if return_dict else output.to_tuple()
        return (output, encoded.state if encoded else None) if return_encoder_state else output

    def policy_chooses(self, settings: StepSettings, superpatch_map: torch.Tensor | None) -> bool:
        """Whether the policy network chooses this call's partition."""
        return settings.partition_source == "policy" and superpatch_map is None and bool(self.config.shared_sizes)

    def parts_in_use(self, settings: StepSettings, superpatch_map, policy_only: bool) -> list[str]:
        """The trainable parts a forward with these settings relies on (for `warn_if_untrained`)."""
        if policy_only:
            return []  # the policy's own training forward
        return ["policy"] * self.policy_chooses(settings, superpatch_map) + ["encoder"] + ["exit_heads"] * settings.halting

    def choose_partition(
        self,
        pixel_values: torch.Tensor,
        grid_size: tuple[int, int],
        superpatch_map: torch.Tensor | None,
        superpatch_targets: torch.Tensor | None,
        settings: StepSettings,
        policy_only: bool,
    ) -> Partition:
        """The partition to embed: the caller's `superpatch_map`, else the one `settings.partition_source` gives.
        The policy runs when it chooses the partition, or for its own training (`policy_only`)."""
        config, (rows, cols) = self.config, grid_size
        policy_chooses = self.policy_chooses(settings, superpatch_map)
        if policy_chooses and settings.token_budget is not None and settings.token_budget > rows * cols:
            raise ValueError(
                f"`token_budget` ({settings.token_budget}) exceeds the {rows}x{cols} grid of this input; lower it or "
                "feed larger images."
            )
        runs_policy = self.policy is not None and (policy_only or policy_chooses)
        block_logits = self.policy(pixel_values) if runs_policy else None
        if superpatch_map is not None:
            check_superpatch_map(superpatch_map, config.superpatch_sizes, grid_size, pixel_values.shape[0])
            return Partition(superpatch_map.long(), block_logits)
        if settings.partition_source == "dense" or not config.shared_sizes:
            return Partition(None, block_logits)
        if settings.partition_source == "oracle":
            refuse_in_export(
                "the 'oracle' partition needs ground-truth labels at inference. Export with "
                "`partition_source=\"policy\"` (`policy_thresholds`, or a `token_budget` for fixed token counts) or "
                "`partition_source=\"dense\"` (`settings=`, or `python -m step_hf.export --partition_source ...`)."
            )
            check_superpatch_targets(superpatch_targets, pixel_values.shape[0], len(config.shared_sizes), grid_size)
            decisions = decisions_from_targets(superpatch_targets, config.shared_sizes)
            return Partition(partition_from_decisions(decisions, grid_size), block_logits)
        superpatch_map, tokens_per_image = partition_from_policy(
            block_logits, grid_size, settings.policy_thresholds, settings.token_budget
        )
        return Partition(superpatch_map, block_logits, tokens_per_image)

    def lay_out_tokens(
        self, partition: Partition, pixel_values: torch.Tensor, grid_size: tuple[int, int], settings: StepSettings
    ) -> tuple[TokenLayout, torch.Tensor, list[int]]:
        """The token layout of a partition, its superpatch map (all ones when dense) and the superpatch sides to
        embed. A count fixed by a token budget needs no host sync: static shapes."""
        batch_size, device, mode = pixel_values.shape[0], pixel_values.device, settings.attention_mode
        if partition.superpatch_map is None:
            layout = dense_token_layout(batch_size, grid_size, device, mode)
            return layout, torch.ones(batch_size, *grid_size, dtype=torch.long, device=device), [1]
        layout = layout_from_superpatch_map(partition.superpatch_map, partition.tokens_per_image, mode)
        return layout, partition.superpatch_map, [1, *self.config.shared_sizes]

    def policy_loss(
        self, partition: Partition, superpatch_targets: torch.Tensor | None, grid_size: tuple[int, int]
    ) -> torch.Tensor | None:
        """The policy's loss against `superpatch_targets`, when both are there (`policy_loss`)."""
        if superpatch_targets is None or partition.block_logits is None:
            return None
        check_superpatch_targets(superpatch_targets, superpatch_targets.shape[0], len(self.config.shared_sizes),
                                 grid_size)
        return policy_loss(partition.block_logits, superpatch_targets, self.config.shared_sizes)

    def encode(
        self, tokens: torch.Tensor, layout: TokenLayout, settings: StepSettings, exits_ran: bool,
        output_hidden_states: bool, output_attentions: bool,
    ) -> EncoderOutputs:
        """
        Run the blocks on the packed tokens of `layout`, with one class token per image in front. After each exit
        block (when `exits_ran`) its head classifies the tokens still in, and with `settings.halting` confident ones
        leave the sequence (`exits.run_exit`). The hidden states and attention weights asked for lie on the
        computation's path (a gradient reaches them).
        """
        config, batch = self.config, layout.batch
        class_tokens = (self.cls_token + self.pos_embed[:, :1]).expand(batch.batch_size, -1, -1)
        survivors = Survivors.all_of(batch, tokens.shape[0], config.num_hidden_layers, tokens.device)
        packed = insert_per_image(tokens, class_tokens, batch, at_start=True)
        laid_out = output_hidden_states or output_attentions
        places = places_by_layout(packed, survivors.index, layout) if laid_out else None
        exits = self.exits(settings) if exits_ran else {}
        exit_predictions, hidden_states, attentions = [], [], []
        packed = record_hidden_state(packed, places, hidden_states) if output_hidden_states else packed
        for layer, block in enumerate(self.blocks, start=1):
            sequence, weights = block(packed.sequence, packed.batch, output_attentions, places)
            packed = packed._replace(sequence=sequence)
            attentions += [weights] if output_attentions else []
            packed = record_hidden_state(packed, places, hidden_states) if output_hidden_states else packed
            if layer in exits:
                packed, survivors, prediction = run_exit(*exits[layer], packed, survivors, layer, settings.halting)
                exit_predictions.append(prediction)
                places = places_by_layout(packed, survivors.index, layout) if laid_out else None
        sequence = self.norm(packed.sequence)
        final_places = places if places is not None else places_by_layout(packed, survivors.index, layout)
        state = EncoderState(layout, sequence[packed.token_positions], sequence[packed.extra_positions[:, 0]],
                             survivors, tuple(exit_predictions) or None)
        return EncoderOutputs(state, final_places.pad(sequence), final_places.filled.long(),
                              tuple(hidden_states) or None, tuple(attentions) or None)

    def exits(self, settings: StepSettings) -> dict[int, tuple[nn.Module, ExitRule]]:
        """Each exit block's head and keep rule under `settings`, by block (1-based)."""
        keep_counts = settings.exit_keep_tokens or [None] * len(self.config.exit_layers)
        rules = [ExitRule(threshold, keep, settings.exit_keep_topk_per_class, settings.exit_keep_rule)
                 for threshold, keep in zip(settings.exit_thresholds, keep_counts)]
        return dict(zip(self.config.exit_layers, zip(self.exit_heads, rules)))


def record_hidden_state(
    packed: PackedSequence, places: PaddedPlaces, hidden_states: list[torch.Tensor]
) -> PackedSequence:
    """Append the hidden state, padded by `places`, to `hidden_states` and go on from the sequence read back from
    it, so that the recorded tensor lies on the computation's path."""
    hidden_states.append(places.pad(packed.sequence))
    return packed._replace(sequence=places.unpad(hidden_states[-1]))


def setting_overrides(kwargs: dict, model_name: str) -> dict:
    """The run-time settings given by name among a forward's extra keywords; the library's shared keywords
    (`TransformersKwargs`) are accepted and unused, anything else is refused with the closest valid name."""
    unknown = [name for name in kwargs if name not in RUN_SETTINGS and name not in _IGNORED_FORWARD_KWARGS]
    if unknown:
        valid = [*FORWARD_ARGUMENTS[model_name], *RUN_SETTINGS]
        raise TypeError(
            f"{model_name}.forward() got an unexpected keyword argument {unknown[0]!r}{closest_name(unknown[0], valid)}"
            f". It takes {list(FORWARD_ARGUMENTS[model_name])}, and run-time settings by name ({list(RUN_SETTINGS)})."
        )
    return {name: value for name, value in kwargs.items() if name in RUN_SETTINGS}


def exit_head(config: StepConfig) -> nn.Module:
    """One exit head of the kind `config.exit_head_type` names."""
    if config.exit_head_type == "atm":
        return AtmExitHead(config.hidden_size, config.exit_hidden_size, config.exit_num_attention_heads,
                           config.exit_num_hidden_layers, config.num_labels)
    return ExitHead(config.hidden_size, config.exit_hidden_size, config.num_labels, config.layer_norm_eps)


def policy_logits_on_cells(block_logits: dict[int, torch.Tensor] | None, grid_size) -> torch.Tensor | None:
    """The policy's block logits spread onto the cells of each block, one channel per size: the `policy_logits`
    output. Cells in no whole block of a size get the dtype's lowest finite value (a probability of 0 that batching
    and NaN checks handle, which `-inf` would not)."""
    if block_logits is None:
        return None
    fill = torch.finfo(next(iter(block_logits.values())).dtype).min
    return torch.stack(
        [blocks_to_cells(block_logits[size], size, grid_size, fill) for size in sorted(block_logits)], dim=1
    )


# ---------------------------------------------------------------------------------------------------- decoder


class MaskTransformerDecoder(nn.Module):
    """
    Segmenter's mask transformer on packed tokens: the (super)tokens of each image and one learned embedding per
    class go through a few transformer blocks together; a token's class score is the cosine similarity of its
    features with each class's features, followed by a LayerNorm over classes.
    """

    def __init__(self, config: StepConfig):
        super().__init__()
        dim, eps = config.decoder_hidden_size, config.decoder_layer_norm_eps
        self.proj_dec = nn.Linear(config.hidden_size, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, config.num_labels, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.decoder_num_attention_heads, config.decoder_intermediate_size, config, eps)
            for _ in range(config.decoder_num_hidden_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=eps)
        self.proj_patch = nn.Parameter(torch.zeros(dim, dim))
        self.proj_classes = nn.Parameter(torch.zeros(dim, dim))
        self.mask_norm = nn.LayerNorm(config.num_labels, eps=eps)

    def forward(self, tokens: torch.Tensor, tokens_batch: PackedBatch) -> torch.Tensor:
        """`tokens` `(num_tokens, hidden_size)`, packed as `tokens_batch` says -> per-token class scores
        `(num_tokens, num_labels)`."""
        check_direct_parameters_placed(self, "decoder")
        batch_size, num_labels = tokens_batch.batch_size, self.cls_emb.shape[1]
        sequence, token_positions, class_positions, batch = insert_per_image(
            self.proj_dec(tokens), self.cls_emb.expand(batch_size, -1, -1), tokens_batch, at_start=False
        )
        for block in self.blocks:
            sequence = block(sequence, batch)[0]
        sequence = self.decoder_norm(sequence)

        token_features = F.normalize(sequence[token_positions] @ self.proj_patch, dim=-1)
        class_features = F.normalize(sequence[class_positions.flatten()] @ self.proj_classes, dim=-1)
        # Score every token against the classes of every image, then keep its own image's: one matmul, no loop.
        all_scores = (token_features @ class_features.T).view(-1, batch_size, num_labels)
        image = tokens_batch.image_index(tokens.shape[0])
        scores = all_scores.gather(1, image[:, None, None].expand(-1, 1, num_labels))[:, 0]
        return self.mask_norm(scores)


# ---------------------------------------------------------------------------------------------------- segmentation head


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
        settings: StepSettings | dict | None = None,
        policy_only: bool = False,
        output_attentions: bool | None = None,
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
            superpatch_targets, superpatch_map, settings, policy_only, output_attentions, output_hidden_states:
                As in [`StepModel.forward`] (run-time settings by name too). With `superpatch_targets` and a policy
                that ran, the policy loss is added to the loss.
            window_offsets (`torch.LongTensor`, *optional*):
                Sliding-window bookkeeping from `StepImageProcessor`, returned unchanged in the output.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        settings = resolve_settings(self.config, settings, **setting_overrides(kwargs, type(self).__name__))
        encoded, state = self.step(
            pixel_values, superpatch_map=superpatch_map, superpatch_targets=superpatch_targets, settings=settings,
            policy_only=policy_only, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True, return_encoder_state=True,
        )
        logits = exit_map = halted_share = None
        if state is not None:  # not `policy_only`
            if not self.training:
                warn_if_untrained(self.config, ["decoder"])
            token_logits = merge_exit_predictions(
                self.decoder(state.tokens, state.survivors.batch), state.survivors, state.exit_predictions,
                self.config.exit_layers, state.layout.image_index, settings.exit_merge if settings.halting else "logits",
            )
            logits = unshare(token_logits, state.layout)
            if settings.halting:
                exit_map, halted_share = exit_statistics(state.survivors.exit_layer, state.layout,
                                                         self.config.exit_layers)
        losses = self.compute_losses(logits, encoded, state, labels)
        output = StepSemanticSegmenterOutput(
            loss=losses.total,
            logits=logits,
            segmentation_loss=losses.segmentation,
            policy_loss=losses.policy,
            exit_loss=losses.exit,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            superpatch_map=encoded.superpatch_map,
            token_counts=encoded.token_counts,
            policy_logits=encoded.policy_logits,
            exit_map=exit_map,
            halted_share=halted_share,
            window_offsets=window_offsets,
            run=encoded.run,
        )
        return output if return_dict else output.to_tuple()

    def compute_losses(
        self, logits: torch.Tensor | None, encoded: StepModelOutput, state: EncoderState | None,
        labels: torch.Tensor | None,
    ) -> "StepLosses":
        """The segmentation loss (with `labels`), the exit heads' deep supervision (with `labels`, in training, when
        the exits ran), the encoder's policy loss (with `superpatch_targets`, when the policy ran), and their
        weighted sum (`None` when there is nothing to learn from)."""
        config = self.config
        segmentation = exits = None
        if logits is not None and labels is not None:
            check_labels(labels, logits.shape[0], config)  # once: the exit losses reuse the labels
            segmentation = self.loss_function(logits, labels)
            if self.training and state.exit_predictions is not None:
                exits = exit_loss(state.exit_predictions, state.survivors.exit_layer, state.layout, labels,
                                  config.exit_layers, self.loss_function, config.semantic_loss_ignore_index)
        policy = encoded.policy_loss
        terms = [term for term in (segmentation, policy if policy is None else config.policy_loss_weight * policy,
                                   exits if exits is None else config.exit_loss_weight * exits) if term is not None]
        return StepLosses(sum(terms) if terms else None, segmentation, policy, exits)

    def set_training_stage(self, stage: str) -> None:
        """
        Choose which parameters train (the STEP recipe): `"policy"` trains the policy network alone (stage 1, run
        with `policy_only=True`); `"segmenter"` and `"prune"` train the encoder, exit heads and decoder with the
        policy frozen (stage 2 runs with halting off, the exit heads learning by deep supervision; the pruning
        fine-tune with `settings={"halting": True}`); `"all"` trains everything. What a saved model runs with is
        its saved settings, which this does not change.
        """
        if stage not in ("policy", "segmenter", "prune", "all"):
            raise ValueError(f"Unknown training stage {stage!r}; choose 'policy', 'segmenter', 'prune' or 'all'.")
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


# ---------------------------------------------------------------------------------------------------- losses and checks


@dataclass(frozen=True)
class StepLosses:
    """The weighted total and its parts (unweighted), each `None` when not computed."""

    total: torch.Tensor | None
    segmentation: torch.Tensor | None
    policy: torch.Tensor | None
    exit: torch.Tensor | None


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


# Each forward's named arguments, for the message that refuses an unknown one.
FORWARD_ARGUMENTS = {
    model.__name__: [name for name in inspect.signature(model.forward).parameters if name not in ("self", "kwargs")]
    for model in (StepModel, StepForSemanticSegmentation)
}


__all__ = [
    "StepPreTrainedModel",
    "StepModel",
    "StepForSemanticSegmentation",
    "StepModelOutput",
    "StepSemanticSegmenterOutput",
    "StepRun",
    "StepSettings",
]
