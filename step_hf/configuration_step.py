"""STEP model configuration.

Shipped as Hub code next to saved weights: imports only from `transformers` and `huggingface_hub`.
"""

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# hidden size, attention heads, layers, MLP size: the standard ViT presets (timm / "An Image is Worth 16x16 Words").
VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_attention_heads": 3, "num_hidden_layers": 12, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": 12, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 24, "intermediate_size": 4096},
}
# The possible superpatch sides (in patches), partition sources and attention modes.
SUPERPATCH_SIZES = (1, 2, 4, 8, 16)
PARTITION_SOURCES = ("policy", "oracle", "dense")
ATTENTION_MODES = ("packed", "padded")
# The exit heads, the keep rules and the ways to merge halted tokens' predictions (see `exits.py`).
EXIT_HEAD_TYPES = ("mlp", "atm")
EXIT_KEEP_RULES = ("predicted_class", "class_column")
EXIT_MERGES = ("probabilities", "logits")
# What a configuration saved before a field existed ran with, where that differs from the field's default for new
# models: `from_dict` (so `from_pretrained`) fills these in, so that a saved model runs as it was evaluated.
BEHAVIOUR_BEFORE_FIELD = {"exit_keep_rule": "class_column", "exit_merge": "logits"}
# The keys of a saved configuration that `PreTrainedConfig` reads itself, besides the dataclass fields.
PRETRAINED_CONFIG_KEYS = frozenset({
    "model_type", "auto_map", "transformers_version", "torch_dtype", "num_labels", "name_or_path", "_name_or_path",
    "_commit_hash", "output_attentions", "attn_implementation", "experts_implementation",
    "_attn_implementation_internal", "_experts_implementation_internal",
})
# The parts of a STEP model that train separately (`trained_components`).
TRAINABLE_COMPONENTS = ("policy", "encoder", "decoder", "exit_heads")
# The published halting thresholds: 0.95 for ViT-L, 0.9 for ViT-B (and here the smaller ViTs).
PRESET_EXIT_THRESHOLD = {"tiny": 0.9, "small": 0.9, "base": 0.9, "large": 0.95}


def closest_name(name: str, names) -> str:
    """` (did you mean 'x'?)` for the valid name closest to a misspelt one, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class StepSettings:
    """
    How a built STEP model runs one forward: the run-time settings, a frozen value apart from the architecture (as
    `GenerationConfig` is for text generation). A model's saved defaults are `config.settings`; a call takes another
    value, or a dict of overrides of the defaults, as `model(pixel_values, settings=...)`, and its output reports the
    value it ran with (`outputs.run.settings`). Nothing is written to the shared configuration, so one model can
    serve calls with different settings from many threads.

    Values are checked when the value is made; the checks that need the architecture (one threshold per exit or
    superpatch size, ...) run where it meets a model (`check_against`). Make variants with `replace`.

    Args:
        partition_source (`str`, defaults to `"policy"`): how the partition into superpatches is chosen when no
            `superpatch_map` is passed: `"policy"` (the policy network, with `policy_thresholds` or `token_budget`),
            `"oracle"` (ground-truth `superpatch_targets`, for analysis and segmenter training) or `"dense"` (no
            sharing: exactly a plain ViT).
        policy_thresholds (`tuple[float]`, *optional*): one probability per superpatch size > 1, ascending sizes;
            a block is shared when the policy's probability that it holds one class exceeds it. Higher thresholds
            keep more tokens. `None`: the model's saved ones.
        token_budget (`int`, *optional*): instead of thresholds, a fixed number of tokens per image (static shapes),
            sharing the blocks the policy is most confident about. Each merge of four blocks removes 3 tokens, so the
            count is the budget when `rows * cols - budget` is a multiple of 3, else the largest reachable count
            below it.
        exit_thresholds (`tuple[float]`, *optional*): one per exit, in (0, 1]; a token halts when its top class
            probability exceeds it (1 never halts). `None`: the model's saved ones.
        exit_keep_tokens (`tuple[int]`, *optional*): instead of thresholds, one count per exit: every image keeps that
            many tokens there (its top k per class, then the least confident), or all it has if fewer; no host
            sync, so with a `token_budget` (or no sharing) the whole forward has static shapes.
        exit_keep_topk_per_class (`int`, defaults to 5): at every exit, k tokens of each image stay in for every
            class, so that later blocks keep context for every class.
        exit_keep_rule (`str`, defaults to `"predicted_class"`): `"predicted_class"` (DToP's rule) keeps the k most
            confident of the tokens predicted as each class; `"class_column"` the k tokens with the highest
            probability of each class, predicted or not.
        exit_merge (`str`, defaults to `"probabilities"`): how halted tokens' predictions join the decoder's when
            halting is on: `"probabilities"` (DToP) makes every token's logits log-probabilities; `"logits"` writes
            an MLP exit head's raw logits beside the decoder's.
        halting (`bool`, defaults to `False`): whether confident tokens leave the sequence at the exits.
        attention_mode (`str`, defaults to `"packed"`): `"packed"` (a variable-length kernel on GPU in half
            precision, one call per image elsewhere) or `"padded"` (pad to the longest image with a key mask) when
            the images of a batch keep different numbers of tokens; both give the same logits.
    """

    partition_source: str = "policy"
    policy_thresholds: tuple[float, ...] | None = None
    token_budget: int | None = None
    exit_thresholds: tuple[float, ...] | None = None
    exit_keep_tokens: tuple[int, ...] | None = None
    exit_keep_topk_per_class: int = 5
    exit_keep_rule: str = "predicted_class"
    exit_merge: str = "probabilities"
    halting: bool = False
    attention_mode: str = "packed"

    def __post_init__(self):
        for name in ("policy_thresholds", "exit_thresholds", "exit_keep_tokens"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                    raise TypeError(f"`{name}` must be a list of numbers, one per {'size' if name[0] == 'p' else 'exit'}"
                                    f", got {value!r}.")
                if name.endswith("thresholds"):
                    # Numbers only: a JSON `true` or a string would otherwise pass through `float` unsaid.
                    wrong = [v for v in value if isinstance(v, bool) or not isinstance(v, numbers.Real)]
                    if wrong:
                        raise ValueError(f"`{name}` must hold numbers (probabilities), got {wrong[0]!r} in "
                                         f"{list(value)}.")
                    value = tuple(float(v) for v in value)
                object.__setattr__(self, name, tuple(value))
        self._check_values()

    def _check_values(self) -> None:
        """Raise a `ValueError` naming the setting when a value cannot work on any model."""
        choices = {"partition_source": PARTITION_SOURCES, "attention_mode": ATTENTION_MODES,
                   "exit_keep_rule": EXIT_KEEP_RULES, "exit_merge": EXIT_MERGES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if not isinstance(self.halting, bool):
            raise TypeError(f"`halting` must be True or False, got {self.halting!r}.")
        if any(not 0.0 <= threshold <= 1.0 for threshold in self.policy_thresholds or ()):
            raise ValueError(f"`policy_thresholds` must be probabilities in [0, 1], got {list(self.policy_thresholds)}.")
        if any(not 0 < threshold <= 1 for threshold in self.exit_thresholds or ()):  # NaN fails every comparison
            raise ValueError(
                f"`exit_thresholds` must be positive probabilities in (0, 1], got {list(self.exit_thresholds)}: a "
                "token halts when its top class probability exceeds its exit's threshold, so 1 never halts; "
                "`halting=False` switches all exits off."
            )
        if any(isinstance(count, bool) or not isinstance(count, int) or count < 1
               for count in self.exit_keep_tokens or ()):
            raise ValueError(f"`exit_keep_tokens` must hold whole numbers of tokens >= 1 (ints), one per exit, got "
                             f"{list(self.exit_keep_tokens)}.")
        if self.token_budget is not None and (isinstance(self.token_budget, bool)
                                              or not isinstance(self.token_budget, int) or self.token_budget < 1):
            raise ValueError(f"`token_budget` must be a whole number of tokens >= 1 (or None), got {self.token_budget!r}.")
        if isinstance(self.exit_keep_topk_per_class, bool) or not isinstance(self.exit_keep_topk_per_class, int) \
                or self.exit_keep_topk_per_class < 0:
            raise ValueError(f"`exit_keep_topk_per_class` must be an integer >= 0, got {self.exit_keep_topk_per_class!r}.")

    def replace(self, **changes) -> "StepSettings":
        """A new value with `changes` (setting names, as `model(..., settings={...})` takes them); an unknown name is
        refused with the closest valid one."""
        unknown = [name for name in changes if name not in RUN_SETTINGS]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a run-time setting{closest_name(unknown[0], RUN_SETTINGS)}; the settings are "
                f"{list(RUN_SETTINGS)}."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings by name, with lists for sequences (JSON, and `StepConfig`'s fields)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, getattr(self, name)) for name in RUN_SETTINGS)}

    def check_against(self, config: "StepConfig") -> None:
        """Refuse settings this architecture cannot run, naming them: one policy threshold per superpatch size
        above 1, one exit threshold (and keep count) per exit, exits for halting, sizes a token budget can reach,
        MLP heads for merged logits. Thresholds left `None` mean the model's saved ones (`resolve_settings`)."""
        shared, exits = config.shared_sizes, config.exit_layers
        if self.policy_thresholds is not None and len(self.policy_thresholds) != len(shared):
            raise ValueError(
                f"`policy_thresholds` has {len(self.policy_thresholds)} values but there are {len(shared)} "
                f"superpatch sizes above 1 ({shared}): give one per size."
            )
        if self.exit_thresholds is not None and len(self.exit_thresholds) != len(exits):
            raise ValueError(
                f"`exit_thresholds` has {len(self.exit_thresholds)} values for {len(exits)} `exit_layers`; give one "
                "per exit."
            )
        if self.exit_keep_tokens is not None and len(self.exit_keep_tokens) != len(exits):
            raise ValueError(
                f"`exit_keep_tokens` must hold one count >= 1 per exit ({len(exits)} exits), got "
                f"{list(self.exit_keep_tokens)}."
            )
        if self.halting and not exits:
            raise ValueError("`halting=True` needs at least one exit in `exit_layers`.")
        if self.token_budget is not None and not shared:  # nothing to merge: the budget would be ignored
            raise ValueError(
                f"`token_budget` needs token sharing, but this model's `superpatch_sizes` are {config.superpatch_sizes}"
                " (every token is one patch); leave `token_budget` None for it."
            )
        if self.token_budget is not None and shared != [2**level for level in range(1, len(shared) + 1)]:
            raise ValueError(
                f"`token_budget` needs `superpatch_sizes` to be consecutive powers of two from 2 (e.g. [2, 4, 8, 16]), "
                f"got {config.superpatch_sizes}."
            )
        if self.exit_merge == "logits" and config.exit_head_type == "atm":
            raise ValueError(
                "`exit_merge='logits'` needs MLP exit heads: an 'atm' head scores classes by probabilities, not on "
                "the decoder's logit scale; use `exit_merge='probabilities'`."
            )


# The run-time settings, by name: `StepSettings`' fields, saved flat in `config.json` as `StepConfig` fields.
RUN_SETTINGS = tuple(item.name for item in dataclasses.fields(StepSettings))


def resolve_settings(config: "StepConfig", settings: "StepSettings | Mapping | None" = None,
                     **overrides) -> StepSettings:
    """
    The settings one call runs with: `settings` (a `StepSettings`, or a dict of overrides of the model's saved
    defaults `config.settings`; `None`: the defaults), then `overrides` by name, checked against the architecture.
    Thresholds left `None` take the model's saved ones.
    """
    if settings is None:
        resolved = config.settings
    elif isinstance(settings, Mapping):
        resolved = config.settings.replace(**settings)
    elif isinstance(settings, StepSettings):
        resolved = settings
    elif dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        # By fields, not `isinstance`: remote code and `step_hf` may each hold a copy of this class.
        resolved = StepSettings(**{name: getattr(settings, name) for name in RUN_SETTINGS})
    else:
        raise TypeError(f"`settings` must be a StepSettings or a dict of setting overrides, got {type(settings).__name__}.")
    resolved = resolved.replace(**overrides) if overrides else resolved
    if resolved.policy_thresholds is None or resolved.exit_thresholds is None:
        defaults = config.settings
        resolved = resolved.replace(
            policy_thresholds=defaults.policy_thresholds if resolved.policy_thresholds is None
            else resolved.policy_thresholds,
            exit_thresholds=defaults.exit_thresholds if resolved.exit_thresholds is None else resolved.exit_thresholds,
        )
    resolved.check_against(config)
    return resolved


def check_drop_path_rate(rate: float) -> None:
    """Refuse a stochastic-depth rate outside [0, 1) (1 would drop every block): the configuration's and
    `StepModel.set_drop_path_rate`'s one check."""
    if not 0 <= rate < 1:  # NaN fails every comparison
        raise ValueError(f"`drop_path_rate` must be in [0, 1) (1 would drop every block), got {rate}.")


def default_exit_layers(num_hidden_layers: int) -> list[int]:
    """
    DToP's exit placement: after blocks 6 and 8 of a 12-block ViT (ViT-B) and 8 and 16 of a 24-block one (ViT-L).
    Other depths follow the nearer of the two: up to 18 blocks, after half and two thirds of them (rounded down);
    deeper, after a third and two thirds. Exits that would coincide or fall before block 1 are dropped.
    """
    first = num_hidden_layers // 2 if num_hidden_layers <= 18 else num_hidden_layers // 3
    return sorted({layer for layer in (first, 2 * num_hidden_layers // 3) if 1 <= layer < num_hidden_layers})


def warn_unknown_fields(config_class: type, config_dict: dict) -> None:
    """Warn, naming them, about the keys of a saved configuration that this version does not know (written by a newer
    one, or edited by hand): `PreTrainedConfig` keeps them as attributes that nothing reads, which would otherwise
    go unsaid."""
    known = {field.name for field in dataclasses.fields(config_class)} | PRETRAINED_CONFIG_KEYS
    unknown = sorted(set(config_dict) - known - set(config_class.attribute_map))
    if unknown:
        logger.warning_once(
            f"The configuration holds fields this version of {config_class.__name__} does not know: {unknown}. They "
            "are kept but nothing reads them, so a model saved by a newer version may not run as it did there: "
            "load it with the step-hf version (or the Hub model code) that wrote it, or remove the fields if they "
            "were added by hand."
        )


DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_step.StepConfig",
    "AutoModel": "modeling_step.StepModel",
    "AutoModelForSemanticSegmentation": "modeling_step.StepForSemanticSegmentation",
}


@strict
class StepConfig(PreTrainedConfig):
    r"""
    Configuration of a STEP segmenter: a plain ViT encoder (patch 16, timm-compatible parameter names) and a
    Segmenter mask-transformer decoder. Build one from a preset with [`StepConfig.from_preset`].

    Args:
        hidden_size (`int`, defaults to 768): width of the encoder tokens.
        num_hidden_layers (`int`, defaults to 12): number of encoder blocks.
        num_attention_heads (`int`, defaults to 12): attention heads per encoder block; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): hidden width of the encoder MLPs.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact GELU, as in timm ViTs).
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon (timm ViTs use 1e-6, HF `ViTModel` 1e-12).
        qkv_bias (`bool`, defaults to `True`): whether the attention input projection has a bias.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after attention and MLP outputs.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention weights.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal weight initialisation.
        image_size (`int` or `list[int]`, defaults to 512): the size, square or `[height, width]`, for which the
            position embeddings are stored. Inputs of any other size (multiples of `patch_size`) are accepted:
            the position-embedding grid is resized (`position_interpolation`) to the input grid.
        position_interpolation (`str`, defaults to `"bicubic"`): how that grid is resized: `"bicubic"` (timm,
            `transformers` and mmsegmentation ViTs) or `"bilinear"` (the Segmenter authors' code), so that a model
            converted from either gives its original's numbers at every input size.
        patch_size (`int`, defaults to 16): side of a patch in pixels.
        num_channels (`int`, defaults to 3): input channels.
        decoder_hidden_size (`int`, *optional*): width of the mask-transformer decoder; defaults to `hidden_size`.
        decoder_num_hidden_layers (`int`, defaults to 2): transformer layers in the decoder (Segmenter uses 2).
        decoder_num_attention_heads (`int`, *optional*): decoder heads; defaults to `decoder_hidden_size // 64`.
        decoder_intermediate_size (`int`, *optional*): decoder MLP width; defaults to `4 * decoder_hidden_size`.
        decoder_layer_norm_eps (`float`, *optional*): the decoder's LayerNorm epsilon; defaults to `layer_norm_eps`
            (mmsegmentation's Segmenter uses 1e-6 in its encoder and 1e-5 in its decoder).
        semantic_loss_ignore_index (`int`, defaults to 255): label value ignored by the loss (void).
        superpatch_sizes (`list[int]`, defaults to `[2, 4, 8, 16]`): the sides, in patches, that a supertoken may
            have (dCTS); powers of two among 1, 2, 4, 8, 16. A plain patch (1) is always possible; `[1]` switches
            token sharing off.
        partition_source (`str`, defaults to `"policy"`): how the partition into superpatches is chosen when no
            `superpatch_map` is passed to `forward`: `"policy"` (the policy network, with `policy_thresholds` or
            `token_budget`), `"oracle"` (ground-truth `superpatch_targets`, for analysis and segmenter training) or
            `"dense"` (no sharing: exactly a plain ViT).
        policy_thresholds (`list[float]`, *optional*): one probability per superpatch size > 1, ascending sizes; a
            block is shared when the policy's probability that it holds one class exceeds it. Defaults to 0.5 each.
            Higher thresholds keep more tokens.
        token_budget (`int`, *optional*): instead of thresholds, keep a fixed number of tokens per image (static
            shapes) by sharing the blocks the policy is most confident about. Each merge of four blocks removes 3
            tokens, so the count is the budget when `rows * cols - budget` is a multiple of 3, else the largest
            reachable count below it. Needs `superpatch_sizes` to be consecutive powers of two from 2.
        policy_hidden_size (`int`, defaults to 64): channels of the policy CNN (a multiple of 4).
        policy_loss_weight (`float`, defaults to 1.0): weight of the policy's binary cross-entropy in the loss when
            `superpatch_targets` are given.
        exit_layers (`list[int]`, *optional*): 1-based indices of the encoder blocks after which an exit head runs
            (early pruning). Defaults to DToP's placement: blocks 6 and 8 of 12, 8 and 16 of 24; other depths after
            half and two thirds of the blocks up to 18 blocks, a third and two thirds beyond. `[]` builds no exit
            heads.
        exit_thresholds (`list[float]`, *optional*): one per exit; a token halts when its top class probability
            (its exit head's score: a softmax for `"mlp"` heads, class presence times mask sigmoid for `"atm"`)
            exceeds it, so each lies in (0, 1] and 1 never halts (`halting=False` switches every exit off). Defaults
            to 0.9 (0.95 in the ViT-L preset, as published).
            Exits and thresholds apply to the tokens the exits see, supertokens of any size included.
        exit_keep_tokens (`list[int]`, *optional*): instead of thresholds, one count per exit: every image keeps
            that many tokens there (its top-k per class, then the least confident), or all it has if fewer. The
            token counts then follow from the input alone (no host sync), so with a `token_budget` (or no sharing)
            the whole forward has static shapes, for `torch.compile` and CUDA graphs.
        exit_keep_topk_per_class (`int`, defaults to 5): at every exit, for every class, k tokens of each image stay
            in, so that later blocks keep context for every class (which k: `exit_keep_rule`).
        exit_keep_rule (`str`, defaults to `"predicted_class"`): `"predicted_class"` (DToP's rule) keeps the k most
            confident of the tokens predicted as each class; `"class_column"` keeps, for each class, the k tokens
            with the highest probability of it, predicted or not (with many classes this keeps far more tokens).
            Configurations saved before this field existed load with `"class_column"`, the rule they ran with.
        exit_merge (`str`, defaults to `"probabilities"`): how the predictions of halted tokens join the decoder's
            when halting is on. `"probabilities"` (as DToP): every token's `logits` are log-probabilities, the
            decoder's log-softmax where it reached the end and its exit head's where it halted, so that the two
            heads' scores share one scale before they are interpolated; `"logits"` writes each exit head's raw logits
            beside the decoder's (MLP heads only). Configurations saved before this field existed load with
            `"logits"`. With halting off the logits are the decoder's, exactly as in Segmenter.
        halting (`bool`, defaults to `False`): whether confident tokens leave the sequence at the exits. Off while
            the base model trains (the heads still train, by deep supervision), on for the pruning fine-tune and
            for fast inference.
        exit_head_type (`str`, defaults to `"mlp"`): the exit heads: `"mlp"`, a per-token classifier (LayerNorm,
            Linear, GELU, Linear) scored by its softmax, trained by cross-entropy; or `"atm"`, DToP's attention-to-mask
            head (one query per class cross-attends to the tokens; a token's class probability is the class's presence
            times the sigmoid of its attention logit), trained by DToP's presence, focal and dice losses.
        exit_hidden_size (`int`, *optional*): hidden width of the exit heads; defaults to 256 for `"mlp"` heads and
            to `hidden_size // 2` for `"atm"` heads (as DToP).
        exit_num_hidden_layers (`int`, defaults to 3): decoder layers of an `"atm"` exit head (DToP uses 3).
        exit_num_attention_heads (`int`, *optional*): attention heads of an `"atm"` exit head; defaults to
            `exit_hidden_size // 64`.
        exit_loss_weight (`float`, defaults to 0.4): weight of each exit head's cross-entropy (deep supervision) in
            the loss when `labels` are given in training.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth of the encoder blocks, rising linearly from 0 at
            the first block to this at the last, per image (Segmenter and DToP fine-tune pretrained ViTs with 0.1).
        attention_mode (`str`, defaults to `"packed"`): how attention runs when the images of a batch keep different
            numbers of tokens: `"packed"` (a variable-length flash kernel on GPU in half precision, one call per
            image elsewhere; the fastest measured) or `"padded"` (pad to the longest image with a key mask). Both
            give the same logits; equal-length batches need neither.
        trained_components (`list[str]`, *optional*): which parts have been trained, among `"policy"`, `"encoder"`,
            `"decoder"` and `"exit_heads"` (`examples/train.py` records them). A forward pass that would use a part
            not listed logs a warning; `None` (models built by hand, or saved before this was recorded) means not
            recorded, and nothing is checked.
        id2label / label2id / num_labels: the classes, as in every `transformers` config.

    The run-time settings (`RUN_SETTINGS`: `partition_source`, `policy_thresholds`, `token_budget`,
    `exit_thresholds`, `exit_keep_tokens`, `exit_keep_topk_per_class`, `exit_keep_rule`, `exit_merge`, `halting`,
    `attention_mode`) are saved here flat, as the defaults a loaded model runs with; `config.settings` gives them as
    one [`StepSettings`] value. A call runs with other settings through `model(..., settings=...)` (nothing shared
    changes); [`StepConfig.update_settings`] changes the saved defaults. Every other field is the architecture, fixed
    once a model is built. `drop_path_rate` acts only in training: change it with `StepModel.set_drop_path_rate`.

    Example:

    ```python
    >>> from step_hf import StepConfig, StepForSemanticSegmentation
    >>> config = StepConfig.from_preset("small", num_labels=11, image_size=512)
    >>> model = StepForSemanticSegmentation(config)
    ```
    """

    model_type = "step"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    image_size: int | list[int] | tuple[int, int] = 512
    patch_size: int = 16
    num_channels: int = 3
    decoder_hidden_size: int | None = None
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int | None = None
    decoder_intermediate_size: int | None = None
    decoder_layer_norm_eps: float | None = None
    position_interpolation: str = "bicubic"
    semantic_loss_ignore_index: int = 255
    superpatch_sizes: list[int] | tuple[int, ...] = (2, 4, 8, 16)
    partition_source: str = "policy"
    policy_thresholds: list[float] | tuple[float, ...] | None = None
    token_budget: int | None = None
    policy_hidden_size: int = 64
    policy_loss_weight: float | int = 1.0
    exit_layers: list[int] | tuple[int, ...] | None = None
    exit_thresholds: list[float] | tuple[float, ...] | None = None
    exit_keep_tokens: list[int] | tuple[int, ...] | None = None
    exit_keep_topk_per_class: int = 5
    exit_keep_rule: str = "predicted_class"
    exit_merge: str = "probabilities"
    halting: bool = False
    exit_head_type: str = "mlp"
    exit_hidden_size: int | None = None
    exit_num_hidden_layers: int = 3
    exit_num_attention_heads: int | None = None
    exit_loss_weight: float | int = 0.4
    drop_path_rate: float | int = 0.0
    attention_mode: str = "packed"
    trained_components: list[str] | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, tuple):
            self.image_size = list(self.image_size)
        if self.decoder_hidden_size is None:
            self.decoder_hidden_size = self.hidden_size
        if self.decoder_num_attention_heads is None:
            self.decoder_num_attention_heads = max(1, self.decoder_hidden_size // 64)
        if self.decoder_intermediate_size is None:
            self.decoder_intermediate_size = 4 * self.decoder_hidden_size
        if self.decoder_layer_norm_eps is None:
            self.decoder_layer_norm_eps = self.layer_norm_eps
        if self.exit_hidden_size is None:
            self.exit_hidden_size = self.hidden_size // 2 if self.exit_head_type == "atm" else 256
        if self.exit_num_attention_heads is None:
            self.exit_num_attention_heads = max(1, self.exit_hidden_size // 64)
        self.superpatch_sizes = sorted(self.superpatch_sizes)
        if self.policy_thresholds is None:
            self.policy_thresholds = [0.5] * len(self.shared_sizes)
        self.policy_thresholds = [float(threshold) for threshold in self.policy_thresholds]
        if self.exit_layers is None:
            self.exit_layers = default_exit_layers(self.num_hidden_layers)
        self.exit_layers = list(self.exit_layers)
        if self.exit_thresholds is None:
            self.exit_thresholds = [0.9] * len(self.exit_layers)
        self.exit_thresholds = [float(threshold) for threshold in self.exit_thresholds]
        if self.exit_keep_tokens is not None:
            self.exit_keep_tokens = list(self.exit_keep_tokens)
        super().__post_init__(**kwargs)
        # Remote-code loading needs one `auto_map` entry per Auto class; `save_pretrained` only writes the saved
        # model's own class, so the base model's entry is added here (missing entries only).
        self.auto_map = {**DEFAULT_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self._check_all()

    @property
    def image_grid_size(self) -> tuple[int, int]:
        """The (rows, columns) of the stored position-embedding grid."""
        height, width = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        return height // self.patch_size, width // self.patch_size

    @property
    def shared_sizes(self) -> list[int]:
        """The superpatch sizes above 1, ascending: those the policy scores and a partition may use."""
        return [size for size in self.superpatch_sizes if size > 1]

    def _check_all(self) -> None:
        """Raise a `ValueError` naming the field when the configuration cannot build a working model. The same
        validators run again in `validate()` (at saving, as for every `@strict` configuration)."""
        self.validate_architecture()
        self.validate_token_sharing()
        self.validate_early_exits()
        self.validate_run_settings()

    def validate_architecture(self) -> None:
        """Part of `@strict`-powered validation: the ViT, the decoder and the classes."""
        positive = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "decoder_hidden_size": self.decoder_hidden_size,
            "decoder_num_attention_heads": self.decoder_num_attention_heads,
            "decoder_intermediate_size": self.decoder_intermediate_size,
            "policy_hidden_size": self.policy_hidden_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        for name in ("policy_loss_weight", "exit_loss_weight", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0 <= value < math.inf or (name.endswith("prob") and value > 1):  # NaN fails every comparison
                raise ValueError(f"`{name}` must be a finite number >= 0 (at most 1 for a dropout), got {value}.")
        check_drop_path_rate(self.drop_path_rate)
        if self.position_interpolation not in ("bicubic", "bilinear"):
            raise ValueError(
                f"`position_interpolation` must be 'bicubic' or 'bilinear', got {self.position_interpolation!r}."
            )
        if self.decoder_num_hidden_layers < 0:
            raise ValueError(f"`decoder_num_hidden_layers` must be >= 0, got {self.decoder_num_hidden_layers}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(
                f"`decoder_hidden_size` ({self.decoder_hidden_size}) must be divisible by "
                f"`decoder_num_attention_heads` ({self.decoder_num_attention_heads})."
            )
        sides = [self.image_size] * 2 if isinstance(self.image_size, int) else list(self.image_size)
        if len(sides) != 2 or any(side < self.patch_size or side % self.patch_size for side in sides):
            raise ValueError(
                f"`image_size` ({self.image_size}) must be one size or [height, width], each a positive multiple "
                f"of `patch_size` ({self.patch_size})."
            )
        if not self.id2label:
            raise ValueError("`id2label` is empty: a segmentation model needs at least one class (`num_labels` >= 1).")
        if 0 <= self.semantic_loss_ignore_index < self.num_labels:
            raise ValueError(
                f"`semantic_loss_ignore_index` ({self.semantic_loss_ignore_index}) is a valid class id "
                f"(num_labels={self.num_labels}); use 255 or another value outside [0, num_labels)."
            )

    def validate_early_exits(self) -> None:
        """Part of `@strict`-powered validation: exit heads, their thresholds and keep counts."""
        layers = self.exit_layers
        if layers != sorted(set(layers)) or any(not 1 <= layer < self.num_hidden_layers for layer in layers):
            raise ValueError(
                f"`exit_layers` ({layers}) must be increasing block indices between 1 and num_hidden_layers - 1 "
                f"({self.num_hidden_layers - 1}): an exit runs after that block."
            )
        if self.exit_head_type not in EXIT_HEAD_TYPES:
            raise ValueError(f"`exit_head_type` must be 'mlp' or 'atm', got {self.exit_head_type!r}.")
        for name in ("exit_hidden_size", "exit_num_hidden_layers", "exit_num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.exit_hidden_size % self.exit_num_attention_heads:
            raise ValueError(
                f"`exit_hidden_size` ({self.exit_hidden_size}) must be divisible by `exit_num_attention_heads` "
                f"({self.exit_num_attention_heads})."
            )
        if self.trained_components is not None and not set(self.trained_components) <= set(TRAINABLE_COMPONENTS):
            raise ValueError(
                f"`trained_components` ({self.trained_components}) may only name {list(TRAINABLE_COMPONENTS)}."
            )

    def validate_run_settings(self) -> None:
        """Part of `@strict`-powered validation: the run-time settings saved as defaults, checked as every call's
        are (`StepSettings`). A token budget is checked against each input's grid, not the stored one: a model
        stored at 512 may be run, or exported, at 1024 with a budget above 512's cell count."""
        self.settings.check_against(self)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As `PreTrainedConfig.from_dict`; a saved configuration that predates a field of `BEHAVIOUR_BEFORE_FIELD`
        gets the value it ran with, not the new default; fields this version does not know are named in a warning."""
        warn_unknown_fields(cls, config_dict)
        return super().from_dict({**BEHAVIOUR_BEFORE_FIELD, **config_dict}, **kwargs)

    def validate_token_sharing(self) -> None:
        """Part of `@strict`-powered validation: superpatch sizes, policy thresholds and token budget."""
        sizes = self.superpatch_sizes
        if not sizes or len(set(sizes)) != len(sizes) or not set(sizes) <= set(SUPERPATCH_SIZES):
            raise ValueError(
                f"`superpatch_sizes` ({sizes}) must be distinct powers of two among 1, 2, 4, 8, 16 (use [1] for no "
                "token sharing)."
            )
        if self.policy_hidden_size % 4:
            raise ValueError(f"`policy_hidden_size` must be a multiple of 4, got {self.policy_hidden_size}.")
        if self.shared_sizes and self.patch_size % 4:
            raise ValueError(f"The policy network needs `patch_size` divisible by 4, got {self.patch_size}.")

    @property
    def settings(self) -> StepSettings:
        """The saved run-time settings: the `StepSettings` a forward runs with when it is given none."""
        return StepSettings(**{name: getattr(self, name) for name in RUN_SETTINGS})

    def update_settings(self, settings: StepSettings | None = None, **changes) -> None:
        """
        Change the saved run-time settings, the defaults every later call runs with (and `save_pretrained`
        writes): to `settings`, or the current ones with `changes` by name. Checked against the architecture before
        anything is written. Architecture fields are refused: they are fixed once a model is built. To run one
        call with other settings, pass `settings=` to the forward instead: that changes nothing shared.
        """
        architecture = [name for name in changes if name not in RUN_SETTINGS and hasattr(self, name)]
        if architecture:
            raise ValueError(
                f"{architecture} cannot change on a built model; the run-time settings are {list(RUN_SETTINGS)}."
            )
        new = resolve_settings(self, settings, **changes)
        for name, value in new.to_dict().items():
            setattr(self, name, value)

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "StepConfig":
        """
        Build a configuration from a ViT preset: `"tiny"`, `"small"`, `"base"` or `"large"` (a `"vit-"` prefix is
        accepted). Keyword arguments override any field, e.g. `num_labels=19` or `image_size=1024`.
        """
        name = preset.lower().removeprefix("vit-").removeprefix("vit_")
        if name not in VIT_PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(VIT_PRESETS)}.")
        fields = {**VIT_PRESETS[name], **kwargs}
        if "exit_thresholds" not in kwargs:
            exits = fields.get("exit_layers")
            if exits is None:  # `[]` means no exits, not the default ones
                exits = default_exit_layers(fields["num_hidden_layers"])
            fields["exit_thresholds"] = [PRESET_EXIT_THRESHOLD[name]] * len(exits)
        return cls(**fields)


__all__ = [
    "ATTENTION_MODES", "EXIT_HEAD_TYPES", "EXIT_KEEP_RULES", "EXIT_MERGES", "PARTITION_SOURCES", "RUN_SETTINGS",
    "SUPERPATCH_SIZES", "TRAINABLE_COMPONENTS", "StepConfig", "StepSettings", "VIT_PRESETS", "resolve_settings",
]
