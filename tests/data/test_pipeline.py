"""Pipeline stages, manifest reading and state files (no DataLoader processes here)."""

import io
import itertools
import json
import tarfile

import pytest

from kd_pipeline.data import pipeline
from kd_pipeline.data.manifest import ManifestError, ShardInfo, read_split
from kd_pipeline.data.samples import BadSampleLog
from kd_pipeline.data.state import LoaderState, LoaderStateError, load_loader_state, save_loader_state

from shard_fixtures import even_train_shards, write_shard_folder


def test_header_scan_gives_the_same_samples_as_webdataset_reading(tmp_path):
    folder = write_shard_folder(tmp_path / "s", {"train": even_train_shards(1, 7)})
    tar_path = folder / "train-000000.tar"
    with tarfile.open(tar_path, "a") as archive:   # metadata and a directory: skipped by webdataset
        for name, payload in (("__meta__", b"x"), ("zz_extra.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
    shard = ShardInfo(name="t", path=str(tar_path), samples=8, sha256="")
    errors = BadSampleLog("test")
    data_keys = [sample["__key__"] for sample in pipeline.read_shard_samples(shard, errors)]
    assert data_keys == pipeline.read_shard_keys(shard)
    assert data_keys == [f"s{i:05d}" for i in range(7)] + ["zz_extra"]
    assert errors.counts == {}


def test_key_replay_reproduces_the_shuffled_data_stream(tmp_path):
    folder = write_shard_folder(tmp_path / "s", {"train": even_train_shards(3, 5)})
    shards = list(read_split(folder, "train").shards)
    errors = BadSampleLog("test")
    args = dict(seed=3, epoch=2, rank=1, worker=0, shuffle_buffer=4, excluded=frozenset({"s00004", "s00010"}))
    data = [(sample["__key__"], repeat) for sample, repeat in itertools.islice(
        pipeline.worker_stream(shards, lambda shard: pipeline.read_shard_samples(shard, errors), **args), 30)]
    keys_of = {shard.name: pipeline.read_shard_keys(shard) for shard in shards}
    assert [key for key, _ in data] == pipeline.replay_keys(shards, keys_of, 30, **args)
    first_pass = [key for key, repeat in data if not repeat]
    assert sorted(first_pass) == sorted(set(itertools.chain(*keys_of.values())) - {"s00004", "s00010"})
    assert data[:13] == [(key, False) for key in first_pass]       # the pass is complete before any repeat
    assert first_pass != sorted(first_pass)                          # and it is shuffled


def test_shard_order_is_deterministic_per_epoch_and_split_is_a_partition(tmp_path):
    folder = write_shard_folder(tmp_path / "s", {"train": even_train_shards(12, 1)})
    shards = read_split(folder, "train").shards
    order = pipeline.epoch_shard_order(shards, seed=0, epoch=0)
    assert order == pipeline.epoch_shard_order(shards, seed=0, epoch=0)
    assert order != pipeline.epoch_shard_order(shards, seed=0, epoch=1)
    parts = [pipeline.worker_shards(order, rank, 2, worker, 3) for rank in range(2) for worker in range(3)]
    assert sorted(shard.name for part in parts for shard in part) == sorted(shard.name for shard in shards)
    assert all(len(part) == 2 for part in parts)


def test_too_few_shards_for_the_readers_is_a_clear_error(tmp_path):
    shards = read_split(write_shard_folder(tmp_path / "s", {"train": even_train_shards(3, 2)}), "train").shards
    with pytest.raises(ValueError, match="3 shards cannot feed 2 ranks x 2 workers"):
        pipeline.batches_per_worker(shards, 2, 2, 1)


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_split(tmp_path / "nope", "train")
    with pytest.raises(ManifestError, match="set data.shards"):
        read_split("", "pt")
    folder = write_shard_folder(tmp_path / "s", {"train": even_train_shards(2, 2)})
    with pytest.raises(ManifestError, match="needs 'pretrain'"):
        read_split(folder, "pt")
    with pytest.raises(ManifestError, match="lists no 'val' shards"):
        read_split(folder, "val")
    (folder / "train-000001.tar").write_bytes(b"short")
    with pytest.raises(ManifestError, match="incomplete or stale"):
        read_split(folder, "train")
    (folder / "train-000001.tar").unlink()
    with pytest.raises(ManifestError, match="missing"):
        read_split(folder, "train")
    (folder / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_split(folder, "train")


def _rank_state(rank, world_size=2, epoch=1, batches=(2, 1), **overrides):
    state = {"format": 1, "loader": "train", "split": "train", "fingerprint": "f", "seed": 0,
             "world_size": world_size, "num_workers": 2, "micro_batch_size": 3, "shuffle_buffer": 8, "rank": rank,
             "epoch": epoch, "next_worker": 1, "workers": [{"batches": b, "samples": 3 * b} for b in batches],
             "stats": {}, "previous": None}
    state.update(overrides)
    return state


def test_state_files_round_trip_and_inconsistent_sets_are_refused(tmp_path):
    for rank in range(2):
        save_loader_state(tmp_path, "train", rank, _rank_state(rank))
    state = load_loader_state(tmp_path, "train")
    assert [r.rank for r in state.ranks] == [0, 1] and state.epoch == 1 and state.first.step_in_epoch == 3
    assert json.loads(json.dumps(state.to_list())) == [_rank_state(0), _rank_state(1)]
    assert load_loader_state(tmp_path, "pt") is None

    with pytest.raises(LoaderStateError, match="a rank's state file is missing"):
        LoaderState.from_rank_states([_rank_state(0)])
    with pytest.raises(LoaderStateError, match="disagree on epoch"):
        LoaderState.from_rank_states([_rank_state(0), _rank_state(1, epoch=2)])
    with pytest.raises(LoaderStateError, match="disagree on step_in_epoch"):
        LoaderState.from_rank_states([_rank_state(0), _rank_state(1, batches=(2, 2))])
    with pytest.raises(LoaderStateError, match="format"):
        LoaderState.from_rank_states([{"format": 99}])
    with pytest.raises(LoaderStateError, match="seed 0 but this run has 5"):
        state.check_compatible(loader="train", split="train", fingerprint="f", seed=5)
    with pytest.raises(LoaderStateError, match="shard set"):
        state.check_compatible(loader="train", split="train", fingerprint="other", seed=0)
