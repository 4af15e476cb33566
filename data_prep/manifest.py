"""manifest.json and rejects.jsonl: building, atomic writing, reading, and the end-of-run summary table.

The manifest's keys are fixed by the shard contract (see ``build_manifest``). It holds nothing that depends on the
machine, the time or the worker count, so an interrupted-then-resumed run writes the same bytes as a clean run.
"""

from __future__ import annotations

import sys

import json
import os

from kd_pipeline.data.manifest import FORMAT_VERSION  # the shard contract's version, defined by its reader
from kd_pipeline.errors import UserError
from kd_pipeline.fileio import write_atomic

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"


class ManifestError(UserError):
    """manifest.json is missing or unusable."""


def write_bytes_atomic(path: str, payload: bytes) -> None:
    """Readers never see a half-written file (``kd_pipeline.fileio.write_atomic``)."""
    write_atomic(path, payload)


def json_bytes(payload: object) -> bytes:
    """Stable, human-readable JSON encoding used for every JSON file the converters write."""
    return (json.dumps(payload, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def write_rejects(path: str, rejects: list[dict]) -> None:
    """rejects.jsonl: one ``{"index", "id", "reason", "detail"}`` line per rejected input record, by index."""
    lines = [json.dumps(reject, ensure_ascii=False) + "\n" for reject in sorted(rejects, key=lambda r: r["index"])]
    write_bytes_atomic(path, "".join(lines).encode("utf-8"))


def count_by(values: list[str], order: tuple[str, ...] | None = None) -> dict[str, int]:
    """Histogram of ``values``; keys follow ``order`` (all of them, zeros included) or sorted order."""
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    if order is None:
        return dict(sorted(counts.items()))
    unknown = sorted(set(counts) - set(order))
    return {key: counts.get(key, 0) for key in (*order, *unknown)}


def build_manifest(
    kind: str,
    source: dict | list[dict],
    seed: int,
    val_fraction: float,
    max_image_pixels: int,
    input_count: int,
    shard_results: list[dict],
    split_names: tuple[str, ...],
    task_kinds: dict[str, int],
    rejects: list[dict],
) -> dict:
    """The manifest dict; ``shard_results`` are ``{"name", "split", "samples", "bytes", "sha256"}`` in plan order.

    Raises AssertionError when written + rejected != input: that would mean a record was lost, which is a bug.
    """
    written = sum(shard["samples"] for shard in shard_results)
    if written + len(rejects) != input_count:
        raise AssertionError(f"bookkeeping bug: {written} written + {len(rejects)} rejected != {input_count} input")
    splits = {
        split: {
            "samples": sum(shard["samples"] for shard in shard_results if shard["split"] == split),
            "shards": sum(1 for shard in shard_results if shard["split"] == split),
        }
        for split in split_names
    }
    shard_entries = [
        {key: shard[key] for key in ("name", "split", "samples", "bytes", "sha256")} for shard in shard_results
    ]
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "source": source,
        "seed": seed,
        "val_fraction": val_fraction,
        "max_image_pixels": max_image_pixels,
        "totals": {"input": input_count, "written": written, "rejected": len(rejects)},
        "splits": splits,
        "shards": shard_entries,
        "task_kinds": task_kinds,
        "reject_reasons": count_by([reject["reason"] for reject in rejects]),
    }


def read_manifest(directory: str) -> dict:
    """Load ``directory/manifest.json``; ManifestError names the problem."""
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as stream:
            manifest = json.load(stream)
    except FileNotFoundError as error:
        raise ManifestError(f"{path} does not exist: is {directory!r} a shard directory?") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ManifestError(f"{path} has no 'shards' list")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def summary_table(manifest: dict) -> str:
    """Plain-text table of totals, splits, task kinds and reject reasons, printed at the end of a run."""
    totals = manifest["totals"]
    rows = [("input records", totals["input"]), ("written", totals["written"]), ("rejected", totals["rejected"])]
    rows += [(f"split {name} (samples / shards)", f"{split['samples']} / {split['shards']}")
             for name, split in manifest["splits"].items()]
    rows += [(f"task {name}", count) for name, count in manifest["task_kinds"].items() if count]
    rows += [(f"reject {reason}", count) for reason, count in manifest["reject_reasons"].items()]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)



def write_run_outputs(out_dir: str, manifest: dict, rejects: list[dict]) -> None:
    """Write rejects.jsonl, then manifest.json last: a manifest present means the run finished."""
    write_rejects(os.path.join(out_dir, REJECTS_NAME), rejects)
    write_bytes_atomic(os.path.join(out_dir, MANIFEST_NAME), json_bytes(manifest))


def reject_fraction_problem(totals: dict, max_reject_fraction: float) -> str | None:
    """A message when more than ``max_reject_fraction`` of the input was rejected, else None."""
    if totals["input"] == 0:
        return None
    fraction = totals["rejected"] / totals["input"]
    if fraction > max_reject_fraction:
        return (f"{totals['rejected']} of {totals['input']} records rejected ({fraction:.1%}) exceeds "
                f"--max-reject-fraction {max_reject_fraction}; see {REJECTS_NAME}")
    return None


def finish_run(out_dir: str, manifest: dict, rejects: list[dict], max_reject_fraction: float) -> int:
    """Write manifest.json and rejects.jsonl, print the summary table, and return the command's exit code:
    1 (outputs still written) when rejects exceed ``max_reject_fraction``, else 0."""
    write_run_outputs(out_dir, manifest, rejects)
    print(summary_table(manifest))
    problem = reject_fraction_problem(manifest["totals"], max_reject_fraction)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0
