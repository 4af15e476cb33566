"""``python -m data_prep pt``: the pre-training corpus D_PT -> ``pt-%06d.tar`` shards + manifest (kind "pretrain").

Runbook::

    python -m data_prep pt --text corpus_a.txt corpus_b.jsonl --out /data/dpt --workers 8
    python -m data_prep pt --text corpus.txt --captions captions.json --images /data/cap_images --out /data/dpt
    python -m data_prep verify /data/dpt

Inputs (the seeded shuffle mixes all of them across shards):
- ``--text FILE...``: ``*.jsonl`` files hold one ``{"text": str, "id"?: str|int}`` object per line; any other file
  is plain UTF-8 text cut into documents by ``--text-unit``: ``line`` (default: one document per non-blank line, the
  layout of ``synth``'s corpus and of most dumps) or ``paragraph`` (blocks separated by blank lines, inner line
  breaks kept).
- ``--captions FILE --images DIR``: image-caption pairs, a JSON list or JSONL of ``{"id"?, "image", "caption"}`` (or
  ``"text"`` instead of ``"caption"``, or LLaVA's pre-training layout whose first ``gpt`` turn is the caption).

A sample's ``{key}.json`` is ``{"id", "task": "pretrain", "text"}`` plus ``"image", "image_ext", "width",
"height"`` for caption pairs (then ``text`` is the caption). Input indices run over the files in the order given
(text files, then captions); rejects.jsonl and the exit codes work as for ``shard`` (reasons: malformed_record,
missing_image, unreadable_image, too_many_pixels, duplicate_id).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from data_prep.images import DEFAULT_MAX_IMAGE_PIXELS
from data_prep.manifest import build_manifest, finish_run
from data_prep.records import IMAGE_TOKEN, RecordRejected, check_image_path, record_id
from data_prep.sharding import SampleSpec, assign_splits, plan_shards, prepare_out_dir, run_shard_jobs, sample_key
from data_prep.sources import InputError, UnparsableLine, describe_source, load_records, load_text_documents

logger = logging.getLogger(__name__)

SHARD_PREFIXES = ("pt-",)
MEBIBYTE = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep pt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", nargs="+", default=[], help="plain text or JSONL files of documents")
    parser.add_argument("--text-unit", choices=("line", "paragraph"), default="line",
                        help="how plain text files are cut into documents (default line)")
    parser.add_argument("--captions", help="JSON list or JSONL of image-caption records")
    parser.add_argument("--images", help="directory the captions' 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-shard-mb", type=float, default=512, help="target shard size in MiB (default 512)")
    parser.add_argument("--max-shard-samples", type=int, default=1_000_000, help="sample cap per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    parser.add_argument("--resume", action="store_true", help="keep complete shards of an interrupted run")
    parser.add_argument("--max-reject-fraction", type=float, default=0.05,
                        help="exit 1 when more than this share of documents is rejected (default 0.05)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="reject images with more pixels, read from the header")
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.text and not args.captions:
        parser.error("give --text FILE... and/or --captions FILE --images DIR")
    if bool(args.captions) != bool(args.images):
        parser.error("--captions and --images go together")
    if args.max_shard_mb <= 0 or args.max_shard_samples <= 0 or args.workers <= 0 or args.max_image_pixels <= 0:
        parser.error("--max-shard-mb, --max-shard-samples, --workers and --max-image-pixels must be positive")
    if not 0 <= args.max_reject_fraction <= 1:
        parser.error(f"--max-reject-fraction must be in [0, 1], got {args.max_reject_fraction}")


def _text_of_document(document: object) -> str:
    if isinstance(document, UnparsableLine):
        raise RecordRejected("malformed_record", document.detail)
    if not isinstance(document, dict):
        raise RecordRejected("malformed_record", f"document is a {type(document).__name__}, expected an object")
    text = document.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RecordRejected("malformed_record", "'text' must be a non-empty string")
    return text


def _caption_of_record(record: dict) -> str:
    for field_name in ("caption", "text"):
        if isinstance(record.get(field_name), str) and record[field_name].strip():
            return record[field_name]
    turns = record.get("conversations")
    if isinstance(turns, list):
        for turn in turns:
            if isinstance(turn, dict) and turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
                if turn["value"].strip():
                    return turn["value"].replace(IMAGE_TOKEN, "").strip()
    raise RecordRejected("malformed_record", "no non-empty 'caption', 'text' or gpt turn")


def screen_inputs(args: argparse.Namespace) -> tuple[list[SampleSpec], list[dict], int, list[dict]]:
    """Read every input, check what needs no decoding; returns (specs, rejects, input count, sources)."""
    inputs: list[tuple[object, str | None]] = []  # (document or caption record, images dir or None)
    sources = []
    for text_path in args.text:
        inputs.extend((document, None) for document in load_text_documents(text_path, args.text_unit))
        sources.append(describe_source(text_path))
    if args.captions:
        records = load_records(args.captions, what="captions file")
        if not isinstance(records, list):
            raise InputError(f"captions file {args.captions!r} must hold a list of records")
        inputs.extend((record, args.images) for record in records)
        sources.append(describe_source(args.captions))

    specs: list[SampleSpec] = []
    rejects: list[dict] = []
    seen_ids: set[str] = set()
    for index, (record, images_dir) in enumerate(inputs):
        identifier = record_id(record)
        try:
            spec = _screen_one(index, record, images_dir, identifier)
            if identifier is not None and str(identifier) in seen_ids:
                raise RecordRejected("duplicate_id", f"id {identifier!r} already used by an earlier document")
        except RecordRejected as rejected:
            rejects.append({"index": index, "id": identifier, "reason": rejected.reason, "detail": rejected.detail})
            continue
        if identifier is not None:
            seen_ids.add(str(identifier))
        specs.append(spec)
    return specs, rejects, len(inputs), sources


def _screen_one(index: int, record: object, images_dir: str | None, identifier: object) -> SampleSpec:
    if images_dir is None:
        meta = {"id": identifier, "task": "pretrain", "text": _text_of_document(record)}
        return SampleSpec(index, sample_key(index), meta)
    if isinstance(record, UnparsableLine):
        raise RecordRejected("malformed_record", record.detail)
    if not isinstance(record, dict):
        raise RecordRejected("malformed_record", f"caption record is a {type(record).__name__}, expected an object")
    image_name = record.get("image")
    if not isinstance(image_name, str) or not image_name.strip():
        raise RecordRejected("malformed_record", "caption record needs a non-empty 'image' path")
    check_image_path(image_name)
    caption = _caption_of_record(record)
    image_path = os.path.join(images_dir, image_name)
    if not os.path.isfile(image_path):
        raise RecordRejected("missing_image", f"{image_name}: no such file under {images_dir}")
    meta = {"id": identifier, "task": "pretrain", "text": caption, "image": image_name,
            "image_ext": None, "width": None, "height": None}
    return SampleSpec(index, sample_key(index), meta, image_path, image_name, os.path.getsize(image_path))


def main(argv: list[str] | None = None) -> int:
    """Run the pt command; exit codes as for ``shard``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    try:
        if args.images and not os.path.isdir(args.images):
            raise InputError(f"--images {args.images!r} is not a directory")
        specs, rejects, input_count, sources = screen_inputs(args)
        prepare_out_dir(args.out, args.resume, SHARD_PREFIXES)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    logger.info("screened %d documents: %d to write, %d rejected", input_count, len(specs), len(rejects))
    splits = assign_splits(specs, args.seed, val_fraction=0.0, train_split="pt")
    jobs = plan_shards(splits, int(args.max_shard_mb * MEBIBYTE), args.max_shard_samples, args.max_image_pixels)
    results = run_shard_jobs(jobs, args.out, args.workers, args.resume, SHARD_PREFIXES, known_rejects=len(rejects))

    for result in results:
        rejects.extend(result.rejects)
    manifest = build_manifest(
        kind="pretrain", source=sources, seed=args.seed, val_fraction=0.0, max_image_pixels=args.max_image_pixels,
        input_count=input_count, shard_results=[vars(result) for result in results], split_names=("pt",),
        task_kinds={"pretrain": sum(result.samples for result in results)}, rejects=rejects,
    )
    return finish_run(args.out, manifest, rejects, args.max_reject_fraction)
