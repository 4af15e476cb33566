"""Benchmark images for scoring and plots: finding a record's file, reading its size, opening it safely.

GeoChat-Bench names the referring images by `image_id` without extension (the file is `image_id + ".png"`); the
other benchmarks give a relative path in `image`. Both are tried, in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

# Remote-sensing tiles are at most a few thousand pixels a side; refuse anything bigger than 8192 x 8192
# (decompression bombs) before decoding. The header is read without decoding pixels.
MAX_IMAGE_PIXELS = 8192 * 8192

ImageSizeLookup = Callable[[Mapping[str, Any]], "tuple[float, float] | None"]


def image_path(record: Mapping[str, Any], image_dir: str | Path) -> Path:
    """The image file of a record under `image_dir`.

    Raises:
        FileNotFoundError: neither `image_id + ".png"` nor `image` names an existing file (both are listed).
    """
    image_dir = Path(image_dir)
    candidates = []
    for key, suffix in (("image_id", ".png"), ("image", "")):
        name = record.get(key)
        if isinstance(name, str) and name:
            candidates.append(image_dir / (name if Path(name).suffix else name + suffix))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates) or "no image_id/image field in the record"
    raise FileNotFoundError(
        f"image of question {record.get('question_id')!r} not found (tried: {tried}); check --image-dir"
    )


def _check_pixel_count(image: Image.Image, path: Path) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{path} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS} pixel cap: not opened")


@lru_cache(maxsize=65536)
def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only; cached because benchmarks reuse images."""
    with Image.open(path) as image:
        _check_pixel_count(image, path)
        return image.size


def open_rgb_image(path: str | Path) -> Image.Image:
    """Decode an image file as RGB after checking its pixel count against MAX_IMAGE_PIXELS."""
    path = Path(path)
    with Image.open(path) as image:
        _check_pixel_count(image, path)
        return image.convert("RGB")


def record_image_size(record: Mapping[str, Any]) -> tuple[float, float] | None:
    """(width, height) carried by a canonical record itself, or None."""
    width, height = record.get("width"), record.get("height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
        return float(width), float(height)
    return None


def image_size_lookup(
    image_dir: str | Path | None = None, fixed_size: tuple[float, float] | None = None
) -> ImageSizeLookup:
    """A function giving a record's image size: its own width/height fields first, then `fixed_size`, then the
    image file under `image_dir`; None when none of these is available (scores then use the 0-100 grid)."""

    def lookup(record: Mapping[str, Any]) -> tuple[float, float] | None:
        own_size = record_image_size(record)
        if own_size is not None:
            return own_size
        if fixed_size is not None:
            return fixed_size
        if image_dir is not None:
            width, height = read_image_size(image_path(record, image_dir))
            return float(width), float(height)
        return None

    return lookup
