"""PIL's decompression-bomb limit set to the caller's pixel limit for one open (no numpy, no torch).

Its own module because the data_prep shard workers need it and nothing else of ``kd_pipeline.data``: importing
``kd_pipeline.data.images`` would cost each spawned worker numpy's import (about half its start-up time).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from PIL import Image


@contextlib.contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make PIL's global bomb limit agree with ``max_pixels`` for one open; our explicit check decides.

    PIL refuses images above twice its module-level ``MAX_IMAGE_PIXELS`` on its own, so a user limit above PIL's
    default would otherwise be overridden by PIL.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous
