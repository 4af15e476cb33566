"""Planning and writing tar shards, shared by ``shard`` (instruct data) and ``pt`` (pre-training data).

Order of work:
1. The caller screens its records without decoding images and hands over ``SampleSpec``s (input index, key, the
   sample's JSON object, image path and size on disk).
2. ``assign_splits`` shuffles them with the seed and cuts off the validation part; ``plan_shards`` then cuts each
   split into ``ShardJob``s by the estimated tar size and a sample cap. The plan depends on the seed, the records
   and the image file sizes only, never on the worker count.
3. ``run_shard_jobs`` writes the jobs, in one process or a ``spawn`` pool. A worker checks every image
   (``images.py``; rejects are dropped from their own shard only, so they move no other sample), writes
   ``NAME.tmp`` while hashing it, fsyncs, renames it to ``NAME`` and records the result in ``.progress/NAME.json``
   together with the job's fingerprint.
4. On ``--resume`` a shard is kept when its progress record has the same fingerprint and the file still has the
   recorded size, sha256 and sample count; everything else is rewritten. Stale ``*.tmp`` files and shards that
   the current plan does not contain are removed. ``.progress/`` stays after a complete run (a few KB per shard)
   so that resuming a finished directory only re-checks it. The fingerprint covers image names and sizes, not
   their bytes: an image replaced by another of exactly the same size is not noticed by ``--resume``.
   Tests simulate an interruption with the environment variable ``DATA_PREP_TEST_FAIL_AFTER_SHARDS=N`` (raise
   after N shards were completed).

Parallel writers on several machines (a Slurm array, ``launch/slurm_data_prep.sh``): every task computes the same
plan (it depends on the seed, records and image sizes only) and writes ``task_jobs(jobs, index, count)``, a disjoint
round-robin share, so shard numbers never collide; a task reuses its own verified shards like ``--resume`` (a
requeued task redoes only what is missing) and removes only its own temporary files. A final merge step re-plans,
checks every shard against its progress record (``collect_finished_shards``) and writes the one manifest.

Tar members are written with ``tarfile`` directly (not webdataset.TarWriter, whose mtime defaults to time.time()):
USTAR format, mtime 0, uid/gid 0, empty uname/gname, mode 0444, so equal inputs give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

from data_prep.images import ImageRejected, read_image_file
from data_prep.manifest import FORMAT_VERSION, json_bytes, write_bytes_atomic
from data_prep.sources import sha256_file
from kd_pipeline.fileio import TEMPORARY_NAME

logger = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
TEMPORARY_SUFFIX = ".tmp"
# Test hook: raise after this many shards were completed in this run, to simulate an interrupted run.
FAIL_AFTER_SHARDS_ENV = "DATA_PREP_TEST_FAIL_AFTER_SHARDS"
_TAR_BLOCK = 512
_JSON_SIZE_SLACK = 64  # width/height/ext are filled in after planning; the estimate leaves room for them
# tarfile copies a member's bytes in pieces of this size (its default, 16 KiB, costs a third more CPU on 200 KB
# images); one piece holds a typical image.
_COPY_BUFFER_BYTES = 4 << 20


@dataclass(frozen=True)
class SampleSpec:
    """One sample to write: ``meta`` becomes ``{key}.json``; the image (if any) is checked and copied at write time."""

    index: int
    key: str
    meta: dict
    image_path: str | None = None
    image_name: str | None = None
    image_size: int = 0


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to write one shard; ``fingerprint`` identifies the job for ``--resume``."""

    name: str
    split: str
    samples: tuple[SampleSpec, ...]
    max_pixels: int
    fingerprint: str


@dataclass
class ShardResult:
    """What a written shard contributes to the manifest and rejects.jsonl."""

    name: str
    split: str
    samples: int
    bytes: int
    sha256: str
    rejects: list[dict] = field(default_factory=list)
    task_kinds: list[str] = field(default_factory=list)


def sample_key(index: int) -> str:
    """Contract key of the sample from input record ``index``: dot-free, stable, no leading underscore."""
    return f"{index:09d}"


def _padded(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK  # header block + data rounded up to whole blocks


def estimated_tar_bytes(spec: SampleSpec) -> int:
    """Bytes the sample will take in a tar (headers and padding included), before its image is checked."""
    json_size = len(json.dumps(spec.meta, ensure_ascii=False).encode("utf-8")) + _JSON_SIZE_SLACK
    return _padded(json_size) + (_padded(spec.image_size) if spec.image_path else 0)


def assign_splits(
    specs: list[SampleSpec], seed: int, val_fraction: float, train_split: str = "train"
) -> dict[str, list[SampleSpec]]:
    """Seeded shuffle, then the first round(val_fraction * n) samples form ``val``, the rest ``train_split``.

    Shuffling mixes GeoChat's source datasets (which come grouped in the input file) across shards.
    """
    order = list(range(len(specs)))
    random.Random(seed).shuffle(order)
    val_count = round(val_fraction * len(specs))
    splits = {train_split: [specs[position] for position in order[val_count:]]}
    if val_fraction > 0:
        splits["val"] = [specs[position] for position in order[:val_count]]
    return splits


def _job_fingerprint(name: str, samples: list[SampleSpec], max_pixels: int) -> str:
    # Image names (not absolute paths) so that a moved images directory does not invalidate finished shards.
    description = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "max_pixels": max_pixels,
        "samples": [[spec.index, spec.key, spec.meta, spec.image_name, spec.image_size] for spec in samples],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


def plan_shards(
    splits: dict[str, list[SampleSpec]], max_shard_bytes: int, max_shard_samples: int, max_pixels: int
) -> list[ShardJob]:
    """Cut each split, in its shuffled order, into ``{split}-%06d.tar`` jobs.

    A shard is closed before the sample that would push it past ``max_shard_bytes`` (a single larger sample gets a
    shard of its own) or once it holds ``max_shard_samples``. An empty split gets no shard.
    """
    jobs = []
    for split, specs in splits.items():
        current: list[SampleSpec] = []
        current_bytes = 0
        shard_number = 0
        for spec in specs:
            sample_bytes = estimated_tar_bytes(spec)
            if current and (current_bytes + sample_bytes > max_shard_bytes or len(current) >= max_shard_samples):
                jobs.append(_make_job(split, shard_number, current, max_pixels))
                current, current_bytes, shard_number = [], 0, shard_number + 1
            current.append(spec)
            current_bytes += sample_bytes
        if current:
            jobs.append(_make_job(split, shard_number, current, max_pixels))
    return jobs


def _make_job(split: str, shard_number: int, samples: list[SampleSpec], max_pixels: int) -> ShardJob:
    name = f"{split}-{shard_number:06d}.tar"
    return ShardJob(name, split, tuple(samples), max_pixels, _job_fingerprint(name, samples, max_pixels))


def _tar_info(member_name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member_name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingWriter:
    """Write-through wrapper of a binary file that hashes (sha256) and counts the bytes on their way out, so a
    written shard need not be read back to be hashed."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._stream.write(data)

    def tell(self) -> int:
        return self._stream.tell()


def write_shard(job: ShardJob, out_dir: str) -> ShardResult:
    """Check every image of the job, write the shard atomically and record the result under ``.progress/``."""
    final_path = os.path.join(out_dir, job.name)
    temporary_path = final_path + TEMPORARY_SUFFIX
    result = ShardResult(job.name, job.split, samples=0, bytes=0, sha256="")
    with open(temporary_path, "wb") as raw_stream:
        hashing_stream = _HashingWriter(raw_stream)
        with tarfile.open(fileobj=hashing_stream, mode="w", format=tarfile.USTAR_FORMAT,
                          copybufsize=_COPY_BUFFER_BYTES) as tar:
            for spec in job.samples:
                meta = dict(spec.meta)
                members = []
                if spec.image_path is not None:
                    try:
                        image_bytes, info = read_image_file(spec.image_path, job.max_pixels, spec.image_name)
                    except ImageRejected as rejected:
                        result.rejects.append(
                            {"index": spec.index, "id": meta.get("id"), "reason": rejected.reason,
                             "detail": rejected.detail}
                        )
                        continue
                    meta.update(image_ext=info.ext, width=info.width, height=info.height)
                    members.append((f"{spec.key}.{info.ext}", image_bytes))
                json_payload = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                # The JSON member goes first: readers learn the sample's fields before its image bytes.
                members.insert(0, (f"{spec.key}.json", json_payload))
                for member_name, payload in members:
                    tar.addfile(_tar_info(member_name, len(payload)), io.BytesIO(payload))
                result.samples += 1
                result.task_kinds.append(meta["task"])
        raw_stream.flush()
        os.fsync(raw_stream.fileno())
    os.replace(temporary_path, final_path)
    result.bytes = hashing_stream.size
    result.sha256 = hashing_stream.digest.hexdigest()
    progress_path = os.path.join(out_dir, PROGRESS_DIR, job.name + ".json")
    write_bytes_atomic(progress_path, json_bytes({"fingerprint": job.fingerprint, "result": asdict(result)}))
    return result


def count_tar_samples(path: str) -> int:
    """Number of ``*.json`` members (one per sample) of a tar; raises tarfile.TarError/EOFError if unreadable."""
    with tarfile.open(path, mode="r:") as tar:
        return sum(1 for member in tar if member.name.endswith(".json"))


def load_finished_shard(job: ShardJob, out_dir: str) -> ShardResult | None:
    """The recorded result of a shard written by an earlier run of the same plan, or None if it must be redone."""
    progress_path = os.path.join(out_dir, PROGRESS_DIR, job.name + ".json")
    shard_path = os.path.join(out_dir, job.name)
    try:
        with open(progress_path, encoding="utf-8") as stream:
            progress = json.load(stream)
        if progress["fingerprint"] != job.fingerprint:
            logger.info("%s: planned content changed since the earlier run; rewriting", job.name)
            return None
        result = ShardResult(**progress["result"])
        if os.path.getsize(shard_path) != result.bytes or sha256_file(shard_path) != result.sha256:
            logger.warning("%s: size or sha256 differs from its progress record; rewriting", job.name)
            return None
        if count_tar_samples(shard_path) != result.samples:
            logger.warning("%s: sample count differs from its progress record; rewriting", job.name)
            return None
        return result
    except FileNotFoundError:
        return None
    except (OSError, KeyError, TypeError, json.JSONDecodeError, tarfile.TarError, EOFError) as error:
        logger.warning("%s: cannot reuse earlier output (%s); rewriting", job.name, error)
        return None


def task_jobs(jobs: list[ShardJob], task_index: int, num_tasks: int) -> list[ShardJob]:
    """Task ``task_index`` of ``num_tasks``'s share of the plan: every ``num_tasks``-th job (round-robin spreads the
    splits and the shard sizes evenly); the shares are disjoint and cover the plan."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return jobs[task_index::num_tasks]


def remove_stale_outputs(out_dir: str, jobs: list[ShardJob], shard_prefixes: tuple[str, ...],
                         planned_names: set[str] | None = None) -> None:
    """Delete temporary files and shards/progress records that are not part of the current plan.

    ``jobs`` are this writer's jobs; ``planned_names`` (default: their names) the whole plan, when other writers
    work on the rest of it at the same time: their temporary files are theirs to clean up.
    """
    own = {job.name for job in jobs}
    planned = own if planned_names is None else planned_names
    progress_dir = os.path.join(out_dir, PROGRESS_DIR)
    for folder, suffix in ((out_dir, ""), (progress_dir, ".json")):
        for name in sorted(os.listdir(folder)):
            # write_atomic's in-flight file (another task may be writing it right now)
            in_flight = TEMPORARY_NAME.fullmatch(name)
            temporary = name.endswith(TEMPORARY_SUFFIX) or in_flight is not None
            shard = (in_flight.group(1) if in_flight else name.removesuffix(TEMPORARY_SUFFIX)).removesuffix(suffix)
            is_shard_file = folder == progress_dir or (shard.endswith(".tar") and shard.startswith(shard_prefixes))
            stale = (temporary and (shard in own or shard not in planned)) or (is_shard_file and shard not in planned)
            if not stale:
                continue
            if folder == out_dir:
                logger.warning("removing %s: left over from an interrupted or different run", name)
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass  # another task of the same plan removed it first


def run_shard_jobs(
    jobs: list[ShardJob],
    out_dir: str,
    workers: int,
    resume: bool,
    shard_prefixes: tuple[str, ...],
    known_rejects: int = 0,
    planned_names: set[str] | None = None,
) -> list[ShardResult]:
    """Write (or, with ``resume``, reuse) every shard of ``jobs``; returns results in plan order.

    ``known_rejects`` (records already rejected while screening) only feeds the progress bar; ``planned_names`` is
    the whole plan when ``jobs`` is one task's share of it (see ``remove_stale_outputs``).
    """
    from tqdm import tqdm  # here, not at the top: every shard worker imports this module and shows no progress

    os.makedirs(os.path.join(out_dir, PROGRESS_DIR), exist_ok=True)
    remove_stale_outputs(out_dir, jobs, shard_prefixes, planned_names)
    results: dict[str, ShardResult] = {}
    if resume:
        for job in tqdm(jobs, desc="checking finished shards", unit="shard", leave=False):
            finished = load_finished_shard(job, out_dir)
            if finished is not None:
                results[job.name] = finished
        logger.info("resume: %d of %d shards already complete", len(results), len(jobs))
    pending = [job for job in jobs if job.name not in results]
    fail_after = int(os.environ.get(FAIL_AFTER_SHARDS_ENV, "0") or 0)

    progress = tqdm(
        total=sum(len(job.samples) for job in jobs),
        initial=sum(len(job.samples) for job in jobs if job.name in results),
        unit="sample", desc="sharding", dynamic_ncols=True,
    )
    rejects_so_far = known_rejects + sum(len(result.rejects) for result in results.values())
    written_bytes, started = 0, time.monotonic()
    for completed, result in enumerate(_results_in_completion_order(pending, out_dir, workers), start=1):
        results[result.name] = result
        rejects_so_far += len(result.rejects)
        written_bytes += result.bytes
        progress.update(result.samples + len(result.rejects))
        megabytes_per_second = written_bytes / max(time.monotonic() - started, 1e-9) / 1e6
        progress.set_postfix(MB_s=f"{megabytes_per_second:.1f}", rejects=rejects_so_far)
        if fail_after and completed >= fail_after:
            progress.close()
            raise RuntimeError(f"{FAIL_AFTER_SHARDS_ENV}={fail_after}: simulated interruption")
    progress.close()
    return [results[job.name] for job in jobs]


def collect_finished_shards(jobs: list[ShardJob], out_dir: str) -> tuple[list[ShardResult], list[str]]:
    """The verified results of every planned shard (in plan order) and the names of those missing or not verifying
    (the merge step of a parallel run)."""
    from tqdm import tqdm  # as in run_shard_jobs

    results, missing = [], []
    for job in tqdm(jobs, desc="checking shards", unit="shard", leave=False):
        finished = load_finished_shard(job, out_dir)
        if finished is None:
            missing.append(job.name)
        else:
            results.append(finished)
    return results, missing


def _results_in_completion_order(pending: list[ShardJob], out_dir: str, workers: int) -> Iterator[ShardResult]:
    if workers <= 1 or len(pending) <= 1:
        for job in pending:
            yield write_shard(job, out_dir)
        return
    # spawn, not fork: workers start clean (no copied tqdm threads or open files) on every platform.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(pending))) as pool:
        yield from pool.imap_unordered(_write_shard_star, [(job, out_dir) for job in pending])


def _write_shard_star(job_and_dir: tuple[ShardJob, str]) -> ShardResult:
    return write_shard(*job_and_dir)


def prepare_out_dir(out_dir: str, resume: bool, shard_prefixes: tuple[str, ...]) -> None:
    """Create ``out_dir``; refuse (ValueError) to overwrite an earlier run's output unless resuming."""
    os.makedirs(out_dir, exist_ok=True)
    if resume:
        return
    leftovers = [
        name for name in sorted(os.listdir(out_dir))
        if name in ("manifest.json", "rejects.jsonl", PROGRESS_DIR) or name.startswith(shard_prefixes)
    ]
    if leftovers:
        raise ValueError(
            f"output directory {out_dir!r} already holds {', '.join(leftovers[:3])}"
            f"{' ...' if len(leftovers) > 3 else ''}: pass --resume to continue that run or choose an empty directory"
        )
