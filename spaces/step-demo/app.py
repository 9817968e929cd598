"""STEP's adaptive compute on your own image: a Gradio app, laid out as a Hugging Face Space.

    python spaces/step-demo/app.py [--model DIR_OR_ID] [--port N]

serves on 127.0.0.1 and prints the local URL. Upload an image (or pick a built-in scene; CamVid frames too when
`../shared/datasets/camvid` is beside the repository), move the policy threshold or the token budget and the exit
thresholds, and see what STEP does with them: the segmentation, the superpatches, the cells that halted at each exit,
and the tokens, halted shares, GFLOPs and milliseconds of that run. Every request runs with its own settings
(`model(..., settings=...)`) on one shared model; nothing a request asks for is written to the model.
"""

import argparse
import base64
import io
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Before gradio and huggingface_hub are imported: no usage reports, no version checks.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation  # noqa: E402

import step_hf  # noqa: E402, F401  (registers "step" with the Auto classes)
from step_hf import input_sizing  # noqa: E402
from step_hf.accounting import flops_for_token_counts, flops_per_image  # noqa: E402
from step_hf.analysis import (  # noqa: E402
    class_legend, colourise, draw_exits, draw_tokens, exit_legend, panel, token_legend,
)
from step_hf.image_reading import rgb_image  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEMO_MODEL = REPO / "outputs" / "demo"  # what `bash scripts/demo.sh` (the README's demo command) writes
SPACE_MODEL = "step-hf/step-vit-tiny"  # the model in this Space's README metadata, for a Space with no local folder
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
MAX_PIXELS = 25_000_000  # larger uploads are refused: they would only be downscaled, after a long decode
DISPLAY_SIDE = 640  # pictures are drawn at most this long
MAX_EXITS = 4  # exit-threshold sliders in the page (and `request`'s parameters); extra exits take the last value
PARTITIONS = ("policy thresholds", "token budget", "dense")


def default_model() -> str:
    return str(DEMO_MODEL) if DEMO_MODEL.is_dir() else SPACE_MODEL


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    processor: object


class Models:
    """Models by folder or Hub id, each loaded once and shared by every request (they only read it); the
    `keep` most recently asked for stay loaded."""

    def __init__(self, keep: int = 3):
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self.keep = keep

    def get(self, name: str) -> LoadedModel:
        name = name.strip()
        with self._lock:
            if name in self._loaded:
                self._loaded[name] = self._loaded.pop(name)  # now the most recent
            else:
                try:
                    model = AutoModelForSemanticSegmentation.from_pretrained(name).eval()
                    processor = AutoImageProcessor.from_pretrained(name)
                except (OSError, ValueError) as error:
                    raise gr.Error(f"Cannot load the model {name!r} ({error}). Give a folder saved by "
                                   "examples/train.py (`bash scripts/demo.sh` writes outputs/demo) or a Hub id.")
                if getattr(model.config, "model_type", None) != "step":
                    raise gr.Error(f"{name!r} is a {model.config.model_type!r} model; this demo needs a STEP model.")
                while len(self._loaded) >= self.keep:  # the least recently asked for goes
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[name] = LoadedModel(name, model, processor)
            return self._loaded[name]


@dataclass(frozen=True)
class Controls:
    """What the page's controls ask for."""

    partition: str = "policy thresholds"  # one of PARTITIONS
    policy_threshold: float = 0.5
    budget_percent: float = 50.0  # the token budget as a share of the dense count of a window
    halting: bool = True
    exit_thresholds: tuple[float, ...] = (0.9,) * MAX_EXITS
    shortest_side: int = 0  # the resized image's shorter side in pixels; 0: the processor's own sizing


def control_number(value, control: str) -> float:
    """A slider's value as the page or the API sent it, refused by the control's name unless a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise gr.Error(f"The {control} must be a finite number, got {value!r}.")
    return float(value)


def control_bool(value, control: str) -> bool:
    """A checkbox's value: True or False, or their names as an API client may send them ("false" is False)."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise gr.Error(f"The {control} must be true or false, got {value!r}.")
    return value


def run_settings(config, controls: Controls, cells_per_window: int) -> dict:
    """The settings of one request, as overrides of the model's saved ones."""
    if controls.partition not in PARTITIONS:
        raise gr.Error(f"Partition must be one of {list(PARTITIONS)}, got {controls.partition!r}.")
    settings: dict = {"partition_source": "dense" if controls.partition == "dense" else "policy"}
    if controls.partition == "policy thresholds":
        settings.update(policy_thresholds=[float(controls.policy_threshold)] * len(config.shared_sizes),
                        token_budget=None)
    elif controls.partition == "token budget":
        settings["token_budget"] = max(1, round(controls.budget_percent / 100 * cells_per_window))
    if config.exit_layers:
        thresholds = [*controls.exit_thresholds][: len(config.exit_layers)]
        thresholds += [thresholds[-1]] * (len(config.exit_layers) - len(thresholds))
        settings.update(halting=controls.halting, exit_thresholds=[float(t) for t in thresholds],
                        exit_keep_tokens=None)  # the sliders' thresholds decide, not fixed keep counts
    return settings


def too_large(width: int, height: int) -> gr.Error:
    """The refusal of an image above MAX_PIXELS, given the size its header says (checked before any decoding)."""
    return gr.Error(f"The image is {width}x{height} pixels ({width * height / 1e6:.0f} MP); this demo takes up to "
                    f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it and upload it again.")


def read_image(path: str | None) -> Image.Image:
    """The uploaded file as an 8-bit RGB image read as the processor reads images (16-bit and float scaled,
    transparency on white, upright), or a message that says what is wrong with it."""
    if not path:
        raise gr.Error("Upload an image (PNG, JPEG, WebP) or pick one of the examples.")

    def unreadable(error: Exception) -> gr.Error:
        return gr.Error(f"{Path(path).name} cannot be read as an image ({error}). Upload a PNG, JPEG or WebP file.")

    try:
        image = Image.open(path)  # reads the header only
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise unreadable(error)
    if image.width * image.height > MAX_PIXELS:
        raise too_large(*image.size)
    try:
        image.load()
        return rgb_image(image, Path(path).name)  # a phone's photo the way up it was taken
    except (OSError, ValueError) as error:  # e.g. a truncated file, or float pixels beyond 0..255
        raise unreadable(error)


class CheckedImage(gr.Image):
    """gr.Image that hands over the uploaded file as it is (no conversion to RGB by Gradio, which decodes the whole
    image and clips 16-bit values: `read_image` reads it), refuses one above MAX_PIXELS from its header before
    anything decodes it, and says so in the page when an upload is not an image."""

    is_template = True  # the page draws it as an ordinary gr.Image
    # No `__init__` of its own: Gradio reads a component's page properties from its `__init__` signature. Build it
    # with `image_mode=None`, so that Gradio hands the file over unconverted.

    def preprocess(self, payload):
        name = getattr(payload, "orig_name", None) or "The upload"
        try:
            url = getattr(payload, "url", None) or ""
            source = payload and (io.BytesIO(base64.b64decode(url.split(",", 1)[-1])) if url.startswith("data:")
                                  else payload.path)
            size = None
            if source:
                with Image.open(source) as header:  # reads the header only
                    size = header.size
            if size is None or size[0] * size[1] <= MAX_PIXELS:
                return super().preprocess(payload)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise gr.Error(f"{name} cannot be read as an image ({error}). Upload a PNG, JPEG or WebP file.")
        raise too_large(*size)


@dataclass
class Result:
    overlay: Image.Image
    superpatches: Image.Image
    exits: Image.Image
    numbers: dict


def own_shorter_side(processor) -> int:
    """The shorter side of the processor's own input: its `shortest_edge`, or the shorter of its height and width."""
    size = dict(processor.size)
    return size["shortest_edge"] if size.get("shortest_edge") else min(size["height"], size["width"])


def fit(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    scale = min(1.0, side / max(image.size))
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


@torch.no_grad()
def segment(loaded: LoadedModel, image: Image.Image, controls: Controls) -> Result:
    """One request: sized by the processor (`input_sizing`: windows only when a larger input is asked for), run
    with this request's settings, stitched, drawn and counted."""
    config, processor = loaded.model.config, loaded.processor
    try:
        sizing = input_sizing(processor, image.height, image.width, int(controls.shortest_side) or None)
    except ValueError as error:  # not a multiple of the patch size
        raise gr.Error(str(error))
    inputs = processor(image, **sizing.overrides, return_tensors="pt")
    window_height, window_width = inputs["pixel_values"].shape[-2:]
    cells = (window_height // config.patch_size) * (window_width // config.patch_size)
    settings = run_settings(config, controls, cells)
    start = time.perf_counter()
    try:
        outputs = loaded.model(**inputs, settings=settings)
    except ValueError as error:  # e.g. a token budget below what the superpatch sizes can reach
        raise gr.Error(str(error))
    milliseconds = 1000 * (time.perf_counter() - start)

    display = fit(image)
    prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[display.size[::-1]])[0].numpy()
    offsets = inputs.get("window_offsets")
    if offsets is None:
        resized = (window_height, window_width)
        places = [(0, 0)]
    else:
        resized = tuple(int(v) for v in offsets[0, 3:5])
        places = [(int(top), int(left)) for top, left in offsets[:, 1:3].tolist()]
    # Each window drawn on its part of the picture, later windows over earlier ones where they overlap.
    scale_y, scale_x = display.height / resized[0], display.width / resized[1]
    superpatches, exits = display.copy(), display.copy()
    layers = config.exit_layers if outputs.exit_map is not None else []
    for index, (top, left) in enumerate(places):
        box = (round(left * scale_x), round(top * scale_y), round((left + window_width) * scale_x),
               round((top + window_height) * scale_y))
        crop = display.crop(box)
        superpatches.paste(draw_tokens(crop, outputs.superpatch_map[index].numpy(), None, config.num_hidden_layers),
                           box[:2])
        if layers:
            exits.paste(draw_exits(crop, outputs.exit_map[index].numpy(), layers), box[:2])

    counts = outputs.token_counts.tolist()
    tokens, dense = sum(counts), cells * len(counts)
    numbers = {
        "windows": len(counts), "window_size": [int(window_height), int(window_width)],
        "tokens": int(tokens), "dense_tokens": int(dense), "token_reduction": dense / tokens,
        "halted_share": {}, "gflops": sum(flops_per_image(config, (window_height, window_width), outputs)) / 1e9,
        "dense_gflops": sum(flops_for_token_counts(config, (window_height, window_width), [cells] * len(counts),
                                                   None, [1], False, False)) / 1e9,
        "milliseconds": milliseconds, "settings": outputs.run.settings.to_dict(),
    }
    if outputs.halted_share is not None:  # each window's shares weighted by its tokens: shares of all tokens
        shares = (outputs.halted_share * outputs.token_counts[:, None]).sum(0) / tokens
        numbers["halted_share"] = {f"block {layer}": float(s) for layer, s in zip(config.exit_layers, shares)}

    classes = class_legend(config.id2label, np.unique(prediction))
    overlay = Image.blend(display, colourise(prediction, config.num_labels), 0.55)
    note = f"{len(counts)} window(s) of {window_width}x{window_height} pixels" if len(counts) > 1 else None
    return Result(
        overlay=panel([overlay], ["segmentation"], classes),
        superpatches=panel([superpatches], [f"superpatches: {tokens} tokens of {dense}"], token_legend(None, 0),
                           note=note),
        exits=panel([exits], ["halted cells, by exit"], exit_legend(layers) if layers else None,
                    note=None if layers else "No token halted: halting is off or the model has no exits."),
        numbers=numbers,
    )


def numbers_markdown(numbers: dict) -> str:
    """The numbers of one request as the page shows them (the browser test reads these lines)."""
    halted = ", ".join(f"{name}: {100 * share:.1f}%" for name, share in numbers["halted_share"].items()) or "none"
    return "\n".join([
        f"- **tokens per image**: {numbers['tokens']} of {numbers['dense_tokens']} dense "
        f"({numbers['token_reduction']:.2f}x fewer)",
        f"- **halted share per exit**: {halted}",
        f"- **GFLOPs**: {numbers['gflops']:.3f} (dense {numbers['dense_gflops']:.3f})",
        f"- **ms on this machine**: {numbers['milliseconds']:.0f} (the forward, {numbers['windows']} window(s) of "
        f"{numbers['window_size'][1]}x{numbers['window_size'][0]})",
        f"- **ran with**: {describe_settings(numbers['settings'])}",
    ])


def describe_settings(settings: dict) -> str:
    """The settings a request ran with, in the words of the page's controls."""
    if settings["partition_source"] == "dense":
        partition = "dense"
    elif settings["token_budget"] is not None:
        partition = f"token budget {settings['token_budget']} per window"
    else:
        partition = "policy thresholds " + " / ".join(f"{t:.2f}" for t in settings["policy_thresholds"])
    halting = "halting off"
    if settings["halting"]:
        halting = "exit thresholds " + " / ".join(f"{t:.2f}" for t in settings["exit_thresholds"])
    return f"{partition}; {halting}"


def built_in_examples(folder: Path, camvid: bool = True) -> list[str]:
    """A few generated road scenes (the demo model's training distribution) and, with `camvid` and the CamVid
    folder beside the repository, three of its validation frames; written to `folder`, their paths returned."""
    paths = []
    sys.path[:0] = [str(HERE), str(REPO / "examples")]  # scenes.py: beside app.py in a Space, else examples/
    try:
        from scenes import make_scene
    except ImportError:  # a Space uploaded without scenes.py: uploads and CamVid only
        make_scene = None
    if make_scene is not None:
        for seed in (12345, 7, 2024):
            paths.append(str(folder / f"scene_{seed}.png"))
            make_scene(360, 480, seed=seed)[0].save(paths[-1])
    frames = sorted(CAMVID.glob("data/validation-*.parquet")) if camvid else []
    if frames:
        import io

        import pyarrow.parquet as pq

        for row, cell in enumerate(pq.read_table(frames[0], columns=["image"]).column("image")[:3].to_pylist()):
            paths.append(str(folder / f"camvid_validation_{row}.png"))
            Image.open(io.BytesIO(cell["bytes"])).convert("RGB").save(paths[-1])
    return paths


def build_app(model_name: str, models: Models | None = None, camvid: bool = True) -> gr.Blocks:
    models = models or Models()
    config = models.get(model_name).model.config
    settings = config.settings
    budget = 100 * settings.token_budget / np.prod(config.image_grid_size) if settings.token_budget else 50
    exit_defaults = [*settings.exit_thresholds][:MAX_EXITS] or [0.9]
    examples = built_in_examples(Path(tempfile.mkdtemp(prefix="step-demo-")), camvid)

    with gr.Blocks(title="STEP: adaptive compute") as app:
        gr.Markdown("# STEP: superpatches and early exits\nUpload an image and move the knobs: a higher policy "
                    "threshold keeps more tokens, a token budget fixes their number, a lower exit threshold halts "
                    "more tokens early. Each request runs with its own settings on one shared model.")
        with gr.Row():
            with gr.Column(scale=1):
                image = CheckedImage(type="filepath", image_mode=None, label="image", elem_id="image")
                if examples:
                    gr.Examples(examples, inputs=image, label="examples")
                model = gr.Textbox(model_name, label="model (a folder or a Hub id)", elem_id="model")
            with gr.Column(scale=1):
                partition = gr.Radio(list(PARTITIONS), value="token budget" if settings.token_budget else
                                     ("dense" if settings.partition_source == "dense" else "policy thresholds"),
                                     label="partition", elem_id="partition")
                policy = gr.Slider(0.05, 0.95, value=float(settings.policy_thresholds[0]), step=0.05,
                                   label="policy threshold (higher: more tokens)", elem_id="policy_threshold")
                budget_percent = gr.Slider(5, 100, value=round(budget), step=5, label="token budget (% of dense)",
                                           elem_id="token_budget")
                halting = gr.Checkbox(bool(settings.halting), label="halt confident tokens at the exits",
                                      elem_id="halting")
                exit_sliders = [gr.Slider(0.05, 1.0, step=0.05, value=float(exit_defaults[min(i, len(exit_defaults) - 1)]),
                                          label=f"exit threshold after block {layer}", elem_id=f"exit_threshold_{i}",
                                          visible=i < len(config.exit_layers))
                                for i, layer in enumerate([*config.exit_layers, *[0] * MAX_EXITS][:MAX_EXITS])]
                side = gr.Slider(32, 1024, value=own_shorter_side(models.get(model_name).processor), step=16,
                                 label="shorter side after resizing (pixels; windows of the model's input size "
                                       "beyond it)",
                                 elem_id="shortest_side")
                run = gr.Button("Segment", variant="primary", elem_id="run")
        numbers = gr.Markdown(elem_id="numbers")
        with gr.Row():
            overlay = gr.Image(label="segmentation", elem_id="overlay", format="png", show_label=False)
            superpatches = gr.Image(label="superpatches", elem_id="superpatches", format="png", show_label=False)
            exits = gr.Image(label="halted cells", elem_id="exits", format="png", show_label=False)
        with gr.Accordion("numbers as JSON", open=False):
            numbers_json = gr.JSON(elem_id="numbers_json")

        # The parameters name the API's inputs (gradio_client); one exit threshold per slider (MAX_EXITS of them).
        def request(image, model, partition, policy_threshold, token_budget_percent, halting, shortest_side,
                    exit_threshold_1, exit_threshold_2, exit_threshold_3, exit_threshold_4):
            exit_thresholds = (exit_threshold_1, exit_threshold_2, exit_threshold_3, exit_threshold_4)
            # Typed here, each refused by its control's name: API clients send what they like (NaN, "false").
            controls = Controls(
                partition, control_number(policy_threshold, "policy threshold"),
                control_number(token_budget_percent, "token budget (% of dense)"),
                control_bool(halting, "halting checkbox"),
                tuple(control_number(t, f"exit threshold {i + 1}") for i, t in enumerate(exit_thresholds)),
                int(control_number(shortest_side, "shorter side after resizing")))
            result = segment(models.get(model), read_image(image), controls)
            return result.overlay, result.superpatches, result.exits, numbers_markdown(result.numbers), result.numbers

        def request_if_image(path, *rest):  # controls moved before any image was given: nothing to redo yet
            return [gr.skip()] * len(outputs) if path is None else request(path, *rest)

        def exit_controls(model_name):  # another model: one slider per exit it has
            layers = models.get(model_name).model.config.exit_layers
            return [gr.update(visible=i < len(layers), label=f"exit threshold after block {layers[i]}")
                    if i < len(layers) else gr.update(visible=False) for i in range(MAX_EXITS)]

        inputs = [image, model, partition, policy, budget_percent, halting, side, *exit_sliders]
        outputs = [overlay, superpatches, exits, numbers, numbers_json]
        run.click(request, inputs, outputs, api_name="segment", concurrency_limit=4)
        live = dict(fn=request_if_image, inputs=inputs, outputs=outputs, api_visibility="private",
                    concurrency_limit=4)
        for control in (image, partition, halting):
            control.change(**live)
        for control in (policy, budget_percent, side, *exit_sliders):
            control.release(**live)
        model.submit(exit_controls, model, exit_sliders, api_visibility="private").then(**live)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(),
                        help=f"a saved STEP model folder or Hub id (default: {DEMO_MODEL.relative_to(REPO)} when "
                             f"present, which `bash scripts/demo.sh` writes; else {SPACE_MODEL})")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="the address to serve on (a Space sets GRADIO_SERVER_NAME=0.0.0.0)")
    parser.add_argument("--no_camvid", action="store_true",
                        help="leave CamVid frames out of the examples (for screenshots: the data's licence forbids "
                             "copying its frames)")
    args = parser.parse_args(argv)
    try:
        app = build_app(args.model, camvid=not args.no_camvid)
    except gr.Error as error:
        raise SystemExit(error.message) from None
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
