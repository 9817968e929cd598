"""Where do the tokens go: per class, the area each superpatch size covers, the share halted at each exit, and how
accurate halted and surviving tokens are; plus pictures of the partition and the exit block of every cell.

    python -m step_hf.analysis --model_name_or_path outputs/camvid-tiny --dataset_name ../shared/datasets/camvid \
        --images 0 10 20 --output_dir outputs/analysis

Everything is counted in label pixels: a cell's superpatch size and exit block are spread over its pixels (nearest),
so shares are shares of each class's area. Void pixels are left out.
"""

import argparse
import colorsys
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .cli import refusing, run_command
from .configuration_step import SUPERPATCH_SIZES


def label_palette(num_labels: int) -> np.ndarray:
    """`(num_labels + 1, 3)` uint8 colours, well apart in hue; the last one (black) is for void."""
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.65, 0.95 - 0.25 * (i % 2)) for i in range(num_labels)]
    return (np.array([*colours, (0, 0, 0)]) * 255).astype(np.uint8)


def colourise(class_map: np.ndarray, num_labels: int) -> Image.Image:
    """A class-id map as a picture; void (and any value outside the classes) is black."""
    ids = np.where((class_map >= 0) & (class_map < num_labels), class_map, num_labels)
    return Image.fromarray(label_palette(num_labels)[ids])


def draw_tokens(image: Image.Image, superpatch_map: np.ndarray, exit_map: np.ndarray | None,
                num_layers: int) -> Image.Image:
    """The image with every superpatch outlined; cells darkened by how early their token halted (`exit_map`
    holds the block after which each cell halted, `num_layers` where it never did). `token_legend` says so."""
    rows, cols = superpatch_map.shape
    cell_height, cell_width = image.height / rows, image.width / cols
    picture = np.asarray(image.convert("RGB")).astype(np.float32)
    if exit_map is not None:
        picture *= halted_shade(_cells_to_pixels(exit_map, image.size) / num_layers)[..., None]
    picture = Image.fromarray(picture.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for row in range(rows):
        for col in range(cols):
            size = int(superpatch_map[row, col])
            if row % size == 0 and col % size == 0:
                box = [col * cell_width, row * cell_height, (col + size) * cell_width - 1,
                       (row + size) * cell_height - 1]
                draw.rectangle(box, outline=OUTLINE_COLOUR)
    return picture


OUTLINE_COLOUR = (255, 255, 0)
# One colour per exit for `draw_exits`, first exit first; chosen apart from each other and from the label palette's
# mid-saturation hues.
EXIT_COLOURS = np.array([[230, 25, 75], [255, 140, 0], [145, 30, 180], [0, 130, 200]], dtype=np.uint8)

LegendEntry = tuple[tuple[int, int, int], str]  # (swatch colour, what it stands for)


def halted_shade(depth: np.ndarray | float) -> np.ndarray | float:
    """How much `draw_tokens` keeps of a pixel's brightness when its token halted after `depth` of the blocks: squared,
    so that exits in the middle blocks (where they usually sit) get shades far apart."""
    return 0.15 + 0.85 * depth**2


def _cells_to_pixels(cell_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid map spread over a picture of `size` = (width, height), nearest."""
    rows, cols = cell_map.shape
    row_of_pixel = np.minimum((np.arange(size[1]) * rows / size[1]).astype(int), rows - 1)
    col_of_pixel = np.minimum((np.arange(size[0]) * cols / size[0]).astype(int), cols - 1)
    return cell_map[row_of_pixel][:, col_of_pixel]


def draw_exits(image: Image.Image, exit_map: np.ndarray, exit_layers: list[int]) -> Image.Image:
    """The image in grey with every halted cell tinted by its exit's colour (`EXIT_COLOURS`, `exit_legend`);
    cells that reached the decoder stay grey."""
    grey = np.asarray(image.convert("L").convert("RGB")).astype(np.float32)
    exit_of_pixel = np.searchsorted(np.asarray(exit_layers), _cells_to_pixels(exit_map, image.size))
    halted = exit_of_pixel < len(exit_layers)
    colours = EXIT_COLOURS[exit_of_pixel % len(EXIT_COLOURS)].astype(np.float32)
    picture = np.where(halted[..., None], 0.35 * grey + 0.65 * colours, grey)
    return Image.fromarray(picture.clip(0, 255).astype(np.uint8))


def class_legend(id2label: dict[int, str], class_ids=None) -> list[LegendEntry]:
    """The colour `colourise` gives each class and its name: every class, or those of `class_ids` (id order)."""
    palette = label_palette(len(id2label))
    ids = range(len(id2label)) if class_ids is None else sorted({int(i) for i in class_ids} & set(range(len(id2label))))
    return [(tuple(int(v) for v in palette[i]), str(id2label[i])) for i in ids]


def token_legend(exit_layers: list[int] | None, num_layers: int) -> list[LegendEntry]:
    """What `draw_tokens` draws: the superpatch outlines and, when tokens halted (`exit_layers`), the shade of a mid
    grey cell halted after each exit and of one that reached the decoder."""
    entries = [(OUTLINE_COLOUR, "superpatch outline")]
    if exit_layers:
        for layer in [*exit_layers, num_layers]:
            value = int(200 * halted_shade(layer / num_layers))
            entries.append(((value,) * 3, "reached the decoder" if layer == num_layers else f"halted after block {layer}"))
    return entries


def exit_legend(exit_layers: list[int]) -> list[LegendEntry]:
    """What `draw_exits` draws: each exit's colour."""
    entries = [(tuple(int(v) for v in EXIT_COLOURS[i % len(EXIT_COLOURS)]), f"halted after block {layer}")
               for i, layer in enumerate(exit_layers)]
    return [*entries, ((160, 160, 160), "reached the decoder")]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: its one bitmap size
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line] if line else lines


def panel(images: list[Image.Image], titles: list[str] | None = None, legend: list[LegendEntry] | None = None,
          note: str | None = None) -> Image.Image:
    """Pictures of the same height side by side; with `titles`, each panel's title above it; with `legend`, colour
    swatches and their names below (wrapped to the width); then `note`, a sentence on how to read the panels."""
    width, height = sum(i.width for i in images), images[0].height
    if not titles and not legend and not note:
        out = Image.new("RGB", (width, height))
        left = 0
        for image in images:
            out.paste(image, (left, 0))
            left += image.width
        return out
    font_size = max(12, min(28, round(height / 22)))
    font, line = _font(font_size), round(font_size * 1.5)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = font_size // 2
    # Lay out the legend: entries left to right, a new row when the next one would not fit.
    entry_widths = [font_size + margin // 2 + int(draw.textlength(name, font=font)) + 2 * margin
                    for _, name in legend or []]
    width = max([width, *(margin + w for w in entry_widths)])  # a narrow picture widens to its longest name
    places, x, y = [], margin, 0
    for (colour, name), entry_width in zip(legend or [], entry_widths):
        if x > margin and x + entry_width > width:
            x, y = margin, y + line
        places.append((x, y, colour, name))
        x += entry_width
    legend_height = (y + line if places else 0) + margin
    note_lines = _wrap(draw, note, font, width - 2 * margin) if note else []
    title_lines = [_wrap(draw, title, font, image.width - margin) for title, image in zip(titles or [], images)]
    top = line * max(map(len, title_lines), default=0)  # a title wraps within its panel
    out = Image.new("RGB", (width, top + height + legend_height + line * len(note_lines)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    left, ink = 0, (20, 20, 20)
    for index, image in enumerate(images):
        out.paste(image, (left, top))
        for row, text in enumerate(title_lines[index] if titles else []):
            draw.text((left + margin // 2, row * line + (line - font_size) // 2), text, fill=ink, font=font)
        left += image.width
    base = top + height + margin
    for x, y, colour, name in places:
        draw.rectangle([x, base + y, x + font_size, base + y + font_size], fill=colour, outline=ink)
        draw.text((x + font_size + margin // 2, base + y), name, fill=ink, font=font)
    for index, text in enumerate(note_lines):
        draw.text((margin, top + height + legend_height + index * line), text, fill=ink, font=font)
    return out


@dataclass
class TokenStats:
    """Pixel counts accumulated over a dataset (see `add`)."""

    num_labels: int
    exit_layers: list[int]
    num_layers: int
    ignore_index: int = 255
    area: np.ndarray = field(init=False)  # (classes, sizes): pixels covered by superpatches of each size
    fate: np.ndarray = field(init=False)  # (classes, exits + 1): pixels halted at each exit, then surviving
    correct: np.ndarray = field(init=False)  # (exits + 1,): correctly predicted pixels by fate

    def __post_init__(self):
        self.area = np.zeros((self.num_labels, len(SUPERPATCH_SIZES)), dtype=np.int64)
        self.fate = np.zeros((self.num_labels, len(self.exit_layers) + 1), dtype=np.int64)
        self.correct = np.zeros(len(self.exit_layers) + 1, dtype=np.int64)

    def add(self, labels: torch.Tensor, prediction: torch.Tensor, superpatch_map: torch.Tensor,
            exit_map: torch.Tensor | None) -> None:
        """Count one batch. `labels`, `prediction`: `(batch, H, W)` at label resolution; `superpatch_map`,
        `exit_map`: `(batch, rows, cols)` on the patch grid (`exit_map` None when nothing halted)."""
        size = labels.shape[-2:]
        sizes = F.interpolate(superpatch_map[:, None].float(), size=size, mode="nearest")[:, 0].long()
        if exit_map is None:
            exits = torch.full_like(labels, self.num_layers)
        else:
            exits = F.interpolate(exit_map[:, None].float(), size=size, mode="nearest")[:, 0].long()
        valid = labels != self.ignore_index
        label = labels[valid].long()
        if len(label) and (label.min() < 0 or label.max() >= self.num_labels):
            raise ValueError(f"Label values must be class ids in [0, {self.num_labels}) or {self.ignore_index}; found "
                             f"{sorted(set(label.unique().tolist()) - set(range(self.num_labels)))}.")
        size_index = torch.searchsorted(torch.tensor(SUPERPATCH_SIZES), sizes[valid])
        fate_index = torch.searchsorted(torch.tensor([*self.exit_layers, self.num_layers]), exits[valid])
        self.area += torch.bincount(label * len(SUPERPATCH_SIZES) + size_index,
                                    minlength=self.area.size).view(self.area.shape).numpy()
        self.fate += torch.bincount(label * self.fate.shape[1] + fate_index,
                                    minlength=self.fate.size).view(self.fate.shape).numpy()
        hits = (prediction[valid] == label).long()
        self.correct += torch.bincount(fate_index, weights=hits, minlength=self.fate.shape[1]).long().numpy()

    def report(self, id2label: dict[int, str]) -> dict:
        """Per class: share of its area per superpatch size and share halted per exit; overall: accuracy of the
        pixels halted at each exit and of the surviving ones."""
        fates = [f"halted after block {layer}" for layer in self.exit_layers] + ["survived"]
        per_class = {}
        for index in range(self.num_labels):
            total = self.area[index].sum()
            if total == 0:
                continue
            per_class[id2label[index]] = {
                "pixels": int(total),
                "area_by_size": {str(s): float(a / total) for s, a in zip(SUPERPATCH_SIZES, self.area[index])},
                "fate": {name: float(f / total) for name, f in zip(fates, self.fate[index])},
            }
        per_fate = self.fate.sum(0)
        accuracy = {name: (float(c / n) if n else None) for name, c, n in zip(fates, self.correct, per_fate)}
        return {"per_class": per_class, "accuracy_by_fate": accuracy,
                "pixels_by_fate": {name: int(n) for name, n in zip(fates, per_fate)}}


def token_table(report: dict) -> str:
    """`TokenStats.report` as a Markdown table: per class, area by superpatch size and fate; then accuracy by fate."""
    fates = list(report["accuracy_by_fate"])
    lines = ["| class | area in 1 / 2 / 4 / 8 / 16 | " + " | ".join(fates) + " |",
             "|---|---|" + "---|" * len(fates)]
    for name, row in report["per_class"].items():
        sizes = " / ".join(f"{100 * v:.0f}%" for v in row["area_by_size"].values())
        lines.append(f"| {name} | {sizes} | " + " | ".join(f"{100 * v:.1f}%" for v in row["fate"].values()) + " |")
    accuracy = " | ".join("-" if v is None else f"{100 * v:.1f}%" for v in report["accuracy_by_fate"].values())
    lines.append(f"| **pixel accuracy** | | {accuracy} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image_column_name", default="image")
    parser.add_argument("--label_column_name", default="label")
    parser.add_argument("--max_samples", type=int)
    parser.add_argument("--images", type=int, nargs="*", default=[0], help="indices of images to draw")
    parser.add_argument("--output_dir", default="analysis")
    parser.add_argument("--without_dataset_pixels", action="store_true",
                        help="draw the partition and exits on the prediction alone, leaving out the frame and the "
                             "ground truth: pictures of the model's own outputs, for data whose licence forbids "
                             "copying its images")
    return parser.parse_args(argv)


def read_split(args: argparse.Namespace):
    """The split to analyse, with its image and label columns named `image` and `label` (as `EvalTransform` reads
    them)."""
    from datasets import load_dataset

    with refusing(f"{args.dataset_name} [{args.split}]", "a Hub id or a local folder laid out like one"):
        dataset = load_dataset(args.dataset_name, split=args.split)
    if args.max_samples:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    dataset = dataset.select_columns([args.image_column_name, args.label_column_name])
    renames = {args.image_column_name: "image", args.label_column_name: "label"}
    return dataset.rename_columns({old: new for old, new in renames.items() if old != new})


def save_picture(path: str, image: Image.Image, labels: torch.Tensor, prediction: torch.Tensor, outputs, config,
                 without_dataset_pixels: bool) -> None:
    """tokens | prediction | ground truth of one image, or the tokens drawn on the prediction alone; titled, with
    the legend of the classes present and of the token drawing."""
    predicted_ids, label_ids = prediction[0].cpu().numpy(), labels[0].cpu().numpy()
    predicted = colourise(predicted_ids, config.num_labels)
    exit_map = outputs.exit_map[0].cpu().numpy() if outputs.exit_map is not None else None
    tokens = draw_tokens(predicted if without_dataset_pixels else image, outputs.superpatch_map[0].cpu().numpy(),
                         exit_map, config.num_hidden_layers)
    exit_layers = config.exit_layers if exit_map is not None else None
    if without_dataset_pixels:
        pictures, titles, present = [tokens], ["superpatches and halted cells, on the prediction"], [predicted_ids]
    else:
        pictures = [tokens, predicted, colourise(label_ids, config.num_labels)]
        titles, present = ["superpatches and halted cells", "prediction", "ground truth"], [predicted_ids, label_ids]
    legend = class_legend(config.id2label, np.unique(np.concatenate([np.ravel(p) for p in present])))
    panel(pictures, titles, legend + token_legend(exit_layers, config.num_hidden_layers)).save(path)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    from torch.utils.data import DataLoader

    from .evaluation import EvalTransform, predictions
    from .image_processing_step import StepImageProcessor
    from .modeling_step import StepForSemanticSegmentation

    args = parse_args(argv)
    with refusing(f"the model {args.model_name_or_path}", "a folder saved by examples/train.py, or a Hub id"):
        model = StepForSemanticSegmentation.from_pretrained(args.model_name_or_path).eval()
        processor = StepImageProcessor.from_pretrained(args.model_name_or_path)
    config, dataset = model.config, read_split(args)
    stats = None
    os.makedirs(args.output_dir, exist_ok=True)
    # One image per batch: label maps keep their own sizes. Predictions are made as `evaluate` makes them.
    loader = DataLoader(EvalTransform(dataset, processor))
    for index, (batch, outputs, prediction) in enumerate(predictions(model, loader, model.device)):
        labels, exit_map = batch["original_labels"], outputs.exit_map
        if stats is None:  # the exits counted are those that halted tokens, as the outputs say
            stats = TokenStats(config.num_labels, config.exit_layers if exit_map is not None else [],
                               config.num_hidden_layers, config.semantic_loss_ignore_index)
        stats.add(labels.cpu(), prediction.cpu(), outputs.superpatch_map.cpu(),
                  exit_map.cpu() if exit_map is not None else None)
        if index in args.images:
            save_picture(os.path.join(args.output_dir, f"tokens_{index}.png"), dataset[index]["image"].convert("RGB"),
                         labels, prediction, outputs, config, args.without_dataset_pixels)
    report = stats.report(config.id2label)
    with open(os.path.join(args.output_dir, "tokens_by_class.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = token_table(report)
    with open(os.path.join(args.output_dir, "tokens_by_class.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    what = "tokens | prediction | ground truth"
    if args.without_dataset_pixels:
        what = "partition and exits on the prediction"
    print(f"pictures ({what}) of images {args.images} in {args.output_dir}")


if __name__ == "__main__":
    run_command(main)
