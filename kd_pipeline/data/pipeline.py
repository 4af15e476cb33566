"""The webdataset stages of one epoch, per rank and per DataLoader worker, and the arithmetic that keeps ranks equal.

Stages, in order (open_clip's layout, with positions made explicit so a stream can be replayed exactly):

1. ``epoch_shard_order``: the split's shards permuted by ``(seed, epoch)`` — identical on every rank and worker, so
   nothing needs communicating; the epoch comes from the loader (never a worker-local counter, which restarts
   whenever workers are re-created).
2. ``worker_shards``: shard-level split by node, then by worker (``order[rank::world][worker::workers]``, what
   webdataset's ``split_by_node``/``split_by_worker`` do; written out because those read the rank from the
   environment, while here rank and world size are explicit arguments). A split with fewer shards than readers
   (ranks x workers) is first cut into parts by ``reader_shards``: each tar becomes ``k`` parts, part ``p`` holding
   the samples whose index in the tar is ``p`` mod ``k``, with ``k = readers / gcd(shards, readers)`` so that the
   parts divide evenly over the readers. Parts are then dealt like shards: disjoint, deterministic, and replayable
   from tar headers like whole shards. Each reader of a shared tar reads all of its bytes and decodes only its
   own samples (a tar shared by k readers is read k times per epoch; the page cache usually serves all but one).
3. ``read_shard_samples``: tar members grouped into samples by webdataset's ``tar_file_iterator`` and
   ``group_by_keys`` (raw bytes; nothing decoded); for a part, only its own samples.
4. ``worker_stream``: per pass over the worker's shards, a shuffle buffer (webdataset's ``shuffle``) seeded by
   ``(seed, epoch, rank, worker, pass)``. Its order depends only on the number of samples, never on their
   content, so ``read_shard_keys`` (tar headers only) replays the very same order without reading any data.
   Pass 0 is the worker's share of the epoch; later passes only pad (``repeat=True``).
5. skip: a resumed worker drops the samples it had already consumed — after the shuffle, before any decoding.
6. decode (``samples.*Encoder``): JSON, template, tokenizer, image; bad samples are logged, counted and skipped.
7. batch (``collate``), tagged with the worker's position for the loader state.

Equal steps on every rank: each worker of each rank delivers exactly ``batches_per_worker`` full batches per epoch,
``ceil(S_max / micro_batch_size)`` where ``S_max`` is the most samples any worker can be dealt in any epoch (the sum
of the ``ceil(shards / (world x workers))`` largest shards). A worker whose share is smaller continues with padding
passes over its own shards; those duplicates are flagged ``is_repeat``. With equal shards whose count divides by
world x workers, and a share divisible by the micro-batch size, there are none, and the ranks x workers see disjoint
samples covering the split exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from kd_pipeline.data.manifest import ShardInfo
from kd_pipeline.data.samples import BadSample, BadSampleLog, EncodedItem
from kd_pipeline.data.state import WorkerPosition

log = logging.getLogger(__name__)

# webdataset's tar_file_iterator skips these members; read_shard_keys must skip the same ones.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


# ----------------------------------------------------------------------------------------------------- shard plan


def epoch_shard_order(shards: Iterable[ShardInfo], seed: int, epoch: int) -> list[ShardInfo]:
    """Stage 1: the same permutation of the split's shards on every rank and worker."""
    order = list(shards)
    random.Random(f"kd_pipeline/shards/{seed}/{epoch}").shuffle(order)
    return order


def worker_shards(order: list[ShardInfo], rank: int, world_size: int, worker: int, num_workers: int) -> list[ShardInfo]:
    """Stage 2: split by node, then by worker, at the shard level."""
    return order[rank::world_size][worker::num_workers]


def parts_per_shard(shard_count: int, readers: int) -> int:
    """How many parts each tar is cut into so that ``readers`` readers all get some: 1 when there are enough."""
    if shard_count >= readers:
        return 1
    return readers // math.gcd(shard_count, readers)


def reader_shards(shards: Iterable[ShardInfo], readers: int) -> tuple[ShardInfo, ...]:
    """The units the readers are dealt: the shards themselves, or each cut into ``parts_per_shard`` parts."""
    shards = tuple(shards)
    parts = parts_per_shard(len(shards), readers)
    if parts == 1:
        return shards
    return tuple(dataclasses.replace(shard, name=f"{shard.name}[{part}/{parts}]", part=part, parts=parts,
                                     samples=len(range(part, shard.samples, parts)))
                 for shard in shards for part in range(parts))


def batches_per_worker(shards: Iterable[ShardInfo], world_size: int, num_workers: int, micro_batch_size: int) -> int:
    """Batches every worker delivers in a full epoch: enough for the largest share any epoch can deal a worker.

    ``shards`` are the units dealt to readers (``reader_shards``), at least one per reader."""
    sizes = sorted((shard.samples for shard in shards), reverse=True)
    slots = world_size * num_workers
    if len(sizes) < slots:
        raise ValueError(f"{len(sizes)} shards cannot feed {world_size} ranks x {num_workers} workers = {slots} "
                         f"readers: cut them with reader_shards first")
    largest_share = sum(sizes[:math.ceil(len(sizes) / slots)])
    return math.ceil(largest_share / micro_batch_size)


# ----------------------------------------------------------------------------------------------------- reading


def read_shard_samples(shard: ShardInfo, errors: BadSampleLog) -> Iterator[dict]:
    """Stage 3: raw samples ``{"__key__", "json": bytes, "<ext>": bytes}`` of one tar, in tar order.

    A damaged tar yields the samples before the damage; the damage is counted as ``unreadable_tar``. A tar holding
    a different number of samples than the manifest says is counted as ``shard_count_mismatch``. A part of a
    shared tar (``shard.parts > 1``) yields only the samples whose index is ``shard.part`` mod ``shard.parts``.
    """
    def handler(error: Exception) -> bool:
        errors.record(shard.name, "unreadable_tar", f"{type(error).__name__}: {error}")
        return True

    count = 0
    with open(shard.path, "rb") as stream:
        try:
            members = ({**member, "__url__": shard.path} for member in tar_file_iterator(stream, handler=handler))
            for index, sample in enumerate(group_by_keys(members, handler=handler)):
                if index % shard.parts == shard.part:
                    count += 1
                    yield sample
        except (tarfile.TarError, OSError, EOFError) as error:
            handler(error)
    if count != shard.samples:
        errors.record(shard.name, "shard_count_mismatch", f"the tar holds {count} samples for this reader, the "
                                                          f"manifest says {shard.samples}: rerun `data_prep verify`")


def read_shard_keys(shard: ShardInfo) -> list[str]:
    """The sample keys of one tar in tar order, from its headers only (data is seeked over, never read).

    Mirrors ``read_shard_samples``: same member filters and webdataset's key rule (basename up to its first dot).
    """
    keys: list[str] = []
    try:
        with tarfile.open(shard.path, mode="r:") as archive:
            for member in archive:
                name = member.name
                if not member.isreg() or _META_MEMBER.match(name) or (
                        "/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                key, _ = base_plus_ext(name)
                if key is not None and (not keys or keys[-1] != key):
                    keys.append(key)
    except (tarfile.TarError, OSError, EOFError) as error:
        log.warning("%s: tar headers unreadable after %d samples (%s)", shard.name, len(keys), error)
    return keys[shard.part::shard.parts]


# ----------------------------------------------------------------------------------------------------- streams


def worker_stream(shards: list[ShardInfo], read: Callable[[ShardInfo], Iterable[dict]], *, seed: int, epoch: int,
                  rank: int, worker: int, shuffle_buffer: int,
                  excluded: frozenset[str] = frozenset()) -> Iterator[tuple[dict, bool]]:
    """Stage 4: ``(raw sample, is_repeat)`` forever: pass 0 without ``excluded`` keys, then padding passes.

    Each pass is shuffled on its own, so every pass-0 sample comes out before the first padding duplicate.
    ``read`` is ``read_shard_samples`` (training) or a key-only reader (replay): the order is the same.
    """
    for pass_index in itertools.count():
        source = (sample for shard in shards for sample in read(shard))
        if pass_index == 0 and excluded:
            source = (sample for sample in source if sample["__key__"] not in excluded)
        if shuffle_buffer > 1:
            rng = random.Random(f"kd_pipeline/samples/{seed}/{epoch}/{rank}/{worker}/{pass_index}")
            source = wds_shuffle(shuffle_buffer, shuffle_buffer, rng=rng)(iter(source))
        produced = 0
        for sample in source:
            produced += 1
            yield sample, pass_index > 0
        if produced == 0 and pass_index > 0:
            raise RuntimeError(f"rank {rank} worker {worker}: shards {[shard.name for shard in shards]} hold no "
                               f"samples; every reader needs a non-empty shard (rerun data_prep)")


def replay_keys(shards: list[ShardInfo], keys_of: dict[str, list[str]], consumed: int, **stream_args) -> list[str]:
    """The first ``consumed`` keys a worker's stream produced (from tar headers; for a layout change on resume)."""
    def read_keys(shard: ShardInfo) -> list[dict]:
        return [{"__key__": key} for key in keys_of[shard.name]]

    return [sample["__key__"] for sample, _ in itertools.islice(worker_stream(shards, read_keys, **stream_args),
                                                                consumed)]


# ----------------------------------------------------------------------------------------------------- one epoch


@dataclass(frozen=True)
class EpochPlan:
    """What one rank's workers read in one epoch (identical arithmetic on every rank)."""

    epoch: int
    batches_per_worker: int
    shards: tuple[tuple[ShardInfo, ...], ...]    # per logical worker of this rank
    start: tuple[WorkerPosition, ...]            # per logical worker: where a resumed worker stands
    first_worker: int                            # logical worker of the first batch the DataLoader hands out
    excluded: frozenset[str] = frozenset()       # keys consumed under an earlier layout in this epoch


class EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of one rank: DataLoader worker ``i`` runs logical worker ``(first_worker + i) % num_workers``.

    The rotation makes a resumed DataLoader, which always starts with its worker 0, continue the round-robin with
    the worker whose batch was due next. Each batch carries ``_position``: the logical worker, its batch count and
    raw-sample count after this batch, and the statistics counted while building it.
    """

    def __init__(self, plan: EpochPlan, encoder, collate: Callable[[list[EncodedItem]], dict], *, seed: int,
                 rank: int, shuffle_buffer: int, micro_batch_size: int) -> None:
        super().__init__()
        self.plan = plan
        self.encoder = encoder
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.micro_batch_size = micro_batch_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        num_workers = len(self.plan.shards)
        yield from self._batches(worker=(self.plan.first_worker + physical) % num_workers)

    def _batches(self, worker: int) -> Iterator[dict]:
        plan, start = self.plan, self.plan.start[worker]
        errors = BadSampleLog(f"rank {self.rank} worker {worker}")
        shards = list(plan.shards[worker])
        stream = worker_stream(shards, lambda shard: read_shard_samples(shard, errors), seed=self.seed,
                               epoch=plan.epoch, rank=self.rank, worker=worker, shuffle_buffer=self.shuffle_buffer,
                               excluded=plan.excluded)
        # Stage 5: consumed samples leave the stream here, before the encoder (and its image decode) sees them.
        stream = itertools.islice(stream, start.samples, None)
        position = WorkerPosition(batches=start.batches, samples=start.samples)
        give_up_after = 2 * sum(shard.samples for shard in shards) + 1
        consecutive_bad, items = 0, []
        reported = {"decoded": self.encoder.images_decoded, "errors": {}}
        while position.batches < plan.batches_per_worker:
            sample, is_repeat = next(stream)
            position.samples += 1
            try:
                item = self.encoder(sample)
            except BadSample as bad:
                errors.record(sample["__key__"], bad.reason, bad.detail)
                consecutive_bad += 1
                if consecutive_bad > give_up_after:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no usable sample in two passes over "
                                       f"{[shard.name for shard in shards]} (last: {bad})") from bad
                continue
            consecutive_bad = 0
            item.repeat = is_repeat
            items.append(item)
            if len(items) == self.micro_batch_size:
                position.batches += 1
                batch = self.collate(items)
                batch["_position"] = {"epoch": plan.epoch, "worker": worker, "batches": position.batches,
                                      "samples": position.samples,
                                      "stats": self._stats_delta(items, errors, reported)}
                items = []
                yield batch

    def _stats_delta(self, items: list[EncodedItem], errors: BadSampleLog, reported: dict) -> dict:
        """Counts since this worker's previous batch (the loader adds up the deltas of the batches it yields)."""
        skipped = {reason: count - reported["errors"].get(reason, 0) for reason, count in errors.counts.items()
                   if count != reported["errors"].get(reason, 0)}
        decoded = self.encoder.images_decoded - reported["decoded"]
        reported["errors"] = dict(errors.counts)
        reported["decoded"] = self.encoder.images_decoded
        return {"samples": len(items), "repeats": sum(item.repeat for item in items),
                "truncated": sum(item.truncated for item in items), "images_decoded": decoded, "skipped": skipped}
