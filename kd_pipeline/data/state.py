"""The loader's resume state: what each rank saves with a checkpoint, and how the ranks' states are put together.

One rank's state (``TrainLoader.state_dict()``, JSON) says where every one of its DataLoader workers stands in the
current epoch:

    {"format": 1, "loader": "train", "split": "train", "fingerprint": "<shards>", "seed": 0,
     "world_size": 2, "num_workers": 2, "micro_batch_size": 4, "shuffle_buffer": 256,
     "rank": 0, "epoch": 3, "next_worker": 1,
     "workers": [{"batches": 5, "samples": 23}, {"batches": 4, "samples": 16}],
     "stats": {...}, "previous": null}

``batches`` counts the batches of that worker the trainer has received; ``samples`` counts the raw samples the worker
took from its shuffled stream for them, bad ones included: that is what a resumed worker drops, before decoding,
to stand exactly where it stood. ``next_worker`` is the worker whose batch comes next (the DataLoader takes workers
round-robin). ``previous`` is set only during an epoch that was resumed under a different layout (see below).

Every rank writes its own state (``save_loader_state``: one small JSON file per rank, no collective needed);
``load_loader_state`` reads them all back as one ``LoaderState``. The ranks step in lockstep, so their states must
agree on epoch and step: a set of files from different steps is refused.

Resume rules (``LoaderState.layout_matches``):
- Same layout (world size, workers per rank, micro-batch size, shuffle buffer): every rank continues exactly where
  it stopped and sees the sample keys it would have seen without the stop.
- Different layout mid-epoch: the samples of the current epoch not yet consumed by any old worker are re-partitioned
  by the new layout and finish the epoch (the old state is kept as ``previous`` to know which ones); no sample of
  the epoch is lost or repeated, apart from the usual end-of-epoch padding duplicates (``is_repeat``).
  Computing the consumed set replays every old worker's key stream: it reads tar headers of the whole split once,
  never image bytes. A state saved at an epoch boundary needs none of this: the next epoch simply starts in the new
  layout.
- A different seed, split or shard set is refused (the old stream cannot be replayed against other data).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kd_pipeline.errors import UserError
from kd_pipeline.fileio import write_atomic

STATE_FORMAT = 1


class LoaderStateError(UserError, ValueError):
    """A saved loader state that cannot be used for this run, worded with the fix."""


@dataclass
class WorkerPosition:
    batches: int = 0    # batches of this worker received by the trainer in the current epoch
    samples: int = 0    # raw samples (bad ones included) the worker took from its stream for them


@dataclass
class RankState:
    loader: str                 # "train" | "pt" | "prompt"
    split: str
    fingerprint: str            # SplitShards.fingerprint
    seed: int
    world_size: int
    num_workers: int            # logical workers per rank (>= 1; DataLoader num_workers 0 runs one in-process)
    micro_batch_size: int
    shuffle_buffer: int
    rank: int
    epoch: int = 0
    next_worker: int = 0
    workers: list[WorkerPosition] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    previous: "LoaderState | None" = None

    @property
    def step_in_epoch(self) -> int:
        return sum(worker.batches for worker in self.workers)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["workers"] = [asdict(worker) for worker in self.workers]
        out["previous"] = self.previous.to_list() if self.previous is not None else None
        return {"format": STATE_FORMAT, **out}

    @classmethod
    def from_dict(cls, payload: dict) -> "RankState":
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
            raise LoaderStateError(f"not a loader state of format {STATE_FORMAT}: {str(payload)[:200]}")
        values = {key: value for key, value in payload.items() if key != "format"}
        try:
            values["workers"] = [WorkerPosition(**worker) for worker in values["workers"]]
            previous = values.get("previous")
            values["previous"] = LoaderState.from_rank_states(previous) if previous else None
            return cls(**values)
        except (KeyError, TypeError) as error:
            raise LoaderStateError(f"malformed loader state ({error}): {str(payload)[:200]}") from error

    def layout(self) -> tuple[int, int, int, int]:
        return (self.world_size, self.num_workers, self.micro_batch_size, self.shuffle_buffer)


@dataclass
class LoaderState:
    """The states of all ranks of one run at one step: what a resumed loader is built from."""

    ranks: tuple[RankState, ...]

    @property
    def first(self) -> RankState:
        return self.ranks[0]

    @property
    def epoch(self) -> int:
        return self.first.epoch

    @property
    def previous(self) -> "LoaderState | None":
        return self.first.previous

    def at_epoch_start(self) -> bool:
        return self.first.step_in_epoch == 0 and self.previous is None

    def layout_matches(self, world_size: int, num_workers: int, micro_batch_size: int, shuffle_buffer: int) -> bool:
        return self.first.layout() == (world_size, num_workers, micro_batch_size, shuffle_buffer)

    def check_compatible(self, *, loader: str, split: str, fingerprint: str, seed: int) -> None:
        """Refuse a state that cannot be replayed for this loader (different loader, split, shards or seed)."""
        saved = self.first
        for name, saved_value, value in (("loader", saved.loader, loader), ("split", saved.split, split),
                                         ("shard set", saved.fingerprint, fingerprint), ("seed", saved.seed, seed)):
            if saved_value != value:
                raise LoaderStateError(
                    f"the saved loader state has {name} {saved_value!r} but this run has {value!r}: resume with the "
                    f"same data.shards / run.seed, or start without the loader state (a new epoch from the top)")

    def to_list(self) -> list[dict]:
        return [rank_state.to_dict() for rank_state in self.ranks]

    @classmethod
    def from_rank_states(cls, payloads: list[dict | RankState]) -> "LoaderState":
        """Put the per-rank states (dicts from ``state_dict()`` or RankState) together and check they agree."""
        ranks = [item if isinstance(item, RankState) else RankState.from_dict(item) for item in payloads]
        if not ranks:
            raise LoaderStateError("no rank states given")
        ranks.sort(key=lambda rank_state: rank_state.rank)
        world_size = ranks[0].world_size
        if [rank_state.rank for rank_state in ranks] != list(range(world_size)):
            raise LoaderStateError(f"need the states of ranks 0..{world_size - 1}, got ranks "
                                   f"{[rank_state.rank for rank_state in ranks]}: a rank's state file is missing")
        reference = ranks[0]
        for rank_state in ranks[1:]:
            for name in ("loader", "split", "fingerprint", "seed", "world_size", "num_workers", "micro_batch_size",
                         "shuffle_buffer", "epoch", "step_in_epoch", "next_worker"):
                if getattr(rank_state, name) != getattr(reference, name):
                    raise LoaderStateError(
                        f"loader states of rank 0 and rank {rank_state.rank} disagree on {name} "
                        f"({getattr(reference, name)!r} vs {getattr(rank_state, name)!r}): they were not saved at "
                        f"the same step of the same run")
            same_previous = (rank_state.previous is None) == (reference.previous is None) and (
                rank_state.previous is None or rank_state.previous.to_list() == reference.previous.to_list())
            if not same_previous:
                raise LoaderStateError(f"loader states of rank 0 and rank {rank_state.rank} disagree on 'previous'")
        for rank_state in ranks:
            if len(rank_state.workers) != rank_state.num_workers:
                raise LoaderStateError(f"rank {rank_state.rank}'s state lists {len(rank_state.workers)} workers, "
                                       f"expected {rank_state.num_workers}")
        return cls(tuple(ranks))


def state_path(directory: str | Path, name: str, rank: int) -> Path:
    return Path(directory) / f"loader_{name}_rank{rank:05d}.json"


def save_loader_state(directory: str | Path, name: str, rank: int, state: dict) -> Path:
    """Write one rank's ``state_dict()`` as ``loader_<name>_rank<rank>.json`` (atomically, fsynced)."""
    path = state_path(directory, name, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(state))
    return path


def load_loader_state(directory: str | Path, name: str) -> LoaderState | None:
    """All ranks' states saved in ``directory`` under ``name``; None when the directory holds none."""
    paths = sorted(Path(directory).glob(f"loader_{name}_rank*.json"))
    if not paths:
        return None
    payloads = []
    for path in paths:
        try:
            payloads.append(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise LoaderStateError(f"{path} is not valid JSON ({error}); the checkpoint is damaged") from error
    return LoaderState.from_rank_states(payloads)
