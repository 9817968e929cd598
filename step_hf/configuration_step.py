"""STEP model configuration.

Shipped as Hub code next to saved weights: imports only from `transformers` and `huggingface_hub`.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# hidden size, attention heads, layers, MLP size: the standard ViT presets (timm / "An Image is Worth 16x16 Words").
VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_attention_heads": 3, "num_hidden_layers": 12, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": 12, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 24, "intermediate_size": 4096},
}

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
            the position-embedding grid is resized (bicubic) to the input grid.
        patch_size (`int`, defaults to 16): side of a patch in pixels.
        num_channels (`int`, defaults to 3): input channels.
        decoder_hidden_size (`int`, *optional*): width of the mask-transformer decoder; defaults to `hidden_size`.
        decoder_num_hidden_layers (`int`, defaults to 2): transformer layers in the decoder (Segmenter uses 2).
        decoder_num_attention_heads (`int`, *optional*): decoder heads; defaults to `decoder_hidden_size // 64`.
        decoder_intermediate_size (`int`, *optional*): decoder MLP width; defaults to `4 * decoder_hidden_size`.
        semantic_loss_ignore_index (`int`, defaults to 255): label value ignored by the loss (void).
        id2label / label2id / num_labels: the classes, as in every `transformers` config.

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
    semantic_loss_ignore_index: int = 255

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, tuple):
            self.image_size = list(self.image_size)
        if self.decoder_hidden_size is None:
            self.decoder_hidden_size = self.hidden_size
        if self.decoder_num_attention_heads is None:
            self.decoder_num_attention_heads = max(1, self.decoder_hidden_size // 64)
        if self.decoder_intermediate_size is None:
            self.decoder_intermediate_size = 4 * self.decoder_hidden_size
        super().__post_init__(**kwargs)
        # Remote-code loading needs one `auto_map` entry per Auto class; `save_pretrained` only writes the saved
        # model's own class, so the base model's entry is added here (missing entries only).
        self.auto_map = {**DEFAULT_AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self._check_consistency()

    @property
    def image_grid_size(self) -> tuple[int, int]:
        """The (rows, columns) of the stored position-embedding grid."""
        height, width = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        return height // self.patch_size, width // self.patch_size

    def _check_consistency(self) -> None:
        """Raise a `ValueError` naming the field when the configuration cannot build a working model."""
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
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
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

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "StepConfig":
        """
        Build a configuration from a ViT preset: `"tiny"`, `"small"`, `"base"` or `"large"` (a `"vit-"` prefix is
        accepted). Keyword arguments override any field, e.g. `num_labels=19` or `image_size=1024`.
        """
        name = preset.lower().removeprefix("vit-").removeprefix("vit_")
        if name not in VIT_PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(VIT_PRESETS)}.")
        return cls(**{**VIT_PRESETS[name], **kwargs})


__all__ = ["StepConfig", "VIT_PRESETS"]
