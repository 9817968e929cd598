"""Convert a published Segmenter model (ViT encoder + mask-transformer decoder) into a step-hf folder.

    python -m step_hf.convert_segmenter --checkpoint PATH [--variant variant.yml] [--dataset ade20k] --output_dir DIR \
        [--push_to_hub --hub_model_id org/name]

Sources, told apart by their keys:
- the Segmenter authors' `checkpoint.pth` (`{"model": state_dict}`, keys `encoder.*` / `decoder.*`), with the
  `variant.yml` next to it (heads, input size, normalisation, windows; read from the checkpoint's folder when
  `--variant` is not given);
- mmsegmentation's Segmenter checkpoints (`{"state_dict": ..., "meta": ...}`, keys `backbone.*` / `decode_head.*`,
  fused `in_proj` attention weights), whose `meta` holds the training config and the class names;
- a plain state dict of either naming, or a `.safetensors` file of one.

The converted model starts dense (no token sharing, no halting): it then computes exactly what the original does.
Its policy network and exit heads are fresh (`trained_components=["encoder", "decoder"]`); `examples/train.py`
trains them (README: "Start from a published Segmenter").
"""

import argparse
import os
import pickle
import re
from dataclasses import dataclass, field

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .cli import run_command
from .configuration_step import StepConfig
from .image_processing_step import StepImageProcessor
from .model_card import model_card
from .modeling_step import StepForSemanticSegmentation
from .segmentation_classes import dataset_id2label

# Test-time shortest edge, window size and window stride of each dataset in the Segmenter authors' configuration.
DATASET_INFERENCE = {"ade20k": (512, 512, 512), "pascal_context": (520, 480, 320), "cityscapes": (1024, 768, 512)}
# The Segmenter authors' normalisations: AugReg ViTs use 0.5, DeiTs ImageNet statistics.
NORMALIZATIONS = {"vit": ([0.5] * 3, [0.5] * 3), "deit": (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))}
# mmsegmentation's dataset classes -> our dataset names.
MMSEG_DATASETS = {
    "ADE20KDataset": "ade20k", "CityscapesDataset": "cityscapes", "PascalContextDataset": "pascal_context",
    "PascalContextDataset59": "pascal_context",
}
EXPECTED_KEYS = (
    "the Segmenter authors' keys (encoder.pos_embed, encoder.blocks.0.attn.qkv.weight, decoder.cls_emb, "
    "decoder.proj_patch, ...) or mmsegmentation's (backbone.pos_embed, backbone.layers.0.attn.attn.in_proj_weight, "
    "decode_head.cls_emb, decode_head.patch_proj.weight, ...), as a plain state dict or under 'model' or 'state_dict'"
)

# mmsegmentation's transformer layers -> timm / Segmenter names (the same for its backbone and its decode head).
_MMSEG_LAYER_RENAMES = [
    (r"\.layers\.(\d+)\.ln1\.", r".blocks.\1.norm1."),
    (r"\.layers\.(\d+)\.ln2\.", r".blocks.\1.norm2."),
    (r"\.layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r".blocks.\1.attn.qkv.\2"),
    (r"\.layers\.(\d+)\.attn\.attn\.out_proj\.", r".blocks.\1.attn.proj."),
    (r"\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r".blocks.\1.mlp.fc1."),
    (r"\.layers\.(\d+)\.ffn\.layers\.1\.", r".blocks.\1.mlp.fc2."),
]
_MMSEG_RENAMES = [
    (r"^backbone\.patch_embed\.projection\.", "step.patch_embed.proj."),
    (r"^backbone\.ln1\.", "step.norm."),
    (r"^backbone\.", "step."),
    (r"^decode_head\.dec_proj\.", "decoder.proj_dec."),
    (r"^decode_head\.", "decoder."),
]
# Tensors of the sources that a segmenter does not use: classification heads, mmseg's unused 1x1 classifier.
_UNUSED = re.compile(r"^(encoder\.head\.|encoder\.head_dist\.|decode_head\.conv_seg\.)")


@dataclass
class SegmenterSource:
    """A checkpoint in step-hf names, with what its source says about running it (`None`: not said)."""

    kind: str  # "segmenter" (the authors' code) or "mmseg"
    state_dict: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)  # StepConfig fields the source fixes
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    window: tuple[int, int] | None = None  # size, stride
    dataset: str | None = None
    class_names: list[str] | None = None


def load_checkpoint(path: str) -> dict:
    """A checkpoint's contents, read without running code: safetensors, or a pickle of tensors and plain containers
    only (`torch.load(weights_only=True)`); a pickle that needs more is refused."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, and loading it could run code, so it is "
            f"refused (torch.load with weights_only=True said: {str(error).splitlines()[0]}). Save its state dict "
            "alone in a trusted environment (torch.save(checkpoint['model'], ...) or safetensors) and convert that."
        ) from None


def find_state_dict(checkpoint: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict of a checkpoint (under 'model', 'state_dict', or the checkpoint itself) and mmseg's `meta`;
    a DataParallel `module.` prefix is removed."""
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), dict) else None
    state_dict = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            state_dict = checkpoint[key]
            break
    tensors = {name: value for name, value in state_dict.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"No tensors found in the checkpoint (top-level keys {sorted(checkpoint)[:8]}); expected "
                         f"{EXPECTED_KEYS}.")
    return {name.removeprefix("module."): value for name, value in tensors.items()}, meta


def detect_source(state_dict: dict[str, torch.Tensor]) -> str:
    """'segmenter' or 'mmseg' from the keys; variants that a StepConfig cannot represent are refused, naming why."""
    if "encoder.pos_embed" in state_dict and any(name.startswith("decoder.") for name in state_dict):
        if "encoder.dist_token" in state_dict:
            raise ValueError("This Segmenter uses a distilled DeiT (encoder.dist_token): its second class token, "
                             "which every patch attends to, has no counterpart in step-hf; it is not converted.")
        if "decoder.cls_emb" not in state_dict:
            raise ValueError("This Segmenter's decoder is not the mask transformer (no decoder.cls_emb; e.g. the "
                             "linear decoder): only mask-transformer decoders are converted.")
        return "segmenter"
    if "backbone.pos_embed" in state_dict and any(name.startswith("decode_head.") for name in state_dict):
        if "decode_head.cls_emb" not in state_dict:
            raise ValueError("This mmsegmentation model's decode head is not SegmenterMaskTransformerHead (no "
                             "decode_head.cls_emb): only the mask-transformer head is converted.")
        return "mmseg"
    raise ValueError(f"Unrecognised checkpoint: expected {EXPECTED_KEYS}; got keys such as {sorted(state_dict)[:6]}.")


def rename_state_dict(state_dict: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Source names -> step-hf names. The authors' encoder and decoder names are already ours (timm's and
    Segmenter's); mmseg's are renamed, and its bias-free `patch_proj` / `classes_proj` Linears (y = x W^T) become
    Segmenter's matrices (y = x P, so P = W^T)."""
    renamed = {}
    for name, tensor in state_dict.items():
        if _UNUSED.match(name):
            continue
        if kind == "segmenter":
            renamed[re.sub(r"^encoder\.", "step.", name)] = tensor
            continue
        if name in ("decode_head.patch_proj.weight", "decode_head.classes_proj.weight"):
            renamed["decoder.proj_patch" if "patch" in name else "decoder.proj_classes"] = tensor.T.contiguous()
            continue
        for pattern, replacement in _MMSEG_LAYER_RENAMES:
            name = re.sub(pattern, replacement, name)
        for pattern, replacement in _MMSEG_RENAMES:
            name, count = re.subn(pattern, replacement, name)
            if count:
                break
        renamed[name] = tensor
    return renamed


def count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks under `prefix` (e.g. 'step.blocks.')."""
    indices = {int(name[len(prefix):].split(".")[0]) for name in state_dict if name.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def architecture(state_dict: dict[str, torch.Tensor]) -> dict:
    """The StepConfig fields that the tensor shapes fix. Heads are not in the shapes: `hidden // 64`, as every
    published ViT-T/S/B/L and Segmenter's decoder (`n_heads = d_model // 64`), unless the source says otherwise."""
    hidden, _, patch, _ = state_dict["step.patch_embed.proj.weight"].shape
    decoder_hidden = state_dict["decoder.proj_dec.weight"].shape[0]
    side = int(round((state_dict["step.pos_embed"].shape[1] - 1) ** 0.5))
    return dict(
        hidden_size=hidden, num_hidden_layers=count_blocks(state_dict, "step.blocks."),
        num_attention_heads=max(1, hidden // 64), intermediate_size=state_dict["step.blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=patch, image_size=side * patch, decoder_hidden_size=decoder_hidden,
        decoder_num_hidden_layers=count_blocks(state_dict, "decoder.blocks."),
        decoder_num_attention_heads=max(1, decoder_hidden // 64),
        decoder_intermediate_size=state_dict["decoder.blocks.0.mlp.fc1.weight"].shape[0]
        if "decoder.blocks.0.mlp.fc1.weight" in state_dict else 4 * decoder_hidden,
        num_labels=state_dict["decoder.cls_emb"].shape[1],
    )


def read_variant(path: str) -> dict:
    """A Segmenter `variant.yml`, read with YAML's safe loader (its `!!python/tuple` sizes become lists)."""
    import yaml

    class VariantLoader(yaml.SafeLoader):
        pass

    VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                                  lambda loader, node: loader.construct_sequence(node))
    with open(path) as f:
        return yaml.load(f, Loader=VariantLoader)


def segmenter_settings(source: SegmenterSource, variant: dict | None) -> None:
    """The Segmenter authors' conventions (LayerNorm eps 1e-5 everywhere, bilinear position resize) and what the
    variant says: heads, stored input size, normalisation, dataset and windows."""
    source.config.update(layer_norm_eps=1e-5, decoder_layer_norm_eps=1e-5, position_interpolation="bilinear")
    if not variant:
        return
    net = variant.get("net_kwargs", {})
    if "n_heads" in net:
        source.config["num_attention_heads"] = int(net["n_heads"])
    if "image_size" in net:
        size = net["image_size"]
        source.config["image_size"] = [int(size[0]), int(size[1])] if isinstance(size, (list, tuple)) else int(size)
    if net.get("distilled"):
        raise ValueError("The variant is a distilled DeiT (net_kwargs.distilled): not convertible (see detect_source).")
    normalization = net.get("normalization") or variant.get("dataset_kwargs", {}).get("normalization")
    if normalization is not None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalization {normalization!r} in the variant; known: {sorted(NORMALIZATIONS)}."
            )
        source.image_mean, source.image_std = NORMALIZATIONS[normalization]
    source.dataset = variant.get("dataset_kwargs", {}).get("dataset")
    inference = variant.get("inference_kwargs", {})
    if "window_size" in inference:
        source.window = (int(inference["window_size"]), int(inference.get("window_stride", inference["window_size"])))


def mmseg_settings(source: SegmenterSource, meta: dict | None) -> None:
    """mmsegmentation's conventions (encoder LayerNorm eps 1e-6, decoder 1e-5, bicubic position resize) and what
    the training config in `meta` says: heads, input size, normalisation, sliding windows, dataset and classes."""
    source.config.update(layer_norm_eps=1e-6, decoder_layer_norm_eps=1e-5, position_interpolation="bicubic")
    meta = meta or {}
    names = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    source.class_names = list(names) if names else None
    text = meta.get("config") if isinstance(meta.get("config"), str) else ""
    heads = [int(value) for value in re.findall(r"num_heads=(\d+)", text)]
    if heads:
        source.config["num_attention_heads"] = heads[0]
        source.config["decoder_num_attention_heads"] = heads[-1]
    if size := re.search(r"img_size=\((\d+),\s*(\d+)\)", text):
        source.config["image_size"] = [int(size[1]), int(size[2])]
    if mode := re.search(r"interpolate_mode='(\w+)'", text):
        source.config["position_interpolation"] = mode[1]
    if norm := re.search(r"mean=\[([\d.,\s]+)\],\s*std=\[([\d.,\s]+)\]", text):
        mean, std = ([float(value) / 255 for value in group.split(",")] for group in (norm[1], norm[2]))
        source.image_mean, source.image_std = mean, std
    if window := re.search(r"crop_size=\((\d+),\s*\d+\),\s*stride=\((\d+),\s*\d+\)", text):
        source.window = (int(window[1]), int(window[2]))
    if dataset := re.search(r"dataset_type\s*=\s*'(\w+)'", text):
        source.dataset = MMSEG_DATASETS.get(dataset[1])


def read_source(checkpoint: str | dict, variant: str | None = None) -> SegmenterSource:
    """Read and recognise a checkpoint (a path or an already loaded dict) and its variant / meta."""
    contents = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state_dict, meta = find_state_dict(contents)
    kind = detect_source(state_dict)
    source = SegmenterSource(kind, rename_state_dict(state_dict, kind))
    if kind == "segmenter":
        if variant is None and isinstance(checkpoint, str):
            beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "variant.yml")
            variant = beside if os.path.isfile(beside) else None
        segmenter_settings(source, read_variant(variant) if variant else None)
    else:
        mmseg_settings(source, meta)
    return source


def build_model(source: SegmenterSource, id2label: dict[int, str] | None) -> StepForSemanticSegmentation:
    """A dense STEP model holding the source's encoder and decoder exactly; its policy and exit heads are fresh."""
    fields = {**architecture(source.state_dict), **source.config}
    num_labels = fields.pop("num_labels")
    id2label = id2label or {index: f"class_{index}" for index in range(num_labels)}
    config = StepConfig(
        **fields, id2label=id2label, label2id={name: index for index, name in id2label.items()},
        partition_source="dense", halting=False, trained_components=["encoder", "decoder"],
    )
    model = StepForSemanticSegmentation(config).eval()
    groups = model.parameter_groups()
    expected = set(groups["encoder"]) | set(groups["decoder"])
    missing = sorted(expected - set(source.state_dict))
    unexpected = sorted(set(source.state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"The checkpoint does not fit a ViT + mask-transformer Segmenter: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (in step-hf names).")
    for name, tensor in model.state_dict().items():
        if name in expected and source.state_dict[name].shape != tensor.shape:
            raise ValueError(f"Shape of {name}: checkpoint {tuple(source.state_dict[name].shape)}, model "
                             f"{tuple(tensor.shape)}; do the heads, sizes or variant match the checkpoint?")
    model.load_state_dict(source.state_dict, strict=False)
    return model


def build_processor(source: SegmenterSource, config: StepConfig, dataset: str | None) -> StepImageProcessor:
    """The checkpoint's normalisation, test-time resize and sliding windows, merged in pixels as the original."""
    if source.window:
        window, stride = source.window
    elif dataset:
        window, stride = DATASET_INFERENCE[dataset][1:]
    else:  # the stored input size, windows side by side
        window = stride = config.image_grid_size[0] * config.patch_size
    shortest_edge = DATASET_INFERENCE[dataset][0] if dataset in DATASET_INFERENCE else window
    mean, std = source.image_mean, source.image_std
    if mean is None:  # neither variant nor meta said: the AugReg ViTs that nearly all published Segmenters use
        mean, std = NORMALIZATIONS["vit"]
    return StepImageProcessor(
        size={"shortest_edge": shortest_edge}, size_divisor=config.patch_size, image_mean=mean, image_std=std,
        window_size=window, window_stride=stride, window_merge="pixels", num_labels=config.num_labels,
        do_reduce_labels=dataset == "ade20k", superpatch_sizes=list(config.superpatch_sizes),
    )


def convert_segmenter(
    checkpoint: str | dict, output_dir: str | None = None, variant: str | None = None, dataset: str | None = None,
    push_to_hub: bool = False, hub_model_id: str | None = None,
) -> tuple[StepForSemanticSegmentation, StepImageProcessor]:
    """
    Convert a Segmenter checkpoint (a path, or a loaded dict) into a dense STEP model and its image processor, and
    write them (safetensors, config, processor, model code and card) to `output_dir` when given.

    `dataset` ('ade20k', 'cityscapes', 'pascal_context') names the classes and the test-time resize and windows
    when the variant or meta does not; `push_to_hub` uploads the folder to `hub_model_id`.
    """
    if push_to_hub and not (hub_model_id and output_dir):
        raise ValueError("push_to_hub needs hub_model_id and output_dir.")
    source = read_source(checkpoint, variant)
    dataset = dataset or (source.dataset if source.dataset in DATASET_INFERENCE else None)
    num_labels = source.state_dict["decoder.cls_emb"].shape[1]
    id2label = dataset_id2label(dataset, num_labels) if dataset else None
    if id2label is None and source.class_names and len(source.class_names) == num_labels:
        id2label = dict(enumerate(source.class_names))
    model = build_model(source, id2label)
    processor = build_processor(source, model.config, dataset)
    if output_dir:
        save_converted(model, processor, output_dir, checkpoint, source.kind)
    if push_to_hub:
        from .hub import push_folder

        push_folder(output_dir, hub_model_id)
    return model, processor


def save_converted(model: StepForSemanticSegmentation, processor: StepImageProcessor, output_dir: str,
                   checkpoint: str | dict, kind: str) -> None:
    """Weights (safetensors), config, processor, model code and a card saying where the weights came from."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    origin = os.path.basename(checkpoint) if isinstance(checkpoint, str) else "a state dict"
    authors = "the Segmenter authors' code" if kind == "segmenter" else "mmsegmentation"
    provenance = (f"Converted from the Segmenter checkpoint `{origin}` ({authors}) by `python -m "
                  "step_hf.convert_segmenter`: the encoder and decoder are the original's and compute what it "
                  "computes; the policy network and exit heads are untrained, and the model runs dense.")
    name = os.path.basename(os.path.normpath(output_dir))
    model_card(name, model.config, None, provenance=provenance).save(os.path.join(output_dir, "README.md"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth, an mmseg .pth, or a state dict")
    parser.add_argument("--variant", help="the Segmenter authors' variant.yml (default: next to the checkpoint)")
    parser.add_argument("--dataset", choices=sorted(DATASET_INFERENCE), help="names the classes, resize, windows")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name")
    model, _ = convert_segmenter(args.checkpoint, args.output_dir, args.variant, args.dataset, args.push_to_hub,
                                 args.hub_model_id)
    print(f"converted {args.checkpoint} ({model.config.num_hidden_layers} blocks, width {model.config.hidden_size}, "
          f"{model.config.num_labels} classes) to {args.output_dir}")


if __name__ == "__main__":
    run_command(main)
