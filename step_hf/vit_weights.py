"""Load public ViT weights (timm or Hugging Face `ViTModel` checkpoints) into the STEP encoder.

Only safetensors are read: pickled checkpoints (`.bin`, `.pth`) can run code when loaded and are refused.
"""

import json
import os
import re

import torch
from safetensors.torch import load_file

from .fast_ops import resize_grid_bicubic
from .modeling_step import StepForSemanticSegmentation, StepModel

# Hugging Face ViT names (v5 modules, then v4 modules as still saved on disk) -> timm names used by StepModel.
_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]
# Separate q / k / v projections, fused into timm's `qkv` in q, k, v order.
_HF_QKV = re.compile(
    r"^(?:layers\.(\d+)\.attention\.([qkv])_proj|encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value))"
    r"\.(weight|bias)$"
)
# Classifier heads and poolers of the source model: not part of a segmentation encoder.
_DROPPED = re.compile(r"^(head|fc_norm|pooler|classifier|head_drop)\b")


def convert_vit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Rename a ViT state dict to the timm names `StepModel` uses. Accepts timm names (returned as they are),
    Hugging Face `ViTModel` names of transformers 4 and 5, and the same with a `vit.` prefix
    (`ViTForImageClassification`). Classification heads and poolers are dropped.
    """
    converted, qkv_parts = {}, {}
    for name, tensor in state_dict.items():
        name = name.removeprefix("vit.")
        if _DROPPED.match(name):
            continue
        match = _HF_QKV.match(name)
        if match:
            layer = match.group(1) or match.group(3)
            part = (match.group(2) or match.group(4))[0]  # q / k / v
            qkv_parts.setdefault((layer, match.group(5)), {})[part] = tensor
            continue
        for pattern, replacement in _HF_RENAMES:
            name, count = re.subn(pattern, replacement, name)
            if count:
                break
        converted[name] = tensor
    for (layer, kind), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Layer {layer} of the checkpoint lacks some of its query/key/value {kind}s.")
        converted[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def resize_position_embedding(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resize a `(1, 1 + rows * cols, dim)` position embedding with a square grid to `grid_size` (bicubic, no
    antialias, as `transformers`' ViT interpolates); the class token's embedding is kept."""
    num_patches, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"The checkpoint's position embedding has {num_patches} patches, not a square grid.")
    if (side, side) == tuple(grid_size):
        return pos_embed
    grid = resize_grid_bicubic(pos_embed[0, 1:].reshape(side, side, dim), tuple(grid_size))
    return torch.cat([pos_embed[:, :1], grid.reshape(1, -1, dim)], dim=1)


def _read_checkpoint(source: str, revision: str | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A state dict (and the source's `config.json`, if any) from a safetensors file, a folder or a Hub id."""
    if os.path.isfile(source):
        if not source.endswith(".safetensors"):
            raise ValueError(
                f"{source} is not a .safetensors file. Pickled checkpoints are refused because loading them can run "
                "code; convert it once in a trusted environment with `safetensors.torch.save_file`."
            )
        return load_file(source), None
    if os.path.isdir(source):
        weights = os.path.join(source, "model.safetensors")
        config_path = os.path.join(source, "config.json")
    else:  # a Hub id such as "timm/vit_large_patch16_384.augreg_in21k_ft_in1k" or "google/vit-large-patch16-224"
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            weights = hf_hub_download(source, "model.safetensors", revision=revision)
        except Exception as error:  # invalid id, unknown repo, no such file, no network: the Hub's words follow
            offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            raise FileNotFoundError(
                f"{source!r} is not a local file or folder (looked for {os.path.abspath(source)}); tried as a Hub id "
                f"and could not get its model.safetensors{offline}: {type(error).__name__}: {error}"
            ) from error
        try:
            config_path = hf_hub_download(source, "config.json", revision=revision)
        except EntryNotFoundError:
            config_path = None
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"No model.safetensors in {source}; STEP loads ViT weights from safetensors only.")
    config = None
    if config_path and os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    return load_file(weights), config


def _check_source_config(source_config: dict | None, model: StepModel) -> None:
    """Refuse a Hugging Face ViT whose architecture differs from the model's, naming the field."""
    if not source_config or source_config.get("model_type") != "vit":
        return
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "layer_norm_eps"):
        if field in source_config and source_config[field] != getattr(model.config, field):
            raise ValueError(
                f"The checkpoint's `{field}` is {source_config[field]} but the STEP config has "
                f"{getattr(model.config, field)}; build the StepConfig with {field}={source_config[field]}."
            )


def load_vit_weights(
    model: StepModel | StepForSemanticSegmentation,
    source: str | dict[str, torch.Tensor],
    revision: str | None = None,
) -> list[str]:
    """
    Load public ViT encoder weights into a STEP model (its decoder keeps its own initialisation).

    Args:
        model: a `StepModel` or `StepForSemanticSegmentation`.
        source: a state dict, a `.safetensors` file, a folder with `model.safetensors` (and optionally a
            Hugging Face `config.json`), or a Hub id. timm and Hugging Face `ViTModel` names are understood; the
            position-embedding grid is resized to `model.config.image_size`. Use `layer_norm_eps=1e-12` in the
            STEP config for Hugging Face ViTs (timm ViTs use 1e-6).
        revision: the Hub revision, when `source` is a Hub id.

    Returns:
        The names of checkpoint tensors that were not used (e.g. a distillation token), for the caller to inspect.
    """
    encoder = model.step if isinstance(model, StepForSemanticSegmentation) else model
    if isinstance(source, dict):
        state_dict, source_config = source, None
    else:
        state_dict, source_config = _read_checkpoint(source, revision)
    _check_source_config(source_config, encoder)

    converted = convert_vit_state_dict(state_dict)
    if "pos_embed" in converted:
        converted["pos_embed"] = resize_position_embedding(converted["pos_embed"], encoder.config.image_grid_size)
    # The policy network and the exit heads are STEP's own: no ViT checkpoint has them.
    vit_names = set(encoder.parameter_groups()["encoder"])
    expected = {name: tensor for name, tensor in encoder.state_dict().items() if name in vit_names}
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} encoder tensors, e.g. {missing[:3]}; is it a ViT with a class "
            "token and the same depth?"
        )
    for name, tensor in expected.items():
        if converted[name].shape != tensor.shape:
            raise ValueError(
                f"Shape mismatch for `{name}`: checkpoint {tuple(converted[name].shape)}, model {tuple(tensor.shape)}"
                "; the preset (hidden size, heads, depth, MLP size) must match the checkpoint's."
            )
    encoder.load_state_dict({name: converted[name] for name in expected}, strict=False)
    return sorted(set(converted) - set(expected))


__all__ = ["convert_vit_state_dict", "load_vit_weights", "resize_position_embedding"]
