"""Reading a shard folder's ``manifest.json`` (the shard contract written by ``data_prep``) for the loaders.

The loader needs, per split, the shard files in manifest order with their sample counts: the counts fix the number of
batches per epoch before any tar is opened, so every rank agrees on it without communicating. Files are checked to
exist with the manifest's byte size (cheap); full sha256 verification is ``data_prep verify``'s job.

A fingerprint of the split (shard names, sample counts and hashes) is stored in every loader state, so a resume
against different shards is refused instead of silently replaying a different stream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kd_pipeline.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KIND_OF_SPLIT = {"train": "instruct", "val": "instruct", "pt": "pretrain"}
PROMPT_KINDS = ("instruct", "prompts")  # stage 2 reads prompts: labelled records or `data_prep shard --prompts-only`


class ManifestError(UserError, ValueError):
    """A shard folder or manifest that the loader cannot use, worded with the path and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    name: str       # e.g. "train-000003.tar"; a part of a shared shard: "train-000003.tar[1/4]"
    path: str       # absolute path of the tar
    samples: int    # samples the manifest says the tar holds (a part: the samples of that part)
    sha256: str
    part: int = 0   # a shard shared by `parts` readers: this reader's samples are those whose index in the tar
    parts: int = 1  # satisfies index % parts == part (see data/pipeline.py, reader_shards)


@dataclass(frozen=True)
class SplitShards:
    folder: str
    split: str
    kind: str                   # "instruct" | "pretrain"
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def fingerprint(self) -> str:
        """sha256 over (name, samples, sha256) of every shard of the split, in manifest order."""
        listing = [[shard.name, shard.samples, shard.sha256] for shard in self.shards]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def read_split(folder: str | Path, split: str, kinds: tuple[str, ...] | None = None) -> SplitShards:
    """The shards of ``split`` ("train", "val" or "pt") listed in ``folder/manifest.json``, checked on disk;
    ``kinds``: the manifest kinds the reader accepts (default: the split's own, ``KIND_OF_SPLIT``)."""
    if not str(folder) or not Path(folder).is_dir():
        raise ManifestError(f"shard folder {str(folder)!r} does not exist: set data.shards (or data.pt_shards) to a "
                            f"`data_prep shard` / `data_prep pt` output folder")
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ManifestError(f"{path} does not exist: {folder} is not a finished data_prep output "
                            f"(the manifest is written last; rerun data_prep)") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); rerun data_prep") from error
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ManifestError(f"{path}: format_version {version!r}, this loader reads version {FORMAT_VERSION}")
    expected_kind = KIND_OF_SPLIT.get(split)
    if expected_kind is None:
        raise ManifestError(f"unknown split {split!r}; known: {', '.join(KIND_OF_SPLIT)}")
    accepted = kinds or (expected_kind,)
    if manifest.get("kind") == "prompts" and "prompts" not in accepted:
        raise ManifestError(f"{path} holds prompts without answers (data_prep shard --prompts-only): training on "
                            f"answers needs instruction shards; use this folder as stage 2's data.shards")
    if manifest.get("kind") not in accepted:
        raise ManifestError(f"{path} is a {manifest.get('kind')!r} manifest but split {split!r} needs "
                            f"{expected_kind!r} (instruction shards for train/val, data_prep pt output for pt)")
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        raise ManifestError(f"{path} has no 'shards' list")
    shards = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("split") != split:
            continue
        shards.append(_checked_shard(folder, path, entry))
    if not shards:
        raise ManifestError(f"{path} lists no {split!r} shards")
    return SplitShards(folder=str(folder.resolve()), split=split, kind=manifest["kind"], shards=tuple(shards))


def _checked_shard(folder: Path, manifest_path: Path, entry: dict) -> ShardInfo:
    name, samples = entry.get("name"), entry.get("samples")
    if not isinstance(name, str) or "/" in name or not name.endswith(".tar"):
        raise ManifestError(f"{manifest_path}: bad shard name {name!r}")
    if not isinstance(samples, int) or samples < 0:
        raise ManifestError(f"{manifest_path}: shard {name} has a bad sample count {samples!r}")
    tar_path = folder / name
    if not tar_path.is_file():
        raise ManifestError(f"{tar_path} is listed in {manifest_path} but missing; copy the whole folder or rerun "
                            f"data_prep")
    expected_bytes = entry.get("bytes")
    if isinstance(expected_bytes, int) and tar_path.stat().st_size != expected_bytes:
        raise ManifestError(f"{tar_path} has {tar_path.stat().st_size} bytes, the manifest says {expected_bytes}: "
                            f"the copy is incomplete or stale (run `data_prep verify`)")
    return ShardInfo(name=name, path=str(tar_path.resolve()), samples=samples, sha256=str(entry.get("sha256", "")))
