"""The fast image checks (data_prep/image_integrity.py) against the full decode they replace.

The oracle is what ``data_prep shard`` did before: PIL's ``Image.open(...).load()`` at full resolution. Every reject
class of that path must still be rejected, with the same reason code, and the JPEG/PNG paths must not decode at
full resolution.
"""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_prep.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRejected, inspect_image_bytes

MARKER_LENGTH_AT = 2  # a JPEG segment: FF xx, then its 2-byte length (which counts itself)


def encode(image_format: str, size=(56, 40), seed=0, **options) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def full_decode_fails(image_bytes: bytes) -> bool:
    """The old check: a full-resolution decode by the shard contract's PIL openers."""
    try:
        with Image.open(io.BytesIO(image_bytes), formats=("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")) as image:
            image.load()
    except Exception:
        return True
    return False


def reject_reason(image_bytes: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    try:
        inspect_image_bytes(image_bytes, max_pixels)
    except ImageRejected as rejected:
        return rejected.reason
    return None


def patched(image_bytes: bytes, offset: int, value: int) -> bytes:
    data = bytearray(image_bytes)
    data[offset] = value
    return bytes(data)


def with_frame_size(jpeg: bytes, height: int, width: int) -> bytes:
    data = bytearray(jpeg)
    struct.pack_into(">HH", data, segment_at(jpeg, b"\xff\xc0") + 5, height, width)
    return bytes(data)


def segment_at(jpeg: bytes, marker: bytes) -> int:
    position = jpeg.find(marker)
    assert position > 0, f"test image has no {marker.hex()} segment"
    return position


def without_segment(jpeg: bytes, marker: bytes) -> bytes:
    start = segment_at(jpeg, marker)
    (length,) = struct.unpack_from(">H", jpeg, start + MARKER_LENGTH_AT)
    return jpeg[:start] + jpeg[start + 2 + length:]


def png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", zlib.crc32(chunk_type + data))


def png_file(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes, interlace: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def rgb_rows(width: int, height: int, filter_type: int = 0) -> bytes:
    return b"".join(bytes([filter_type]) + bytes(range(row, row + 3 * width)) for row in range(height))


def adam7_png(pixels: np.ndarray) -> bytes:
    """An interlaced 8-bit RGB PNG (PIL writes none): the seven Adam7 sub-images, each row with filter type 0."""
    height, width, _ = pixels.shape
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x_start, y_start, x_step, y_step in passes:
        sub_image = pixels[y_start::y_step, x_start::x_step]
        if sub_image.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub_image)
    return png_file(width, height, 8, 2, raw, interlace=1)


BASELINE = encode("JPEG")
PROGRESSIVE = encode("JPEG", progressive=True)
PNG = encode("PNG")
SOF = segment_at(BASELINE, b"\xff\xc0")
SOS = segment_at(BASELINE, b"\xff\xda")
DHT = segment_at(BASELINE, b"\xff\xc4")

# One example of every reject class of the old full-decode path, with the reason code it must still get.
REJECT_CLASSES = {
    "truncated baseline JPEG": (BASELINE[: len(BASELINE) // 2], "unreadable_image"),
    "truncated progressive JPEG": (PROGRESSIVE[: len(PROGRESSIVE) * 3 // 4], "unreadable_image"),
    "JPEG without its EOI": (BASELINE[:-2], "unreadable_image"),
    "truncated PNG": (PNG[: len(PNG) * 2 // 3], "unreadable_image"),
    "PNG data shorter than its header": (png_file(8, 4, 8, 2, rgb_rows(8, 4)[:-5]), "unreadable_image"),
    "corrupt JPEG Huffman table": (patched(BASELINE, DHT + 5 + 15, 255), "unreadable_image"),
    "JPEG quantisation table missing": (without_segment(BASELINE, b"\xff\xdb"), "unreadable_image"),
    "JPEG scan of an unknown component": (patched(BASELINE, SOS + 5, 9), "unreadable_image"),
    "JPEG segment length past the end": (BASELINE[:SOF] + b"\xff\xe5\xff\xf0" + BASELINE[SOF:], "unreadable_image"),
    "PNG corrupt zlib data": (png_file(8, 4, 8, 2, rgb_rows(8, 4)).replace(
        zlib.compress(rgb_rows(8, 4))[2:6], b"\xff\xff\xff\xff"), "unreadable_image"),
    "PNG scanline filter type 7": (png_file(8, 4, 8, 2, rgb_rows(8, 4, filter_type=7)), "unreadable_image"),
    "unrecognised bytes": (b"definitely not an image", "unreadable_image"),
    "unsupported format (PPM)": (encode("PPM"), "unreadable_image"),
    "JPEG pixel bomb": (patched(patched(BASELINE, SOF + 5, 0xEA), SOF + 7, 0xEA), "too_many_pixels"),
    "truncated JPEG pixel bomb": (patched(patched(BASELINE, SOF + 5, 0xEA), SOF + 7, 0xEA)[:-300],
                                  "too_many_pixels"),
    "JPEG wider than libjpeg's 65500": (with_frame_size(BASELINE, 1, 65535), "unreadable_image"),
    "JPEG of height 0": (with_frame_size(BASELINE, 0, 56), "unreadable_image"),
    "JPEG sampling factor 0": (patched(BASELINE, SOF + 11, 0x00), "unreadable_image"),
    "hierarchical JPEG (SOF5)": (patched(BASELINE, SOF + 1, 0xC5), "unreadable_image"),
    "12-bit JPEG": (patched(BASELINE, SOF + 4, 12), "unreadable_image"),
    "PNG RGB at 4 bits": (png_file(8, 4, 4, 2, rgb_rows(8, 4)), "unreadable_image"),
    "PNG colour type 5": (png_file(8, 4, 8, 5, rgb_rows(8, 4)), "unreadable_image"),
}


@pytest.mark.parametrize("case", sorted(REJECT_CLASSES))
def test_every_reject_class_of_the_full_decode_is_still_caught(case):
    image_bytes, reason = REJECT_CLASSES[case]
    assert full_decode_fails(image_bytes) or reason == "too_many_pixels"
    assert reject_reason(image_bytes, max_pixels=1_000_000) == reason


def mpo(size=(24, 16)) -> bytes:
    """A camera-style MPO: two JPEGs in one file (PIL reads the first)."""
    first, second = (Image.open(io.BytesIO(encode("JPEG", size, seed=seed))) for seed in (1, 2))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    return buffer.getvalue()


@pytest.mark.parametrize("name, image_bytes", [
    ("baseline", encode("JPEG", (24, 16))),
    ("progressive", encode("JPEG", (24, 16), progressive=True)),
    ("restart intervals", encode("JPEG", (48, 32), restart_marker_blocks=1)),
    ("mpo", mpo()),
    ("png", encode("PNG", (24, 16))),
])
@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the damaged MPO metadata it skips
def test_every_file_the_full_decode_rejects_is_rejected(name, image_bytes):
    # every truncation point and 300 single-bit flips
    generator = random.Random(0)
    damaged = [image_bytes[:cut] for cut in range(len(image_bytes))]
    for _ in range(300):
        flipped = bytearray(image_bytes)
        flipped[generator.randrange(len(flipped))] ^= 1 << generator.randrange(8)
        damaged.append(bytes(flipped))
    missed = [index for index, candidate in enumerate(damaged)
              if full_decode_fails(candidate) and reject_reason(candidate) is None]
    assert missed == []
    assert reject_reason(image_bytes) is None


def test_stricter_than_the_full_decode_only_for_damaged_png_framing():
    # PIL's decode ignores IDAT CRCs and a missing IEND; libpng refuses both, and so does the check.
    bad_idat_crc = bytearray(PNG)
    iend = PNG.rindex(b"IEND") - 4
    bad_idat_crc[iend - 1] ^= 0xFF  # the last byte of the last IDAT chunk's CRC
    for image_bytes in (bytes(bad_idat_crc), PNG[:-12]):
        assert not full_decode_fails(image_bytes)
        assert reject_reason(image_bytes) == "unreadable_image"


def test_extra_png_data_is_ignored_like_the_decoders_do():
    image_bytes = png_file(8, 4, 8, 2, rgb_rows(8, 4) + bytes(300))
    assert not full_decode_fails(image_bytes)
    assert reject_reason(image_bytes) is None


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (13, 9), (16, 16)])
def test_interlaced_png_is_accepted_and_its_truncation_caught(size):
    pixels = np.random.default_rng(1).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    image_bytes = adam7_png(pixels)
    with Image.open(io.BytesIO(image_bytes)) as image:  # the hand-built file is what PIL decodes as these pixels
        assert np.array_equal(np.asarray(image), pixels)
    assert inspect_image_bytes(image_bytes, DEFAULT_MAX_IMAGE_PIXELS).width == size[0]
    raw = zlib.decompress(image_bytes[image_bytes.index(b"IDAT") + 4:image_bytes.index(b"IEND") - 8])
    short = png_file(size[0], size[1], 8, 2, raw[:-1], interlace=1)
    assert full_decode_fails(short)
    assert reject_reason(short) == "unreadable_image"


def test_jpeg_and_png_are_never_decoded_at_full_resolution(monkeypatch):
    decoded_sizes = []
    original_load = ImageFile.ImageFile.load

    def recording_load(image):
        decoded_sizes.append((image.format, image.size))
        return original_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    jpeg = encode("JPEG", size=(512, 384))
    assert inspect_image_bytes(jpeg, DEFAULT_MAX_IMAGE_PIXELS).width == 512
    assert inspect_image_bytes(encode("JPEG", size=(512, 384), progressive=True), DEFAULT_MAX_IMAGE_PIXELS)
    assert inspect_image_bytes(encode("PNG", size=(512, 384)), DEFAULT_MAX_IMAGE_PIXELS).height == 384
    # baseline: the headers with the frame shrunk to 16 x 16, at 1/8; progressive: the file at 1/8; PNG: nothing
    assert decoded_sizes == [("JPEG", (2, 2)), ("JPEG", (64, 48))]


def test_shard_workers_import_neither_torch_nor_numpy():
    # every spawned worker imports data_prep.sharding: torch took ~2.5 s of CPU there, numpy half of the rest
    heavy = ("torch", "numpy", "kd_pipeline.data.loaders")
    code = f"import sys, data_prep.sharding; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
