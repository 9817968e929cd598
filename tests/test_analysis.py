import json

import numpy as np
import pytest
import torch
from PIL import Image

from step_hf.analysis import (EXIT_COLOURS, TokenStats, class_legend, colourise, draw_exits, draw_tokens, exit_legend,
                              label_palette, panel, token_legend, token_table)


def test_token_stats_on_a_hand_made_case():
    # A 2x4 grid of 16x16 cells = 32x64 pixels. Left half: one 2x2 superpatch of class 0 that halted after block 2
    # (predicted right). Right half: four plain patches of class 1; the top two survived (one predicted wrong),
    # the bottom two halted after block 4; one bottom cell is void.
    labels = torch.zeros(1, 32, 64, dtype=torch.long)
    labels[:, :, 32:] = 1
    labels[:, 16:, 48:] = 255
    superpatch_map = torch.tensor([[[2, 2, 1, 1], [2, 2, 1, 1]]])
    exit_map = torch.tensor([[[2, 2, 12, 12], [2, 2, 4, 4]]])
    prediction = labels.clone().clamp(max=1)
    prediction[:, :16, 48:] = 0  # the top-right cell is predicted wrong
    stats = TokenStats(num_labels=2, exit_layers=[2, 4], num_layers=12)
    stats.add(labels, prediction, superpatch_map, exit_map)
    cell = 16 * 16
    assert stats.area.tolist() == [[0, 4 * cell, 0, 0, 0], [3 * cell, 0, 0, 0, 0]]
    assert stats.fate.tolist() == [[4 * cell, 0, 0], [0, cell, 2 * cell]]
    assert stats.correct.tolist() == [4 * cell, cell, cell]
    report = stats.report({0: "road", 1: "car"})
    assert report["per_class"]["road"]["area_by_size"]["2"] == 1.0
    assert report["per_class"]["car"]["fate"] == pytest.approx(
        {"halted after block 2": 0.0, "halted after block 4": 1 / 3, "survived": 2 / 3})
    assert report["accuracy_by_fate"] == {"halted after block 2": 1.0, "halted after block 4": 1.0, "survived": 0.5}
    table = token_table(report)
    assert "| car | 100% / 0% / 0% / 0% / 0% | 0.0% | 33.3% | 66.7% |" in table


def test_without_halting_everything_survives():
    stats = TokenStats(num_labels=3, exit_layers=[], num_layers=12)
    labels = torch.randint(0, 3, (2, 32, 32))
    stats.add(labels, labels, torch.ones(2, 2, 2, dtype=torch.long), None)
    assert stats.fate[:, 0].sum() == 2 * 32 * 32 and stats.correct.tolist() == [2 * 32 * 32]
    with pytest.raises(ValueError, match=r"found \[7\]"):
        stats.add(torch.full((1, 32, 32), 7), labels[:1], torch.ones(1, 2, 2, dtype=torch.long), None)


def test_pictures():
    image = Image.new("RGB", (64, 32), (200, 200, 200))
    superpatch_map = np.array([[2, 2, 1, 1], [2, 2, 1, 1]])
    exit_map = np.array([[4, 4, 12, 12], [4, 4, 12, 12]])
    picture = np.asarray(draw_tokens(image, superpatch_map, exit_map, 12))
    assert picture.shape == (32, 64, 3)
    assert picture[8, 8, 0] < picture[8, 40, 0]  # the halted superpatch is darker than the surviving cells
    assert tuple(picture[0, 0]) == (255, 255, 0) and tuple(picture[8, 31]) == (255, 255, 0)  # its outline
    assert tuple(picture[8, 16]) != (255, 255, 0)  # no line inside a superpatch
    colours = np.asarray(colourise(np.array([[0, 1], [2, 255]]), 3))
    assert tuple(colours[1, 1]) == (0, 0, 0) and len({tuple(c) for c in label_palette(3)[:3]}) == 3


def test_cli_writes_tables_and_pictures(tmp_path, scene_dataset):
    from scenes import SCENE_CLASSES

    from step_hf import StepForSemanticSegmentation, StepImageProcessor
    from step_hf.analysis import main

    from .conftest import tiny_config

    config = tiny_config(id2label=SCENE_CLASSES, label2id={v: k for k, v in SCENE_CLASSES.items()}, halting=True)
    StepForSemanticSegmentation(config).save_pretrained(tmp_path / "model")  # exits after block 1 of the 2
    StepImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "model")
    main(["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(scene_dataset), "--images", "1",
          "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "tokens_1.png").is_file()
    report = json.loads((tmp_path / "out" / "tokens_by_class.json").read_text())
    assert set(report["accuracy_by_fate"]) == {"halted after block 1", "survived"}
    assert sum(report["pixels_by_fate"].values()) == 4 * 96 * 128  # every pixel of the 4 validation scenes
    # Without the dataset's pixels: one picture the size of the frame, holding no pixel of it (only the
    # prediction's palette colours, darkened where tokens halted, and the yellow outlines).
    main(["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(scene_dataset), "--images", "1",
          "--output_dir", str(tmp_path / "bare"), "--without_dataset_pixels"])
    picture = Image.open(tmp_path / "bare" / "tokens_1.png")
    assert picture.width >= 128 and picture.height > 96  # the frame, with its title and legend (widened to fit)
    palette = {tuple(int(v) for v in c) for c in label_palette(len(SCENE_CLASSES))} | {(255, 255, 0)}
    shades = {tuple(int(v * f) for v in c) for c in palette for f in np.linspace(0.3, 1.0, 71)}
    shades = np.array(sorted(shades | {(v, v, v) for v in range(256)}))  # titles, legend text and grey swatches
    pixels = np.unique(np.asarray(picture).reshape(-1, 3).astype(int), axis=0)
    assert np.abs(pixels[:, None] - shades[None]).sum(-1).min(1).max() <= 6  # (a scene frame: most pixels > 6)


def test_panel_titles_and_legend():
    left, right = Image.new("RGB", (40, 30), (10, 200, 10)), Image.new("RGB", (40, 30), (10, 10, 200))
    legend = class_legend({0: "road", 1: "sky", 2: "car"}, class_ids=[2, 0, 2])
    assert [name for _, name in legend] == ["road", "car"]
    assert [colour for colour, _ in legend] == [tuple(label_palette(3)[i]) for i in (0, 2)]
    picture = np.asarray(panel([left, right], ["left", "right"], legend, note="how to read it"))
    assert picture.shape[1] >= 80 and picture.shape[0] > 30
    top = int(np.argmax((picture[:, 5] == (10, 200, 10)).all(-1)))  # the first row of the left panel
    assert top > 0 and (picture[top:top + 30, :40] == (10, 200, 10)).all()
    assert (picture[top:top + 30, 40:80] == (10, 10, 200)).all()
    above, below = picture[:top].reshape(-1, 3), picture[top + 30:].reshape(-1, 3)
    assert (above.max(-1) < 100).any()  # title text
    for colour, _ in legend:  # each swatch below the panels
        assert (below == colour).all(-1).any()
    assert panel([left, right]).size == (80, 30)  # without titles or legend: the pictures alone


def test_exit_pictures_and_legends():
    image = Image.new("RGB", (64, 32), (100, 100, 100))
    exit_map = np.array([[4, 4, 8, 12], [4, 4, 8, 12]])
    picture = np.asarray(draw_exits(image, exit_map, [4, 8])).astype(int)
    first, second, survivor = picture[8, 8], picture[8, 40], picture[8, 56]
    assert tuple(survivor) == (100, 100, 100)  # reached the decoder: the image in grey
    assert np.abs(first - (0.35 * 100 + 0.65 * EXIT_COLOURS[0])).max() <= 1
    assert np.abs(second - (0.35 * 100 + 0.65 * EXIT_COLOURS[1])).max() <= 1
    assert [name for _, name in exit_legend([4, 8])] == ["halted after block 4", "halted after block 8",
                                                          "reached the decoder"]
    names = [name for _, name in token_legend([4, 8], 12)]
    assert names == ["superpatch outline", "halted after block 4", "halted after block 8", "reached the decoder"]
    shades = [colour[0] for colour, _ in token_legend([4, 8], 12)[1:]]
    assert shades == sorted(shades) and shades[0] < shades[-1]  # darker = halted earlier, as draw_tokens shades
    assert [name for _, name in token_legend(None, 12)] == ["superpatch outline"]


def test_halting_shades_of_the_demo_models_exits_are_far_apart():
    """ViT-Tiny's exits after blocks 6 and 8 of 12: the legend's three greys differ by at least 30 levels."""
    shades = [colour[0] for colour, _ in token_legend([6, 8], 12)[1:]]
    assert min(later - earlier for earlier, later in zip(shades, shades[1:])) >= 30
