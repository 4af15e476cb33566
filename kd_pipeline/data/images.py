"""Image decoding and CLIP preprocessing as GeoChat trains: RGB, pad to square, resize, normalise.

This module is the one definition of the preprocessing: the training loader (``data.samples``), ``eval run``
(``eval.generate.load_pixels``) and the exported transformers processor (``image_processor``, written by
``kd_pipeline.export``) all follow it, and the tests hold the three to equality (<= 1e-6; in fact bit-exact).

Order of operations (GeoChat's ``image_aspect_ratio: pad`` path of LLaVA-1.5):

1. ``open_image``: PIL reads the header only; the pixel count is checked against ``max_pixels`` BEFORE any pixel is
   decoded (decompression bombs), then the image is decoded fully (truncated files fail here).
2. ``to_rgb``: 16-bit grayscale (``I;16*``) and 32-bit integer (``I``) images are scaled linearly from the 16-bit range
   to 8 bit (``value * 255 / 65535``); PIL's own ``convert("RGB")`` clips them at 255, which turns most of a 16-bit
   picture white. Alpha is dropped (what GeoChat's ``Image.open(...).convert("RGB")`` does), palette images go through
   RGBA so PIL honours their transparency entry. No EXIF rotation: GeoChat does not apply one either.
3. ``pad_to_square``: LLaVA's ``expand2square`` with the CLIP mean colour (122, 116, 104), the original centred.
4. ``resize`` to ``image_size`` x ``image_size`` with PIL's bicubic resampling (no centre crop: the image is square).
5. ``normalize``: ``level / 255`` (computed in float64, then rounded to float32, as transformers' ``rescale``), minus
   the CLIP mean, divided by the CLIP std, in float32; channels first (by a lookup table of the 256 levels).

transformers' ``LlavaImageProcessor`` with ``do_pad=True`` (pad colour ``int(mean * 255)``, the same rule as
``PAD_COLOUR``), ``size = {height, width}``, bicubic, ``do_center_crop=False`` performs exactly these steps on an RGB
image; ``image_processor`` builds it from the constants below. Two caveats for users of the exported processor:
- transformers' RGB conversion composites transparency onto white (we drop alpha, as GeoChat) and clips 16-bit
  images: give it ``to_rgb(image)`` (or ``image.convert("RGB")``) for such files; ordinary RGB photos are identical;
- with torchvision installed, ``AutoProcessor`` picks transformers' torchvision backend, whose bicubic resize is
  torch's (another kernel, antialiased) and differs from PIL's by up to a few levels: load with ``backend="pil"``.

Why not the processor itself in the loader: per image it converts PIL -> numpy -> PIL -> numpy and validates
arguments on every call; the steps above are the same operations without that overhead (the benchmark measures it).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kd_pipeline.data.pixel_limit import pil_pixel_limit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA's expand2square and transformers' LlavaImageProcessor(do_pad=True): tuple(int(x * 255) for x in image_mean)
PAD_COLOUR = tuple(int(channel * 255) for channel in CLIP_MEAN)
RESAMPLE = Image.Resampling.BICUBIC
RESCALE_FACTOR = 1 / 255

# The formats the shard contract allows (MPO is how PIL names a camera JPEG with an embedded preview).
ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "TIFF", "BMP", "WEBP", "GIF")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is the short code counted in the loader statistics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def open_image(image_bytes: bytes, *, max_pixels: int) -> Image.Image:
    """Decode image bytes after checking the header's pixel count; raises ImageError (never returns a half image)."""
    with pil_pixel_limit(max_pixels):
        try:
            image = Image.open(io.BytesIO(image_bytes), formats=list(ALLOWED_FORMATS))
        except Image.DecompressionBombError as error:
            raise ImageError("too_many_pixels", str(error)) from error
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for data it cannot identify
            raise ImageError("unreadable_image", f"{type(error).__name__}: {error}") from error
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError("too_many_pixels", f"{width}x{height} = {width * height} pixels > limit {max_pixels} "
                                                f"(raise data.max_image_pixels if the image is genuine)")
        try:
            image.load()  # the full decode is what notices truncated or corrupt data
        except Exception as error:  # any decoder failure means the bytes are unusable
            raise ImageError("unreadable_image", f"decoding failed ({type(error).__name__}: {error})") from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit and 32-bit integer grayscale scaled linearly from 0..65535, alpha dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)  # (H, W); 'I' may hold anything int32: clip to 16 bit
        gray = np.rint(np.clip(values, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, colour: tuple[int, int, int] = PAD_COLOUR) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of its longer side filled with ``colour``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# (3, 256): the normalised float32 value of every 8-bit level per channel, computed with transformers' operations
# (``rescale``: level * (1/255) in float64, rounded to float32; ``normalize``: (x - mean) / std in float32), so the
# exported processor's pixels are bit-identical; looking values up is about 3x faster than the arithmetic per pixel.
_LEVELS = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)[None, :]        # (1, 256)
_NORMALIZED_LEVELS = ((_LEVELS - np.asarray(CLIP_MEAN, dtype=np.float32)[:, None])
                      / np.asarray(CLIP_STD, dtype=np.float32)[:, None])                           # (3, 256)


def normalize(image: Image.Image) -> np.ndarray:
    """(S, S) RGB image -> (3, S, S) float32 array with the CLIP mean and std applied."""
    pixels = np.asarray(image)                                          # (S, S, 3) uint8
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)            # (3, S, S)
    for channel in range(3):
        np.take(_NORMALIZED_LEVELS[channel], pixels[..., channel], out=out[channel])
    return out


def preprocess_image(image_bytes: bytes, *, image_size: int, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> (3, image_size, image_size) float32 model input, as GeoChat trains."""
    return preprocess_rgb(to_rgb(open_image(image_bytes, max_pixels=max_pixels)), image_size=image_size)


def preprocess_rgb(image: Image.Image, *, image_size: int) -> np.ndarray:
    """An RGB image -> (3, image_size, image_size) float32: pad to square, resize, normalise (steps 3-5)."""
    resized = pad_to_square(image).resize((image_size, image_size), RESAMPLE)
    return normalize(resized)


def image_processor(image_size: int):
    """transformers' ``LlavaImageProcessor`` (PIL backend) doing steps 3-5 exactly as ``preprocess_rgb`` does."""
    from transformers import LlavaImageProcessorPil

    return LlavaImageProcessorPil(
        do_convert_rgb=True, do_pad=True, do_resize=True, size={"height": image_size, "width": image_size},
        resample=RESAMPLE, do_center_crop=False, do_rescale=True, rescale_factor=RESCALE_FACTOR, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def blank_image(image_size: int) -> np.ndarray:
    """(3, S, S) float32: a canvas of the padding colour after normalisation (used for padding batches)."""
    return normalize(Image.new("RGB", (image_size, image_size), PAD_COLOUR))
