"""Export the models users have: a generated matrix of the presets' layouts (shrunk in width only, so that depths,
exit layers, superpatch sizes and stored grids stay as users have them) with several class counts, x every
configuration (dense, dense + halting, policy thresholds, policy thresholds + halting, token budget + exit keep
counts), x input sizes from 8x8 to 64x64 cells (square, non-square, the stored size, a larger one), x formats. Every
cell exports through `transformers.exporters`, reloads, and gives eager's outputs, field for field, on images and
batch sizes it was not traced with. The fast subset runs by default, the whole matrix with `-m slow`."""

import itertools
from typing import NamedTuple

import pytest
import torch

from step_hf import StepConfig, StepForSemanticSegmentation
from step_hf.configuration_step import VIT_PRESETS
from step_hf.export import export_model, load_exported

from .cases import output_leaves

exporters = pytest.importorskip("transformers.exporters")


class ModelCase(NamedTuple):
    preset: str
    num_labels: int
    superpatch_sizes: tuple[int, ...] = (2, 4, 8, 16)


# Presets x class counts: CamVid's 11, ADE20K's 150, Cityscapes' 19, the demo's 5, and 3 (a width that is no power of
# two, like ViT-Tiny's 192, once caught the ONNX exporter's guards); one model with a subset of superpatch sizes.
MODELS = [ModelCase("tiny", 11), ModelCase("small", 150), ModelCase("base", 19), ModelCase("large", 5),
          ModelCase("tiny", 3, (2, 4))]
STORED_SIZE = 512  # the presets' default `image_size`: a 32x32 grid
# (height, width) in pixels: 8x8 cells, non-square 16x24, the stored 32x32, and 64x64.
SIZES = [(128, 128), (256, 384), (STORED_SIZE, STORED_SIZE), (1024, 1024)]
FORMATS = ["dynamo", "onnx", "openvino"]
CONFIGURATIONS = ["dense", "dense + halting", "policy thresholds", "policy thresholds + halting",
                  "token budget + exit keep counts"]
DYNAMIC_SIZE = {"dense", "dense + halting"}  # programs that take any input size; the others take the traced one


def matrix_model(case: ModelCase) -> StepForSemanticSegmentation:
    """A preset's layout, 8 channels per attention head, random weights (seed 0), the exit heads' spread so that
    their confidences vary across tokens."""
    heads = VIT_PRESETS[case.preset]["num_attention_heads"]
    config = StepConfig.from_preset(
        case.preset, hidden_size=8 * heads, intermediate_size=16 * heads, decoder_hidden_size=32,
        decoder_num_attention_heads=2, policy_hidden_size=8, exit_hidden_size=32, num_labels=case.num_labels,
        image_size=STORED_SIZE, superpatch_sizes=list(case.superpatch_sizes), partition_source="policy",
    )
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(config).eval()
    with torch.no_grad():
        for head in model.step.exit_heads:
            head.fc2.weight.normal_(0, 3)
    return model


def images(batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Random images with structure: smooth colour fields with texture whose strength varies over the image, so
    that a policy's probabilities vary across blocks and images (white noise looks alike everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(2 * torch.randn(batch, 4, 4, 4, generator=generator), size=size,
                                             mode="bilinear", align_corners=False)
    texture = torch.randn(batch, 3, *size, generator=generator)
    return smooth[:, :3] + texture * smooth[:, 3:].sigmoid() * 2


def median_policy_thresholds(model: StepForSemanticSegmentation, size: tuple[int, int]) -> list[float]:
    """Per superpatch size, the median of the policy's probabilities on the checked images of `size` (`CHECKED`):
    about half the blocks of each size qualify, so that images differ in their token counts (0.5 for a size with
    fewer than two distinct values)."""
    with torch.no_grad():
        logits = model(images(CHECKED[-1], size, seed=len(CHECKED) - 1), policy_only=True).policy_logits
    thresholds = []
    for channel in logits.unbind(1):
        # Midway between the two middle distinct values: a threshold equal to a block's own probability would
        # leave its decision to rounding, which differs between runtimes.
        values = channel[channel > torch.finfo(channel.dtype).min].unique()
        middle = len(values) // 2
        thresholds.append(float(values[middle - 1:middle + 1].mean().sigmoid()) if len(values) > 1 else 0.5)
    return thresholds


def configuration_settings(name: str, model: StepForSemanticSegmentation, size: tuple[int, int]) -> dict:
    """The settings of configuration `name` for `model` at input `size`: policy thresholds at the median of its
    probabilities, exit thresholds that halt some tokens of these random weights (protecting one token per class, so
    that 150 classes on 8x8 cells still halt some), a budget of half the grid's cells, keep counts of 3/4 and 1/2 of
    the budget."""
    exits = len(model.config.exit_layers)
    policy = dict(partition_source="policy", policy_thresholds=median_policy_thresholds(model, size))
    halting = dict(halting=True, exit_thresholds=[min(0.9, 1.5 / model.config.num_labels)] * exits,
                   exit_keep_topk_per_class=1)
    cells = (size[0] // 16) * (size[1] // 16)
    return {
        "dense": dict(partition_source="dense", halting=False),
        "dense + halting": dict(partition_source="dense", **halting),
        "policy thresholds": dict(**policy, halting=False),
        "policy thresholds + halting": dict(**policy, **halting),
        "token budget + exit keep counts": dict(partition_source="policy", token_budget=cells // 2, halting=True,
                                                exit_keep_tokens=[cells * 3 // 8, cells // 4][:exits]),
    }[name]


class Cell(NamedTuple):
    model: ModelCase
    configuration: str
    size: tuple[int, int]
    export_format: str

    @property
    def id(self) -> str:
        sizes = "" if self.model.superpatch_sizes == (2, 4, 8, 16) else f" sizes {list(self.model.superpatch_sizes)}"
        return (f"{self.export_format}-{self.configuration}-{self.model.preset} {self.model.num_labels} classes"
                f"{sizes}-{self.size[0]}x{self.size[1]}")


def matrix() -> list[Cell]:
    """The generated matrix. A program whose size is dynamic is traced once per format, at a size that rotates, and
    checked at that size and at the smallest; the others are traced at each size. Models rotate across the cells so
    that every format meets every model and every configuration meets every size and most models."""
    cells = []
    for (c, configuration), (f, export_format) in itertools.product(enumerate(CONFIGURATIONS), enumerate(FORMATS)):
        traced_sizes = [SIZES[(c + f + 1) % len(SIZES)]] if configuration in DYNAMIC_SIZE else SIZES
        for s, size in enumerate(traced_sizes):
            cells.append(Cell(MODELS[(c + f + s) % len(MODELS)], configuration, size, export_format))
    return cells


def checked_sizes(cell: Cell) -> list[tuple[int, int]]:
    """The input sizes a cell's program is run at: the traced one, and for a program that takes any size the
    smallest too (or the non-square one, when traced at the smallest)."""
    if cell.configuration not in DYNAMIC_SIZE:
        return [cell.size]
    return [cell.size, SIZES[1] if cell.size == SIZES[0] else SIZES[0]]


def fast_subset(cells: list[Cell]) -> set[Cell]:
    """The default run: every configuration once, in torch.export, on a 12-block layout."""
    fast = {}
    for cell in cells:
        if cell.export_format == "dynamo" and cell.model.preset != "large":
            fast.setdefault(cell.configuration, cell)
    return set(fast.values())


FAST = fast_subset(matrix())


CHECKED = (1, 3)  # the batch sizes checked; the traced batch is 2 (`export_model`), of other images


def check_cell(cell: Cell, tmp_path) -> None:
    """Export the cell, reload it, and compare with eager on unseen images: other batch sizes, and for dynamic
    programs another input size (`checked_sizes`)."""
    model = matrix_model(cell.model)
    settings = configuration_settings(cell.configuration, model, cell.size)
    exported, traced = export_model(model, cell.export_format, cell.size, settings)
    assert model.config.settings.to_dict() == traced  # the saved defaults are what was traced
    exported.save_pretrained(tmp_path / "exported")
    program = load_exported(tmp_path / "exported")
    counts, halted = set(), 0.0
    for (seed, batch), size in itertools.product(enumerate(CHECKED), checked_sizes(cell)):
        pixels = images(batch, size, seed=seed)
        with torch.no_grad():
            eager = output_leaves(model(pixels))
        ran = output_leaves(program(pixel_values=pixels))
        assert sorted(ran) == sorted(eager), f"{cell.id}: fields differ"
        for name, value in eager.items():
            if value.is_floating_point():
                torch.testing.assert_close(ran[name], value, rtol=1e-4, atol=2e-4,
                                           msg=lambda message: f"{cell.id}: {name}: {message}")
            else:
                assert torch.equal(ran[name], value), f"{cell.id}: {name} differs"
        counts.update(eager["token_counts"].tolist())
        halted += float(eager["halted_share"].sum()) if "halted_share" in eager else 0.0
    if cell.configuration.startswith("policy thresholds"):  # the program computed each image's own count
        assert len(counts) > 1, f"{cell.id}: every image got {counts} tokens"
    if "halting" in cell.configuration or "keep counts" in cell.configuration:
        assert halted > 0, f"{cell.id}: nothing halted"


def marks(cell: Cell):
    return [] if cell in FAST else [pytest.mark.slow]


@pytest.mark.parametrize("cell", [pytest.param(cell, id=cell.id, marks=marks(cell)) for cell in matrix()])
def test_every_cell_exports_and_matches_eager(cell, tmp_path):
    if cell.export_format == "onnx":
        pytest.importorskip("onnxruntime")
    if cell.export_format == "openvino":
        pytest.importorskip("openvino")
    check_cell(cell, tmp_path)


def test_the_matrix_covers_every_model_configuration_size_and_format():
    cells = matrix()
    assert {cell.model for cell in cells} == set(MODELS)
    assert {(cell.configuration, cell.export_format) for cell in cells} == set(itertools.product(CONFIGURATIONS,
                                                                                                FORMATS))
    for configuration in CONFIGURATIONS:
        sizes = {size for cell in cells if cell.configuration == configuration for size in checked_sizes(cell)}
        assert sizes == set(SIZES), configuration
    assert FAST <= set(cells)
