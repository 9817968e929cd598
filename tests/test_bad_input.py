"""Bad and borderline input, one row per case: either a clear error (its type and the words its message must hold)
or the correct result, checked. Rows are grouped by family, one list and one test per family; a new family is a
new list and a new test at the end of the file. Every row fails on the code before these checks, except the
"guard:" rows, which keep a check from refusing what is valid next to what it refuses."""

import contextlib
import errno
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTModel

from step_hf import (
    StepConfig, StepForSemanticSegmentation, StepImageProcessor, StepModel, load_image, load_vit_weights,
)
import step_hf
from step_hf.evaluation import EvalTransform

from .cases import assert_equal, case_id, refused, run_case, works
from .conftest import EXAMPLES, tiny_config, tiny_model
from .hub_server import HubServer

import checkpoints  # examples/ (conftest puts it on the path)
import train
from data import load_data


# ---- processor ----------------------------------------------------------------------------------------------------


def pixels(images, **kwargs) -> torch.Tensor:
    """`pixel_values` of a 16x16 processor that only rescales (no normalisation), so 0..1 = black..white."""
    processor = StepImageProcessor(size={"height": 16, "width": 16}, do_normalize=False)
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def labels_of(segmentation_maps, images=None, **kwargs) -> torch.Tensor:
    images = np.zeros((16, 16, 3), np.uint8) if images is None else images
    processor = StepImageProcessor(size={"height": 16, "width": 16})
    return processor(images, segmentation_maps=segmentation_maps, return_tensors="pt", **kwargs)["labels"]


# A full-range 16-bit horizontal gradient: the 8-bit image it should become is its value / 257.
GRADIENT16 = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
GRADIENT8 = np.rint(GRADIENT16 / 257).astype(np.uint8)
RGB8 = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def pil16(mode: str) -> Image.Image:
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    return Image.frombytes(mode, (16, 16), GRADIENT16.astype(dtype).tobytes())


def same_as(expected: np.ndarray, atol: float = 0.0) -> Callable[[torch.Tensor], None]:
    """Checks that pixel values equal those of the uint8 image `expected` (to within `atol`)."""

    def check(result: torch.Tensor) -> None:
        torch.testing.assert_close(result, pixels(expected), atol=atol, rtol=0)

    return check


def rgb_of(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def float_labels(value: float) -> np.ndarray:
    return np.full((16, 16), value, np.float32)


PROCESSOR_CASES = [
    # 16-bit greyscale is scaled to 8 bits, not clipped at 255 (which made 99.6% of the gradient white).
    *(works(f"16-bit PIL {mode}", lambda mode=mode: pixels(pil16(mode), do_resize=False), same_as(rgb_of(GRADIENT8)))
      for mode in ("I;16", "I;16B", "I;16L")),
    works("uint16 array (H, W)", lambda: pixels(GRADIENT16, do_resize=False), same_as(rgb_of(GRADIENT8))),
    works("uint16 array (H, W, 3)", lambda: pixels(rgb_of(GRADIENT16), do_resize=False), same_as(rgb_of(GRADIENT8))),
    works("uint8 greyscale array (H, W)", lambda: pixels(GRADIENT8), same_as(rgb_of(GRADIENT8))),
    # 32-bit integer and float PIL modes: 8-bit values are used as they are, anything wider is refused by name.
    works("guard: PIL mode I holding 0..255", lambda: pixels(Image.fromarray(GRADIENT8.astype(np.int32))),
          same_as(rgb_of(GRADIENT8))),
    refused("PIL mode I holding 16-bit values", lambda: pixels(Image.fromarray(GRADIENT16.astype(np.int32))),
            ValueError, "mode 'I'", "[0, 65535]", "uint16"),
    refused("int32 array above 255", lambda: pixels(np.full((16, 16, 3), 1000, np.int32)),
            ValueError, "int32", "[1000, 1000]", "0..255"),
    works("PIL mode F in [0, 1]", lambda: pixels(Image.fromarray((GRADIENT8 / 255).astype(np.float32))),
          same_as(rgb_of(GRADIENT8))),
    refused("PIL mode F holding 16-bit values", lambda: pixels(Image.fromarray(GRADIENT16.astype(np.float32))),
            ValueError, "mode 'F'", "[0, 1]", "0..255"),
    # Float images in [0, 1] (torchvision's ToTensor) are already rescaled: not divided by 255 again.
    works("float32 (H, W, 3) in [0, 1]", lambda: pixels((RGB8 / 255).astype(np.float32)), same_as(RGB8)),
    works("float32 (H, W, 3) in [0, 1], no resize", lambda: pixels((RGB8 / 255).astype(np.float32), do_resize=False),
          same_as(RGB8)),
    works("float tensor (3, H, W) in [0, 1]", lambda: pixels(torch.from_numpy(RGB8 / 255).permute(2, 0, 1).float()),
          same_as(RGB8)),
    works("float32 (H, W, 3) in 0..255, not whole", lambda: pixels(np.minimum(RGB8 + 0.25, 255).astype(np.float32)),
          same_as(RGB8)),
    works("guard: float32 in [0, 1] with do_rescale=False is used as it is",
          lambda: pixels((RGB8 / 255).astype(np.float32), do_rescale=False, do_resize=False),
          same_as(RGB8, atol=1e-6)),
    refused("float image above 255", lambda: pixels(np.full((16, 16, 3), 300.0, np.float32)),
            ValueError, "[300, 300]", "0..255", "do_rescale=False"),
    refused("float image with NaN", lambda: pixels(np.full((16, 16, 3), np.nan, np.float32)), ValueError, "NaN"),
    works("bfloat16 tensor in [0, 1]", lambda: pixels(torch.from_numpy(RGB8 / 255).to(torch.bfloat16)),
          same_as(RGB8, atol=1.01 / 255)),  # bfloat16 keeps 8 significant bits: within one 8-bit step
    works("bool array is black and white", lambda: pixels(np.ones((16, 16, 3), bool)),
          lambda result: torch.testing.assert_close(result, torch.ones(1, 3, 16, 16))),
    refused("2-channel array", lambda: pixels(np.zeros((16, 16, 2), np.uint8)), ValueError, "(16, 16, 2)", "channels"),
    refused("no images", lambda: pixels([]), ValueError, "empty"),
    # Label maps: integer class ids, single channel.
    refused("float labels with fractions", lambda: labels_of(float_labels(1.5)), ValueError, "1.5", "whole number",
            "nearest"),
    works("guard: float labels holding whole numbers", lambda: labels_of(float_labels(2.0)),
          lambda result: torch.testing.assert_close(result, torch.full((1, 16, 16), 2))),
    refused("negative label", lambda: labels_of(np.full((16, 16), -1, np.int32)), ValueError, "negative value -1",
            "255"),
    refused("RGB label array (H, W, 3)", lambda: labels_of(np.zeros((16, 16, 3), np.uint8)), ValueError,
            "colour image", "(16, 16, 3)", "single-channel", "class id", "mode 'P'"),
    refused("RGB label tensor (H, W, 3)", lambda: labels_of(torch.zeros(16, 16, 3, dtype=torch.uint8)), ValueError,
            "colour image", "single-channel", "class id"),
    refused("RGB label PIL image", lambda: labels_of(Image.new("RGB", (16, 16))), ValueError, "mode 'RGB'",
            "single-channel", "class id"),
]


@pytest.mark.parametrize("case", PROCESSOR_CASES, ids=case_id)
def test_processor(case):
    run_case(case)


# ---- config -------------------------------------------------------------------------------------------------------

EXITS = dict(num_hidden_layers=3, exit_layers=[1, 2])

CONFIG_CASES = [
    refused("NaN exit thresholds", lambda: tiny_config(**EXITS, exit_thresholds=[math.nan] * 2, halting=True),
            ValueError, "exit_thresholds", "nan"),
    refused("exit threshold above 1", lambda: tiny_config(**EXITS, exit_thresholds=[1.01, 0.9]),
            ValueError, "exit_thresholds", "(0, 1]", "1 never halts", "halting=False"),
    works("guard: exit threshold of 1", lambda: tiny_config(**EXITS, exit_thresholds=[1.0, 1.0], halting=True)),
    refused("NaN loss weight", lambda: tiny_config(exit_loss_weight=math.nan), ValueError, "exit_loss_weight", "nan"),
    refused("infinite loss weight", lambda: tiny_config(policy_loss_weight=math.inf), ValueError,
            "policy_loss_weight", "inf"),
    refused("negative loss weight", lambda: tiny_config(policy_loss_weight=-1.0), ValueError, "policy_loss_weight"),
    refused("NaN dropout", lambda: tiny_config(hidden_dropout_prob=math.nan), ValueError, "hidden_dropout_prob"),
    works("preset without exits",
          lambda: StepConfig.from_preset("tiny", exit_layers=[], num_hidden_layers=2, image_size=64, num_labels=3),
          lambda config: assert_equal((config.exit_layers, config.exit_thresholds), ([], []))),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=case_id)
def test_config(case):
    run_case(case)


# ---- model --------------------------------------------------------------------------------------------------------


def images(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def no_exits_round_trip() -> None:
    """Without exit heads: eval and train (with labels), backprop, save and reload give the same logits."""
    model = tiny_model(num_hidden_layers=3, exit_layers=[])
    with torch.no_grad():
        logits = model(images(2)).logits
        assert model(images(2)).halted_share is None  # no exit, nothing halts
    model.train()
    output = model(images(2), labels=torch.randint(0, 4, (2, 32, 32)))
    output.loss.backward()
    assert model.step.pos_embed.grad is not None and output.exit_loss is None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = StepForSemanticSegmentation.from_pretrained(folder).eval()
    assert loaded.config.exit_layers == [] and len(loaded.step.exit_heads) == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(2)).logits, logits)


MODEL_CASES = [
    works("no exit heads: eval, train, backprop, save, reload", no_exits_round_trip),
    refused("empty batch", lambda: tiny_model()(images(0)), ValueError, "empty batch"),
    refused("uint8 pixel_values (the processor skipped)",
            lambda: tiny_model()(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)), TypeError, "uint8",
            "StepImageProcessor"),
    refused("labels with fractions", lambda: tiny_model()(images(1), labels=torch.full((1, 32, 32), 1.5)),
            ValueError, "1.5", "whole number", "nearest"),
    refused("labels with NaN", lambda: tiny_model()(images(1), labels=torch.full((1, 32, 32), math.nan)),
            ValueError, "nan", "whole number"),
    works("guard: float labels holding whole numbers",
          lambda: tiny_model()(images(1), labels=torch.full((1, 32, 32), 2.0)),
          lambda output: torch.testing.assert_close(
              output.loss, tiny_model()(images(1), labels=torch.full((1, 32, 32), 2)).loss)),
    refused("superpatch_map for 3 images, pixel_values for 2",
            lambda: tiny_model()(images(2), superpatch_map=torch.ones(3, 2, 2, dtype=torch.long)),
            ValueError, "3 maps", "2 images"),
    refused("superpatch_map holding a fraction",
            lambda: tiny_model()(images(1), superpatch_map=torch.full((1, 2, 2), 1.5)), ValueError, "1.5"),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=case_id)
def test_model(case):
    run_case(case)


# ---- loading ------------------------------------------------------------------------------------------------------


def saved_without_config() -> str:
    folder = tempfile.mkdtemp()
    tiny_model().save_pretrained(folder)
    (Path(folder) / "config.json").unlink()
    return folder


def saved_vit() -> str:
    folder = tempfile.mkdtemp()
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64)
    ViTModel(config).save_pretrained(folder)
    return folder


LOADING_CASES = [
    refused("load_vit_weights from a missing path", lambda: load_vit_weights(tiny_model(), "checkpoints/vit-small"),
            FileNotFoundError, "'checkpoints/vit-small'", "not a local file or folder", "Hub id"),
    refused("from_pretrained on a folder without config.json",
            lambda: StepForSemanticSegmentation.from_pretrained(saved_without_config()), OSError, "config.json"),
    refused("StepModel.from_pretrained on a ViT folder", lambda: StepModel.from_pretrained(saved_vit()),
            ValueError, "'vit'", "'step'", "load_vit_weights"),
    refused("StepForSemanticSegmentation.from_pretrained on a ViT folder",
            lambda: StepForSemanticSegmentation.from_pretrained(saved_vit()), ValueError, "'vit'", "'step'"),
    works("guard: from_pretrained without config.json, given config=",
          lambda: StepForSemanticSegmentation.from_pretrained(saved_without_config(), config=tiny_config()),
          lambda model: torch.testing.assert_close(model(images(1)).logits, tiny_model()(images(1)).logits)),
]


@pytest.mark.parametrize("case", LOADING_CASES, ids=case_id)
def test_loading(case):
    run_case(case)


# ---- training (examples/train.py) ----------------------------------------------------------------------------------


@functools.cache
def toy_dataset() -> str:
    """A four-image scene dataset folder (train and validation), laid out like a Hub dataset repo."""
    from datasets import Dataset, Image as ImageFeature
    from scenes import SCENE_CLASSES, make_scene

    folder = Path(tempfile.mkdtemp())
    (folder / "data").mkdir()
    for split in ("train", "validation"):
        rows = [make_scene(64, 80, seed=seed) for seed in range(4)]
        dataset = Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]})
        dataset = dataset.cast_column("image", ImageFeature()).cast_column("label", ImageFeature())
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    (folder / "id2label.json").write_text(json.dumps(SCENE_CLASSES))
    return str(folder)


TOY_RUN = ["--image_size", "64", "--policy_steps", "2", "--segmenter_steps", "2", "--prune_steps", "2",
           "--per_device_train_batch_size", "2", "--max_eval_samples", "1"]


def train_args(*extra: str, dataset: str | None = None) -> list[str]:
    return [*TOY_RUN, "--dataset_name", dataset or toy_dataset(), *extra]


@functools.cache
def finished_run() -> Path:
    """A toy run with a checkpoint after every stage: 0-policy-0000002, 1-segmenter-0000002, 2-prune-0000002."""
    output_dir = Path(tempfile.mkdtemp()) / "run"
    train.main(train_args("--checkpointing_steps", "2", "--output_dir", str(output_dir)))
    return output_dir


def copy_of_run() -> Path:
    copy = Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(finished_run(), copy)
    return copy


def full_disk(error_after: Callable[[str], None]) -> Callable:
    """A writer that writes a little into its folder (`error_after(folder)`), then fails as a full disk does."""
    def write(folder, *args, **kwargs):
        os.makedirs(folder, exist_ok=True)
        error_after(folder)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def checkpoint_on_a_full_disk() -> tuple[OSError, list[str]]:
    """`save_checkpoint` whose state write fails half-way: the error, and what it left in checkpoints/."""
    output_dir = Path(tempfile.mkdtemp())
    write_some = full_disk(lambda folder: Path(folder, "model.safetensors").write_bytes(b"x"))
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=write_some)
    with pytest.raises(OSError) as raised:
        checkpoints.save_checkpoint(accelerator, str(output_dir), "segmenter", 4, {"history": []})
    return raised.value, os.listdir(output_dir / "checkpoints")


def final_save_on_a_full_disk() -> tuple[OSError, list[str]]:
    """`save_final` whose weights write fails after config.json was written: the error and the output folder."""
    output_dir = Path(tempfile.mkdtemp())
    model = tiny_model()
    model.save_pretrained = full_disk(lambda folder: Path(folder, "config.json").write_text("{}"))
    args = train.parse_args(["--output_dir", str(output_dir)])
    with pytest.raises(OSError) as raised:
        train.save_final(model, StepImageProcessor(), args, [], None, 0.0, [])
    return raised.value, os.listdir(output_dir)


def resume_with_truncated_latest() -> tuple[str, list[str]]:
    run = copy_of_run()
    weights = run / "checkpoints" / "2-prune-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    messages = []
    found = checkpoints.find_checkpoint(str(run), "latest", log=messages.append)
    return found, messages


def partial_checkpoints_removed() -> tuple[list[str], list[str]]:
    run = copy_of_run()
    (run / "checkpoints" / "2-prune-0000004.tmp").mkdir()
    messages = []
    checkpoints.remove_partial_checkpoints(str(run), log=messages.append)
    return sorted(os.listdir(run / "checkpoints")), messages


def dataset_without_id2label() -> str:
    folder = Path(tempfile.mkdtemp()) / "data"
    shutil.copytree(toy_dataset(), folder)
    (folder / "id2label.json").unlink()
    return str(folder)


def a_file() -> str:
    return tempfile.mkstemp()[1]


def push_to_hub(env: dict[str, str]) -> None:
    """train.py --push_to_hub in a process with `env`; a failure is raised with what the process printed, after
    checking that it stopped before any training (no checkpoint written)."""
    output_dir = Path(tempfile.mkdtemp()) / "run"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), *train_args("--output_dir", str(output_dir), "--push_to_hub",
                                                                  "--hub_model_id", "org/step")],
        env={**env, "HF_HUB_OFFLINE": "0", "HF_HOME": tempfile.mkdtemp()}, capture_output=True, text=True,
        timeout=300)
    if result.returncode:
        assert not (output_dir / "checkpoints").exists(), "training ran before the Hub was contacted"
        raise RuntimeError(result.stderr[-2000:] + result.stdout[-2000:])


def push_to_unreachable_hub() -> None:
    """The Hub endpoint refuses connections (a closed loopback port)."""
    push_to_hub({**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"})


def push_without_permission() -> None:
    """No token, against the local Hub stand-in, which refuses writes without one."""
    with HubServer() as hub:
        push_to_hub({**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, "HF_ENDPOINT": hub.url})


def parse_error(*argv: str) -> str:
    """What `train.py`'s argument parser prints when it refuses `argv` (it exits: argparse's way)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        train.parse_args(list(argv))
    return stderr.getvalue()


def holds(*words: str) -> Callable[[str], None]:
    def check(text: str) -> None:
        for word in words:
            assert word in text, f"{word!r} not in: {text}"
    return check


TRAINING_CASES = [
    works("a batch size of 0", lambda: parse_error("--per_device_train_batch_size", "0"),
          holds("--per_device_train_batch_size must be at least 1, got 0")),
    works("negative steps", lambda: parse_error("--segmenter_steps", "-5"),
          holds("--segmenter_steps must be at least 0")),
    works("a NaN learning rate", lambda: parse_error("--learning_rate", "nan"),
          holds("--learning_rate must be a positive finite number, got nan")),
    works("--min_scale above --max_scale", lambda: parse_error("--min_scale", "3"),
          holds("--min_scale (3.0) is above")),
    works("guard: the defaults parse", lambda: train.parse_args([]), lambda args: assert_equal(args.crop_size, 256)),
    refused("NaN exit thresholds", lambda: train.main(train_args("--output_dir", tempfile.mkdtemp(),
                                                                  "--exit_thresholds", "nan", "nan")),
            ValueError, "exit_thresholds", "(0, 1]"),
    refused("--output_dir is an existing file", lambda: train.main(train_args("--output_dir", a_file())),
            ValueError, "is an existing file"),
    refused("--output_dir cannot be written", lambda: train.main(train_args("--output_dir", a_file() + "/run")),
            ValueError, "cannot be written"),
    refused("--push_to_hub while offline", lambda: train.main(train_args(
        "--output_dir", tempfile.mkdtemp(), "--push_to_hub", "--hub_model_id", "org/step")),
            ValueError, "cannot create or reach the Hub repository org/step"),
    refused("--push_to_hub with the Hub unreachable", push_to_unreachable_hub, RuntimeError,
            "cannot create or reach the Hub repository org/step"),
    refused("--push_to_hub without permission", push_without_permission, RuntimeError,
            "cannot create or reach the Hub repository org/step", "token"),
    refused("--resume_from_checkpoint latest with no checkpoint",
            lambda: train.main(train_args("--output_dir", tempfile.mkdtemp(), "--resume_from_checkpoint", "latest")),
            ValueError, "no checkpoint in", "Leave the flag out"),
    refused("--resume_from_checkpoint of a missing folder",
            lambda: train.main(train_args("--output_dir", tempfile.mkdtemp(), "--resume_from_checkpoint", "nowhere")),
            ValueError, "Cannot resume from nowhere"),
    works("a truncated latest checkpoint: resume falls back to the newest whole one", resume_with_truncated_latest,
          lambda result: (assert_equal(Path(result[0]).name, "1-segmenter-0000002"),
                          assert_equal(len(result[1]), 1), holds(
                              "2-prune-0000002", "model.safetensors is truncated")(result[1][0]))),
    works("partial checkpoint folders are removed, and said", partial_checkpoints_removed,
          lambda result: (assert_equal(result[0], ["0-policy-0000002", "1-segmenter-0000002", "2-prune-0000002"]),
                          holds("2-prune-0000004.tmp", "did not finish")(result[1][0]))),
    works("a full disk while checkpointing: no partial folder, the cause named", checkpoint_on_a_full_disk,
          lambda result: (assert_equal(result[1], []), holds(
              "No space left", "1-segmenter-0000004")(str(result[0])))),
    works("a full disk while saving the final model: nothing that looks like a model", final_save_on_a_full_disk,
          lambda result: (assert_equal(result[1], []), holds(
              "No space left", "saving the final model")(str(result[0])))),
    refused("a dataset folder without id2label.json",
            lambda: load_data(dataset_name=dataset_without_id2label()),
            ValueError, "has no id2label.json", "class names are missing", "--id2label"),
]


@pytest.mark.parametrize("case", TRAINING_CASES, ids=case_id)
def test_training(case):
    run_case(case)


# ---- evaluation ---------------------------------------------------------------------------------------------------


EVALUATION_CASES = [
    refused("a windowed processor for whole-image evaluation",
            lambda: EvalTransform([], StepImageProcessor(window_size=64)), ValueError, "window_size=64",
            "post_process_semantic_segmentation"),
    # The processor sees one image at a time here: its "Segmentation map 0" would point at no row.
    refused("a label map of another size than its image, in row 2",
            lambda: EvalTransform(rows_with_a_small_label(), StepImageProcessor(size={"height": 32, "width": 32}))[2],
            ValueError, "Row 2 of the dataset", "its label map is 24x24 but its image is 32x32"),
]


def rows_with_a_small_label() -> list[dict]:
    rows = [{"image": Image.new("RGB", (32, 32)), "label": Image.new("L", (32, 32))} for _ in range(3)]
    rows[2]["label"] = Image.new("L", (24, 24))
    return rows


@pytest.mark.parametrize("case", EVALUATION_CASES, ids=case_id)
def test_evaluation(case):
    run_case(case)



# ---- reading images: every entry point alike ----------------------------------------------------------------------


@functools.cache
def image_files() -> SimpleNamespace:
    """Files whose plain `convert("RGB")` is wrong: 16-bit greyscale, float, a palette with a transparent black beside
    an opaque black, RGBA with transparent pixels; each with the 8-bit RGB image it should read as."""
    folder = Path(tempfile.mkdtemp())
    Image.fromarray(GRADIENT16).save(folder / "grey16.png")  # opens as PIL mode 'I;16'
    Image.fromarray((GRADIENT8 / 255).astype(np.float32)).save(folder / "float.tiff")  # mode 'F' in [0, 1]
    palette = Image.fromarray(np.tile(np.arange(16) % 2, (16, 1)).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0] * 256)  # index 0 and 1 both black; index 0 transparent
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png")
    opaque = np.tile(np.arange(16) % 2 == 1, (16, 1))
    rgba = np.dstack([RGB8, np.where(opaque, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba).save(folder / "rgba.png")
    return SimpleNamespace(
        grey16=(folder / "grey16.png", rgb_of(GRADIENT8)), float=(folder / "float.tiff", rgb_of(GRADIENT8)),
        palette=(folder / "palette.png", rgb_of(np.where(opaque, 0, 255).astype(np.uint8))),
        rgba=(folder / "rgba.png", np.where(opaque[..., None], RGB8, 255).astype(np.uint8)))


def read_by(entry: str, kind: str) -> np.ndarray:
    """`kind`'s file as 8-bit pixels, read by one entry point: the processor given the path or the opened image,
    `load_image`, or `examples/onnx_segment.py`'s reader run where torch cannot be imported."""
    path = str(getattr(image_files(), kind)[0])
    if entry == "load_image":
        return np.asarray(load_image(path))
    if entry == "onnx_segment.py":
        # An exported folder holds a copy of step_hf's `image_reading.py`, which the script reads from there.
        script = (f"import pathlib, runpy, sys, numpy; sys.modules['torch'] = None; "
                  f"image = runpy.run_path({str(EXAMPLES / 'onnx_segment.py')!r})['read_image']({path!r}, "
                  f"pathlib.Path({str(Path(step_hf.__file__).parent)!r})); "
                  f"numpy.save(sys.argv[1], numpy.asarray(image))")
        out = Path(tempfile.mkdtemp()) / "pixels.npy"
        result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return np.load(out)
    processor = StepImageProcessor(size={"height": 16, "width": 16}, do_normalize=False, do_resize=False)
    pixel_values = processor(path if entry == "processor (path)" else Image.open(path), return_tensors="pt")
    return np.rint(pixel_values["pixel_values"][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def reads_as(kind: str) -> Callable[[np.ndarray], None]:
    return lambda result: np.testing.assert_array_equal(result, getattr(image_files(), kind)[1])


@functools.cache
def segmenter():
    from transformers import pipeline

    folder = tempfile.mkdtemp()
    tiny_model().save_pretrained(folder)
    StepImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return pipeline("image-segmentation", folder)


def pipeline_segments(image_or_path) -> list[tuple[str, bytes]]:
    return [(segment["label"], segment["mask"].tobytes()) for segment in segmenter()(image_or_path)]


READING_CASES = [
    # 16-bit greyscale, float, a transparent palette entry and alpha: one reading, whatever the entry point.
    # The processor given the opened image already read them so: the rule the other entry points now follow.
    *(works(f"{'guard: ' if entry == 'processor (opened)' else ''}{kind} file, {entry}",
            lambda entry=entry, kind=kind: read_by(entry, kind), reads_as(kind))
      for kind in ("grey16", "float", "palette", "rgba")
      for entry in ("processor (opened)", "processor (path)", "load_image", "onnx_segment.py")),
    works("the pipeline given a 16-bit PNG's path: the segments of its 8-bit image",
          lambda: pipeline_segments(str(image_files().grey16[0])),
          lambda result: assert_equal(result, pipeline_segments(Image.fromarray(rgb_of(GRADIENT8))))),
    works("the pipeline given an opened 16-bit PNG: the segments of its 8-bit image",
          lambda: pipeline_segments(Image.open(image_files().grey16[0])),
          lambda result: assert_equal(result, pipeline_segments(Image.fromarray(rgb_of(GRADIENT8))))),
    refused("a float file beyond 0..255, by load_image: named",
            lambda: load_image(str(save_float(np.full((16, 16), 300.0, np.float32)))), ValueError, "hot.tiff",
            "mode 'F'", "[300, 300]", "0..255"),
]


def save_float(pixels: np.ndarray) -> Path:
    path = Path(tempfile.mkdtemp()) / "hot.tiff"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("case", READING_CASES, ids=case_id)
def test_reading(case):
    run_case(case)


# ---- run-time settings from JSON or the command line --------------------------------------------------------------


SHARING = dict(partition_source="policy", num_hidden_layers=3, exit_layers=[1])


def update_settings(config: StepConfig, **changes) -> StepConfig:
    config.update_settings(**changes)
    return config


SETTINGS_CASES = [
    refused("exit_thresholds=[True]", lambda: tiny_model(**SHARING)(images(1), exit_thresholds=[True]), ValueError,
            "`exit_thresholds`", "numbers", "True"),
    refused("policy_thresholds=[True] * 4", lambda: tiny_model(**SHARING)(images(1), policy_thresholds=[True] * 4),
            ValueError, "`policy_thresholds`", "numbers", "True"),
    refused("policy_thresholds=['abc'] * 4", lambda: tiny_model(**SHARING)(images(1), policy_thresholds=["abc"] * 4),
            ValueError, "`policy_thresholds`", "'abc'"),
    refused("update_settings(exit_thresholds=[True])",
            lambda: update_settings(tiny_config(**SHARING), exit_thresholds=[True]), ValueError, "`exit_thresholds`"),
    works("guard: NumPy thresholds", lambda: tiny_model(**SHARING)(images(1), policy_thresholds=np.full(4, 0.5),
                                                                   exit_thresholds=[np.float32(0.5)]),
          lambda output: assert_equal(output.run.settings.policy_thresholds, (0.5,) * 4)),
    refused("exit_keep_tokens=[20.0]", lambda: tiny_model(**SHARING)(images(1), exit_keep_tokens=[20.0]),
            ValueError, "`exit_keep_tokens`", "whole numbers", "[20.0]"),
    refused("a token budget per call on a model without token sharing",
            lambda: tiny_model(superpatch_sizes=[1])(images(1), token_budget=10), ValueError, "`token_budget`",
            "token sharing", "[1]"),
    refused("a token budget by update_settings on a model without token sharing",
            lambda: update_settings(tiny_config(superpatch_sizes=[1]), token_budget=10), ValueError,
            "`token_budget`", "token sharing"),
    works("guard: a token budget with token sharing", lambda: tiny_model(**SHARING)(images(1), token_budget=1),
          lambda output: assert_equal(int(output.token_counts[0]), 1)),  # a 2x2 grid merged into one token
]


@pytest.mark.parametrize("case", SETTINGS_CASES, ids=case_id)
def test_settings(case):
    run_case(case)
