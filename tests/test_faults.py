"""Faults at the edges of inference, files and metrics, in the row style of `test_bad_input.py`: inputs too large to
run, images behind URLs that fail, processor and config files that are wrong or from a newer version, weights files
that lack weights, and labels that evaluation cannot count. Every row fails on the code before these checks, except
the "guard:" rows, which keep a check from refusing what is valid next to what it refuses."""

import functools
import http.server
import io
import json
import socket
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoModelForSemanticSegmentation, pipeline
from transformers.testing_utils import CaptureLogger

from step_hf import StepConfig, StepForSemanticSegmentation, StepImageProcessor, load_image
from step_hf.configuration_step import logger as config_logger
from step_hf.evaluation import EvalTransform, confusion_matrices, evaluate, segmentation_metrics

from .conftest import tiny_config, tiny_model
from .cases import assert_equal, case_id, refused, run_case, works

RGB = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
EXITS = dict(num_hidden_layers=3, exit_layers=[1, 2])

# ---- inputs too large to run ----------------------------------------------------------------------------------------


def processed(image_shape: tuple[int, int], **kwargs) -> torch.Tensor:
    """`pixel_values` of a black image of `image_shape` (height, width)."""
    return StepImageProcessor(**kwargs)(np.zeros((*image_shape, 3), np.uint8), return_tensors="pt")["pixel_values"]


SIZE_CASES = [
    # The default limit, 16 x the 4096 tokens of 1024x1024, refuses an unresized 4112x4112 image (66049 tokens).
    refused("an unresized image above the default token limit", lambda: processed((4112, 4112), do_resize=False),
            ValueError, "4112x4112", "66049 tokens", "max_tokens_per_image` (65536)", "window_size=1024",
            "do_resize=True"),
    refused("a resized image above a limit", lambda: processed((100, 100), size={"height": 144, "width": 128},
                                                               max_tokens_per_image=64),
            ValueError, "144x128 after resizing", "72 tokens", "(64)"),
    works("guard: an image at the limit", lambda: processed((128, 128), do_resize=False, max_tokens_per_image=64),
          lambda pixel_values: assert_equal(tuple(pixel_values.shape), (1, 3, 128, 128))),
    works("guard: windows under the limit cut an image above it",
          lambda: processed((256, 256), do_resize=False, window_size=128, max_tokens_per_image=64),
          lambda pixel_values: assert_equal(tuple(pixel_values.shape), (9, 3, 128, 128))),
    refused("windows above the limit", lambda: processed((256, 256), do_resize=False, window_size=144,
                                                         max_tokens_per_image=64),
            ValueError, "each of its windows", "144x144", "81 tokens", "smaller windows"),
    works("guard: no limit for one call",
          lambda: processed((256, 256), do_resize=False, max_tokens_per_image=None),
          lambda pixel_values: assert_equal(tuple(pixel_values.shape), (1, 3, 256, 256))),
]


@pytest.mark.parametrize("case", SIZE_CASES, ids=case_id)
def test_size(case):
    run_case(case)


# ---- images behind URLs -------------------------------------------------------------------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Pages(http.server.BaseHTTPRequestHandler):
    """/image.png: a PNG of `RGB`; /page: a 200 HTML page; anything else: a 404 HTML page."""

    def do_GET(self):
        status, content_type, body = {
            "/image.png": (200, "image/png", png_bytes(RGB)),
            "/page": (200, "text/html", b"<html><body>Sign in to see this image</body></html>"),
        }.get(self.path, (404, "text/html", b"<html><body><h1>404 Not Found</h1></body></html>"))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@functools.cache
def servers() -> SimpleNamespace:
    """A loopback HTTP server, a closed port (connections refused) and a socket that accepts connections (the
    kernel completes them from its backlog) but never answers; they live as long as the test process."""
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    base = f"http://127.0.0.1:{pages.server_address[1]}"
    return SimpleNamespace(image=f"{base}/image.png", missing=f"{base}/missing.png", page=f"{base}/page",
                           refused=f"http://127.0.0.1:{closed_port}/image.png",
                           silent=f"http://127.0.0.1:{silent.getsockname()[1]}/image.png", sockets=(pages, silent))


def url(name: str) -> str:
    return getattr(servers(), name)


def pixels_of(image) -> torch.Tensor:
    return StepImageProcessor(size={"height": 32, "width": 48})(image, return_tensors="pt")["pixel_values"]


def segments_of(image, **call) -> list[tuple[str, bytes]]:
    """What `pipeline("image-segmentation")` finds in `image`, with a tiny saved model."""
    folder = tempfile.mkdtemp()
    tiny_model().save_pretrained(folder)
    StepImageProcessor(size={"height": 32, "width": 48}).save_pretrained(folder)
    segments = pipeline("image-segmentation", folder)(image, **call)
    return [(segment["label"], segment["mask"].tobytes()) for segment in segments]


URL_CASES = [
    works("guard: a served PNG loads as its pixels", lambda: load_image(url("image")),
          lambda image: assert_equal(np.asarray(image).tolist(), RGB.tolist())),
    works("guard: the processor given a URL: the image's pixel values", lambda: pixels_of(url("image")),
          lambda result: torch.testing.assert_close(result, pixels_of(Image.fromarray(RGB)), rtol=0, atol=0)),
    works("guard: the pipeline given load_image(URL): the image's segments",
          lambda: segments_of(load_image(url("image"))),
          lambda result: assert_equal(result, segments_of(Image.fromarray(RGB)))),
    works("guard: the pipeline given the URL: the image's segments", lambda: segments_of(url("image")),
          lambda result: assert_equal(result, segments_of(Image.fromarray(RGB)))),
    refused("a 404 page", lambda: load_image(url("missing")), OSError, url("missing"), "404 Not Found"),
    refused("the pipeline given a 404 page", lambda: segments_of(url("missing")), OSError, url("missing"), "404"),
    refused("the pipeline given a server that never answers", lambda: segments_of(url("silent"), timeout=0.5),
            TimeoutError, url("silent"), "no answer within 0.5 s"),
    refused("the processor given a 404 page", lambda: pixels_of(url("missing")), OSError, url("missing"), "404"),
    refused("a 200 HTML page", lambda: load_image(url("page")), OSError, url("page"), "200", "text/html",
            "cannot read as an image"),
    refused("a refused connection", lambda: load_image(url("refused")), ConnectionError, url("refused"),
            "ConnectError"),
    refused("the processor given a refused connection", lambda: pixels_of(url("refused")), ConnectionError,
            url("refused")),
    refused("a server that never answers", lambda: load_image(url("silent"), timeout=0.5), TimeoutError,
            url("silent"), "no answer within 0.5 s", "timeout"),
]


@pytest.mark.parametrize("case", URL_CASES, ids=case_id)
def test_url(case):
    run_case(case)


# ---- processor fields ---------------------------------------------------------------------------------------------


def saved_processor_with(**fields) -> str:
    """A saved processor folder whose preprocessor_config.json was edited to hold `fields`."""
    folder = tempfile.mkdtemp()
    StepImageProcessor().save_pretrained(folder)
    path = Path(folder) / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return folder


def processor_after(**attributes) -> torch.Tensor:
    """A processor whose attributes were changed after construction, then called."""
    processor = StepImageProcessor(size={"height": 32, "width": 48})
    for name, value in attributes.items():
        setattr(processor, name, value)
    return processor(RGB, return_tensors="pt")["pixel_values"]


PROCESSOR_FIELD_CASES = [
    refused("image_std holding 0", lambda: StepImageProcessor(image_std=[0.229, 0, 0.225]), ValueError,
            "`image_std` [0.229, 0.0, 0.225] holds 0", "divides"),
    refused("a saved processor with image_std holding 0",
            lambda: StepImageProcessor.from_pretrained(saved_processor_with(image_std=[0.229, 0, 0.225])),
            ValueError, "`image_std`", "holds 0"),
    refused("a saved processor with image_mean of two values, given an RGB image",
            lambda: StepImageProcessor.from_pretrained(saved_processor_with(image_mean=[0.5, 0.5]))(
                np.zeros((16, 16, 3), np.uint8)),
            ValueError, "`image_mean` has 2 values", "3 channels"),
    refused("NaN in image_mean", lambda: StepImageProcessor(image_mean=[0.5, float("nan"), 0.5]), ValueError,
            "`image_mean`", "NaN"),
    refused("image_std holding 0 for one call", lambda: pixels_of_call(image_std=[1.0, 0.0, 1.0]), ValueError,
            "`image_std`", "holds 0"),
    refused("image_std set to 0 after construction", lambda: processor_after(image_std=(1.0, 0.0, 1.0)), ValueError,
            "`image_std`", "holds 0"),
    works("one mean and one std for all channels",
          lambda: StepImageProcessor(size={"height": 16, "width": 16}, image_mean=0.5, image_std=0.5)(
              np.zeros((16, 16, 3), np.uint8), return_tensors="pt")["pixel_values"],
          lambda result: torch.testing.assert_close(result, torch.full((1, 3, 16, 16), -1.0))),
    refused("a window that is not a multiple of 16, at construction", lambda: StepImageProcessor(window_size=100),
            ValueError, "`window_size`", "multiple of 16"),
    refused("a zero rescale factor", lambda: StepImageProcessor(rescale_factor=0.0), ValueError, "`rescale_factor`"),
    refused("a token limit of 0", lambda: StepImageProcessor(max_tokens_per_image=0), ValueError,
            "`max_tokens_per_image`"),
]


def pixels_of_call(**overrides) -> torch.Tensor:
    return StepImageProcessor(size={"height": 32, "width": 48})(RGB, return_tensors="pt", **overrides)["pixel_values"]


@pytest.mark.parametrize("case", PROCESSOR_FIELD_CASES, ids=case_id)
def test_processor_field(case):
    run_case(case)


# ---- config fields from a newer version ---------------------------------------------------------------------------


def config_warnings(**extra_fields) -> str:
    """What loading a saved configuration with `extra_fields` added logs."""
    folder = tempfile.mkdtemp()
    tiny_config().save_pretrained(folder)
    path = Path(folder) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra_fields}))
    with CaptureLogger(config_logger) as captured:
        config = StepConfig.from_pretrained(folder)
    for name, value in extra_fields.items():
        assert getattr(config, name) == value  # kept, as transformers keeps them
    return captured.out


def saved_model_warnings() -> str:
    """What saving a model (exits, halting, eager attention) and loading it back through the Auto class logs."""
    folder = tempfile.mkdtemp()
    tiny_model(**EXITS, halting=True, attn_implementation="eager", output_attentions=True).save_pretrained(folder)
    with CaptureLogger(config_logger) as captured:
        AutoModelForSemanticSegmentation.from_pretrained(folder)
    return captured.out


CONFIG_FIELD_CASES = [
    works("fields a newer version wrote are named in one warning",
          lambda: config_warnings(exit_schedule="cosine", token_merge_rule="mean"),
          lambda out: (assert_equal(out.count("does not know"), 1),
                       assert_equal("['exit_schedule', 'token_merge_rule']" in out, True))),
    works("guard: a configuration saved by this version warns of nothing", saved_model_warnings,
          lambda out: assert_equal(out, "")),
]


@pytest.mark.parametrize("case", CONFIG_FIELD_CASES, ids=case_id)
def test_config_field(case):
    run_case(case)


# ---- weights files that lack weights ------------------------------------------------------------------------------


def saved(model, edit=None) -> str:
    """`model` saved to a new folder, its safetensors then edited by `edit(state_dict)`."""
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    if edit is not None:
        path = Path(folder) / "model.safetensors"
        state = load_file(path)
        edit(state)
        save_file(state, path, metadata={"format": "pt"})
    return folder


def rename(old: str, new: str):
    def edit(state: dict) -> None:
        state[new] = state.pop(old)
    return edit


def drop(name: str):
    return lambda state: state.pop(name)


def same_weights(loaded, reference) -> None:
    reference_state = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, reference_state[name], rtol=0, atol=0, msg=name)


WEIGHTS_CASES = [
    refused("a renamed decoder weight",
            lambda: StepForSemanticSegmentation.from_pretrained(saved(tiny_model(), rename(
                "decoder.blocks.0.attn.qkv.weight", "decoder.blocks.0.attn.qkv_weight"))),
            OSError, "'decoder.blocks.0.attn.qkv.weight'", "re-initialised at random",
            "'decoder.blocks.0.attn.qkv_weight'", "renamed?", "damaged"),
    refused("an encoder weight missing, through AutoModel",
            lambda: AutoModel.from_pretrained(saved(tiny_model(), drop("step.blocks.1.norm2.bias"))),
            OSError, "'blocks.1.norm2.bias'", "re-initialised"),
    refused("one tensor of an exit head missing",
            lambda: StepForSemanticSegmentation.from_pretrained(saved(
                tiny_model(**EXITS), drop(next(name for name in tiny_model(**EXITS).state_dict()
                                               if name.startswith("step.exit_heads.1."))))),
            OSError, "step.exit_heads.1."),
    works("guard: a saved encoder gets a new decoder, its own weights loaded",
          lambda: StepForSemanticSegmentation.from_pretrained(saved(tiny_model().step)),
          lambda model: same_weights(model.step, tiny_model().step)),
    works("guard: an exit head added by exit_layers= starts new",
          lambda: StepForSemanticSegmentation.from_pretrained(
              saved(tiny_model(num_hidden_layers=3, exit_layers=[1])), exit_layers=[1, 2],
              exit_thresholds=[0.9, 0.9]),
          lambda model: same_weights(model.step.exit_heads[0], tiny_model(num_hidden_layers=3,
                                                                           exit_layers=[1]).step.exit_heads[0])),
    works("guard: output_loading_info still returns the report",
          lambda: StepForSemanticSegmentation.from_pretrained(saved(tiny_model()), output_loading_info=True),
          lambda result: assert_equal(result[1]["missing_keys"], set())),
]


@pytest.mark.parametrize("case", WEIGHTS_CASES, ids=case_id)
def test_weights(case):
    run_case(case)


# ---- labels evaluation cannot count -------------------------------------------------------------------------------


def labels_with(value: int, image: int, batch_size: int) -> torch.Tensor:
    labels = torch.zeros(batch_size, 8, 8, dtype=torch.long)
    labels[image, 2, 3] = value
    return labels


def confusion_of(labels: torch.Tensor, prediction: torch.Tensor | None = None) -> torch.Tensor:
    prediction = torch.zeros_like(labels) if prediction is None else prediction
    return confusion_matrices(labels, prediction, 4, 255)


def evaluated(label_maps: list[np.ndarray], batch_size: int = 2) -> dict:
    """`evaluate` of a tiny model over images with `label_maps` (4 classes)."""
    rows = [{"image": Image.fromarray(RGB[:32, :32]), "label": label_map} for label_map in label_maps]
    loader = DataLoader(EvalTransform(rows, StepImageProcessor(size={"height": 32, "width": 32})),
                        batch_size=batch_size)
    return evaluate(tiny_model(), loader)


VOID = np.full((32, 32), 255, np.uint8)


def json_valid(metrics: dict) -> None:
    json.dumps(metrics, allow_nan=False)  # raises on NaN or infinity


EVALUATION_CASES = [
    refused("a label outside id2label, batches of 2", lambda: confusion_of(labels_with(7, image=1, batch_size=2)),
            ValueError, "labels of image 1", "value 7", "[0, 4)", "ignore index 255"),
    refused("a label outside id2label, batches of 1", lambda: confusion_of(labels_with(4, image=0, batch_size=1)),
            ValueError, "labels of image 0", "value 4"),
    refused("a negative label", lambda: confusion_of(labels_with(-1, image=0, batch_size=2)), ValueError, "value -1"),
    refused("a prediction outside the classes",
            lambda: confusion_of(torch.zeros(2, 8, 8, dtype=torch.long), labels_with(5, image=1, batch_size=2)),
            ValueError, "prediction of image 1", "value 5"),
    refused("one prediction for two label maps",
            lambda: confusion_of(torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long)),
            ValueError, "(1, 8, 8)", "(2, 8, 8)", "one prediction per label map"),
    works("guard: void pixels are left out", lambda: confusion_of(labels_with(255, image=1, batch_size=2)),
          lambda confusion: assert_equal(int(confusion.sum()), 2 * 64 - 1)),
    works("nothing labelled: metrics are None, and valid JSON",
          lambda: segmentation_metrics(torch.zeros(4, 4, dtype=torch.long), {i: str(i) for i in range(4)}),
          lambda metrics: (assert_equal(metrics["mean_iou"], None), assert_equal(metrics["overall_accuracy"], None),
                           assert_equal(set(metrics["per_category_iou"].values()), {None}), json_valid(metrics))),
    works("a class absent from labels and predictions: IoU None, the mean the others'",
          lambda: segmentation_metrics(torch.tensor([[3, 1, 0], [1, 3, 0], [0, 0, 0]]), {0: "a", 1: "b", 2: "c"}),
          lambda metrics: (assert_equal(metrics["per_category_iou"], {"a": 0.6, "b": 0.6, "c": None}),
                           assert_equal(metrics["mean_iou"], 0.6), json_valid(metrics))),
    refused("evaluate: a label outside id2label in the third image",
            lambda: evaluated([VOID, np.zeros((32, 32), np.uint8), np.full((32, 32), 9, np.uint8)]),
            ValueError, "labels of image 2", "value 9"),
    refused("evaluate: an all-void split", lambda: evaluated([VOID, VOID, VOID]), ValueError,
            "No pixel of the 3 evaluation images is labelled", "ignore index 255", "do_reduce_labels"),
    works("guard: evaluate with one labelled image among void ones",
          lambda: evaluated([VOID, np.zeros((32, 32), np.uint8)]),
          lambda metrics: (json_valid(metrics), assert_equal(0 <= metrics["mean_iou"] <= 1, True))),
]


@pytest.mark.parametrize("case", EVALUATION_CASES, ids=case_id)
def test_evaluation(case):
    run_case(case)
