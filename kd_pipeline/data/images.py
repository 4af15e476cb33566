"""Image decoding and CLIP preprocessing as GeoChat trains: RGB, pad to square, resize, normalise.

Order of operations (GeoChat's ``image_aspect_ratio: pad`` path of LLaVA-1.5):

1. ``open_image``: PIL reads the header only; the pixel count is checked against ``max_pixels`` BEFORE any pixel is
   decoded (decompression bombs), then the image is decoded fully (truncated files fail here).
2. ``to_rgb``: 16-bit grayscale (``I;16*``) and 32-bit integer (``I``) images are scaled linearly from the 16-bit range
   to 8 bit (``value * 255 / 65535``); PIL's own ``convert("RGB")`` clips them at 255, which turns most of a 16-bit
   picture white. Alpha is dropped (what GeoChat's ``Image.open(...).convert("RGB")`` does), palette images go through
   RGBA so PIL honours their transparency entry. No EXIF rotation: GeoChat does not apply one either.
3. ``pad_to_square``: LLaVA's ``expand2square`` with the CLIP mean colour (122, 116, 104), the original centred.
4. ``resize`` to ``image_size`` x ``image_size`` with bicubic resampling. CLIP's processor resizes the shortest edge
   and centre-crops; on a square image that is exactly this plain resize.
5. ``normalize``: scale to [0, 1], subtract the CLIP mean, divide by the CLIP std; channels first, float32 (by a
   lookup table of the 256 levels per channel).

Why not ``CLIPImageProcessor`` itself: per image it converts PIL -> numpy -> PIL -> numpy and validates arguments on
every call; the steps above are the same operations without that overhead (the tests check equality with
``CLIPImageProcessorPil`` on square images, and the benchmark measures the difference).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kd_pipeline.data.pixel_limit import pil_pixel_limit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA: tuple(int(x * 255) for x in image_processor.image_mean)
PAD_COLOUR = tuple(int(channel * 255) for channel in CLIP_MEAN)

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


# (3, 256): the normalised float32 value of every 8-bit level per channel, computed with the same float32
# operations as (level / 255 - mean) / std; looking values up is about 3x faster than the arithmetic per pixel.
_LEVELS = np.arange(256, dtype=np.float32)[None, :] * np.float32(1.0 / 255.0)                      # (1, 256)
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
    image = pad_to_square(to_rgb(open_image(image_bytes, max_pixels=max_pixels)))
    resized = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return normalize(resized)


def blank_image(image_size: int) -> np.ndarray:
    """(3, S, S) float32: a canvas of the padding colour after normalisation (used for padding batches)."""
    return normalize(Image.new("RGB", (image_size, image_size), PAD_COLOUR))
