"""Validation of LLaVA/GeoChat instruction records, box text, and the task kind of a record.

A record is ``{"id"?, "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``. Every check that
fails raises ``RecordRejected`` carrying a reason code from ``REJECT_REASONS``; callers write it to rejects.jsonl.
These checks need no image I/O; image checks live in ``images.py``.

Rules (beyond the issue text, the choices made here):
- ``"image": null`` is treated like an absent image (text-only record).
- An image path must be relative and stay inside ``--images`` (no absolute path, no ``..``): ``malformed_record``.
- The conversation must end with a ``gpt`` turn: a trailing question has no answer to train on
  (``malformed_record``).
- ``<image>`` must appear exactly once in the first human turn of an image record and nowhere else; a text-only
  record must not contain it (``bad_image_token``), because each occurrence becomes an image placeholder.
- Box text is looked for in every turn: any ``{`` followed by ``<`` starts one, and it must read
  ``{<x1><y1><x2><y2>}`` or ``{<x1><y1><x2><y2>|<angle>}`` with integer coordinates in 0..100 and an integer angle
  (``bad_box`` otherwise). Coordinate order is not checked: GeoChat's data is not consistent about it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"

REJECT_REASONS = (
    "missing_image",
    "unreadable_image",
    "too_many_pixels",
    "malformed_record",
    "bad_image_token",
    "bad_box",
    "duplicate_id",
    "missing_ground_truth",
)

TASK_KINDS = ("grounding", "refer", "identify", "vqa", "classification", "conversation", "text-only")

BOX_GRID_MAX = 100
_BOX_START = re.compile(r"\{\s*<")
_BOX_TEXT = re.compile(r"\{<(-?\d+)><(-?\d+)><(-?\d+)><(-?\d+)>(?:\|<(-?\d+)>)?\}")
_TASK_TAGS = (("[grounding]", "grounding"), ("[refer]", "refer"), ("[identify]", "identify"))
_CLASSIFICATION_WORDS = ("classify", "scene", "category")


class RecordRejected(Exception):
    """A record failed a check; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Box:
    """One box of GeoChat box text, on the 0-100 grid; ``angle`` in degrees or None when absent."""

    x1: int
    y1: int
    x2: int
    y2: int
    angle: int | None


def parse_boxes(text: str) -> list[Box]:
    """Return every box written in ``text``; raise RecordRejected("bad_box") for unparsable or off-grid ones."""
    boxes = []
    for start_match in _BOX_START.finditer(text):
        start = start_match.start()
        close = text.find("}", start)
        candidate = text[start : close + 1] if close != -1 else text[start:]
        box_match = _BOX_TEXT.fullmatch(candidate)
        if box_match is None:
            raise RecordRejected("bad_box", f"unparsable box text {candidate[:60]!r}")
        x1, y1, x2, y2 = (int(box_match.group(group)) for group in range(1, 5))
        for value in (x1, y1, x2, y2):
            if not 0 <= value <= BOX_GRID_MAX:
                raise RecordRejected("bad_box", f"box {candidate!r} leaves the 0-{BOX_GRID_MAX} grid")
        angle = int(box_match.group(5)) if box_match.group(5) is not None else None
        boxes.append(Box(x1, y1, x2, y2, angle))
    return boxes


def check_image_path(image_path: str) -> None:
    """Refuse image paths that are absolute or climb out of the images directory."""
    normalized = image_path.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise RecordRejected("malformed_record", f"image path {image_path!r} is absolute; it must be relative")
    if ".." in normalized.split("/"):
        raise RecordRejected("malformed_record", f"image path {image_path!r} leaves the images directory")


def record_id(record: object) -> object:
    """The record's id when it has a usable one (str or int), else None; used for rejects.jsonl too."""
    if isinstance(record, dict):
        value = record.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    return None


def validate_record(record: object, prompts_only: bool = False) -> tuple[str | None, list[dict[str, str]]]:
    """Check structure, roles, image token and box text of one record.

    Returns ``(image_path or None, conversations)`` with conversations reduced to ``{"from", "value"}`` turns.
    With ``prompts_only`` (``data_prep shard --prompts-only``: stage 2's prompts, no answers) the conversation is
    cut after its last human turn, so a record may end with a question and a trailing answer is dropped, never
    stored. Raises RecordRejected on the first failed check.
    """
    if not isinstance(record, dict):
        raise RecordRejected("malformed_record", f"record is a {type(record).__name__}, expected an object")
    if "id" in record and record["id"] is not None and record_id(record) is None:
        raise RecordRejected("malformed_record", f"'id' is a {type(record['id']).__name__}, expected str or int")

    image_path = record.get("image")
    if image_path is not None:
        if not isinstance(image_path, str) or not image_path.strip():
            raise RecordRejected("malformed_record", f"'image' must be a non-empty string, got {image_path!r}")
        check_image_path(image_path)

    conversations = _validate_turns(record.get("conversations"), prompts_only)
    _check_image_tokens(conversations, has_image=image_path is not None)
    for turn in conversations:
        parse_boxes(turn["value"])
    return image_path, conversations


def _validate_turns(turns: object, prompts_only: bool = False) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise RecordRejected("malformed_record", "'conversations' must be a non-empty list")
    cleaned = []
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordRejected("malformed_record", f"turn {turn_index} is not an object")
        role, value = turn.get("from"), turn.get("value")
        expected_role = "human" if turn_index % 2 == 0 else "gpt"
        if role != expected_role:
            raise RecordRejected(
                "malformed_record", f"turn {turn_index} is from {role!r}; roles must alternate human, gpt, ..."
            )
        if not isinstance(value, str):
            raise RecordRejected("malformed_record", f"turn {turn_index} 'value' is not a string")
        if not value.strip():
            raise RecordRejected("malformed_record", f"turn {turn_index} is empty")
        cleaned.append({"from": role, "value": value})
    if prompts_only:
        return cleaned[:max(index for index, turn in enumerate(cleaned) if turn["from"] == "human") + 1]
    if cleaned[-1]["from"] != "gpt":
        raise RecordRejected("malformed_record", "the last turn is from human: no answer to train on (shard "
                                                 "prompts for stage 2 with --prompts-only)")
    return cleaned


def _check_image_tokens(conversations: list[dict[str, str]], has_image: bool) -> None:
    first_count = conversations[0]["value"].count(IMAGE_TOKEN)
    later_count = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations[1:])
    if has_image and first_count != 1:
        raise RecordRejected("bad_image_token", f"first human turn holds {first_count} '<image>', expected exactly 1")
    if has_image and later_count:
        raise RecordRejected("bad_image_token", f"'<image>' appears {later_count} time(s) after the first human turn")
    if not has_image and first_count + later_count:
        raise RecordRejected("bad_image_token", "text-only record contains '<image>'")


def task_kind(conversations: list[dict[str, str]], has_image: bool) -> str:
    """Task kind of a validated record, decided by its first human turn (the shard contract's rule, in order)."""
    question = conversations[0]["value"].replace(IMAGE_TOKEN, "").strip()
    lowered = question.lower()
    for tag, kind in _TASK_TAGS:
        if lowered.startswith(tag):
            return kind
    if not has_image:
        return "text-only"
    if sum(turn["from"] == "human" for turn in conversations) > 1:
        return "conversation"
    if any(word in lowered for word in _CLASSIFICATION_WORDS):
        return "classification"
    if "a single word or phrase" in lowered:
        return "vqa"
    return "conversation"
