"""Build a tiny STEP model, save it with its code, and segment a generated image through `pipeline`.

The model has random weights until `examples/train.py` exists: the picture shows the plumbing working
(processor -> model -> post-processing -> pipeline), not a meaningful segmentation.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image
from transformers import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenes import SCENE_CLASSES, colourise, make_scene  # noqa: E402

from step_hf import StepConfig, StepForSemanticSegmentation, StepImageProcessor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--image_size", type=int, default=256)
    args = parser.parse_args()

    config = StepConfig.from_preset(
        "tiny", num_hidden_layers=4, image_size=args.image_size,
        id2label=SCENE_CLASSES, label2id={name: i for i, name in SCENE_CLASSES.items()},
    )
    model = StepForSemanticSegmentation(config)
    processor = StepImageProcessor(size={"height": args.image_size, "width": args.image_size},
                                   num_labels=config.num_labels)
    model_dir = os.path.join(args.output_dir, "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    image, labels = make_scene(360, 480, seed=0)
    segmenter = pipeline("image-segmentation", model=model_dir)
    segments = segmenter(image)
    prediction = np.zeros((image.height, image.width), dtype=np.int64)
    for segment in segments:
        prediction[np.array(segment["mask"]) > 0] = config.label2id[segment["label"]]

    picture = Image.new("RGB", (image.width * 3, image.height))
    for column, panel in enumerate([image, colourise(np.array(labels)), colourise(prediction)]):
        picture.paste(panel, (column * image.width, 0))
    picture_path = os.path.join(args.output_dir, "segmentation.png")
    picture.save(picture_path)
    print(f"saved model, processor and code to {model_dir}")
    print(f"segments: {', '.join(segment['label'] for segment in segments)}")
    print(f"wrote {picture_path} (image | ground truth | prediction of an untrained model)")


if __name__ == "__main__":
    main()
