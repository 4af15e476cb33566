"""Unit tests of record validation, box text, task kinds and image checks."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.data_prep.conftest import png_with_claimed_size, record, write_image
from data_prep.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRejected, inspect_image_bytes, read_image_file
from data_prep.records import Box, RecordRejected, parse_boxes, task_kind, validate_record


def reason_of(candidate) -> str | None:
    try:
        validate_record(candidate)
    except RecordRejected as rejected:
        return rejected.reason
    return None


def test_parse_boxes_reads_angles_and_several_boxes():
    text = "two <p>ships</p> {<0><5><10><20>|<-30>}{<50><60><100><99>} done"
    assert parse_boxes(text) == [Box(0, 5, 10, 20, -30), Box(50, 60, 100, 99, None)]
    assert parse_boxes("no boxes {here} or <here>") == []


@pytest.mark.parametrize("bad", ["{<1><2><101><4>}", "{<-1><2><3><4>}", "{<1><2><3>}", "{<1><2><3><4>|45}",
                                 "{<a><2><3><4>}", "{<1.5><2><3><4>}", "tail {<1><2><3><4>"])
def test_parse_boxes_rejects_bad_box_text(bad):
    with pytest.raises(RecordRejected) as caught:
        parse_boxes(bad)
    assert caught.value.reason == "bad_box"


def test_validate_record_returns_clean_turns():
    raw = record("<image>\nQ", "A", "x/y.png", "id1")
    raw["conversations"][0]["extra"] = "dropped"
    image, turns = validate_record(raw)
    assert image == "x/y.png"
    assert turns == [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]


@pytest.mark.parametrize(
    "candidate, reason",
    [
        ([1, 2], "malformed_record"),
        ({"conversations": []}, "malformed_record"),
        ({"id": 1.5, **record("q", "a")}, "malformed_record"),
        ({"image": "", **record("<image>q", "a")}, "malformed_record"),
        (record("<image>q", "a", "/abs/path.png"), "malformed_record"),
        (record("<image>q", "a", "a/../../b.png"), "malformed_record"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]}, "malformed_record"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}, "malformed_record"),
        (record("q", ""), "malformed_record"),
        (record("q", "a", None, None, "follow-up"), "malformed_record"),
        (record("q", "a", "img.png"), "bad_image_token"),
        (record("<image><image>q", "a", "img.png"), "bad_image_token"),
        (record("<image>q", "a", "img.png", None, "<image>again", "b"), "bad_image_token"),
        (record("<image>q", "a"), "bad_image_token"),
        (record("<image>q", "{<1><2><3><400>}", "img.png"), "bad_box"),
        ({"image": None, **record("text only", "fine")}, None),
        (record("Ünïcödé <image> question", "ответ", "IMG.PNG", 7), None),
    ],
)
def test_validate_record_reason_codes(candidate, reason):
    assert reason_of(candidate) == reason


@pytest.mark.parametrize(
    "question, has_image, turns, kind",
    [
        ("<image>\n[grounding] describe", True, 1, "grounding"),
        ("[refer] Give me the location of <p> x </p>\n<image>", True, 1, "refer"),
        ("<image>\n[identify] What is the object present at {<1><2><3><4>}", True, 1, "identify"),
        ("[refer] where is it?", False, 1, "refer"),
        ("what time is it", False, 1, "text-only"),
        ("<image>\nClassify the image. Answer with a single word or phrase.", True, 2, "conversation"),
        ("<image>\nWhich category fits?", True, 1, "classification"),
        ("<image>\nIs it a rural scene? Answer using a single word or phrase.", True, 1, "classification"),
        ("<image>\nIs there a road? Answer the question using a single word or phrase.", True, 1, "vqa"),
        ("<image>\nDescribe the image in detail.", True, 1, "conversation"),
    ],
)
def test_task_kind_follows_the_contract_order(question, has_image, turns, kind):
    conversation = []
    for turn_index in range(turns):
        conversation += [{"from": "human", "value": question if turn_index == 0 else "more?"},
                         {"from": "gpt", "value": "answer"}]
    assert task_kind(conversation, has_image) == kind


@pytest.mark.parametrize(
    "mode, image_format, ext",
    [("RGB", "PNG", "png"), ("L", "JPEG", "jpg"), ("RGBA", "TIFF", "tif"), ("RGB", "BMP", "bmp"),
     ("RGB", "WEBP", "webp"), ("P", "GIF", "gif"), ("I;16", "PNG", "png")],
)
def test_inspect_image_accepts_supported_formats_and_modes(tmp_path, mode, image_format, ext):
    payload = write_image(tmp_path / "image.BIN", size=(20, 12), mode=mode, image_format=image_format)
    info = inspect_image_bytes(payload, DEFAULT_MAX_IMAGE_PIXELS)
    assert (info.ext, info.width, info.height) == (ext, 20, 12)


def test_read_image_file_returns_the_unchanged_bytes(tmp_path):
    payload = write_image(tmp_path / "a.png")
    image_bytes, _ = read_image_file(str(tmp_path / "a.png"), DEFAULT_MAX_IMAGE_PIXELS)
    assert image_bytes == payload


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_image_is_unreadable(tmp_path, image_format):
    payload = write_image(tmp_path / "a", size=(64, 64), image_format=image_format)
    with pytest.raises(ImageRejected) as caught:
        inspect_image_bytes(payload[: len(payload) * 2 // 3], DEFAULT_MAX_IMAGE_PIXELS)
    assert caught.value.reason == "unreadable_image"


def test_unsupported_or_garbage_bytes_are_unreadable(tmp_path):
    write_image(tmp_path / "a.ppm", image_format="PPM")
    for payload in [b"hello", (tmp_path / "a.ppm").read_bytes()]:
        with pytest.raises(ImageRejected) as caught:
            inspect_image_bytes(payload, DEFAULT_MAX_IMAGE_PIXELS)
        assert caught.value.reason == "unreadable_image"


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    # The data is a 1x1 image under a 3000x3000 header: decoding fails, so too_many_pixels proves that the header
    # check came first. 4e6 is below half the claimed size (PIL's own bomb error, mapped), 9e6 - 1 just below it.
    png_with_claimed_size(tmp_path / "bomb.png", 3000, 3000)
    previous_limit = Image.MAX_IMAGE_PIXELS
    for limit in (4_000_000, 9_000_000 - 1):
        with pytest.raises(ImageRejected) as caught:
            read_image_file(str(tmp_path / "bomb.png"), limit)
        assert caught.value.reason == "too_many_pixels"
    with pytest.raises(ImageRejected) as caught:
        read_image_file(str(tmp_path / "bomb.png"), 9_000_000)
    assert caught.value.reason == "unreadable_image"
    assert Image.MAX_IMAGE_PIXELS == previous_limit


def test_pixel_limit_is_inclusive_and_configurable(tmp_path):
    payload = write_image(tmp_path / "a.png", size=(30, 20))
    assert inspect_image_bytes(payload, 600).width == 30
    with pytest.raises(ImageRejected) as caught:
        inspect_image_bytes(payload, 599)
    assert caught.value.reason == "too_many_pixels"


def test_missing_file_is_missing_image(tmp_path):
    with pytest.raises(ImageRejected) as caught:
        read_image_file(str(tmp_path / "nope.png"), DEFAULT_MAX_IMAGE_PIXELS)
    assert caught.value.reason == "missing_image"
