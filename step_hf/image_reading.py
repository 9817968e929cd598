"""How every entry point turns an image into 8-bit pixels: the image processor, `load_image` (so the pipeline and
`examples/segment.py`), the demo app and the torch-free `examples/onnx_segment.py`.

Imports only numpy and PIL (no torch, no transformers): `examples/onnx_segment.py` loads this file where torch is
absent, and it is shipped as Hub code beside the image processor.

The rules: 16-bit greyscale (PIL modes 'I;16', 'I;16B', 'I;16L', uint16 arrays) is divided by 257; other integer
images (PIL mode 'I', int arrays) must hold 0..255; bool is 0 or 255; floats (PIL mode 'F', float arrays) in [0, 1]
are taken as already rescaled and multiplied by 255, other floats must hold 0..255. Transparency (an alpha band, or
a palette or colour marked transparent) is composited onto white, as `transformers` converts images to RGB.
"""

import functools
import logging

import numpy as np
import PIL.Image
import PIL.ImageOps

logger = logging.getLogger(__name__)

# PIL modes whose values `Image.convert` would clip at 255 instead of scaling (16-bit and 32-bit greyscale, float).
WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


@functools.cache
def note_float_rescale() -> None:
    """Said once per process: floats in [0, 1] are not divided by 255 again."""
    logger.warning(
        "Float images with values in [0, 1] are taken as already rescaled (not divided by 255 again); pass them as "
        "uint8 or 0..255 floats if they are dark 0..255 images."
    )


def eight_bit_pixels(pixels: np.ndarray, subject: str, do_rescale: bool = True) -> np.ndarray:
    """
    `pixels` brought to 8 bits by the module's rules; `subject` says what they are for messages (e.g. "Image 2 is
    an array of int32"). With `do_rescale=False` float pixels are returned as they are. Greyscale `(H, W)` becomes
    `(H, W, 3)`; images whose channels are neither 1, 3 nor 4 (first or last) are refused.
    """
    if pixels.dtype.kind == "b":
        pixels = pixels.astype(np.uint8) * 255  # as PIL mode '1': True is white
    elif pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:
        pixels = np.rint(pixels / 257).astype(np.uint8)  # 16 bits to 8: 65535 / 257 = 255 exactly
    elif pixels.dtype.kind in "iu" and pixels.dtype != np.uint8:
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{subject} with values in [{low}, {high}]; integer images must hold 8-bit values (0..255), or be "
                "uint16 for 16-bit data (divided by 257). Convert it: `np.asarray(image).astype(np.uint16)` for "
                "16-bit data, or scale it to 0..255 as uint8."
            )
        pixels = pixels.astype(np.uint8)
    elif pixels.dtype.kind == "f" and do_rescale:
        if not np.isfinite(pixels).all():
            raise ValueError(f"{subject} holding NaN or infinite values; replace them first.")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{subject} with values in [{low:g}, {high:g}]; float images must hold [0, 1] (already rescaled) or "
                "0..255. Scale it to one of these, or pass `do_rescale=False` (and your own normalisation) to feed "
                "it as it is."
            )
        if high <= 1:
            note_float_rescale()
            pixels = pixels * 255
        pixels = np.rint(pixels).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)  # greyscale to RGB, as PIL mode 'L' is converted
    if pixels.ndim == 3 and pixels.shape[0] not in (1, 3, 4) and pixels.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{subject} of shape {pixels.shape}: images need 1 (greyscale), 3 (RGB) or 4 (RGBA) channels, first or "
            "last (for greyscale with alpha, drop the alpha: `image[..., 0]`)."
        )
    return pixels


def rgb_image(image: PIL.Image.Image, name: str = "The image", upright: bool = True) -> PIL.Image.Image:
    """
    `image` as an 8-bit RGB PIL image by the module's rules, whatever its mode (16-bit, float, palette, with alpha,
    CMYK, ...); with `upright`, first turned by its EXIF orientation (as a phone's photo was taken). `name` names
    it in messages (a file name, "Image 0").
    """
    if upright:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in WIDE_MODES:
        pixels = eight_bit_pixels(np.asarray(image), f"{name} is a PIL mode {image.mode!r} image")
        return PIL.Image.fromarray(pixels)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, image.convert("RGBA"))
    elif image.mode == "RGB":
        return image
    image = image.convert("RGB")
    image.info.pop("transparency", None)  # a transparent colour carried over would be made white again later
    return image


__all__ = ["WIDE_MODES", "eight_bit_pixels", "rgb_image"]
