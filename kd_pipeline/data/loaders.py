"""The loaders the recipes call: training/pre-training/prompt streams with exact resume, and exactly-once validation.

``TrainLoader`` (built by ``build_train_loader``, ``build_pt_loader``, ``build_prompt_loader``) is iterable forever:
one torch DataLoader per epoch over ``pipeline.EpochDataset`` (workers are not persistent: each epoch's workers are
created with that epoch's plan passed in, so no worker-local epoch counter can drift), epochs rolling over.
Every rank yields ``steps_per_epoch`` batches per epoch whatever the shard sizes, so no rank waits at an epoch end.
``state_dict()`` is this rank's position after the batches yielded so far (batches prefetched by the DataLoader but
not yet yielded do not count); see ``state.py`` for the saved format and the resume rules, including a resume
under a different world size. Pass the same ``seed`` on every rank: the shard order is derived from it.

``EvalLoader`` (``build_eval_loader``) reads the validation split exactly once: every rank reads all val shards
(val is small) and keeps the samples whose index in manifest order satisfies ``index % world_size == rank``,
decoding only those. Every rank yields ``num_batches`` batches, the same number on all ranks (computed from the
manifest); a rank with fewer real batches (fewer samples, or bad ones skipped) ends with fully masked padding
batches (``is_padding`` True, ``keys`` empty), so collective forwards stay matched.

Statistics (``stats``): samples, repeats, truncated, images_decoded and ``skipped`` per reason, per rank, carried in
the state so they survive a resume (they restart when the layout changes).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator

import torch

from kd_pipeline.config import ConfigError
from kd_pipeline.data import pipeline
from kd_pipeline.data.collate import collate_left_padded, padding_batch, training_collate
from kd_pipeline.data.manifest import PROMPT_KINDS, SplitShards, read_split
from kd_pipeline.data.samples import (BadSample, BadSampleLog, EncodingSettings, InstructEncoder, PretrainEncoder,
                                      PromptEncoder)
from kd_pipeline.data.state import LoaderState, RankState, WorkerPosition
from kd_pipeline.tokenizer import image_token_id

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 256
"""Text tokens of a stage-2 rollout prompt at most (MiniLLM's max_prompt_length); longer prompts are skipped."""


# Workers start from a forkserver, not by forking the rank. On Python < 3.12 a fork can hang the child inside
# os.fork for good when another thread of the parent is creating or deleting its Python thread state at that moment
# (the child inherits a held runtime lock: cpython#112275, fixed in 3.12). A rank's gloo threads do that each time
# they drop the last reference to a tensor (pybind11 takes the GIL from a thread without a thread state). Measured
# with tiny_cpu.yaml on 2 ranks, a validation every step: 3 of 22 runs of 150 steps hung with a forked validation
# worker stuck in os.fork (the CI hang of test_resume_gives_identical_losses_and_weights); 0 of 26 with it. The
# server is started once per rank by fork + exec and is single-threaded. It preloads what unpickling a dataset
# imports, GeoChat's (LLaMA's) tokenizer class included: without it each worker start imports transformers' models
# (0.8 s here), with it a worker starts in 0.1 s as a fork did. Python 3.14 makes forkserver multiprocessing's
# default on Linux for the same kind of reason.
WORKER_START_METHOD = "forkserver"
FORKSERVER_PRELOAD = ["kd_pipeline.data.forkserver_init", "kd_pipeline.data.loaders",
                      "transformers.models.llama.tokenization_llama"]


@functools.cache
def worker_context():
    """The multiprocessing context of every DataLoader here (the first call fixes the forkserver's preload)."""
    import multiprocessing

    context = multiprocessing.get_context(WORKER_START_METHOD)
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


def start_worker_server() -> None:
    """Start this rank's forkserver now, so that its imports (torch and the data modules, ~2 s) overlap the model
    build instead of delaying the first batch. Started by fork + exec: safe with threads running."""
    import multiprocessing.forkserver

    worker_context()
    multiprocessing.forkserver.ensure_running()


def outlive_stop_signals(_worker_id: int, rank_pid: int) -> None:
    """DataLoader workers outlive USR1 and TERM: Slurm signals every process of a step, and the stop decision (and
    the checkpoint) belongs to the rank; a worker killed by the signal would crash the rank.

    Torch's workers exit on a TERM from their rank (multiprocessing ends leftover workers so when the rank exits)
    and die of a TERM from anyone else. Here both signals are blocked and taken by a thread with ``sigwaitinfo``,
    which tells the sender apart: TERM from the rank (``rank_pid``: the worker's parent is the forkserver) still
    ends the worker (a worker ignoring it would keep a failed rank from exiting), everything else is ignored.
    Written out because a Python signal handler never sees the sender."""
    stop_signals = {signal.SIGUSR1, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # this thread and every thread it starts
    for number in stop_signals:  # ignored in the forkserver (forkserver_init); an ignored signal is discarded
        signal.signal(number, signal.SIG_DFL)

    def take_signals() -> None:
        while True:
            received = signal.sigwaitinfo(stop_signals)
            if received.si_signo == signal.SIGTERM and received.si_pid == rank_pid:
                os._exit(0)

    threading.Thread(target=take_signals, name="stop_signals", daemon=True).start()


def worker_settings(num_workers: int) -> dict:
    """DataLoader arguments shared by every loader here: the workers, their start method and signal policy."""
    if not num_workers:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": worker_context(),
            "worker_init_fn": functools.partial(outlive_stop_signals, rank_pid=os.getpid())}


def _add_stats(total: dict, delta: dict) -> None:
    for name, value in delta.items():
        if isinstance(value, dict):
            _add_stats(total.setdefault(name, {}), value)
        else:
            total[name] = total.get(name, 0) + value


# ----------------------------------------------------------------------------------------------------- training


class TrainLoader:
    """An endless, resumable stream of batches for one rank (see the module docstring)."""

    def __init__(self, *, loader: str, split: SplitShards, encoder, collate, seed: int, rank: int, world_size: int,
                 num_workers: int, micro_batch_size: int, shuffle_buffer: int, state: LoaderState | None = None,
                 pin_memory: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.loader, self.split, self.encoder, self.collate = loader, split, encoder, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = num_workers                  # DataLoader processes (0: in the main process)
        self.logical_workers = max(1, num_workers)      # streams per rank
        self.micro_batch_size, self.shuffle_buffer, self.pin_memory = micro_batch_size, shuffle_buffer, pin_memory
        check_readers(split, world_size, self.logical_workers)
        self.units = pipeline.reader_shards(split.shards, world_size * self.logical_workers)
        if len(self.units) > len(split.shards):
            log.info("loader %s: %d %s shard(s) for %d ranks x %d workers: each tar is shared by %d readers at the "
                     "sample level", loader, len(split.shards), split.split, world_size, self.logical_workers,
                     self.units[0].parts)
        self.full_batches_per_worker = pipeline.batches_per_worker(self.units, world_size, self.logical_workers,
                                                                   micro_batch_size)
        self._state = self._initial_state(state)
        self._plan = self._make_plan()

    # -- public view -----------------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same on every rank)."""
        return self.full_batches_per_worker * self.logical_workers

    @property
    def epoch(self) -> int:
        return self._state.epoch

    @property
    def step_in_epoch(self) -> int:
        return self._state.step_in_epoch

    @property
    def steps_in_epoch(self) -> int:
        """Batches of the current epoch: ``steps_per_epoch``, or fewer in an epoch resumed under a new layout."""
        return self._plan.batches_per_worker * self.logical_workers

    @property
    def stats(self) -> dict:
        return self._state.stats

    def state_dict(self) -> dict:
        """This rank's JSON-serialisable state after the batches yielded so far (an epoch end reads as the next)."""
        if self.step_in_epoch >= self.steps_in_epoch:
            return self._fresh_state(self.epoch + 1, stats=self._state.stats).to_dict()
        return self._state.to_dict()

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self.step_in_epoch < self.steps_in_epoch:
                yield from self._epoch_batches()
                if self.step_in_epoch != self.steps_in_epoch:
                    raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after {self.step_in_epoch} of "
                                       f"{self.steps_in_epoch} batches")
            self._state = self._fresh_state(self.epoch + 1, stats=self._state.stats)
            self._plan = self._make_plan()

    # -- internals -------------------------------------------------------------------------------------------

    def _fresh_state(self, epoch: int, *, stats: dict | None = None, previous: LoaderState | None = None) -> RankState:
        return RankState(loader=self.loader, split=self.split.split, fingerprint=self.split.fingerprint,
                         seed=self.seed, world_size=self.world_size, num_workers=self.logical_workers,
                         micro_batch_size=self.micro_batch_size, shuffle_buffer=self.shuffle_buffer, rank=self.rank,
                         epoch=epoch, workers=[WorkerPosition() for _ in range(self.logical_workers)],
                         stats=dict(stats or {}), previous=previous)

    def _initial_state(self, state: LoaderState | None) -> RankState:
        if state is None:
            return self._fresh_state(0)
        state.check_compatible(loader=self.loader, split=self.split.split, fingerprint=self.split.fingerprint,
                               seed=self.seed)
        if state.layout_matches(self.world_size, self.logical_workers, self.micro_batch_size, self.shuffle_buffer):
            return RankState.from_dict(state.ranks[self.rank].to_dict())
        old = state.first
        log.info("loader %s: layout changed from world %d x workers %d x batch %d (buffer %d) to %d x %d x %d (%d); "
                 "%s", self.loader, *old.layout(), self.world_size, self.logical_workers, self.micro_batch_size,
                 self.shuffle_buffer, "starting epoch %d" % state.epoch if state.at_epoch_start() else
                 "re-partitioning what is left of epoch %d" % state.epoch)
        if state.at_epoch_start():
            return self._fresh_state(state.epoch)
        return self._fresh_state(state.epoch, previous=state)

    def _make_plan(self) -> pipeline.EpochPlan:
        order = pipeline.epoch_shard_order(self.units, self.seed, self.epoch)
        shards = tuple(tuple(pipeline.worker_shards(order, self.rank, self.world_size, worker, self.logical_workers))
                       for worker in range(self.logical_workers))
        excluded, batches = frozenset(), self.full_batches_per_worker
        if self._state.previous is not None:
            excluded, batches = self._remainder(order)
        return pipeline.EpochPlan(epoch=self.epoch, batches_per_worker=batches, shards=shards,
                                  start=tuple(self._state.workers), first_worker=self._state.next_worker,
                                  excluded=excluded)

    def _remainder(self, order: list) -> tuple[frozenset[str], int]:
        """Keys consumed under the earlier layout(s) of this epoch, and the batches per worker left to run."""
        tar_keys = {shard.name: pipeline.read_shard_keys(shard) for shard in self.split.shards}
        excluded = consumed_keys(self._state.previous, self.split, tar_keys)
        largest = 0
        for rank in range(self.world_size):  # every rank computes every rank's share, so all agree on the count
            for worker in range(self.logical_workers):
                share = pipeline.worker_shards(order, rank, self.world_size, worker, self.logical_workers)
                left = sum(1 for unit in share for key in unit_keys(unit, tar_keys) if key not in excluded)
                largest = max(largest, left)
        log.info("loader %s: %d samples of epoch %d already consumed; %d batches per worker finish it",
                 self.loader, len(excluded), self.epoch, math.ceil(largest / self.micro_batch_size))
        return excluded, math.ceil(largest / self.micro_batch_size)

    def _epoch_batches(self) -> Iterator[dict]:
        dataset = pipeline.EpochDataset(self._plan, self.encoder, self.collate, seed=self.seed, rank=self.rank,
                                        shuffle_buffer=self.shuffle_buffer, micro_batch_size=self.micro_batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, pin_memory=self.pin_memory,
                                             persistent_workers=False, **worker_settings(self.num_workers))
        for batch in loader:
            self._advance(batch.pop("_position"))
            yield batch

    def _advance(self, position: dict) -> None:
        """Record a yielded batch; refuse one that breaks the round-robin the resume state relies on."""
        state = self._state
        if position["epoch"] != state.epoch or position["worker"] != state.next_worker:
            raise RuntimeError(f"rank {self.rank}: got a batch of epoch {position['epoch']} worker "
                               f"{position['worker']} where epoch {state.epoch} worker {state.next_worker} was due; "
                               f"the DataLoader must hand out worker batches in order (in_order=True)")
        state.workers[position["worker"]] = WorkerPosition(batches=position["batches"], samples=position["samples"])
        state.next_worker = (position["worker"] + 1) % self.logical_workers
        _add_stats(state.stats, position["stats"])


def unit_keys(unit, tar_keys: dict[str, list[str]]) -> list[str]:
    """The keys of a reader unit (a whole shard or a part of one) from its tar's keys in tar order."""
    tar_name = unit.name.split("[", 1)[0]
    return tar_keys[tar_name][unit.part::unit.parts]


def consumed_keys(state: LoaderState, split: SplitShards, tar_keys: dict[str, list[str]]) -> frozenset[str]:
    """Every key the workers of ``state`` (and of its own earlier layouts in the epoch) had taken, by replay.

    The saved layout's own reader units are rebuilt (a layout with more readers may have shared the shards)."""
    excluded = consumed_keys(state.previous, split, tar_keys) if state.previous is not None else frozenset()
    saved = state.first
    units = pipeline.reader_shards(split.shards, saved.world_size * saved.num_workers)
    keys_of = {unit.name: unit_keys(unit, tar_keys) for unit in units}
    order = pipeline.epoch_shard_order(units, saved.seed, saved.epoch)
    consumed = set(excluded)
    for rank_state in state.ranks:
        for worker, position in enumerate(rank_state.workers):
            shards = pipeline.worker_shards(order, rank_state.rank, saved.world_size, worker, saved.num_workers)
            consumed.update(pipeline.replay_keys(shards, keys_of, position.samples, seed=saved.seed,
                                                 epoch=saved.epoch, rank=rank_state.rank, worker=worker,
                                                 shuffle_buffer=saved.shuffle_buffer, excluded=excluded))
    return frozenset(consumed)


def check_readers(split: SplitShards, world_size: int, num_workers: int) -> None:
    """Refuse a split that cannot give every one of ``world_size x num_workers`` readers a sample.

    Shards are shared at the sample level when there are fewer than readers, so only a split with too few samples
    (a shard smaller than the readers sharing it, or an empty shard) is refused."""
    readers = world_size * max(1, num_workers)
    parts = pipeline.parts_per_shard(len(split.shards), readers)
    for shard in split.shards:
        if shard.samples < parts or shard.samples == 0:
            shared = f", shared by {parts} readers ({world_size} ranks x {max(1, num_workers)} data.num_workers)"
            raise ConfigError(
                f"{split.split} shard {shard.name} of {split.folder} has {shard.samples} samples"
                f"{shared if parts > 1 else ''}: every reader needs at least one; lower data.num_workers or "
                f"rerun data_prep with fewer, larger shards (--max-shard-samples, --max-shard-mb)")


def check_loader_readers(config, world_size: int) -> None:
    """Before any model is built: every training split the run's stage reads can feed its readers."""
    kinds = PROMPT_KINDS if config.run.stage == "minillm" else None
    splits = [(config.data.shards, "train", kinds)]
    if config.run.stage == "minillm" and config.data.pt_shards:
        splits.append((config.data.pt_shards, "pt", None))
    for folder, split, split_kinds in splits:
        check_readers(read_split(folder, split, split_kinds), world_size, config.data.num_workers)


# ----------------------------------------------------------------------------------------------------- builders


def _settings(data_cfg, tokenizer, image_size: int, num_image_tokens: int, max_length: int) -> EncodingSettings:
    return EncodingSettings(tokenizer=tokenizer, image_token_id=image_token_id(tokenizer),
                            num_image_tokens=num_image_tokens, image_size=image_size,
                            max_image_pixels=data_cfg.max_image_pixels, template=data_cfg.template,
                            max_length=max_length)


def build_train_loader(data_cfg, *, tokenizer, image_size: int, num_image_tokens: int, micro_batch_size: int,
                       rank: int, world_size: int, seed: int, split: str = "train",
                       state: LoaderState | None = None, pin_memory: bool = False) -> TrainLoader:
    """Instruction-tuning batches (GeoChat labels; packed per ``data_cfg.packing``) from ``data_cfg.shards``."""
    settings = _settings(data_cfg, tokenizer, image_size, num_image_tokens, data_cfg.max_length)
    collate = training_collate(data_cfg, pad_id=tokenizer.pad_token_id, image_size=image_size)
    return TrainLoader(loader="train", split=read_split(data_cfg.shards, split), encoder=InstructEncoder(settings),
                       collate=collate, seed=seed, rank=rank, world_size=world_size,
                       num_workers=data_cfg.num_workers, micro_batch_size=micro_batch_size,
                       shuffle_buffer=data_cfg.shuffle_buffer, state=state, pin_memory=pin_memory)


def build_pt_loader(data_cfg, *, tokenizer, image_size: int, num_image_tokens: int, micro_batch_size: int,
                    rank: int, world_size: int, seed: int, max_length: int | None = None,
                    state: LoaderState | None = None, pin_memory: bool = False) -> TrainLoader:
    """Pre-training batches (``BOS + text + EOS``, all supervised) from ``data_cfg.pt_shards``."""
    settings = _settings(data_cfg, tokenizer, image_size, num_image_tokens, max_length or data_cfg.max_length)
    collate = training_collate(data_cfg, pad_id=tokenizer.pad_token_id, image_size=image_size)
    return TrainLoader(loader="pt", split=read_split(data_cfg.pt_shards, "pt"), encoder=PretrainEncoder(settings),
                       collate=collate, seed=seed, rank=rank, world_size=world_size,
                       num_workers=data_cfg.num_workers, micro_batch_size=micro_batch_size,
                       shuffle_buffer=data_cfg.shuffle_buffer, state=state, pin_memory=pin_memory)


def build_prompt_loader(data_cfg, *, tokenizer, image_size: int, num_image_tokens: int, micro_batch_size: int,
                        rank: int, world_size: int, seed: int, max_prompt_length: int = MAX_PROMPT_TOKENS,
                        split: str = "train",
                        state: LoaderState | None = None, pin_memory: bool = False) -> TrainLoader:
    """Stage-2 rollout prompts (left-padded, no labels); prompts over ``max_prompt_length`` text tokens are skipped."""
    settings = _settings(data_cfg, tokenizer, image_size, num_image_tokens, max_prompt_length)
    collate = functools.partial(collate_left_padded, pad_id=tokenizer.pad_token_id, image_size=image_size)
    return TrainLoader(loader="prompt", split=read_split(data_cfg.shards, split, PROMPT_KINDS),
                       encoder=PromptEncoder(settings),
                       collate=collate, seed=seed, rank=rank, world_size=world_size,
                       num_workers=data_cfg.num_workers, micro_batch_size=micro_batch_size,
                       shuffle_buffer=data_cfg.shuffle_buffer, state=state, pin_memory=pin_memory)


# ----------------------------------------------------------------------------------------------------- validation


class _EvalDataset(torch.utils.data.IterableDataset):
    """This rank's share of the split in manifest order; ends with a ``{"_stats": ...}`` record."""

    def __init__(self, split: SplitShards, encoder, collate, *, rank: int, world_size: int, micro_batch_size: int,
                 max_batches: int) -> None:
        super().__init__()
        self.split, self.encoder, self.collate = split, encoder, collate
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.max_batches = micro_batch_size, max_batches

    def __iter__(self) -> Iterator[dict]:
        errors = BadSampleLog(f"validation rank {self.rank}")
        stats = {"samples": 0, "truncated": 0}
        items, produced = [], 0
        samples = (sample for shard in self.split.shards for sample in pipeline.read_shard_samples(shard, errors))
        for index, sample in enumerate(samples):
            if produced == self.max_batches:
                break
            if index % self.world_size != self.rank:
                continue
            try:
                items.append(self.encoder(sample))
            except BadSample as bad:
                errors.record(sample["__key__"], bad.reason, bad.detail)
                continue
            if len(items) == self.micro_batch_size:
                produced += 1
                yield self._batch(items, stats)
                items = []
        if items and produced < self.max_batches:
            yield self._batch(items, stats)
        yield {"_stats": {**stats, "images_decoded": self.encoder.images_decoded, "skipped": dict(errors.counts)}}

    def _batch(self, items: list, stats: dict) -> dict:
        stats["samples"] += len(items)
        stats["truncated"] += sum(item.truncated for item in items)
        return {**self.collate(items), "is_padding": False}


class EvalLoader:
    """Exactly-once validation batches for one rank; every rank yields ``num_batches``."""

    def __init__(self, split: SplitShards, encoder, collate, padding: dict, *, rank: int, world_size: int,
                 micro_batch_size: int, max_batches: int = 0, num_workers: int = 1) -> None:
        self.split, self.encoder, self.collate, self.padding = split, encoder, collate, padding
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.num_workers = num_workers
        share = math.ceil(split.samples / world_size)            # rank 0 always has the largest share
        full = math.ceil(share / micro_batch_size)
        self.num_batches = min(full, max_batches) if max_batches > 0 else full
        self.stats: dict = {}

    def __iter__(self) -> Iterator[dict]:
        dataset = _EvalDataset(self.split, self.encoder, self.collate, rank=self.rank, world_size=self.world_size,
                               micro_batch_size=self.micro_batch_size, max_batches=self.num_batches)
        produced = 0
        for batch in torch.utils.data.DataLoader(dataset, batch_size=None, **worker_settings(self.num_workers)):
            if "_stats" in batch:
                self.stats = batch["_stats"]
                continue
            produced += 1
            yield batch
        for _ in range(self.num_batches - produced):
            yield {**self.padding, "is_padding": True}


def build_eval_loader(data_cfg, *, tokenizer, image_size: int, num_image_tokens: int, micro_batch_size: int,
                      rank: int, world_size: int, split: str = "val", max_batches: int = 0) -> EvalLoader:
    """Validation batches (training format plus ``is_padding``); ``max_batches`` > 0 caps them (train.eval_batches)."""
    settings = _settings(data_cfg, tokenizer, image_size, num_image_tokens, data_cfg.max_length)
    collate = training_collate(data_cfg, pad_id=tokenizer.pad_token_id, image_size=image_size)
    padding = padding_batch(bos_id=tokenizer.bos_token_id, image_token_id=settings.image_token_id,
                            num_image_tokens=num_image_tokens, image_size=image_size)
    # One background worker overlaps decoding with the model's forward; val is read once, so no more are needed.
    return EvalLoader(read_split(data_cfg.shards, split), InstructEncoder(settings), collate, padding, rank=rank,
                      world_size=world_size, micro_batch_size=micro_batch_size, max_batches=max_batches,
                      num_workers=min(1, data_cfg.num_workers))


def build_eval_prompt_loader(data_cfg, *, tokenizer, image_size: int, num_image_tokens: int, micro_batch_size: int,
                             rank: int, world_size: int, split: str = "val", max_batches: int = 0,
                             max_prompt_length: int = MAX_PROMPT_TOKENS) -> EvalLoader:
    """Held-out rollout prompts (left-padded), exactly once across ranks and the same ones every time: stage 2's
    validation. Padding batches (``is_padding``) keep every rank's generation count equal."""
    settings = _settings(data_cfg, tokenizer, image_size, num_image_tokens, max_prompt_length)
    collate = functools.partial(collate_left_padded, pad_id=tokenizer.pad_token_id, image_size=image_size)
    prompt_padding = {key: value for key, value in padding_batch(
        bos_id=tokenizer.bos_token_id, image_token_id=settings.image_token_id, num_image_tokens=num_image_tokens,
        image_size=image_size).items() if key != "labels"}
    return EvalLoader(read_split(data_cfg.shards, split, PROMPT_KINDS), PromptEncoder(settings), collate,
                      prompt_padding, rank=rank,
                      world_size=world_size, micro_batch_size=micro_batch_size, max_batches=max_batches,
                      num_workers=min(1, data_cfg.num_workers))
