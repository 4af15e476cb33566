"""``python -m data_prep shard``: GeoChat/LLaVA instruction data -> webdataset tar shards + manifest + rejects.

Runbook::

    python -m data_prep shard --instruct GeoChat_Instruct.json --images /data/geochat/images \\
        --out /data/geochat/shards --workers 16            # 512 MiB shards, 1% validation split, seed 0
    python -m data_prep shard ... --resume                 # after an interruption: same arguments plus --resume
    python -m data_prep verify /data/geochat/shards
    python -m data_prep shard --instruct prompts.json --images IMAGES --out prompt_shards --prompts-only
                                                           # stage 2's prompts: questions without answers
    # on several machines: task i of n writes its share of the same plan, then one merge writes the manifest
    python -m data_prep shard ... --task-index i --num-tasks n        # for i in 0..n-1, in parallel
    python -m data_prep shard ... --merge                             # after all tasks (launch/slurm_data_prep.sh)

Output: ``train-%06d.tar``, ``val-%06d.tar``, ``manifest.json``, ``rejects.jsonl`` (format: ``manifest.py`` and the
shard contract). Every input record is either written or listed in rejects.jsonl with a reason code:
``malformed_record``, ``bad_image_token``, ``bad_box`` (``records.py``), ``missing_image`` (checked by stat while
screening), ``duplicate_id`` (first valid occurrence kept), ``unreadable_image`` and ``too_many_pixels`` (found by
the workers while checking the images: ``images.py``; JPEG and PNG without a full-resolution decode).

Duplicate ids are decided while screening, before images are checked: if the first occurrence of an id later turns
out to have an unreadable image, its duplicates stay rejected (the plan is fixed before the image checks so that it
cannot depend on the worker count).

A task (``--task-index/--num-tasks``) writes shards and their progress records only; it reuses its own verified
shards, so a requeued task redoes only what is missing. ``--merge`` writes no shard: it checks every planned shard
against its progress record and writes manifest.json and rejects.jsonl, byte-identical to a one-process run.

``--prompts-only`` shards prompts for stage 2 (``run.stage=minillm`` samples its own answers): every conversation
is cut after its last human turn, so records may end with a question and any trailing answer is dropped, never
written; the manifest's ``kind`` is ``prompts`` and the supervised stages refuse such a folder.

Exit codes: 0 success; 1 more than ``--max-reject-fraction`` of the records rejected (default 0.05: a higher rate
usually means a wrong ``--images`` directory or a schema mismatch; outputs are still written), or ``--merge`` found
shards missing; 2 unusable input or arguments (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tqdm import tqdm

from data_prep.images import DEFAULT_MAX_IMAGE_PIXELS
from data_prep.manifest import MANIFEST_NAME, build_manifest, count_by, finish_run
from data_prep.records import TASK_KINDS, RecordRejected, record_id, task_kind, validate_record
from data_prep.sharding import (
    SampleSpec,
    assign_splits,
    collect_finished_shards,
    plan_shards,
    prepare_out_dir,
    run_shard_jobs,
    sample_key,
    task_jobs,
)
from data_prep.sources import InputError, UnparsableLine, describe_source, load_records

logger = logging.getLogger(__name__)

SHARD_PREFIXES = ("train-", "val-")
MEBIBYTE = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--instruct", required=True, help="GeoChat/LLaVA JSON list or JSONL of records")
    parser.add_argument("--images", required=True, help="directory the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="output directory for shards, manifest.json, rejects.jsonl")
    parser.add_argument("--max-shard-mb", type=float, default=512, help="target shard size in MiB (default 512)")
    parser.add_argument("--max-shard-samples", type=int, default=1_000_000, help="sample cap per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of samples in val (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and shard assignment")
    parser.add_argument("--resume", action="store_true", help="keep complete shards of an interrupted run")
    parser.add_argument("--max-reject-fraction", type=float, default=0.05,
                        help="exit 1 when more than this share of records is rejected (default 0.05)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="reject images with more pixels, read from the header (default %(default)s)")
    parser.add_argument("--num-tasks", type=int, default=1,
                        help="parallel tasks sharing the plan (a Slurm array); each writes its share, no manifest")
    parser.add_argument("--task-index", type=int, default=0, help="this task's index in 0..num-tasks-1")
    parser.add_argument("--prompts-only", action="store_true",
                        help="stage 2's prompts: cut every conversation after its last human turn (no answers "
                             "stored); manifest kind 'prompts'")
    parser.add_argument("--merge", action="store_true",
                        help="after all tasks: check every planned shard and write manifest.json + rejects.jsonl")
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_shard_mb <= 0 or args.max_shard_samples <= 0 or args.workers <= 0 or args.max_image_pixels <= 0:
        parser.error("--max-shard-mb, --max-shard-samples, --workers and --max-image-pixels must be positive")
    if not 0 <= args.max_reject_fraction <= 1:
        parser.error(f"--max-reject-fraction must be in [0, 1], got {args.max_reject_fraction}")
    if args.num_tasks < 1 or not 0 <= args.task_index < args.num_tasks:
        parser.error(f"--task-index must be in 0..{args.num_tasks - 1} and --num-tasks >= 1, got "
                     f"{args.task_index} of {args.num_tasks}")
    if args.merge and (args.num_tasks > 1 or args.task_index):
        parser.error("--merge checks the whole plan in one step: it takes no --task-index/--num-tasks")


def screen_records(records: list[object], images_dir: str,
                   prompts_only: bool = False) -> tuple[list[SampleSpec], list[dict]]:
    """Checks that need no decoding, in input order: structure, tokens, boxes, image presence, duplicate ids.

    Returns the samples to plan and the rejects found so far.
    """
    specs: list[SampleSpec] = []
    rejects: list[dict] = []
    seen_ids: set[str] = set()
    for index, record in enumerate(tqdm(records, desc="screening", unit="record", leave=False)):
        try:
            if isinstance(record, UnparsableLine):
                raise RecordRejected("malformed_record", record.detail)
            image_name, conversations = validate_record(record, prompts_only)
            image_path, image_size = None, 0
            if image_name is not None:
                image_path = os.path.join(images_dir, image_name)
                if not os.path.isfile(image_path):
                    raise RecordRejected("missing_image", f"{image_name}: no such file under {images_dir}")
                image_size = os.path.getsize(image_path)
            identifier = record_id(record)
            # ids are compared as text: 7 and "7" would become the same string downstream
            if identifier is not None and str(identifier) in seen_ids:
                raise RecordRejected("duplicate_id", f"id {identifier!r} already used by an earlier record")
        except RecordRejected as rejected:
            rejects.append({"index": index, "id": record_id(record), "reason": rejected.reason,
                            "detail": rejected.detail})
            continue
        if identifier is not None:
            seen_ids.add(str(identifier))
        meta = {
            "id": identifier, "image": image_name, "image_ext": None, "width": None, "height": None,
            "task": task_kind(conversations, has_image=image_name is not None), "conversations": conversations,
        }
        specs.append(SampleSpec(index, sample_key(index), meta, image_path, image_name, image_size))
    return specs, rejects


def main(argv: list[str] | None = None) -> int:
    """Run the shard command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    try:
        records = load_records(args.instruct)
        if not isinstance(records, list):
            raise InputError(f"instruct file {args.instruct!r} holds a {type(records).__name__}, expected a list")
        if not os.path.isdir(args.images):
            raise InputError(f"--images {args.images!r} is not a directory")
        parallel = args.num_tasks > 1 or args.merge
        # Tasks and the merge share the folder with each other (and with a requeued earlier try of themselves).
        prepare_out_dir(args.out, args.resume or parallel, SHARD_PREFIXES)
        if parallel and not args.resume and os.path.exists(os.path.join(args.out, MANIFEST_NAME)):
            raise ValueError(f"output directory {args.out!r} already holds a finished run (manifest.json): pass "
                             f"--resume to check it again or choose an empty directory")
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    source = describe_source(args.instruct)
    specs, rejects = screen_records(records, args.images, args.prompts_only)
    logger.info("screened %d records: %d to write, %d rejected", len(records), len(specs), len(rejects))
    splits = assign_splits(specs, args.seed, args.val_fraction)
    jobs = plan_shards(splits, int(args.max_shard_mb * MEBIBYTE), args.max_shard_samples, args.max_image_pixels)
    if args.merge:
        results, missing = collect_finished_shards(jobs, args.out)
        if missing:
            print(f"error: {len(missing)} of {len(jobs)} planned shards are missing or do not match their progress "
                  f"record ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): rerun the tasks that "
                  f"write them (shard i of the plan belongs to task i % num-tasks), then merge again",
                  file=sys.stderr)
            return 1
    elif args.num_tasks > 1:
        share = task_jobs(jobs, args.task_index, args.num_tasks)
        run_shard_jobs(share, args.out, args.workers, True, SHARD_PREFIXES, known_rejects=len(rejects),
                       planned_names={job.name for job in jobs})
        print(f"task {args.task_index} of {args.num_tasks}: {len(share)} of {len(jobs)} shards written or "
              f"verified; run --merge after every task finished")
        return 0
    else:
        results = run_shard_jobs(jobs, args.out, args.workers, args.resume, SHARD_PREFIXES,
                                 known_rejects=len(rejects))

    for result in results:
        rejects.extend(result.rejects)
    manifest = build_manifest(
        kind="prompts" if args.prompts_only else "instruct", source=source, seed=args.seed,
        val_fraction=args.val_fraction,
        max_image_pixels=args.max_image_pixels, input_count=len(records),
        shard_results=[vars(result) for result in results], split_names=("train", "val"),
        task_kinds=count_by([kind for result in results for kind in result.task_kinds], TASK_KINDS),
        rejects=rejects,
    )
    return finish_run(args.out, manifest, rejects, args.max_reject_fraction)
