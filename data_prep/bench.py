"""``python -m data_prep bench``: GeoChat-Bench question files -> the normalized evaluation set.

Runbook (one call per task, all into the same directory)::

    python -m data_prep bench --task aid --questions aid.jsonl --images /data/AID --out /data/eval
    python -m data_prep bench --task lrben --questions lrben.jsonl --images /data/LRBEN \\
        --answers /data/RSVQA_LR/all_answers.json --out /data/eval

Normalized set (what the evaluation suite reads), in ``--out``:
- ``<task>.jsonl``: one object per accepted question, in input order, always with these keys:
  ``question_id`` (as in the input; the 0-based line index when the input has none), ``task``, ``image`` (path
  relative to ``<out>/images``), ``image_width``, ``image_height``, ``prompt`` (user text without ``<image>`` and
  without the chat template), ``ground_truth`` (as in the input, any JSON type), ``class`` (scene class from the
  ``question_id`` prefix ``<ClassName>/...``; aid/ucmerced only), ``type`` (VQA question type from ``category``
  or ``type``; referring type), ``size_group``, ``dataset``, ``obj_ids`` (passed through when present). A key that
  does not apply is null.
- ``images/<task>/...``: byte-for-byte copies of the images used (copies, not links, so the set is self-contained).
- ``<task>.rejects.jsonl`` (``{"index", "id", "reason", "detail"}``, id = question_id) and ``<task>.manifest.json``
  (format_version, kind "eval", task, source(s), totals, reject_reasons, image count and bytes).

Input fields and prompts per task (GeoChat's eval scripts):
- aid, ucmerced: ``question_id``, ``image``, ``text``, ``ground_truth``; prompt = ``text``.
- lrben, hrben: ``question_id``, ``image``, ``text``, type in ``category`` (or ``type``), answer in
  ``ground_truth`` (or ``answer``) or, since GeoChat-Bench's VQA files ship without answers, in ``--answers``
  (RSVQA answers JSON: ``{"answers": [{"question_id", "answer"}, ...]}``, position used when question_id is
  absent); prompt = ``text``. No answer: ``missing_ground_truth``.
- referring: ``question_id``, ``image_id`` (file ``image_id + ".png"`` unless it carries an image extension),
  ``question``, ``type``, ``ground_truth``, ``dataset``, ``obj_ids``, ``size_group``; prompt
  ``"[refer] Give me the location of <p> " + question + " </p>"`` when type is ``ref``, else
  ``"[grounding]" + question`` (GeoChat concatenates without a space; kept as is).
- region_captioning: ``question_id``, ``image_id``, ``question`` (box text, must parse: ``bad_box``),
  ``ground_truth``; prompt ``"[identify] What is the object present at " + question``.

When an image is not found under its exact name, a single file with the same stem and another image extension
is used instead (e.g. AID's ``.jpg`` files referenced as ``.png``); the count is logged. Rejects and exit codes
work as for ``shard`` (reasons: malformed_record, missing_image, unreadable_image, too_many_pixels, bad_box,
duplicate_id, missing_ground_truth).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tqdm import tqdm

from data_prep.images import DEFAULT_MAX_IMAGE_PIXELS, DISK_EXTENSIONS, ImageInfo, ImageRejected, read_image_file
from data_prep.manifest import (
    FORMAT_VERSION,
    count_by,
    json_bytes,
    reject_fraction_problem,
    write_bytes_atomic,
    write_rejects,
)
from data_prep.records import IMAGE_TOKEN, RecordRejected, check_image_path, parse_boxes
from data_prep.sources import InputError, UnparsableLine, describe_source, load_records

logger = logging.getLogger(__name__)

TASKS = ("aid", "ucmerced", "lrben", "hrben", "referring", "region_captioning")
PASS_THROUGH_FIELDS = ("size_group", "dataset", "obj_ids")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=TASKS, help="which GeoChat-Bench file this is")
    parser.add_argument("--questions", required=True, help="the GeoChat-Bench question file (JSONL)")
    parser.add_argument("--images", required=True, help="directory holding the task's images")
    parser.add_argument("--out", required=True, help="evaluation set directory (shared by all tasks)")
    parser.add_argument("--answers", help="lrben/hrben: RSVQA answers JSON when the questions lack answers")
    parser.add_argument("--max-reject-fraction", type=float, default=0.05,
                        help="exit 1 when more than this share of questions is rejected (default 0.05)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="reject images with more pixels, read from the header")
    return parser


def _text_field(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise RecordRejected("malformed_record", f"'{name}' must be a non-empty string")
    return value


def load_answers(path: str) -> dict[str, object]:
    """RSVQA answers file -> {str(question_id): answer}."""
    try:
        with open(path, encoding="utf-8") as stream:
            content = json.load(stream)
    except OSError as error:
        raise InputError(f"--answers {path!r} cannot be read ({error.strerror})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"--answers {path!r} is not valid JSON ({error})") from error
    entries = content.get("answers") if isinstance(content, dict) else content
    if not isinstance(entries, list):
        raise InputError(f"--answers {path!r} must hold a list or {{'answers': [...]}}")
    answers = {}
    for position, entry in enumerate(entries):
        if isinstance(entry, dict) and "answer" in entry:
            answers[str(entry.get("question_id", position))] = entry["answer"]
    return answers


def image_file_name(task: str, record: dict) -> str:
    """Relative image path of a question, following GeoChat's eval scripts."""
    if task in ("referring", "region_captioning"):
        image_id = record.get("image_id")
        if isinstance(image_id, int) and not isinstance(image_id, bool):
            image_id = str(image_id)  # numeric ids name files too
        if not isinstance(image_id, str) or not image_id.strip():
            raise RecordRejected("malformed_record", "'image_id' must be a non-empty string or an integer")
        extension = os.path.splitext(image_id)[1].lstrip(".").lower()
        return image_id if extension in DISK_EXTENSIONS else image_id + ".png"
    return _text_field(record, "image")


def build_prompt(task: str, record: dict) -> str:
    """The user text GeoChat sends for this question, without ``<image>`` and without the chat template."""
    if task in ("aid", "ucmerced", "lrben", "hrben"):
        return _text_field(record, "text").replace(IMAGE_TOKEN, "").strip()
    question = _text_field(record, "question")
    if task == "region_captioning":
        if not parse_boxes(question):
            raise RecordRejected("bad_box", f"question {question[:60]!r} holds no box text")
        return "[identify] What is the object present at " + question
    if record.get("type") == "ref":
        return "[refer] Give me the location of <p> " + question + " </p>"
    return "[grounding]" + question


def normalize_question(task: str, record: dict, answers: dict[str, object] | None) -> dict:
    """Everything of the normalized object except the image fields; raises RecordRejected."""
    prompt = build_prompt(task, record)
    parse_boxes(prompt)
    question_id = record["question_id"]
    scene_class = None
    if task in ("aid", "ucmerced"):
        if not isinstance(question_id, str) or "/" not in question_id:
            raise RecordRejected("malformed_record", f"question_id {question_id!r} lacks the '<ClassName>/' prefix")
        scene_class = question_id.split("/", 1)[0]
    ground_truth = record.get("ground_truth", record.get("answer"))
    if ground_truth is None and answers is not None:
        ground_truth = answers.get(str(question_id))
    if ground_truth is None or ground_truth == "":
        raise RecordRejected("missing_ground_truth", f"no ground truth for question {question_id!r}")
    question_type = record.get("category", record.get("type"))
    if task in ("lrben", "hrben", "referring") and not isinstance(question_type, str):
        raise RecordRejected("malformed_record", "no question type ('category' or 'type')")
    normalized = {"question_id": question_id, "task": task, "image": None, "image_width": None,
                  "image_height": None, "prompt": prompt, "ground_truth": ground_truth, "class": scene_class,
                  "type": question_type if isinstance(question_type, str) else None}
    normalized.update({name: record.get(name) for name in PASS_THROUGH_FIELDS})
    return normalized


def find_image(images_dir: str, image_name: str) -> str | None:
    """Relative path of the image file: the exact name, else the only same-stem file with an image extension."""
    check_image_path(image_name)
    if os.path.isfile(os.path.join(images_dir, image_name)):
        return image_name
    stem = os.path.splitext(image_name)[0]
    candidates = [stem + "." + extension for extension in DISK_EXTENSIONS]
    candidates += [stem + "." + extension.upper() for extension in DISK_EXTENSIONS]
    found = [name for name in candidates if os.path.isfile(os.path.join(images_dir, name))]
    return found[0] if len(found) == 1 else None


class ImageCopier:
    """Checks each distinct image once, copies its bytes to ``<out>/images/<task>/`` and remembers the outcome."""

    def __init__(self, task: str, images_dir: str, out_dir: str, max_pixels: int) -> None:
        self.task, self.images_dir, self.out_dir, self.max_pixels = task, images_dir, out_dir, max_pixels
        self.outcomes: dict[str, tuple[str, ImageInfo] | ImageRejected] = {}
        self.copied_bytes = 0
        self.renamed = 0

    def copy(self, image_name: str) -> tuple[str, ImageInfo]:
        """(path relative to ``<out>/images``, info) of an accepted image; raises RecordRejected otherwise."""
        if image_name not in self.outcomes:
            self.outcomes[image_name] = self._check_and_copy(image_name)
        outcome = self.outcomes[image_name]
        if isinstance(outcome, ImageRejected):
            raise RecordRejected(outcome.reason, outcome.detail)
        return outcome

    def _check_and_copy(self, image_name: str) -> tuple[str, ImageInfo] | ImageRejected:
        found_name = find_image(self.images_dir, image_name)
        if found_name is None:
            return ImageRejected("missing_image", f"{image_name}: no such file under {self.images_dir}")
        if found_name != image_name:
            self.renamed += 1
        try:
            image_bytes, info = read_image_file(os.path.join(self.images_dir, found_name), self.max_pixels, found_name)
        except ImageRejected as rejected:
            return rejected
        relative_path = f"{self.task}/{found_name}"
        destination = os.path.join(self.out_dir, "images", relative_path)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        write_bytes_atomic(destination, image_bytes)
        self.copied_bytes += len(image_bytes)
        return relative_path, info


def convert(task: str, records: list[object], copier: ImageCopier, answers: dict[str, object] | None):
    """Normalize every question in input order; returns (normalized objects, rejects)."""
    normalized_questions, rejects = [], []
    seen_ids: set[str] = set()
    missing_ids = 0
    for index, record in enumerate(tqdm(records, desc=f"bench {task}", unit="question")):
        question_id = record.get("question_id") if isinstance(record, dict) else None
        try:
            if isinstance(record, UnparsableLine):
                raise RecordRejected("malformed_record", record.detail)
            if not isinstance(record, dict):
                raise RecordRejected("malformed_record", f"question is a {type(record).__name__}, expected an object")
            if question_id is None:
                question_id, missing_ids = index, missing_ids + 1
                record = {**record, "question_id": index}
            if str(question_id) in seen_ids:
                raise RecordRejected("duplicate_id", f"question_id {question_id!r} already used by an earlier line")
            normalized = normalize_question(task, record, answers)
            image_path, info = copier.copy(image_file_name(task, record))
        except RecordRejected as rejected:
            rejects.append({"index": index, "id": question_id, "reason": rejected.reason, "detail": rejected.detail})
            continue
        seen_ids.add(str(question_id))
        normalized.update(image=image_path, image_width=info.width, image_height=info.height)
        normalized_questions.append(normalized)
    if missing_ids:
        logger.warning("%d questions had no question_id: their 0-based line index is used", missing_ids)
    if copier.renamed:
        logger.warning("%d images were found under another extension than the question file names", copier.renamed)
    return normalized_questions, rejects


def main(argv: list[str] | None = None) -> int:
    """Run the bench command; exit codes as for ``shard``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.answers and args.task not in ("lrben", "hrben"):
        parser.error("--answers applies to lrben and hrben only")
    try:
        records = load_records(args.questions, what="question file")
        if not isinstance(records, list):
            raise InputError(f"question file {args.questions!r} must hold a list of questions")
        if not os.path.isdir(args.images):
            raise InputError(f"--images {args.images!r} is not a directory")
        answers = load_answers(args.answers) if args.answers else None
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    copier = ImageCopier(args.task, args.images, args.out, args.max_image_pixels)
    normalized_questions, rejects = convert(args.task, records, copier, answers)
    payload = "".join(json.dumps(question, ensure_ascii=False) + "\n" for question in normalized_questions)
    write_bytes_atomic(os.path.join(args.out, f"{args.task}.jsonl"), payload.encode("utf-8"))
    write_rejects(os.path.join(args.out, f"{args.task}.rejects.jsonl"), rejects)
    sources = [describe_source(args.questions)] + ([describe_source(args.answers)] if args.answers else [])
    accepted_images = [outcome for outcome in copier.outcomes.values() if not isinstance(outcome, ImageRejected)]
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "eval", "task": args.task, "source": sources,
        "max_image_pixels": args.max_image_pixels,
        "totals": {"input": len(records), "written": len(normalized_questions), "rejected": len(rejects)},
        "images": {"count": len(accepted_images), "bytes": copier.copied_bytes},
        "reject_reasons": count_by([reject["reason"] for reject in rejects]),
    }
    write_bytes_atomic(os.path.join(args.out, f"{args.task}.manifest.json"), json_bytes(manifest))
    print(f"{args.task}: {len(records)} questions, {len(normalized_questions)} written, {len(rejects)} rejected "
          f"{manifest['reject_reasons'] or ''}")
    problem = reject_fraction_problem(manifest["totals"], args.max_reject_fraction)
    if problem:
        print(f"error: {problem.replace('rejects.jsonl', args.task + '.rejects.jsonl')}", file=sys.stderr)
        return 1
    return 0
