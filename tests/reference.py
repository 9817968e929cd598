"""Reference implementations and checks shared by several test files: what STEP must equal, written out plainly."""

import textwrap

import numpy as np
import torch
import torch.nn.functional as F


def reference_block(block, x):
    """A timm-style pre-norm block on a plain (batch, tokens, dim) tensor, attention written out by hand."""
    batch, tokens, dim = x.shape
    heads = block.attn.num_heads
    q, k, v = block.attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
    x = x + block.attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


def reference_vit_segmenter(model, pixel_values):
    """Plain ViT + Segmenter mask transformer on fixed grids, with the model's parameters: what STEP must equal
    when it shares and prunes nothing."""
    encoder, decoder = model.step, model.decoder
    batch, _, height, width = pixel_values.shape
    rows, cols = height // 16, width // 16
    x = encoder.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
    stored = encoder.config.image_grid_size
    grid = encoder.pos_embed[:, 1:].reshape(1, *stored, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(batch, -1, -1)
    x = torch.cat([cls, x + grid], dim=1)
    for block in encoder.blocks:
        x = reference_block(block, x)
    x = encoder.norm(x)[:, 1:]

    num_labels = decoder.cls_emb.shape[1]
    x = torch.cat([decoder.proj_dec(x), decoder.cls_emb.expand(batch, -1, -1)], dim=1)
    for block in decoder.blocks:
        x = reference_block(block, x)
    x = decoder.decoder_norm(x)
    patches = F.normalize(x[:, :-num_labels] @ decoder.proj_patch, dim=-1)
    classes = F.normalize(x[:, -num_labels:] @ decoder.proj_classes, dim=-1)
    masks = decoder.mask_norm(patches @ classes.transpose(1, 2))
    return masks.transpose(1, 2).reshape(batch, num_labels, rows, cols)


def check_pipeline_output(result, image, id2label):
    assert isinstance(result, list) and result
    for segment in result:
        assert set(segment) == {"score", "label", "mask"}
        assert segment["score"] is None and segment["label"] in id2label.values()
        assert segment["mask"].mode == "L" and segment["mask"].size == image.size
        assert set(np.unique(np.array(segment["mask"]))) <= {0, 255}
    # Each pixel belongs to exactly one segment.
    total = sum(np.array(segment["mask"]) // 255 for segment in result)
    assert (total == 1).all()


# Run in a fresh process: loads a saved folder with remote code only (`import step_hf` fails) and prints JSON.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["step_hf"] = None  # any `import step_hf` now fails: only the saved code may be used
    import json, numpy as np, torch
    from PIL import Image
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation,
                              pipeline)
    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    segments = pipeline("image-segmentation", model=folder, trust_remote_code=True)(image)
    print(json.dumps({
        "classes": [type(x).__name__ for x in (config, encoder, model, processor)],
        "logits": logits.tolist(),
        "segments": [[s["label"], s["mask"].size, np.array(s["mask"]).tolist()] for s in segments],
    }))
    """
)
