"""Tiny inputs for the data_prep tests: images written by PIL, GeoChat-style records with known expected outcomes."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, size=(32, 32), mode="RGB", image_format="PNG", seed=0) -> bytes:
    """Write a small noisy image (noise keeps formats from compressing it to nothing) and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        pixels = generator.integers(0, 65535, size=(height, width), dtype=np.uint16)
        image = Image.fromarray(pixels)
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
        pixels = generator.integers(0, 255, size=(height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
        if mode == "P":
            image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def png_with_claimed_size(path: Path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb stand-in that costs no memory."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr_start = 8  # after the PNG signature: length (4), b"IHDR" (4), data (13), crc (4)
    data[ihdr_start + 8: ihdr_start + 16] = struct.pack(">II", width, height)
    chunk = bytes(data[ihdr_start + 4: ihdr_start + 8 + 13])
    data[ihdr_start + 21: ihdr_start + 25] = struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def record(question: str, answer: str = "ok", image: str | None = None, record_id=None, *more_turns) -> dict:
    """One instruct record; ``more_turns`` are extra (question, answer) strings appended in order."""
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    for turn_index, value in enumerate(more_turns):
        turns.append({"from": "human" if turn_index % 2 == 0 else "gpt", "value": value})
    result: dict = {"conversations": turns}
    if record_id is not None:
        result["id"] = record_id
    if image is not None:
        result["image"] = image
    return result


@pytest.fixture
def geochat_inputs(tmp_path: Path):
    """Images + records covering every reject reason and odd-but-valid input.

    Returns (instruct path, images dir, records, expected) where expected maps input index -> reject reason or
    None (written). Run with ``--max-image-pixels 3000`` so that the 64x64 image is too large.
    """
    images = tmp_path / "images"
    write_image(images / "scene/a.png", seed=1)
    write_image(images / "gray.JPG", mode="L", image_format="JPEG", seed=2)
    write_image(images / "rgba.png", size=(48, 24), mode="RGBA", seed=3)
    write_image(images / "deep.png", mode="I;16", seed=4)
    truncated = write_image(images / "truncated.jpg", image_format="JPEG", seed=5)
    (images / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    write_image(images / "big.png", size=(64, 64), seed=6)
    write_image(images / "tiles/t.tif", image_format="TIFF", seed=7)
    write_image(images / "w.webp", image_format="WEBP", seed=8)
    write_image(images / "g.gif", mode="P", image_format="GIF", seed=9)
    write_image(images / "b.bmp", image_format="BMP", seed=10)
    write_image(images / "bilder/straße.png", size=(40, 30), seed=11)
    (images / "notes.png").write_text("not an image")
    png_with_claimed_size(images / "bomb.png", 50_000, 50_000)

    image_question = "<image>\n"
    cases = [
        (record(image_question + "[refer] Give me the location of <p> car </p>", "{<1><2><30><40>|<45>}",
                "scene/a.png", "r0"), None),
        (record(image_question + "Classify the scene. Answer using a single word or phrase.", "forest",
                "gray.JPG", "r1"), None),
        (record("Wie spät ist es? ☀", "Zeit für Tee — 🍵", None, "r2"), None),
        (record(image_question + "Describe it.", "A field.", "rgba.png", "r3", "And the road?", "Grey."), None),
        (record("How many cars? Answer using a single word or phrase.\n<image>", "3", "deep.png", 4), None),
        (record(image_question + "x", "y", "absent.png", "r5"), "missing_image"),
        (record(image_question + "x", "y", "truncated.jpg", "r6"), "unreadable_image"),
        (record(image_question + "x", "y", "big.png", "r7"), "too_many_pixels"),
        ({"id": "r8", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
         "malformed_record"),
        (record("question", "   ", None, "r9"), "malformed_record"),
        ({"id": "r10", "image": "scene/a.png"}, "malformed_record"),
        (record("no token here", "y", "scene/a.png", "r11"), "bad_image_token"),
        (record("<image> and <image>", "y", "scene/a.png", "r12"), "bad_image_token"),
        (record(image_question + "where?", "{<1><2><300><4>}", "scene/a.png", "r13"), "bad_box"),
        (record(image_question + "where?", "{<1><2><3>}", "scene/a.png", "r14"), "bad_box"),
        (record(image_question + "again", "y", "scene/a.png", "r0"), "duplicate_id"),
        (record(image_question + "[grounding] Describe the image.", "A <p>tile</p> {<5><5><9><9>}",
                "tiles/t.tif", "r16"), None),
        ("just a string", "malformed_record"),
        (record(image_question + "x", "y", "notes.png", "r18"), "unreadable_image"),
        (record(image_question + "[identify] What is the object present at {<8><26><22><37>}", "a ship",
                "w.webp", "r19"), None),
        (record(image_question + "What is this?", "a gif", "g.gif", "r20"), None),
        (record(image_question + "What is this?", "a bmp", "b.bmp", "r21"), None),
        (record(image_question + "Beschreibe das Bild.", "Ein Dach.", "bilder/straße.png"), None),
        (record(image_question + "x", "y", "bomb.png", "r23"), "too_many_pixels"),
        (record(image_question + "x", "y", "../outside.png", "r24"), "malformed_record"),
        (record("<image>\nquestion", "y", None, "r25"), "bad_image_token"),
        (record(image_question + "q", "a", "scene/a.png", "r26", "trailing question"), "malformed_record"),
    ]
    records = [case for case, _ in cases]
    expected = {index: reason for index, (_, reason) in enumerate(cases)}
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return instruct, images, records, expected
