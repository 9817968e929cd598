"""Segment an image with a saved STEP model and save a picture: image | prediction | where the tokens went.

    python examples/segment.py --model outputs/demo --image photo.jpg --output segmentation.png

Without `--image`, a generated road scene is segmented (and its ground truth shown). The third panel outlines the
superpatches the model used and shades each cell by the block after which its token halted (darker = earlier).
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenes import colourise, make_scene  # noqa: E402


def token_picture(image: Image.Image, superpatch_map: np.ndarray, exit_map: np.ndarray | None, depth: int):
    """The image with every superpatch outlined, cells darkened by how early their token halted."""
    rows, cols = superpatch_map.shape
    cell_h, cell_w = image.height / rows, image.width / cols
    picture = np.asarray(image).astype(np.float32)
    if exit_map is not None:
        shade = np.kron(exit_map / depth, np.ones((int(np.ceil(cell_h)), int(np.ceil(cell_w)))))
        picture *= 0.35 + 0.65 * shade[: image.height, : image.width, None]
    picture = Image.fromarray(picture.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for row in range(rows):
        for col in range(cols):
            size = int(superpatch_map[row, col])
            if row % size == 0 and col % size == 0:
                box = [col * cell_w, row * cell_h, (col + size) * cell_w - 1, (row + size) * cell_h - 1]
                draw.rectangle(box, outline=(255, 255, 0))
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved STEP model folder or Hub id")
    parser.add_argument("--image", help="an image file; default: a generated scene")
    parser.add_argument("--output", default="segmentation.png")
    parser.add_argument("--trust_remote_code", action="store_true", help="load the model's own code (no step_hf)")
    args = parser.parse_args()
    if not args.trust_remote_code:
        import step_hf  # noqa: F401  registers the model type

    model = AutoModelForSemanticSegmentation.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model.eval()
    truth = None
    if args.image:
        try:
            image = Image.open(args.image)
            image.load()
        except (OSError, ValueError) as error:
            raise SystemExit(f"Cannot read {args.image} as an image: {error}")
        image = image.convert("RGB")
    else:
        image, truth = make_scene(360, 480, seed=12345)
    with torch.no_grad():
        inputs = processor(image, return_tensors="pt")
        outputs = model(**inputs)
    prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()

    exit_map = outputs.exit_map[0].numpy() if outputs.exit_map is not None and model.config.halting else None
    panels = [image, colourise(prediction),
              token_picture(image, outputs.superpatch_map[0].numpy(), exit_map, model.config.num_hidden_layers)]
    if truth is not None:
        panels.insert(1, colourise(np.array(truth)))
    picture = Image.new("RGB", (image.width * len(panels), image.height))
    for index, panel in enumerate(panels):
        picture.paste(panel, (index * image.width, 0))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    picture.save(args.output)
    labels = model.config.id2label
    present = ", ".join(labels[i] for i in np.unique(prediction))
    tokens = int(outputs.token_counts.sum())
    cells = outputs.superpatch_map[0].numel()
    halted = "" if outputs.halted_share is None else f", halted per exit {outputs.halted_share[0].tolist()}"
    print(f"classes found: {present}")
    print(f"tokens: {tokens} of {cells} cells{halted}")
    print(f"wrote {args.output} (image{' | ground truth' if truth is not None else ''} | prediction | tokens)")


if __name__ == "__main__":
    main()
