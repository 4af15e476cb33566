"""Answer records: reading jsonl files, field-name variants, joining with question files, answer text checks.

Scorers work on *canonical* records: plain dicts with the keys below. GeoChat's own scripts and LLaVA-style
scripts name the same things differently, so every scorer first passes its records through `canonical_record`,
which maps the variants (first match wins, in the order listed):

    canonical key   accepted names
    -------------   --------------------------------------------------------------
    answer          answer, prediction, pred, output, response, text
                    ("text" only in answer files: LLaVA's model_vqa writes the answer there, while
                    GeoChat-Bench question files use "text" for the question, so question records never
                    supply an answer)
    ground_truth    ground_truth, gt, gt_answer, answer_gt, label, reference, references
    type            type, category, question_type, q_type
    size_group      size_group, size
    question_id     question_id, qid, id
    image_id        image_id, image
    width, height   width/height, image_width/image_height, or image_size = [width, height]

Other fields are kept as they are. `join_questions` fills the canonical fields an answer record lacks from the
question record with the same question_id (compared as strings, so 12 and "12" join).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Greedy decoding stops at max_new_tokens 256 (about 1,300 characters of English); anything much longer is a
# runaway or corrupted answer. It scores as wrong and is counted as unparsable instead of being matched.
MAX_ANSWER_CHARS = 4096

ANSWER_FIELDS = ("answer", "prediction", "pred", "output", "response", "text")
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "ground_truth": ("ground_truth", "gt", "gt_answer", "answer_gt", "label", "reference", "references"),
    "type": ("type", "category", "question_type", "q_type"),
    "size_group": ("size_group", "size"),
    "question_id": ("question_id", "qid", "id"),
    "image_id": ("image_id", "image"),
    "width": ("width", "image_width"),
    "height": ("height", "image_height"),
}

_WHITESPACE_AND_PERIODS = re.compile(r"[\s.]+")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a jsonl file into a list of dicts; blank lines are skipped, anything else that is not an object fails.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid JSON or not a JSON object (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer/question file {path} does not exist: check the path")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number} is not valid JSON ({error.msg}); fix or remove that line"
                ) from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_number} holds a {type(record).__name__}, expected a JSON object per line"
                )
            records.append(record)
    return records


def canonical_record(record: Mapping[str, Any], *, is_answer: bool = True) -> dict[str, Any]:
    """Return a copy of `record` with the canonical keys filled from their variants (see the module docstring).

    Idempotent: a canonical record maps to itself. `is_answer=False` (question files) never takes an answer.
    """
    canonical = dict(record)
    if is_answer and "answer" not in canonical:
        for name in ANSWER_FIELDS:
            if name in record:
                canonical["answer"] = record[name]
                break
    for key, aliases in FIELD_ALIASES.items():
        if key in canonical:
            continue
        for name in aliases:
            if name in record:
                canonical[key] = record[name]
                break
    image_size = record.get("image_size")
    if ("width" not in canonical or "height" not in canonical) and _is_size_pair(image_size):
        canonical.setdefault("width", image_size[0])
        canonical.setdefault("height", image_size[1])
    return canonical


def join_questions(
    answers: Iterable[Mapping[str, Any]], questions: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Canonicalise answer records and fill their missing canonical fields from the matching question records.

    The join key is question_id compared as a string. Answers without a matching question are kept as they are
    (when questions were given, a warning gives their count); a question_id repeated in the questions file keeps
    its last record (warned).
    """
    question_by_id: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for question in questions:
        canonical_question = canonical_record(question, is_answer=False)
        question_id = canonical_question.get("question_id")
        if question_id is None:
            continue
        if str(question_id) in question_by_id:
            duplicates += 1
        question_by_id[str(question_id)] = canonical_question
    if duplicates:
        logger.warning("questions file repeats %d question_id(s); the last record of each is used", duplicates)

    joined: list[dict[str, Any]] = []
    unmatched = 0
    for answer in answers:
        canonical_answer = canonical_record(answer)
        question = question_by_id.get(str(canonical_answer.get("question_id")))
        if question is None:
            unmatched += 1
        else:
            for key, value in question.items():
                canonical_answer.setdefault(key, value)
        joined.append(canonical_answer)
    if unmatched and question_by_id:
        logger.warning("%d answer(s) have no question with the same question_id in the questions file", unmatched)
    return joined


def answer_text(record: Mapping[str, Any]) -> str | None:
    """The record's answer as a string, or None when it is unusable: missing, not a string, blank or over-long."""
    answer = record.get("answer")
    if not isinstance(answer, str) or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def normalize_label(text: str) -> str:
    """GeoChat's label normalisation: lowercase with spaces and periods removed.

    GeoChat removes only the space character; all whitespace is removed here so that a stray newline or tab does
    not turn a right answer wrong (a strict superset of GeoChat's rule).
    """
    return _WHITESPACE_AND_PERIODS.sub("", text).lower()


def split_missing_ground_truth(
    records: Iterable[Mapping[str, Any]], task: str
) -> tuple[list[dict[str, Any]], int]:
    """Canonicalise records and drop those without a ground truth, returning (kept, dropped count).

    Raises:
        ValueError: there are no records, or none has a ground truth (usually the questions file was not given).
    """
    kept: list[dict[str, Any]] = []
    dropped = 0
    for record in records:
        canonical = canonical_record(record)
        if canonical.get("ground_truth") is None:
            dropped += 1
        else:
            kept.append(canonical)
    if not kept and not dropped:
        raise ValueError(f"{task}: there are no answer records to score")
    if not kept:
        raise ValueError(
            f"{task}: none of the {dropped} answer records carries a ground truth; pass the benchmark's question "
            "file (--questions) so it can be joined on question_id"
        )
    if dropped:
        logger.warning("%s: %d record(s) without ground truth are left out of the scores", task, dropped)
    return kept, dropped


def _is_size_pair(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(side, (int, float)) and not isinstance(side, bool) for side in value)
    )
