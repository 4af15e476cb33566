"""Integrity checks of JPEG and PNG bytes without a full-resolution decode (used by ``images.py``).

A full decode spends most of its time turning entropy-coded or deflated data into pixels; what it actually tells
the shard writer is whether the data is complete and well formed. These checks answer that from the byte stream:

JPEG (``plan_jpeg_check``, then ``decode_jpeg``):
1. The marker walk, as libjpeg reads a file: after SOI, segments (a marker and a 2-byte length that must fit in the
   file) up to each SOS; after SOS, the entropy-coded data runs to the next marker other than RST0-7 (a stuffed
   ``FF 00`` is data), found by a regular expression in C; then segments again (a progressive file has several
   scans) until EOI. Bytes between segments are skipped as libjpeg skips them (it warns, it does not fail). A file
   that ends before EOI is truncated: this is what the full decode noticed ("image file is truncated"), and it is
   exactly what a reduced-size (draft) decode cannot be trusted for alone. Markers libjpeg does not know, a second
   SOI or SOF, a scan before the frame header and EOI before any scan are corrupt.
2. libjpeg itself reads the headers up to the first scan closed by EOI, with no entropy data and the frame shrunk
   to 16 x 16: it validates the frame, the Huffman and quantisation tables and the colour conversion (unsupported
   precisions, sampling factors or component layouts fail here) and decodes a flat 16 x 16 image.
   Tables that a progressive file defines between later scans are checked by libjpeg in step 3.
3. A progressive file is decoded whole at 1/8 scale: libjpeg fails on some damaged progressive scans, and a
   reduced decode fails on exactly the same files as a full one (checked by bit-flip comparison), at about the
   same cost; such files are rare in the datasets. Damage inside a baseline file's entropy-coded data is not
   caught, as before: libjpeg only warns about it during a full decode too.
A few damaged files that a full decode accepted are rejected now (a corrupt segment after the last scan, which
the decoder never reads), never the other way round.

PNG (``check_png``): every chunk's CRC (as PIL's ``png.verify()``), IHDR first and IEND last, then the IDAT
stream is inflated piece by piece (never more than a bounded buffer at a time, no pixel buffer) and must hold
the bytes the header implies (per Adam7 pass when interlaced; data beyond them is ignored, as PIL and libpng do,
and never inflated), every scanline's filter type must be 0-4, and the zlib stream must end with a correct
Adler-32 checksum. Stricter than PIL's decode, which ignores the CRCs
of IDAT and later chunks and a missing IEND; libpng, the reference decoder, refuses both.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from PIL import Image


class IntegrityError(ValueError):
    """The bytes are not a complete, well-formed image; the message says what is wrong."""


# ----------------------------------------------------------------------------- JPEG

_SOI, _EOI, _SOS, _TEM = 0xD8, 0xD9, 0xDA, 0x01
_RESTART_MARKERS = range(0xD0, 0xD8)
# Start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_FRAME_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_MAX_DIMENSION = 65500  # libjpeg's JPEG_MAX_DIMENSION
_SMALL_FRAME = 16  # frame side for the header decode: one MCU at the largest sampling factors (2)
# Segments libjpeg reads or skips by their length: DHT, DAC, DQT, DNL, DRI, APP0-15, COM.
_TABLE_AND_MISC_MARKERS = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)})
# The next marker: FF followed by anything but 00 (a stuffed data byte) and FF (fill); a run of FFs is fill.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xff]")
# The end of entropy-coded data: a marker that is not RST0-7 (those separate restart intervals inside a scan).
_SCAN_END = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")


def walk_jpeg_markers(image_bytes: bytes) -> tuple[int, int, bool]:
    """Walk the JPEG's markers to EOI (see the module docstring); return the offset where the first scan's data
    begins, the offset of the frame header's marker and whether the frame is progressive. Raises IntegrityError for
    truncated or corrupt framing."""
    if image_bytes[:2] != b"\xff\xd8":
        raise IntegrityError("does not start with the JPEG SOI marker")
    size = len(image_bytes)
    position = 2
    first_scan_data = None
    frame_marker, frame_start = None, 0
    while True:
        match = _NEXT_MARKER.search(image_bytes, position)
        if match is None:
            raise IntegrityError(f"truncated: the data ends at byte {size} before the EOI marker")
        marker = image_bytes[match.start() + 1]
        position = match.end()
        if marker == _EOI:
            if first_scan_data is None:
                raise IntegrityError("EOI before any scan: the file holds no image data")
            return first_scan_data, frame_start, frame_marker in _PROGRESSIVE_FRAME_MARKERS
        if marker in _RESTART_MARKERS or marker == _TEM:
            continue  # parameterless; outside a scan libjpeg skips them
        if marker == _SOI:
            raise IntegrityError(f"a second SOI marker at byte {match.start()}")
        if marker not in _FRAME_MARKERS and marker not in _TABLE_AND_MISC_MARKERS and marker != _SOS:
            raise IntegrityError(f"unknown marker 0xFF{marker:02X} at byte {match.start()}")
        if position + 2 > size:
            raise IntegrityError(f"truncated inside the 0xFF{marker:02X} segment at byte {match.start()}")
        (length,) = struct.unpack_from(">H", image_bytes, position)
        if length < 2 or position + length > size:
            raise IntegrityError(
                f"truncated or corrupt 0xFF{marker:02X} segment at byte {match.start()}: length {length} "
                f"with {size - position} bytes left"
            )
        segment_end = position + length
        if marker in _FRAME_MARKERS:
            if frame_marker is not None:
                raise IntegrityError(f"a second frame header (0xFF{marker:02X}) at byte {match.start()}")
            frame_marker, frame_start = marker, match.start()
        elif marker == _SOS:
            if frame_marker is None:
                raise IntegrityError(f"a scan at byte {match.start()} before the frame header")
            components = image_bytes[position + 2] if length > 2 else 0
            if length != 6 + 2 * components:
                raise IntegrityError(f"corrupt scan header at byte {match.start()}: length {length} for "
                                     f"{components} components")
            if first_scan_data is None:
                first_scan_data = segment_end
            scan_end = _SCAN_END.search(image_bytes, segment_end)
            if scan_end is None:
                raise IntegrityError(f"truncated: the scan that starts at byte {segment_end} has no end "
                                     f"({size} bytes in the file)")
            position = scan_end.start()
            continue
        position = segment_end


class JpegPlan(NamedTuple):
    """What is left to check of a JPEG whose markers walked cleanly."""

    header_bytes: bytes
    """What PIL opens for the format, mode and size: the headers closed by EOI (the whole file if progressive)."""
    decode_bytes: bytes
    """What libjpeg decodes (``decode_jpeg``) to validate the rest."""


def plan_jpeg_check(image_bytes: bytes) -> JpegPlan:
    """Walk the markers (raises IntegrityError), then plan the libjpeg part (module docstring).

    Baseline: the headers closed by EOI with no entropy data; libjpeg decodes that as a flat image (it warns about
    the missing data, which PIL ignores) and raises for anything wrong in the headers. Its frame is shrunk to at most
    16 x 16 for the decode: libjpeg's header checks do not depend on the frame size except for its limits (zero,
    more than 65500), and a frame outside them is left as it is. Progressive: the whole file, at 1/8 scale.
    """
    first_scan_data, frame_start, progressive = walk_jpeg_markers(image_bytes)
    if progressive:
        return JpegPlan(image_bytes, image_bytes)
    headers = image_bytes[:first_scan_data] + b"\xff\xd9"
    return JpegPlan(headers, _with_small_frame(headers, frame_start))


def _with_small_frame(headers: bytes, frame_start: int) -> bytes:
    # frame header: FF Cn, length (2), precision (1), height (2), width (2), components ...
    height, width = struct.unpack_from(">HH", headers, frame_start + 5)
    if not (0 < height <= _MAX_DIMENSION and 0 < width <= _MAX_DIMENSION):
        return headers
    small = bytearray(headers)
    struct.pack_into(">HH", small, frame_start + 5, min(height, _SMALL_FRAME), min(width, _SMALL_FRAME))
    return bytes(small)


def decode_jpeg(decode_bytes: bytes) -> None:
    """Let libjpeg decode a planned JPEG at the smallest scale it offers (1/8 per side); raises what it raises."""
    with Image.open(io.BytesIO(decode_bytes), formats=("JPEG",)) as image:
        image.draft(image.mode, (1, 1))
        image.load()


# ----------------------------------------------------------------------------- PNG

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
# Adam7 passes: (x start, y start, x step, y step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_PIECE = 1 << 20  # bytes of decompressed data held at a time
_MAX_FILTER_TYPE = 4


def _png_chunks(image_bytes: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, data start, data end) of every chunk up to IEND, CRCs checked."""
    size = len(image_bytes)
    position = len(_PNG_SIGNATURE)
    while True:
        if position + 8 > size:
            raise IntegrityError(f"truncated: the data ends at byte {size} before the IEND chunk")
        length, chunk_type = struct.unpack_from(">I4s", image_bytes, position)
        data_start = position + 8
        data_end = data_start + length
        if data_end + 4 > size:
            raise IntegrityError(f"truncated inside the {chunk_type!r} chunk at byte {position}")
        (stored_crc,) = struct.unpack_from(">I", image_bytes, data_end)
        if zlib.crc32(memoryview(image_bytes)[position + 4 : data_end]) != stored_crc:
            raise IntegrityError(f"CRC mismatch in the {chunk_type!r} chunk at byte {position}")
        yield chunk_type, data_start, data_end
        if chunk_type == b"IEND":
            return
        position = data_end + 4


def _scanline_layout(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> list[tuple[int, int, int]]:
    """(offset, row stride, rows) of each (sub)image in the decompressed stream; a row is a filter byte + data."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    layout, offset = [], 0
    for x_start, y_start, x_step, y_step in passes:
        pass_width = max(0, -(-(width - x_start) // x_step))
        pass_height = max(0, -(-(height - y_start) // y_step))
        if pass_width == 0 or pass_height == 0:
            continue  # an empty pass has no rows, not even filter bytes
        stride = 1 + -(-(pass_width * bits_per_pixel) // 8)
        layout.append((offset, stride, pass_height))
        offset += stride * pass_height
    return layout


def check_png(image_bytes: bytes) -> None:
    """Raise IntegrityError unless the PNG's chunks, CRCs and image data are complete (module docstring)."""
    if not image_bytes.startswith(_PNG_SIGNATURE):
        raise IntegrityError("does not start with the PNG signature")
    view = memoryview(image_bytes)
    chunks = _png_chunks(image_bytes)
    chunk_type, data_start, data_end = next(chunks)
    if chunk_type != b"IHDR" or data_end - data_start != 13:
        raise IntegrityError("the first chunk is not a 13-byte IHDR")
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack_from(">IIBBBBB", image_bytes, data_start)
    if colour_type not in _CHANNELS:
        raise IntegrityError(f"unknown PNG colour type {colour_type}")
    layout = _scanline_layout(width, height, _CHANNELS[colour_type] * bit_depth, interlace == 1)
    expected = sum(stride * rows for _, stride, rows in layout)

    inflater = zlib.decompressobj()
    produced = 0
    extra_data = False  # more data than the header needs: PIL and libpng ignore the rest, and so does this check
    idat_state = "before"  # IDAT chunks must be consecutive
    for chunk_type, data_start, data_end in chunks:
        if chunk_type != b"IDAT":
            if idat_state == "inside":
                idat_state = "after"
            continue
        if idat_state == "after":
            raise IntegrityError("IDAT chunks are not consecutive")
        idat_state = "inside"
        pending = view[data_start:data_end]
        while pending and not inflater.eof and not extra_data:
            try:
                # one byte more than still needed at most: inflating a bomb's excess is never paid for
                piece = inflater.decompress(pending, min(_INFLATE_PIECE, expected - produced + 1))
            except zlib.error as error:
                raise IntegrityError(f"corrupt image data ({error})") from error
            _check_filter_types(piece[: expected - produced], produced, layout)
            produced += len(piece)
            extra_data = produced > expected
            pending = inflater.unconsumed_tail
    if idat_state == "before":
        raise IntegrityError("no IDAT chunk")
    if produced < expected:
        raise IntegrityError(f"image data holds {produced} bytes, its {width}x{height} header needs {expected}")
    if not inflater.eof and not extra_data:
        raise IntegrityError("truncated image data: the zlib stream has no end")


def _check_filter_types(piece: bytes, piece_offset: int, layout: list[tuple[int, int, int]]) -> None:
    """Every scanline's first byte (its filter type) that falls inside ``piece`` must be 0-4."""
    piece_end = piece_offset + len(piece)
    for offset, stride, rows in layout:
        block_end = offset + stride * rows
        if block_end <= piece_offset or offset >= piece_end:
            continue
        first_row = max(0, -(-(piece_offset - offset) // stride))
        start = offset + first_row * stride - piece_offset
        stop = min(block_end, piece_end) - piece_offset
        filter_types = piece[start:stop:stride]
        if filter_types and max(filter_types) > _MAX_FILTER_TYPE:
            raise IntegrityError(f"scanline filter type {max(filter_types)} (0-4 allowed)")
