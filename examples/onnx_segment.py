"""Segment one image with an exported STEP model in ONNX Runtime, with numpy and PIL only (no torch).

    python -m step_hf.export --model_name_or_path outputs/demo --format onnx --output_dir outputs/demo-onnx
    python examples/onnx_segment.py --model outputs/demo-onnx --image photo.jpg --output classes.png

Preprocessing follows the exported folder's `preprocessor_config.json` as `StepImageProcessor` does: the image is
read by step_hf's `image_reading.py` (upright by EXIF orientation, 8-bit RGB with 16-bit and float images scaled and
transparency on white), then resized bilinearly to the patch grid, rescaled and normalised; the logits are upsampled
bilinearly to the image's size (half-pixel centres, as `post_process_semantic_segmentation`) before the arg-max. The
output is the class-id map as a single-channel PNG at the image's size.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

def read_image(path: str, model: Path) -> Image.Image:
    """The image as the processor and the pipeline read it: upright, 8-bit RGB (16-bit and float images scaled,
    transparency on white), by step_hf's image reader (numpy and PIL only), loaded from its file in the exported
    folder: importing the step_hf package would import torch."""
    reader_file = model / "image_reading.py"
    spec = importlib.util.spec_from_file_location("image_reading", reader_file)
    if spec is None or not reader_file.is_file():
        raise SystemExit(f"{reader_file} is missing: export the model again with python -m step_hf.export.")
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    try:
        return reader.rgb_image(Image.open(path), path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--image: cannot read {path}: {error}") from None


def input_size(height: int, width: int, size: dict, divisor: int) -> tuple[int, int]:
    """The processor's resized (height, width): exact, or the shortest edge scaled, sides rounded to `divisor`."""
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    scale = size["shortest_edge"] / min(height, width)
    return tuple(max(divisor, round(side * scale / divisor) * divisor) for side in (height, width))


def pixel_values(image: Image.Image, processor: dict) -> np.ndarray:
    """`(1, 3, height, width)` float32, as the processor prepares one image."""
    if processor.get("window_size"):
        raise SystemExit("This example runs whole images; export with a processor without `window_size`.")
    if processor.get("do_resize", True):
        height, width = input_size(image.height, image.width, processor["size"], processor.get("size_divisor", 16))
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    if processor.get("do_rescale", True):
        pixels = pixels * np.float32(processor.get("rescale_factor", 1 / 255))
    if processor.get("do_normalize", True):
        pixels = pixels - np.asarray(processor["image_mean"], dtype=np.float32).reshape(-1, 1, 1)
        pixels = pixels / np.asarray(processor["image_std"], dtype=np.float32).reshape(-1, 1, 1)
    return pixels[None]


def bilinear_weights(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each target index, the two source indices and the weight of the second (half-pixel centres, clamped)."""
    position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, None)
    low = np.minimum(np.floor(position).astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, (position - low).astype(np.float32)


def upsample(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """`(classes, rows, cols)` -> `(classes, height, width)`, bilinear."""
    top, bottom, down = bilinear_weights(logits.shape[1], height)
    left, right, across = bilinear_weights(logits.shape[2], width)
    rows = logits[:, top] * (1 - down)[:, None] + logits[:, bottom] * down[:, None]
    return rows[:, :, left] * (1 - across) + rows[:, :, right] * across


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder written by `python -m step_hf.export --format onnx`")
    parser.add_argument("--image", required=True)
    parser.add_argument("--output", default="classes.png")
    args = parser.parse_args()

    folder = Path(args.model)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    image = read_image(args.image, folder)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: pixel_values(image, processor)})))
    logits = outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    classes = upsample(logits[0].astype(np.float32), image.height, image.width).argmax(0)
    Image.fromarray(classes.astype(np.uint8), mode="L").save(args.output)
    id2label = json.loads((folder / "config.json").read_text()).get("id2label", {})
    found = ", ".join(id2label.get(str(i), str(i)) for i in np.unique(classes).tolist())
    print(f"wrote {args.output} (class ids) at {image.width}x{image.height}; classes found: {found}")


if __name__ == "__main__":
    main()
