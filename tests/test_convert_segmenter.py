"""The Segmenter converter against independent reference forwards written from the original code's structure: the
Segmenter authors' `segm/model` (vit.py, blocks.py, decoder.py, segmenter.py, utils.py) and mmsegmentation's
ViT backbone, `SegmenterMaskTransformerHead` and `slide_inference`. The checkpoints are tiny random state dicts with
each source's exact key names and shapes."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, pipeline

from step_hf.convert_segmenter import convert_segmenter

from .reference import REMOTE_SCRIPT, check_pipeline_output

WIDTH, DEPTH, HEADS, CLASSES, IMAGE = 128, 2, 4, 5, 64  # heads: not width // 64, so they must come from the source
GRID = IMAGE // 16


def random_block(prefix: str, dim: int, generator: torch.Generator, mmseg: bool) -> dict[str, torch.Tensor]:
    """One transformer block's tensors in timm / Segmenter names, or mmseg's (`ln1`, fused `in_proj`, `ffn`)."""
    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    names = (["ln1", "ln2", "attn.attn.in_proj_", "attn.attn.out_proj.", "ffn.layers.0.0.", "ffn.layers.1."] if mmseg
             else ["norm1", "norm2", "attn.qkv.", "attn.proj.", "mlp.fc1.", "mlp.fc2."])
    tensors = {}
    for norm in names[:2]:
        tensors[f"{prefix}{norm}.weight"], tensors[f"{prefix}{norm}.bias"] = 1 + rand(dim), rand(dim)
    for name, (rows, cols) in zip(names[2:], [(3 * dim, dim), (dim, dim), (4 * dim, dim), (dim, 4 * dim)]):
        tensors[f"{prefix}{name}weight"], tensors[f"{prefix}{name}bias"] = rand(rows, cols), rand(rows)
    return tensors


def segmenter_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Segmenter authors' `checkpoint["model"]`: `encoder.*` (timm names, a 1000-class head) and `decoder.*`."""
    g = torch.Generator().manual_seed(seed)
    d = WIDTH
    sd = {"encoder.cls_token": torch.randn(1, 1, d, generator=g), "encoder.pos_embed": torch.randn(1, 1 + GRID**2, d, generator=g),
          "encoder.patch_embed.proj.weight": torch.randn(d, 3, 16, 16, generator=g) * 0.05,
          "encoder.patch_embed.proj.bias": torch.randn(d, generator=g) * 0.1,
          "encoder.norm.weight": 1 + 0.1 * torch.randn(d, generator=g), "encoder.norm.bias": 0.1 * torch.randn(d, generator=g),
          "encoder.head.weight": torch.randn(1000, d, generator=g), "encoder.head.bias": torch.randn(1000, generator=g),
          "decoder.cls_emb": torch.randn(1, CLASSES, d, generator=g),
          "decoder.proj_dec.weight": torch.randn(d, d, generator=g) * 0.1, "decoder.proj_dec.bias": torch.randn(d, generator=g) * 0.1,
          "decoder.proj_patch": torch.randn(d, d, generator=g) * d**-0.5, "decoder.proj_classes": torch.randn(d, d, generator=g) * d**-0.5,
          "decoder.decoder_norm.weight": 1 + 0.1 * torch.randn(d, generator=g), "decoder.decoder_norm.bias": 0.1 * torch.randn(d, generator=g),
          "decoder.mask_norm.weight": 1 + 0.1 * torch.randn(CLASSES, generator=g), "decoder.mask_norm.bias": 0.1 * torch.randn(CLASSES, generator=g)}
    for i in range(DEPTH):
        sd.update(random_block(f"encoder.blocks.{i}.", d, g, mmseg=False))
    for i in range(2):
        sd.update(random_block(f"decoder.blocks.{i}.", d, g, mmseg=False))
    return sd


def mmseg_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """An mmsegmentation Segmenter's `state_dict`: the same model in mmseg's names (its projections are bias-free
    Linears, and its decode head keeps an unused `conv_seg`)."""
    sd = {}
    for name, tensor in segmenter_state_dict(seed).items():
        if name.startswith("encoder.head") or ".blocks." in name:
            continue
        name = name.replace("encoder.patch_embed.proj", "backbone.patch_embed.projection")
        name = name.replace("encoder.norm.", "backbone.ln1.").replace("encoder.", "backbone.")
        name = name.replace("decoder.proj_dec", "decode_head.dec_proj").replace("decoder.", "decode_head.")
        if name in ("decode_head.proj_patch", "decode_head.proj_classes"):
            name, tensor = name.replace("proj_patch", "patch_proj.weight").replace("proj_classes", "classes_proj.weight"), tensor
        sd[name] = tensor
    g = torch.Generator().manual_seed(seed + 10)
    for i in range(DEPTH):
        sd.update(random_block(f"backbone.layers.{i}.", WIDTH, g, mmseg=True))
    for i in range(2):
        sd.update(random_block(f"decode_head.layers.{i}.", WIDTH, g, mmseg=True))
    sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"] = torch.randn(CLASSES, WIDTH, 1, 1), torch.randn(CLASSES)
    return sd


MMSEG_CONFIG = (
    "model = dict(type='EncoderDecoder', backbone=dict(type='VisionTransformer', img_size=(64, 64), patch_size=16, "
    f"embed_dims={WIDTH}, num_layers={DEPTH}, num_heads={HEADS}, final_norm=True, norm_cfg=dict(type='LN', eps=1e-06), "
    "with_cls_token=True, interpolate_mode='bicubic'), decode_head=dict(type='SegmenterMaskTransformerHead', "
    f"num_classes={CLASSES}, num_layers=2, num_heads=2, embed_dims={WIDTH}), "
    "test_cfg=dict(mode='slide', crop_size=(64, 64), stride=(32, 32)))\n"
    "dataset_type = 'CustomDataset'\n"
    "img_norm_cfg = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], to_rgb=True)\n"
)
MMSEG_CLASSES = ["sky", "road", "car", "tree", "person"]
VARIANT = f"""\
dataset_kwargs:
  dataset: custom
  normalization: deit
inference_kwargs:
  im_size: 64
  window_size: 64
  window_stride: 32
net_kwargs:
  backbone: vit_tiny_patch16_384
  d_model: {WIDTH}
  decoder:
    n_cls: {CLASSES}
    n_layers: 2
    name: mask_transformer
  distilled: false
  image_size: !!python/tuple
  - 64
  - 64
  n_cls: {CLASSES}
  n_heads: {HEADS}
  n_layers: {DEPTH}
  normalization: deit
  patch_size: 16
"""


# ---------------------------------------------------------------------------------------------- reference forwards


def segmenter_block(x, p, prefix, heads, eps=1e-5):
    """segm/model/blocks.py `Block`: pre-norm, qkv reshaped (B, N, 3, heads, C // heads), explicit softmax."""
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), p[prefix + "norm1.weight"], p[prefix + "norm1.bias"], eps)
    qkv = F.linear(h, p[prefix + "attn.qkv.weight"], p[prefix + "attn.qkv.bias"])
    q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), p[prefix + "attn.proj.weight"], p[prefix + "attn.proj.bias"])
    h = F.layer_norm(x, (C,), p[prefix + "norm2.weight"], p[prefix + "norm2.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, p[prefix + "mlp.fc1.weight"], p[prefix + "mlp.fc1.bias"])), p[prefix + "mlp.fc2.weight"],
                 p[prefix + "mlp.fc2.bias"])
    return x + h


def segmenter_forward(p, im):
    """segm/model/segmenter.py `Segmenter.forward` (inputs already multiples of the patch): ViT with a bilinear
    position resize, MaskTransformer, masks bilinearly upsampled to the input."""
    B, _, H, W = im.shape
    x = F.conv2d(im, p["encoder.patch_embed.proj.weight"], p["encoder.patch_embed.proj.bias"], stride=16)
    x = torch.cat([p["encoder.cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = p["encoder.pos_embed"]
    if x.shape[1] != pos.shape[1]:  # utils.resize_pos_embed
        grid = pos[0, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H // 16, W // 16), mode="bilinear").permute(0, 2, 3, 1).reshape(1, -1, WIDTH)
        pos = torch.cat([pos[:, :1], grid], dim=1)
    x = x + pos
    for i in range(DEPTH):
        x = segmenter_block(x, p, f"encoder.blocks.{i}.", HEADS)
    x = F.layer_norm(x, (WIDTH,), p["encoder.norm.weight"], p["encoder.norm.bias"], 1e-5)[:, 1:]
    # decoder.py MaskTransformer, n_heads = d_model // 64
    x = torch.cat([F.linear(x, p["decoder.proj_dec.weight"], p["decoder.proj_dec.bias"]), p["decoder.cls_emb"].expand(B, -1, -1)], 1)
    for i in range(2):
        x = segmenter_block(x, p, f"decoder.blocks.{i}.", WIDTH // 64)
    x = F.layer_norm(x, (WIDTH,), p["decoder.decoder_norm.weight"], p["decoder.decoder_norm.bias"], 1e-5)
    patches, classes = x[:, :-CLASSES] @ p["decoder.proj_patch"], x[:, -CLASSES:] @ p["decoder.proj_classes"]
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = F.layer_norm(patches @ classes.transpose(1, 2), (CLASSES,), p["decoder.mask_norm.weight"], p["decoder.mask_norm.bias"], 1e-5)
    masks = masks.transpose(1, 2).reshape(B, CLASSES, H // 16, W // 16)  # rearrange "b (h w) n -> b n h w"
    return F.interpolate(masks, size=(H, W), mode="bilinear")


def segmenter_windowed(forward, im, window, stride, ori_shape):
    """segm/model/utils.py `sliding_window` + `merge_windows` (no flip), logits before the softmax."""
    _, _, H, W = im.shape
    h_anchors = [h for h in range(0, H, stride) if h < H - window] + [H - window]
    w_anchors = [w for w in range(0, W, stride) if w < W - window] + [W - window]
    logit, count = torch.zeros(CLASSES, H, W), torch.zeros(1, H, W)
    for ha in h_anchors:
        for wa in w_anchors:
            logit[:, ha:ha + window, wa:wa + window] += forward(im[:, :, ha:ha + window, wa:wa + window])[0]
            count[:, ha:ha + window, wa:wa + window] += 1
    return F.interpolate((logit / count)[None], ori_shape, mode="bilinear")[0]


def mmseg_layer(x, p, prefix, heads, eps):
    """mmseg's TransformerEncoderLayer: mmcv MultiheadAttention (torch's, batch first) and FFN, both residual."""
    C = x.shape[-1]
    attention = torch.nn.MultiheadAttention(C, heads, batch_first=True)
    attention.load_state_dict({"in_proj_weight": p[prefix + "attn.attn.in_proj_weight"], "in_proj_bias": p[prefix + "attn.attn.in_proj_bias"],
                               "out_proj.weight": p[prefix + "attn.attn.out_proj.weight"], "out_proj.bias": p[prefix + "attn.attn.out_proj.bias"]})
    h = F.layer_norm(x, (C,), p[prefix + "ln1.weight"], p[prefix + "ln1.bias"], eps)
    x = x + attention(h, h, h, need_weights=False)[0]
    h = F.layer_norm(x, (C,), p[prefix + "ln2.weight"], p[prefix + "ln2.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, p[prefix + "ffn.layers.0.0.weight"], p[prefix + "ffn.layers.0.0.bias"])),
                 p[prefix + "ffn.layers.1.weight"], p[prefix + "ffn.layers.1.bias"])
    return x + h


def mmseg_forward(p, im):
    """mmseg `EncoderDecoder.encode_decode`: ViT (bicubic position resize, eps 1e-6, final `ln1`), the mask head
    (eps 1e-5, `patch_proj` / `classes_proj` Linears), logits resized to the input."""
    B, _, H, W = im.shape
    x = F.conv2d(im, p["backbone.patch_embed.projection.weight"], p["backbone.patch_embed.projection.bias"], stride=16)
    h, w = x.shape[2:]
    x = torch.cat([p["backbone.cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = p["backbone.pos_embed"]
    if x.shape[1] != pos.shape[1]:  # VisionTransformer.resize_pos_embed
        grid = pos[:, -GRID * GRID:].reshape(1, GRID, GRID, WIDTH).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), align_corners=False, mode="bicubic").flatten(2).transpose(1, 2)
        pos = torch.cat([pos[:, :1], grid], dim=1)
    x = x + pos
    for i in range(DEPTH):
        x = mmseg_layer(x, p, f"backbone.layers.{i}.", HEADS, 1e-6)
    x = F.layer_norm(x, (WIDTH,), p["backbone.ln1.weight"], p["backbone.ln1.bias"], 1e-6)[:, 1:]
    x = torch.cat([F.linear(x, p["decode_head.dec_proj.weight"], p["decode_head.dec_proj.bias"]),
                   p["decode_head.cls_emb"].expand(B, -1, -1)], 1)
    for i in range(2):
        x = mmseg_layer(x, p, f"decode_head.layers.{i}.", 2, 1e-5)
    x = F.layer_norm(x, (WIDTH,), p["decode_head.decoder_norm.weight"], p["decode_head.decoder_norm.bias"], 1e-5)
    patches = F.normalize(F.linear(x[:, :-CLASSES], p["decode_head.patch_proj.weight"]), dim=2, p=2)
    classes = F.normalize(F.linear(x[:, -CLASSES:], p["decode_head.classes_proj.weight"]), dim=2, p=2)
    masks = F.layer_norm(patches @ classes.transpose(1, 2), (CLASSES,), p["decode_head.mask_norm.weight"],
                         p["decode_head.mask_norm.bias"], 1e-5)
    masks = masks.permute(0, 2, 1).contiguous().view(B, -1, h, w)
    return F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)


def mmseg_windowed(forward, im, window, stride, ori_shape):
    """mmseg `EncoderDecoder.slide_inference`, then the resize to the original shape."""
    _, _, H, W = im.shape
    preds, count = torch.zeros(1, CLASSES, H, W), torch.zeros(1, 1, H, W)
    for h_idx in range(max(H - window + stride - 1, 0) // stride + 1):
        for w_idx in range(max(W - window + stride - 1, 0) // stride + 1):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + window, H), min(x1 + window, W)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            crop = forward(im[:, :, y1:y2, x1:x2])
            preds += F.pad(crop, (x1, W - x2, y1, H - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count, size=ori_shape, mode="bilinear", align_corners=False)[0]


# ---------------------------------------------------------------------------------------------- tests


SOURCES = {
    "segmenter": (segmenter_forward, segmenter_windowed, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "mmseg": (mmseg_forward, mmseg_windowed, [0.5] * 3, [0.5] * 3),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each source converted from a file: the authors' checkpoint.pth with its variant.yml next to it, and an mmseg
    checkpoint with its meta. Returns {kind: (state dict, model, processor, folder)}."""
    result = {}
    folder = tmp_path_factory.mktemp("segmenter")
    (folder / "variant.yml").write_text(VARIANT)
    sd = segmenter_state_dict()
    torch.save({"model": sd, "epoch": 63, "n_cls": CLASSES}, folder / "checkpoint.pth")
    model, processor = convert_segmenter(str(folder / "checkpoint.pth"), str(folder / "out"))
    result["segmenter"] = (sd, model, processor, folder / "out")

    folder = tmp_path_factory.mktemp("mmseg")
    sd = mmseg_state_dict()
    torch.save({"state_dict": sd, "meta": {"CLASSES": tuple(MMSEG_CLASSES), "config": MMSEG_CONFIG}}, folder / "m.pth")
    model, processor = convert_segmenter(str(folder / "m.pth"), str(folder / "out"))
    result["mmseg"] = (sd, model, processor, folder / "out")
    return result


@pytest.mark.parametrize("kind", ["segmenter", "mmseg"])
@pytest.mark.parametrize("size", [(64, 64), (48, 96), (80, 64)])
def test_logits_match_the_original(converted, kind, size):
    sd, model, _, _ = converted[kind]
    forward = SOURCES[kind][0]
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(pixels).logits
        reference = forward(sd, pixels)
    upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    assert (upsampled - reference).abs().max() <= 1e-5
    assert reference.std() > 0.1  # random weights that give varied logits, not a trivial comparison


@pytest.mark.parametrize("kind", ["segmenter", "mmseg"])
def test_sliding_windows_match_the_original(converted, kind):
    sd, model, processor, _ = converted[kind]
    forward, windowed, mean, std = SOURCES[kind]
    assert processor.window_size == 64 and processor.window_stride == 32 and processor.window_merge == "pixels"
    assert np.allclose(processor.image_mean, mean) and np.allclose(processor.image_std, std)
    image = np.random.default_rng(4).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    inputs = processor(image, do_resize=False, return_tensors="pt")
    assert len(inputs["pixel_values"]) == 2 * 4
    ori_shape = (70, 130)
    with torch.no_grad():
        ours = processor.semantic_logits(model(**inputs), target_sizes=[ori_shape])[0]
        pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - torch.tensor(mean)[:, None, None]) \
            / torch.tensor(std)[:, None, None]
        reference = windowed(lambda crop: forward(sd, crop), pixels, 64, 32, ori_shape)
    assert (ours - reference).abs().max() <= 1e-5


def test_converted_config(converted):
    for kind, (_, model, _, folder) in converted.items():
        config = model.config
        assert config.partition_source == "dense" and not config.halting
        assert config.trained_components == ["encoder", "decoder"]
        assert config.num_attention_heads == HEADS and config.decoder_num_attention_heads == 2
        assert config.position_interpolation == ("bilinear" if kind == "segmenter" else "bicubic")
        assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(os.listdir(folder))
        assert "Converted from the Segmenter checkpoint" in (folder / "README.md").read_text()
    assert list(converted["mmseg"][1].config.id2label.values()) == MMSEG_CLASSES


def test_dataset_names_the_classes(tmp_path):
    sd = segmenter_state_dict()
    sd["decoder.cls_emb"] = torch.randn(1, 19, WIDTH)
    sd["decoder.mask_norm.weight"], sd["decoder.mask_norm.bias"] = torch.ones(19), torch.zeros(19)
    model, processor = convert_segmenter(sd, dataset="cityscapes")
    assert model.config.id2label[0] == "road" and model.config.id2label[18] == "bicycle"
    assert processor.size["shortest_edge"] == 1024 and processor.window_size == 768 and processor.window_stride == 512
    with pytest.raises(ValueError, match="19 classes but ade20k has 150"):
        convert_segmenter(sd, dataset="ade20k")


def test_loads_through_auto_classes_and_pipeline(converted, monkeypatch):
    _, model, _, folder = converted["mmseg"]
    loaded = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    pixels = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=1e-5, atol=1e-5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(folder))
    check_pipeline_output(segmenter(image), image, segmenter.model.config.id2label)


def test_command_line_and_remote_code(tmp_path):
    """`python -m step_hf.convert_segmenter` on a checkpoint.pth + variant.yml, then the folder runs where step_hf
    cannot be imported (`trust_remote_code=True`)."""
    (tmp_path / "variant.yml").write_text(VARIANT)
    torch.save({"model": segmenter_state_dict()}, tmp_path / "checkpoint.pth")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "step_hf.convert_segmenter", "--checkpoint", str(tmp_path / "checkpoint.pth"),
                    "--output_dir", str(tmp_path / "out")], check=True, env=env, timeout=300)
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "out")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["classes"] == ["StepConfig", "StepModel", "StepForSemanticSegmentation", "StepImageProcessor"]


def test_refusals(tmp_path):
    # Any object beyond tensors and plain containers, as training scripts often save their arguments.
    torch.save({"model": segmenter_state_dict(), "args": argparse.Namespace(lr=0.001)}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="could run code"):
        convert_segmenter(str(tmp_path / "unsafe.pth"))
    with pytest.raises(ValueError, match="encoder.pos_embed.*backbone.pos_embed"):
        convert_segmenter({"model": {"vit.embeddings.cls_token": torch.zeros(1)}})
    distilled = {**segmenter_state_dict(), "encoder.dist_token": torch.zeros(1, 1, WIDTH)}
    with pytest.raises(ValueError, match="distilled DeiT"):
        convert_segmenter(distilled)
    linear = {k: v for k, v in segmenter_state_dict().items() if not k.startswith("decoder.")}
    linear["decoder.head.weight"] = torch.zeros(CLASSES, WIDTH)
    with pytest.raises(ValueError, match="not the mask transformer"):
        convert_segmenter(linear)


def test_add_step_recipe_on_a_converted_model(tmp_path, scene_dataset):
    """scripts/add_step.sh at toy size: converted dense model -> policy -> segmenter fine-tune -> pruning fine-tune,
    each stage saved and evaluated, the converted model's normalisation kept throughout."""
    from scenes import SCENE_CLASSES

    id2label = {int(index): name for index, name in SCENE_CLASSES.items()}
    sd = segmenter_state_dict()
    sd["decoder.cls_emb"] = torch.randn(1, len(id2label), WIDTH)
    sd["decoder.mask_norm.weight"], sd["decoder.mask_norm.bias"] = torch.ones(len(id2label)), torch.zeros(len(id2label))
    model, processor = convert_segmenter(sd)
    model.config.id2label, model.config.label2id = id2label, {name: index for index, name in id2label.items()}
    model.save_pretrained(tmp_path / "dense")
    # A DeiT-normalised model's statistics: unlike 0.5 they differ from a new processor's defaults.
    processor.image_mean, processor.image_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor.save_pretrained(tmp_path / "dense")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "SIZE": "64", "POLICY_STEPS": "2",
           "SEGMENTER_STEPS": "2", "PRUNE_STEPS": "2", "BATCH": "2", "PRECISION": "no", "WORKERS": "0"}
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "add_step.sh")
    result = subprocess.run(["bash", script, str(tmp_path / "dense"), str(scene_dataset), str(tmp_path / "run"),
                             "--max_train_samples", "4", "--max_eval_samples", "2"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("policy", "segmenter", "step"):
        metrics = json.loads((tmp_path / "run" / stage / "metrics.json").read_text())
        if stage != "policy":  # the policy stage measures its tokens only
            assert 0 <= metrics["final_eval"]["mean_iou"] <= 1
        saved = json.loads((tmp_path / "run" / stage / "preprocessor_config.json").read_text())
        assert saved["image_mean"] == [0.485, 0.456, 0.406]  # the converted model's (DeiT) statistics, not reset
    final = json.loads((tmp_path / "run" / "step" / "config.json").read_text())
    assert {"policy", "encoder", "decoder", "exit_heads"} <= set(final["trained_components"]) and final["halting"]
