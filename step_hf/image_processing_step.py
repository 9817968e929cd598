"""Image processor for STEP (PIL / NumPy backend, no torchvision).

Shipped as Hub code next to saved weights: imports only numpy, torch, transformers and huggingface_hub.
"""

import base64
import io
import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from huggingface_hub.utils import httpx  # the HTTP client transformers' own `load_image` uses
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
    is_pil_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack

from .image_reading import WIDE_MODES, eight_bit_pixels, rgb_image
from .superpatch import superpatch_targets_from_labels

# How to turn a colour-coded label image into class ids; said wherever one is refused.
COLOUR_LABELS_HINT = (
    "it must be a single-channel map of class ids (PIL mode 'L', 'P' or 'I', or an (H, W) integer array), not a "
    "colour image. Map each colour of a colour-coded map to its class id first, e.g. `ids = np.zeros(rgb.shape[:2], "
    "np.uint8)` then `ids[(rgb == colour).all(-1)] = class_id` for each (colour, class_id) of the palette, or save "
    "the map as a PIL mode 'P' image whose palette indices are the class ids."
)
# Seconds `load_image` waits for a URL to answer (transformers' own `load_image` waits without limit by default).
URL_TIMEOUT_S = 30.0
# The default `max_tokens_per_image`: sixteen times the 4096 tokens of a 1024x1024 image.
MAX_TOKENS_PER_IMAGE = 16 * 4096


class StepImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`): map label 0 to the ignore index and shift the others down by one (ADE20K style).
    window_size (`int` or `dict[str, int]`): side, or `{"height", "width"}`, of the sliding windows that images
        larger than it are cut into after resizing; `None` feeds whole images.
    window_stride (`int` or `dict[str, int]`): step between windows; defaults to two thirds of `window_size`.
    window_merge (`str`): where `post_process_semantic_segmentation` averages overlapping windows: `"cells"` (the
        default: on the patch grid, then one resize to the target size) or `"pixels"` (each window's logits are
        first upsampled to its pixels, then averaged, then resized: the Segmenter authors' and mmsegmentation's
        sliding-window inference, which converted models reproduce).
    num_labels (`int`): when set, label values outside `[0, num_labels)` other than `ignore_index` are refused.
    ignore_index (`int`): the void label (255).
    superpatch_sizes (`list[int]`): the superpatch sizes (set it to the model's `superpatch_sizes`) for which
        `superpatch_targets` are emitted along with `labels`; sizes of 1 are skipped, `[]` emits none.
    max_tokens_per_image (`int`): the most patch tokens one model input (an image after resizing, or a window) may
        have, `(height / 16) * (width / 16)`; larger inputs are refused with the fix (windows, resizing) before any
        work, since attention over them costs the square of their tokens. `None` (per call) sets no limit.
    """

    do_reduce_labels: bool
    window_size: int | dict[str, int] | None
    window_stride: int | dict[str, int] | None
    window_merge: str
    num_labels: int | None
    ignore_index: int
    superpatch_sizes: list[int] | None
    max_tokens_per_image: int | None


def _pair(value: int | dict[str, int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return value["height"], value["width"]
    raise ValueError(f"`{name}` must be an int or a dict with 'height' and 'width', got {value!r}.")


def load_image(image: "str | PIL.Image.Image", timeout: float | None = URL_TIMEOUT_S) -> "PIL.Image.Image":
    """
    An image given as a URL, a local path, a base64 string (or `data:image/...` URI) or a PIL image, as an upright
    (by its EXIF orientation) 8-bit RGB PIL image, read by `image_reading.rgb_image`: 16-bit and float images are
    scaled, not clipped, as the processor scales them, and transparency is composited onto white. Every failure
    names the input: a URL is fetched with the HTTP client `transformers` uses, and a server that refuses the
    connection, does not answer within `timeout` seconds (`None`: no limit), answers with an HTTP error (a 404
    page), or answers with something that is not an image is said so, with the URL and the status; all of these
    raise `OSError` (`ConnectionError`, `TimeoutError`).
    """
    if isinstance(image, PIL.Image.Image):
        return rgb_image(image)
    if not isinstance(image, str):
        raise TypeError(f"`load_image` takes a URL, a path, a base64 string or a PIL image, got {type(image).__name__}.")
    if image.startswith(("http://", "https://")):
        url = image
        try:
            response = httpx.get(url, timeout=timeout, follow_redirects=True)
        except httpx.TimeoutException:
            raise TimeoutError(
                f"Cannot load the image at {url}: no answer within {timeout} s. Check the URL, or pass a longer "
                "`timeout`."
            ) from None
        except httpx.HTTPError as error:  # refused, unknown host, TLS, a broken connection
            raise ConnectionError(f"Cannot load the image at {url}: {type(error).__name__}: {error}") from None
        if not response.is_success:
            raise OSError(
                f"Cannot load the image at {url}: the server answered {response.status_code} "
                f"{response.reason_phrase}, not an image."
            )
        try:
            return rgb_image(decoded(io.BytesIO(response.content)), url)
        except OSError:  # PIL's message names neither the URL nor what came back
            content_type = response.headers.get("content-type", "no content type")
            raise OSError(
                f"Cannot load the image at {url}: the server answered {response.status_code} with "
                f"{len(response.content)} bytes of {content_type}, which PIL cannot read as an image."
            ) from None
    if os.path.isfile(image):
        try:
            return rgb_image(decoded(image), image)
        except OSError as error:  # a local file that is not a whole image: PIL does not always name it
            raise OSError(f"Cannot read {image} as an image: {error}") from None
    try:  # neither a URL nor a file: a base64 string, as `transformers.image_utils.load_image` takes one
        data = base64.b64decode(image.split(",", 1)[1] if image.startswith("data:image/") else image, validate=True)
        return rgb_image(decoded(io.BytesIO(data)), "The base64 image")
    except (OSError, ValueError):
        shown = image if len(image) <= 100 else f"{image[:100]}..."
        raise ValueError(
            f"Cannot load {shown!r}: it is neither a URL (http:// or https://), an existing file, nor a base64 "
            "encoded image."
        ) from None


def decoded(source) -> "PIL.Image.Image":
    """The image in `source` (a path or a file object), decoded now: a truncated file fails here, as an `OSError`."""
    image = PIL.Image.open(source)
    image.load()
    return image


def check_processor_fields(fields: dict) -> None:
    """Refuse processor settings that cannot give correct pixels, naming the field: at construction (so at
    `from_pretrained`) and for the resolved settings of every call."""
    for name in ("image_mean", "image_std"):
        value = fields.get(name)
        if value is None:
            continue
        try:
            values = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.ndim > 1 or values.size == 0:  # the channels are checked per image
            raise ValueError(f"`{name}` must be one number or one per channel (three for RGB), got {value!r}.")
        values = values.reshape(-1)
        if not np.isfinite(values).all():
            raise ValueError(f"`{name}` {values.tolist()} holds NaN or infinity; it must hold finite numbers.")
        if name == "image_std" and (values <= 0).any():
            raise ValueError(
                f"`image_std` {values.tolist()} holds {values[values <= 0][0]:g}: normalisation divides by it, which "
                "gives infinite or sign-flipped pixel values. Use the training images' per-channel standard "
                "deviations (ImageNet's [0.229, 0.224, 0.225], or [0.5, 0.5, 0.5])."
            )
    rescale_factor = fields.get("rescale_factor")
    if rescale_factor is not None and not (math.isfinite(rescale_factor) and rescale_factor > 0):
        raise ValueError(f"`rescale_factor` must be a positive finite number (1/255 for 8-bit images), got "
                         f"{rescale_factor}.")
    divisor = fields.get("size_divisor") or 16
    size = fields.get("size")
    if size is not None:
        size = dict(size)
        if size.get("height") is not None and size.get("width") is not None:
            if min(size["height"], size["width"]) < divisor or size["height"] % divisor or size["width"] % divisor:
                raise ValueError(f"`size` {size['height']}x{size['width']} is not a multiple of {divisor} (both sides "
                                 "positive): the model needs multiples of its patch size.")
        elif not (isinstance(size.get("shortest_edge"), int) and size["shortest_edge"] > 0):
            raise ValueError(f"`size` must have 'height' and 'width' or a positive 'shortest_edge', got {size}.")
    for name in ("window_size", "window_stride"):
        pair = _pair(fields.get(name), name)
        if pair is not None and min(pair) <= 0:
            raise ValueError(f"`{name}` must be positive, got {fields[name]!r}.")
        if name == "window_size" and pair is not None and (pair[0] % divisor or pair[1] % divisor):
            raise ValueError(f"`window_size` must be a multiple of {divisor}, got {fields[name]!r}.")
    if fields.get("window_merge", "cells") not in ("cells", "pixels"):
        raise ValueError(f"`window_merge` must be 'cells' or 'pixels', got {fields['window_merge']!r}.")
    for name in ("num_labels", "max_tokens_per_image"):
        value = fields.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")


def reduce_labels(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K-style label reduction: 0 (void) becomes `ignore_index`, every other id moves down by one, and
    `ignore_index` stays void."""
    labels = np.asarray(labels).astype(np.int64)
    return np.where((labels == 0) | (labels == ignore_index), ignore_index, labels - 1)


def flat_images(images) -> list:
    """One image or a (nested) list of images, or a 4-D batch array, as a flat list (URLs and paths pass as they
    are)."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flat_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def eight_bit_image(image, index: int, do_rescale: bool, do_convert_rgb: bool = True):
    """
    Bring one image to the processor's 8-bit range by `image_reading`'s rules (see `StepImageProcessor`): PIL
    images become RGB as `load_image` makes them (when `do_convert_rgb`), arrays and tensors 8-bit arrays (floats
    as they are without `do_rescale`). Everything else is returned as it is.
    """
    if is_pil_image(image):
        if do_convert_rgb and (do_rescale or image.mode != "F"):
            return rgb_image(image, f"Image {index}", upright=False)  # the one reading every entry point shares
        if image.mode not in WIDE_MODES:
            return image
        what, image = f"a PIL mode {image.mode!r} image", np.asarray(image)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        what = f"a tensor of {image.dtype}"
        image = (image.float() if image.dtype in (torch.float16, torch.bfloat16) else image).numpy()
    elif isinstance(image, np.ndarray):
        what = f"an array of {image.dtype}"
    else:
        return image
    return eight_bit_pixels(image, f"Image {index} is {what}", do_rescale)


def flat_label_maps(segmentation_maps, num_images: int) -> list:
    """Segmentation maps as a flat list, refusing colour maps: a 3-D array is a stack of maps, unless its last
    dimension looks like colour channels and it is not one map per image."""
    if isinstance(segmentation_maps, (list, tuple)):
        maps = list(segmentation_maps)
    elif isinstance(segmentation_maps, (np.ndarray, torch.Tensor)) and segmentation_maps.ndim == 3:
        colour = segmentation_maps.shape[-1] in (3, 4) and segmentation_maps.shape[0] != num_images
        maps = [segmentation_maps] if colour else list(segmentation_maps)
    else:
        maps = [segmentation_maps]
    for index, label_map in enumerate(maps):
        if is_pil_image(label_map):
            channels, what = len(label_map.getbands()), f"PIL mode {label_map.mode!r}"
        elif isinstance(label_map, (np.ndarray, torch.Tensor)) and label_map.ndim == 3:
            channels, what = label_map.shape[-1], f"of shape {tuple(label_map.shape)}"
        else:
            continue
        if channels in (3, 4) or (is_pil_image(label_map) and channels > 1):
            raise ValueError(f"Segmentation map {index} is a colour image ({what}): {COLOUR_LABELS_HINT}")
    return maps


@dataclass(frozen=True)
class InputSizing:
    """How one image is sized for the model (`input_sizing`): resized to `resized` (height, width), then fed whole
    (`window` is None) or cut into windows of `window`; `overrides` are the processor-call arguments that give this
    sizing (`{}`: the processor's own)."""

    resized: tuple[int, int]
    window: tuple[int, int] | None
    overrides: dict

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of each model input: the window, or the whole resized image."""
        return self.window or self.resized


def input_sizing(processor: "StepImageProcessor", height: int, width: int,
                 shortest_edge: int | None = None) -> InputSizing:
    """
    The one rule by which every tool (pipeline, examples/segment.py, the demo app, evaluation, export) sizes an image
    of `height` x `width` pixels for a STEP model: the processor's own `size` decides, as for any `transformers` image
    processor (`{"height", "width"}`: exactly that; `{"shortest_edge": n}`: the shorter side to n, the aspect ratio
    kept, each side rounded to a multiple of the patch size), and its own `window_size`, if it has one, cuts the
    resized image into windows. `shortest_edge` asks for another resolution: the shorter side is resized to it, and
    when that is larger than the processor's own input the image is cut into windows of the processor's own input
    size (its `size`, or its shortest edge squared), so that the model still sees inputs of the size it was trained
    on; the processor's own shorter side (or `None`) keeps the processor's own sizing.
    """
    size = SizeDict(**dict(processor.size))  # a SizeDict, or a plain dict set on the processor since
    own_window = _pair(processor.window_size, "window_size")
    own_input = (size.height, size.width) if size.height and size.width else (size.shortest_edge,) * 2
    if shortest_edge is None or shortest_edge == min(own_input):
        return InputSizing(processor.output_size(height, width, size), own_window, {})
    divisor = processor.size_divisor
    if shortest_edge % divisor or shortest_edge < divisor:
        raise ValueError(f"The shorter side must be a positive multiple of {divisor} pixels (the patch size), got "
                         f"{shortest_edge}.")
    overrides: dict = {"size": {"shortest_edge": shortest_edge}}
    window = own_window
    if window is None and shortest_edge > min(own_input):
        window = own_input
        overrides.update(window_size={"height": window[0], "width": window[1]},
                         window_stride={"height": window[0], "width": window[1]})
    return InputSizing(processor.output_size(height, width, SizeDict(shortest_edge=shortest_edge)), window, overrides)


def window_starts(length: int, window: int, stride: int, step: int) -> list[int]:
    """Start offsets of windows of `window` pixels covering `length` pixels, every start a multiple of `step`,
    the last window ending exactly at `length` (which must be a multiple of `step` when windows are needed)."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    starts = [min(i * stride, length - window) // step * step for i in range(count)]
    return sorted(set(starts))


class StepImageProcessor(PilBackend):
    r"""
    Prepares images (and optionally segmentation maps) for [`StepForSemanticSegmentation`].

    Images are converted to RGB (greyscale, RGBA and palette images included; transparency composited onto white,
    as `load_image` does: both read PIL images with `image_reading.rgb_image`), resized, rescaled to [0, 1] and
    normalised. With `size={"height", "width"}` both sides are set exactly; with `size={"shortest_edge": n}` the
    aspect ratio is kept and each side rounded to a multiple of `size_divisor` (the patch size), since the model
    accepts any height and width that are multiples of 16. With `window_size`, each resized image larger than the
    window is cut into overlapping windows (padded where smaller), and `post_process_semantic_segmentation` stitches
    the windows' logits back together by averaging where they overlap. A model input (a resized image or a window)
    with more than `max_tokens_per_image` patch tokens is refused before any work, with the fixes. URLs and paths
    load with `load_image` (upright by EXIF orientation; errors name the URL and the HTTP status).

    Every image is first brought to 8 bits: 16-bit greyscale (PIL modes 'I;16', 'I;16B', 'I;16L', uint16 arrays) is
    divided by 257; other integer images (PIL mode 'I', int arrays) must hold 0..255 and are refused otherwise; bool
    arrays are 0 or 255. Float images (arrays, tensors, PIL mode 'F') follow `do_rescale`: with it (the default),
    values in [0, 1] are taken as already rescaled (torchvision's `ToTensor` convention) and not divided by 255 again
    (a note is logged once), other values must lie in 0..255, NaN and infinity are refused; with `do_rescale=False`
    float images are used as they are.

    Segmentation maps hold one class id per pixel (single channel: colour maps are refused; floats only when every
    value is a whole number; no negative values but the ignore index). They are resized with nearest-neighbour,
    returned as int64 `labels`; 255 (`ignore_index`) is void. With them come `superpatch_targets`, uint8 `(batch,
    len(sizes), height / 16, width / 16)` for the sizes above 1 in `superpatch_sizes`: each cell holds the target of
    the aligned block of that size containing it, 1 when the block holds a single label (all-void counts as
    uniform), 0 when it holds several, 255 when it must not be supervised (one class mixed with void, or a block
    that does not fit inside the image). They train the dCTS policy and give the oracle partition; the same resize
    and windows apply to images, labels and targets.
    """

    valid_kwargs = StepImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 512, "width": 512}
    size_divisor = 16
    default_to_square = True
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_reduce_labels = False
    window_size = None
    window_stride = None
    window_merge = "cells"
    num_labels = None
    ignore_index = 255
    superpatch_sizes = [2, 4, 8, 16]
    max_tokens_per_image = MAX_TOKENS_PER_IMAGE

    def __init__(self, **kwargs: Unpack[StepImageProcessorKwargs]):
        super().__init__(**kwargs)
        check_processor_fields({name: getattr(self, name, None) for name in self.valid_kwargs.__annotations__})

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        super()._validate_preprocess_kwargs(**kwargs)
        check_processor_fields(kwargs)  # the settings of this call: attributes changed since, or overrides

    def fetch_images(self, image_url_or_urls):
        """As `transformers`' `fetch_images`, but URLs and paths load with `load_image`, whose errors name the
        input (and a URL that never answers fails after `URL_TIMEOUT_S` seconds)."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return load_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[StepImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        images (`ImageInput`): one image or a list (PIL, NumPy or torch).
        segmentation_maps (`ImageInput`, *optional*): one single-channel class-id map per image.

        Returns a `BatchFeature` with `pixel_values`, `labels` and `superpatch_targets` when maps are given, and
        `window_offsets`
        `(num_windows, 5)` = (image index, top, left, resized height, resized width) when windows are used.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def output_size(self, height: int, width: int, size: SizeDict) -> tuple[int, int]:
        """The resized (height, width) of an image: exact, or aspect-preserving rounded to `size_divisor`."""
        divisor = self.size_divisor
        if size.height and size.width:
            if size.height % divisor or size.width % divisor:
                raise ValueError(
                    f"`size` {size.height}x{size.width} is not a multiple of {divisor}; the model needs multiples "
                    f"of its patch size."
                )
            return size.height, size.width
        if size.shortest_edge:
            scale = size.shortest_edge / min(height, width)
            return tuple(max(divisor, round(side * scale / divisor) * divisor) for side in (height, width))
        raise ValueError(f"`size` must have 'height' and 'width' or 'shortest_edge', got {dict(size)}.")

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        do_rescale = kwargs["do_rescale"]
        images = [eight_bit_image(image, index, do_rescale, do_convert_rgb)
                  for index, image in enumerate(flat_images(images))]
        if not images:
            raise ValueError("`images` is empty: pass at least one image.")
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format
        )
        label_maps = None
        if segmentation_maps is not None:
            label_maps = self._prepare_image_like_inputs(
                images=flat_label_maps(segmentation_maps, len(images)),
                expected_ndims=2,
                do_convert_rgb=False,
                input_data_format=ChannelDimension.FIRST,
            )
            if len(label_maps) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(label_maps)} segmentation maps.")

        pixel_values, labels, window_offsets = [], [], []
        for index, image in enumerate(images):
            channels = image.shape[0]  # any number: a model's `num_channels` need not be 3
            for name in ("image_mean", "image_std"):
                count = np.size(kwargs[name])  # one number serves every channel
                if kwargs["do_normalize"] and count not in (1, channels):
                    raise ValueError(
                        f"Image {index} has {channels} channels but `{name}` has {count} values; pass "
                        "RGB images (keep `do_convert_rgb=True`), or one mean and std per channel."
                    )
            self._check_token_count(index, image, **kwargs)
            label = None if label_maps is None else self._prepare_label(label_maps[index], index, image, **kwargs)
            image = self._prepare_pixels(image, **kwargs)
            if kwargs["window_size"] is None:
                pixel_values.append(image)
                labels.append(label)
                continue
            for top, left, window_image, window_label in self._split_windows(image, label, **kwargs):
                pixel_values.append(window_image)
                labels.append(window_label)
                window_offsets.append([index, top, left, image.shape[1], image.shape[2]])

        data = {"pixel_values": pixel_values}
        if label_maps is not None:
            data["labels"] = labels
            sizes = [size for size in kwargs["superpatch_sizes"] or [] if size > 1]
            if sizes:
                data["superpatch_targets"] = [
                    superpatch_targets_from_labels(
                        torch.from_numpy(label), sizes, self.size_divisor, kwargs["ignore_index"]
                    ).numpy()
                    for label in labels
                ]
        if window_offsets:
            data["window_offsets"] = np.array(window_offsets, dtype=np.int64)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_token_count(self, index: int, image: np.ndarray, do_resize, size, window_size, max_tokens_per_image,
                           **kwargs) -> None:
        """Refuse, before any work, a model input (the resized image, or a window of it) with more patch tokens than
        `max_tokens_per_image`: attention over it costs the square of its tokens, so it would not finish."""
        if max_tokens_per_image is None:
            return
        height, width = self.output_size(*image.shape[1:], size) if do_resize else image.shape[1:]
        input_height, input_width = _pair(window_size, "window_size") or (height, width)
        tokens = (input_height // self.size_divisor) * (input_width // self.size_divisor)
        if tokens <= max_tokens_per_image:
            return
        reference = 1024 * 1024 // self.size_divisor**2  # the tokens of a 1024x1024 image
        resized = f"{height}x{width} after resizing" if do_resize else "not resized (do_resize=False)"
        windows = "smaller windows" if window_size is not None else "windows"
        raise ValueError(
            f"Image {index} is {image.shape[1]}x{image.shape[2]} pixels, {resized}: "
            f"{'each of its windows' if window_size is not None else 'it'} would be a model input of "
            f"{input_height}x{input_width} pixels = {tokens} tokens ({self.size_divisor}x{self.size_divisor} "
            f"patches), {tokens / reference:.1f}x the tokens of a 1024x1024 image and {(tokens / reference) ** 2:,.0f}x"
            f" its attention cost, above `max_tokens_per_image` ({max_tokens_per_image}). Cut it into {windows} "
            "(`window_size=1024`; `post_process_semantic_segmentation` stitches them back), resize it "
            "(`do_resize=True` with e.g. `size={'shortest_edge': 1024}`), or raise `max_tokens_per_image`."
        )

    def _prepare_pixels(self, image: np.ndarray, do_resize, size, resample, do_rescale, rescale_factor,
                        do_normalize, image_mean, image_std, **kwargs) -> np.ndarray:
        if do_resize:
            height, width = self.output_size(image.shape[1], image.shape[2], size)
            image = self.resize(image, SizeDict(height=height, width=width), resample)
        elif image.shape[1] % self.size_divisor or image.shape[2] % self.size_divisor:
            raise ValueError(
                f"Image of {image.shape[1]}x{image.shape[2]} pixels is not a multiple of {self.size_divisor} and "
                "`do_resize=False`; resize it or enable `do_resize`."
            )
        # Rescale and normalise in place in float32 (channels first): the generic helpers go through float64 and
        # transposed copies, a large share of a training sample's preprocessing time.
        pixels = image.astype(np.float32)
        if do_rescale:
            pixels *= np.float32(rescale_factor)
        if do_normalize:
            pixels -= np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)  # one value or one per channel
            pixels /= np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
        return pixels

    def _prepare_label(self, label: np.ndarray, index: int, image: np.ndarray, do_resize, size, do_reduce_labels,
                       num_labels, ignore_index, **kwargs) -> np.ndarray:
        if label.shape[0] != 1:
            raise ValueError(f"Segmentation map {index} has {label.shape[0]} channels; {COLOUR_LABELS_HINT}")
        if label.dtype.kind == "f":
            fractional = label != np.round(label)  # NaN too
            if fractional.any():
                raise ValueError(
                    f"Segmentation map {index} holds the value {label[fractional][0]}, which is not a whole number: "
                    "labels are integer class ids. Resize label maps with nearest-neighbour interpolation (never "
                    "bilinear) and pass them as integers."
                )
        negative = (label < 0) & (label != ignore_index)
        if negative.any():
            raise ValueError(
                f"Segmentation map {index} holds the negative value {label[negative][0]}; class ids are >= 0 and "
                f"void is the ignore index {ignore_index}."
            )
        if label.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"Segmentation map {index} is {label.shape[1]}x{label.shape[2]} but its image is "
                f"{image.shape[1]}x{image.shape[2]}; they must have the same size."
            )
        label = reduce_labels(label, ignore_index) if do_reduce_labels else label.astype(np.int64)
        if num_labels is not None:
            invalid = (label != ignore_index) & ((label < 0) | (label >= num_labels))
            if invalid.any():
                raise ValueError(
                    f"Segmentation map {index} holds the label value {int(label[invalid][0])}, which is not a class "
                    f"id in [0, {num_labels}) nor the ignore index {ignore_index}; map it to a class or to "
                    f"{ignore_index} (or set `do_reduce_labels` if 0 means void)."
                )
        if do_resize:
            height, width = self.output_size(image.shape[1], image.shape[2], size)
            label = self.resize(
                label.astype(np.int32), SizeDict(height=height, width=width), PILImageResampling.NEAREST
            )
        return label[0].astype(np.int64)

    def _split_windows(self, image: np.ndarray, label: np.ndarray | None, window_size, window_stride, ignore_index,
                       **kwargs):
        """Yield `(top, left, window_image, window_label)`; windows beyond a small image's edge are padded
        (0 for pixels, the ignore index for labels)."""
        window_height, window_width = _pair(window_size, "window_size")
        stride = _pair(window_stride, "window_stride") or (window_height * 2 // 3, window_width * 2 // 3)
        height, width = image.shape[1:]
        pad = ((0, max(0, window_height - height)), (0, max(0, window_width - width)))
        image = np.pad(image, ((0, 0), *pad))
        if label is not None:
            label = np.pad(label, pad, constant_values=ignore_index)
        for top in window_starts(height, window_height, max(1, stride[0]), self.size_divisor):
            for left in window_starts(width, window_width, max(1, stride[1]), self.size_divisor):
                rows, cols = slice(top, top + window_height), slice(left, left + window_width)
                yield top, left, image[:, rows, cols], None if label is None else label[rows, cols]

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | None = None, return_segmentation_scores: bool = False
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Turn model outputs into one class-id map per image.

        Args:
            outputs: a [`StepSemanticSegmenterOutput`] (its `logits`, and `window_offsets` when the processor cut
                the images into windows).
            target_sizes (`list[tuple[int, int]]`, *optional*): (height, width) of each original image. The logits
                are bilinearly resized to it; without it the maps stay on the patch grid (for windows: the grid of
                the resized image).
            return_segmentation_scores (`bool`, *optional*, defaults to `False`): also return the per-pixel scores
                the maps are the argmax of: the model's `logits` (log-probabilities when the model ran with
                halting), stitched and resized like the maps.

        Returns:
            `list[torch.Tensor]`: one `(height, width)` int64 map of class ids per image; with
            `return_segmentation_scores=True`, one `SemanticSegmentationPostProcessorOutput` per image instead, with
            `segmentation` (that map) and `segmentation_scores` `(num_labels, height, width)`.
        """
        scores = self.semantic_logits(outputs, target_sizes)
        maps = [image_scores.argmax(dim=0) for image_scores in scores]
        if not return_segmentation_scores:
            return maps
        return [
            SemanticSegmentationPostProcessorOutput(data={"segmentation": image_map, "segmentation_scores": image_scores})
            for image_map, image_scores in zip(maps, scores)
        ]

    def semantic_logits(self, outputs, target_sizes: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """The per-image class logits `post_process_semantic_segmentation` takes the argmax of: windows stitched
        (`window_merge`), then bilinearly resized to `target_sizes` when given."""
        if self.window_merge not in ("cells", "pixels"):
            raise ValueError(f"`window_merge` must be 'cells' or 'pixels', got {self.window_merge!r}.")
        logits, offsets = outputs.logits, outputs.get("window_offsets")
        if self.window_merge == "pixels":  # a window's pixels are its cells upsampled, as the original code does
            cell = self.size_divisor
            logits = F.interpolate(logits, scale_factor=cell, mode="bilinear", align_corners=False)
            logits = self.stitch_windows(logits, offsets, cell=1)
        else:
            logits = self.stitch_windows(logits, offsets)
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for {len(logits)} images.")
        if target_sizes is None:
            return logits
        return [
            F.interpolate(image_logits[None], size=tuple(int(side) for side in size), mode="bilinear",
                          align_corners=False)[0]
            for image_logits, size in zip(logits, target_sizes)
        ]

    def stitch_windows(
        self, logits: torch.Tensor, window_offsets: torch.Tensor | None, cell: int | None = None
    ) -> list[torch.Tensor]:
        """Per-image logits on the patch grid: the windows' logits averaged where windows overlap (cells are
        `cell` pixels, `size_divisor` by default, and window offsets are multiples of it; 1 stitches pixels)."""
        if window_offsets is None:
            return list(logits)
        cell = cell or self.size_divisor
        offsets = torch.as_tensor(window_offsets).tolist()
        num_images = max(row[0] for row in offsets) + 1
        sizes = {row[0]: (row[3] // cell, row[4] // cell) for row in offsets}
        sums = [logits.new_zeros(logits.shape[1], *sizes[i]) for i in range(num_images)]
        counts = [logits.new_zeros(1, *sizes[i]) for i in range(num_images)]
        for window, (image, top, left, height, width) in enumerate(offsets):
            rows = min(logits.shape[2], height // cell - top // cell)
            cols = min(logits.shape[3], width // cell - left // cell)
            region = (slice(None), slice(top // cell, top // cell + rows), slice(left // cell, left // cell + cols))
            sums[image][region] += logits[window, :, :rows, :cols]
            counts[image][region] += 1
        return [total / count for total, count in zip(sums, counts)]


__all__ = ["InputSizing", "StepImageProcessor", "input_sizing", "load_image", "reduce_labels"]
