"""Segment an image with a saved STEP model and save a picture: image | prediction | where the tokens went.

    python examples/segment.py --model_name_or_path outputs/demo --image photo.jpg --output segmentation.png

`--image` is a file or a URL, loaded as the pipeline loads images (turned upright by its EXIF orientation, as phone
photos need). Without it, a generated road scene is segmented (and its ground truth shown). The last panel outlines
the superpatches the model used and shades each cell by the block after which its token halted (darker = earlier).
Every panel is titled, and a legend below names the colours of the classes present and of the token drawing.
"""

import argparse
import os

import numpy as np
import torch
from scenes import make_scene
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from step_hf import input_sizing, load_image
from step_hf.cli import UserError, run_command
from step_hf.analysis import class_legend, colourise, draw_tokens, panel, token_legend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a saved STEP model folder or Hub id")
    parser.add_argument("--image", help="an image file or URL; default: a generated scene")
    parser.add_argument("--output", default="segmentation.png")
    args = parser.parse_args()

    # importing step_hf (above) registered the model type with the Auto classes
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model_name_or_path)
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    model.eval()
    truth = None
    if args.image:
        try:
            image = load_image(args.image)  # upright by its EXIF orientation, RGB; errors name the file or URL
        except (OSError, ValueError) as error:
            raise UserError(f"--image: {error}") from None
    else:
        image, truth = make_scene(360, 480, seed=12345)
    sizing = input_sizing(processor, image.height, image.width)  # the processor's own size: the pipeline's input
    with torch.no_grad():
        inputs = processor(image, **sizing.overrides, return_tensors="pt")
        outputs = model(**inputs)
    prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()

    exit_map = outputs.exit_map[0].numpy() if outputs.exit_map is not None else None
    config = model.config
    panels = [image, colourise(prediction, config.num_labels),
              draw_tokens(image, outputs.superpatch_map[0].numpy(), exit_map, config.num_hidden_layers)]
    titles, present = ["image", "prediction", "superpatches and halted cells"], [prediction]
    if truth is not None:
        panels.insert(1, colourise(np.array(truth), config.num_labels))
        titles.insert(1, "ground truth")
        present.append(np.array(truth))
    legend = class_legend(config.id2label, np.unique(np.concatenate([p.ravel() for p in present])))
    legend += token_legend(config.exit_layers if exit_map is not None else None, config.num_hidden_layers)
    picture = panel(panels, titles, legend)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    picture.save(args.output)
    labels = model.config.id2label
    present = ", ".join(labels[i] for i in np.unique(prediction))
    tokens = int(outputs.token_counts.sum())
    cells = outputs.superpatch_map[0].numel()
    halted = "" if outputs.halted_share is None else \
        f", halted per exit {[round(share, 3) for share in outputs.halted_share[0].tolist()]}"
    height, width = sizing.input_size
    print(f"classes found: {present}")
    print(f"input: {image.height}x{image.width} pixels resized to {sizing.resized[0]}x{sizing.resized[1]}, "
          f"{len(inputs['pixel_values'])} model input(s) of {height}x{width}")
    print(f"tokens: {tokens} of {cells} cells{halted}")
    print(f"wrote {args.output} (image{' | ground truth' if truth is not None else ''} | prediction | tokens)")


if __name__ == "__main__":
    run_command(main)
