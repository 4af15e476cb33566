"""``python -m data_prep verify DIR``: re-check a shard directory (``shard`` or ``pt`` output) against its manifest.

For every shard listed in manifest.json: the file exists, has the recorded size and sha256, reads as a tar to its
end, holds the recorded number of samples with adjacent members, every ``{key}.json`` decodes and has the fields
of its kind, and every image passes the checks of sharding (``images.py``) with the recorded extension and size. Also
reported: ``*.tar`` files the manifest does not list, totals that do not add up, a rejects.jsonl whose line count
differs from ``totals.rejected``.

Prints one line per problem, ``NAME: what is wrong``, and exits 1 if there is any (0 otherwise; 2 when the
manifest itself is missing or unreadable).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tarfile

from tqdm import tqdm

from data_prep.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRejected, inspect_image_bytes
from data_prep.manifest import REJECTS_NAME, ManifestError, read_manifest
from data_prep.sources import sha256_file

_END_OF_ARCHIVE_BYTES = 1024
_REQUIRED_FIELDS = {
    "instruct": ("id", "image", "image_ext", "width", "height", "task", "conversations"),
    "prompts": ("id", "image", "image_ext", "width", "height", "task", "conversations"),
    "pretrain": ("id", "task", "text"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="directory holding manifest.json and the shards")
    parser.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel")
    return parser


def _split_member_name(member_name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the base name; extensions are lower-cased."""
    directory, _, base_name = member_name.rpartition("/")
    stem, _, extension = base_name.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _read_samples(shard_path: str) -> tuple[list[tuple[str, dict[str, bytes]]], list[str]]:
    """Samples of a tar as (key, {extension: bytes}) in order, plus problems found while reading it."""
    problems: list[str] = []
    samples: list[tuple[str, dict[str, bytes]]] = []
    finished_keys: set[str] = set()
    try:
        with tarfile.open(shard_path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    problems.append(f"member {member.name!r} is not a regular file")
                    continue
                key, extension = _split_member_name(member.name)
                payload = tar.extractfile(member).read()
                if samples and samples[-1][0] == key:
                    if extension in samples[-1][1]:
                        problems.append(f"sample {key!r} has two '{extension}' members")
                    samples[-1][1][extension] = payload
                    continue
                if key in finished_keys:
                    problems.append(f"members of sample {key!r} are not adjacent (or the key is repeated)")
                if samples:
                    finished_keys.add(samples[-1][0])
                samples.append((key, {extension: payload}))
            archive_end = tar.offset
        # tarfile stops silently at a cut-off header; a complete archive ends with two zero blocks.
        with open(shard_path, "rb") as stream:
            stream.seek(archive_end)
            if stream.read(_END_OF_ARCHIVE_BYTES) != bytes(_END_OF_ARCHIVE_BYTES):
                problems.append(f"truncated or corrupt tar (no end-of-archive marker at byte {archive_end})")
    except (tarfile.TarError, EOFError, OSError) as error:
        problems.append(f"truncated or corrupt tar ({type(error).__name__}: {error})")
    return samples, problems


def _check_sample(key: str, members: dict[str, bytes], kind: str, max_pixels: int) -> list[str]:
    if "json" not in members:
        return [f"sample {key!r} has no .json member"]
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"sample {key!r}: .json does not decode ({error})"]
    if not isinstance(meta, dict):
        return [f"sample {key!r}: .json is not an object"]
    missing = [name for name in _REQUIRED_FIELDS.get(kind, ()) if name not in meta]
    if missing:
        return [f"sample {key!r}: .json lacks {', '.join(missing)}"]
    image_extensions = sorted(set(members) - {"json"})
    expected_ext = meta.get("image_ext")
    if expected_ext is None:
        return [f"sample {key!r}: unexpected member(s) {image_extensions}"] if image_extensions else []
    if image_extensions != [expected_ext]:
        return [f"sample {key!r}: image member(s) {image_extensions}, .json says '{expected_ext}'"]
    try:
        info = inspect_image_bytes(members[expected_ext], max_pixels, f"{key}.{expected_ext}")
    except ImageRejected as rejected:
        return [f"sample {key!r}: {rejected.reason} ({rejected.detail})"]
    if (info.ext, info.width, info.height) != (expected_ext, meta.get("width"), meta.get("height")):
        return [f"sample {key!r}: image is {info.ext} {info.width}x{info.height}, .json says "
                f"{expected_ext} {meta.get('width')}x{meta.get('height')}"]
    return []


def check_shard(directory: str, entry: dict, kind: str, max_pixels: int) -> list[str]:
    """Problems of one shard listed in the manifest (empty list: the shard is fine)."""
    shard_path = os.path.join(directory, entry["name"])
    if not os.path.isfile(shard_path):
        return ["missing shard (listed in manifest.json, no such file)"]
    problems = []
    size = os.path.getsize(shard_path)
    if size != entry["bytes"]:
        problems.append(f"size {size} bytes, manifest says {entry['bytes']} (truncated or changed)")
    if sha256_file(shard_path) != entry["sha256"]:
        problems.append("sha256 differs from manifest (changed bytes)")
    samples, read_problems = _read_samples(shard_path)
    problems.extend(read_problems)
    for key, members in samples:
        problems.extend(_check_sample(key, members, kind, max_pixels))
    if len(samples) != entry["samples"]:
        problems.append(f"count mismatch: {len(samples)} samples, manifest says {entry['samples']}")
    return problems


def _check_shard_star(arguments: tuple[str, dict, str, int]) -> tuple[str, list[str]]:
    return arguments[1]["name"], check_shard(*arguments)


def _directory_problems(directory: str, manifest: dict) -> list[tuple[str, str]]:
    problems = []
    listed = {entry["name"] for entry in manifest["shards"]}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar") and name not in listed:
            problems.append((name, "shard not listed in manifest.json"))
    totals = manifest.get("totals", {})
    written = sum(entry["samples"] for entry in manifest["shards"])
    if totals.get("written") != written:
        problems.append(("manifest.json", f"totals.written {totals.get('written')} != sum of shard samples {written}"))
    if totals.get("input") != totals.get("written", 0) + totals.get("rejected", 0):
        problems.append(("manifest.json", "totals.input != written + rejected"))
    rejects_path = os.path.join(directory, REJECTS_NAME)
    if not os.path.isfile(rejects_path):
        problems.append((REJECTS_NAME, "missing"))
    else:
        with open(rejects_path, encoding="utf-8") as stream:
            reject_lines = sum(1 for line in stream if line.strip())
        if reject_lines != totals.get("rejected"):
            problems.append((REJECTS_NAME, f"{reject_lines} lines, totals.rejected is {totals.get('rejected')}"))
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the verify command; returns 0 when everything checks out, 1 on problems, 2 without a usable manifest."""
    args = build_parser().parse_args(argv)
    try:
        manifest = read_manifest(args.directory)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kind = manifest.get("kind", "instruct")
    max_pixels = manifest.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    jobs = [(args.directory, entry, kind, max_pixels) for entry in manifest["shards"]]
    problems = _directory_problems(args.directory, manifest)
    if args.workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            checked = list(tqdm(pool.imap(_check_shard_star, jobs), total=len(jobs), desc="verify", unit="shard"))
    else:
        checked = [_check_shard_star(job) for job in tqdm(jobs, desc="verify", unit="shard")]
    problems += [(name, problem) for name, shard_problems in checked for problem in shard_problems]
    for name, problem in problems:
        print(f"{name}: {problem}")
    if problems:
        bad_names = sorted({name for name, _ in problems})
        print(f"FAILED: {len(bad_names)} bad: {', '.join(bad_names)}", file=sys.stderr)
        return 1
    print(f"OK: {len(jobs)} shards, {manifest['totals']['written']} samples")
    return 0
