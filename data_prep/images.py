"""Image checks shared by the shard, pt and bench converters.

An image is accepted when PIL recognises one of the formats the shard contract allows (PNG, JPEG, TIFF, BMP, WebP,
GIF), its header reports at most ``max_pixels`` pixels, and its data is complete and well formed. The pixel limit is
checked from the header BEFORE anything else, so a decompression bomb is rejected without allocating its pixels.
JPEG and PNG, nearly all of GeoChat's images, are checked without a full-resolution decode (``image_integrity``: a
marker walk to EOI plus libjpeg on the headers; chunk CRCs plus the inflated data's size), catching the files a full
decode rejects (truncated, corrupt, unrecognised, unreadable modes: tests/data_prep/test_image_integrity.py) at
about a tenth of its CPU time (0.36 vs 4.1 ms per 512-px JPEG on this project's machine); the rarer TIFF, BMP, WebP
and GIF are fully decoded as before. Bytes are never modified: callers keep writing the exact bytes that were
checked (``inspect_image_bytes`` works on those bytes, not on a second read of the file).

Grayscale, RGBA, palette and 16-bit images are accepted as they are; conversion to RGB happens in the training
loader, not here. ``width`` and ``height`` are the stored size (before any EXIF orientation), as GeoChat's own
``Image.open`` sees them.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image

from data_prep.image_integrity import IntegrityError, JpegPlan, check_png, decode_jpeg, plan_jpeg_check
from kd_pipeline.data.pixel_limit import pil_pixel_limit

# PIL raises DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS (2 x 89,478,485); the same number is our default.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# PIL format name -> file extension of the shard contract. MPO is how PIL names JPEGs written by cameras that embed
# a second (preview) picture: the bytes are a valid JPEG.
FORMAT_EXTENSIONS = {
    "PNG": "png",
    "JPEG": "jpg",
    "MPO": "jpg",
    "TIFF": "tif",
    "BMP": "bmp",
    "WEBP": "webp",
    "GIF": "gif",
}
SUPPORTED_EXTENSIONS = tuple(sorted(set(FORMAT_EXTENSIONS.values())))
# Openers handed to Image.open: MPO has no opener of its own, PIL's JPEG opener returns MPO images itself.
_OPENERS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")

# How every JPEG starts (SOI and the first marker's FF), PIL's own test for the format.
_JPEG_START = b"\xff\xd8\xff"

# Extensions a file of an accepted format may carry on disk (used to find a file whose name lost its extension).
DISK_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp", "gif")


@dataclass(frozen=True)
class ImageInfo:
    """What the shard JSON records about an accepted image."""

    ext: str
    width: int
    height: int


class ImageRejected(Exception):
    """An image failed a check; ``reason`` is the reject code written to rejects.jsonl."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _describe(error: Exception) -> str:
    """Error text without object addresses, so that rejects.jsonl is the same in every run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(error).__name__}: {error}")


def inspect_image_bytes(image_bytes: bytes, max_pixels: int, name: str = "image") -> ImageInfo:
    """Check one image held in memory and return its contract extension and size.

    Raises ImageRejected with reason ``too_many_pixels`` (header size above ``max_pixels``) or
    ``unreadable_image`` (unknown or unsupported format, corrupt or truncated data).
    """
    to_open, damage, jpeg_plan = image_bytes, None, None
    if image_bytes.startswith(_JPEG_START):
        try:
            jpeg_plan = plan_jpeg_check(image_bytes)
            to_open = jpeg_plan.header_bytes  # PIL parses only the headers anyway
        except IntegrityError as error:
            damage = error  # reported after the header's pixel count, as the decode failure was before
    with pil_pixel_limit(max_pixels):
        try:
            # formats= keeps PIL's rarer (and less hardened) plugins away from untrusted bytes.
            image = Image.open(io.BytesIO(to_open), formats=_OPENERS)
        except Image.DecompressionBombError as error:
            raise ImageRejected("too_many_pixels", f"{name}: {_describe(error)}") from error
        except Image.UnidentifiedImageError as error:
            raise ImageRejected(
                "unreadable_image", f"{name}: not a {'/'.join(SUPPORTED_EXTENSIONS)} image (format not recognised)"
            ) from error
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad data
            raise ImageRejected("unreadable_image", f"{name}: header cannot be read ({_describe(error)})") from error
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "too_many_pixels", f"{name}: {width}x{height} = {width * height} pixels > limit {max_pixels}"
                )
            try:
                if damage is not None:
                    raise damage
                _check_data(image, image_bytes, jpeg_plan)
            except IntegrityError as error:
                raise ImageRejected("unreadable_image", f"{name}: damaged data ({error})") from error
            except Exception as error:  # same reason as above: any decoder failure means unreadable
                raise ImageRejected("unreadable_image", f"{name}: decoding failed ({_describe(error)})") from error
            return ImageInfo(ext=FORMAT_EXTENSIONS[image.format], width=width, height=height)


def _check_data(image: Image.Image, image_bytes: bytes, jpeg_plan: JpegPlan | None) -> None:
    """Raise (IntegrityError or the decoder's error) unless the image data behind the parsed header is usable."""
    if image.format in ("JPEG", "MPO"):
        decode_jpeg(jpeg_plan.decode_bytes)  # PIL's JPEG opener accepts only bytes that start as planned ones do
    elif image.format == "PNG":
        check_png(image_bytes)
    else:
        image.load()  # TIFF, BMP, WebP, GIF: a full decode is what notices their truncated data


def read_image_file(image_path: str, max_pixels: int, name: str | None = None) -> tuple[bytes, ImageInfo]:
    """Read an image file and check it; returns the unchanged bytes and their ImageInfo.

    Raises ImageRejected with ``missing_image`` when the file is absent or not a regular file, else as
    ``inspect_image_bytes``.
    """
    label = name or image_path
    try:
        with open(image_path, "rb") as image_file:
            image_bytes = image_file.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise ImageRejected("missing_image", f"{label}: {error.strerror}") from error
    except OSError as error:
        raise ImageRejected("unreadable_image", f"{label}: cannot read file ({error})") from error
    return image_bytes, inspect_image_bytes(image_bytes, max_pixels, label)
