"""Reading the input files of the converters: JSON lists, JSONL and plain text, with clear errors.

A file whose first non-blank character is ``[`` is read as one JSON list; anything else is read as JSONL (one JSON
value per non-blank line). A JSON list that does not parse, an empty file or list (``[]``), or a file that is
missing, raises ``InputError`` (the CLIs turn it into one line on stderr and exit 2). One bad line of a JSONL file
only spoils that record: it comes back as an ``UnparsableLine`` so that the caller rejects it (``malformed_record``)
instead of losing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from kd_pipeline.errors import UserError

_HASH_CHUNK_BYTES = 1 << 20


class InputError(UserError):
    """An input file cannot be used at all (missing, unreadable, not JSON)."""


@dataclass(frozen=True)
class UnparsableLine:
    """Stand-in for a JSONL line that is not valid JSON; ``detail`` names the line and the parser's complaint."""

    detail: str


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source(path: str) -> dict:
    """The manifest's ``source`` entry: base name, size in bytes and sha256 of an input file."""
    return {"name": os.path.basename(path), "size": os.path.getsize(path), "sha256": sha256_file(path)}


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise InputError(f"{what} {path!r} does not exist") from error
    except IsADirectoryError as error:
        raise InputError(f"{what} {path!r} is a directory, expected a file") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{what} {path!r} is not UTF-8 text ({error})") from error
    except OSError as error:
        raise InputError(f"{what} {path!r} cannot be read ({error})") from error


def load_records(path: str, what: str = "instruct file") -> list[object]:
    """Records of a JSON list or JSONL file, in file order; bad JSONL lines become UnparsableLine."""
    text = _read_text(path, what)
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{what} {path!r} is empty")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{what} {path!r} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
            ) from error
        if records == []:
            raise InputError(f"{what} {path!r} is an empty JSON list: there is nothing to convert (check the export "
                             f"that wrote it)")
        return records
    if stripped[0] != "{":
        raise InputError(f"{what} {path!r} is neither a JSON list nor JSONL (starts with {stripped[0]!r})")
    if _is_one_multiline_object(stripped):
        raise InputError(f"{what} {path!r} holds one JSON object; expected a JSON list of records or JSONL")
    records: list[object] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            records.append(UnparsableLine(f"line {line_number}: not valid JSON ({error.msg})"))
    return records


def _is_one_multiline_object(stripped_text: str) -> bool:
    """True for a pretty-printed single JSON object, which would otherwise become one reject per line."""
    first_line = stripped_text.split("\n", 1)[0]
    try:
        json.loads(first_line)
        return False
    except json.JSONDecodeError:
        pass
    try:
        return isinstance(json.loads(stripped_text), dict)
    except json.JSONDecodeError:
        return False


def load_text_documents(path: str, unit: str) -> list[object]:
    """Documents of a pre-training text file.

    ``*.jsonl`` files: one JSON object per line with a string ``"text"`` (and optional ``"id"``); the parsed objects
    are returned (UnparsableLine for bad lines) and checked by the caller. Other files are plain text split into
    documents by ``unit``: ``"paragraph"`` (blocks separated by blank lines, inner newlines kept) or ``"line"``.
    Plain documents come back as ``{"text": str}``.
    """
    if path.endswith(".jsonl"):
        return load_records(path, what="text file")
    text = _read_text(path, "text file")
    if unit == "line":
        pieces = text.splitlines()
    else:
        pieces = []
        paragraph: list[str] = []
        for line in text.splitlines() + [""]:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                pieces.append("\n".join(paragraph))
                paragraph = []
    return [{"text": piece.strip()} for piece in pieces if piece.strip()]
