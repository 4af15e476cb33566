"""Fewer shards than readers (ranks x workers): the readers share each tar at the sample level. Every epoch is still
read exactly once across ranks and real DataLoader workers, a resume continues the exact key sequence, a layout
change re-partitions the rest of the epoch with nothing lost or repeated, and a split too small for its readers is
refused with a message that names real settings."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd_pipeline.config import ConfigError
from kd_pipeline.data import LoaderState, build_pt_loader, build_train_loader
from kd_pipeline.data.loaders import check_readers
from kd_pipeline.data.manifest import read_split
from kd_pipeline.data.pipeline import parts_per_shard, reader_shards

from shard_fixtures import (IMAGE_SIZE, NUM_IMAGE_TOKENS, data_config, even_train_shards, pretrain_sample,
                            write_shard_folder)

pytestmark = pytest.mark.timeout(300)

ONE_SHARD_KEYS = sorted(f"s{i:05d}" for i in range(24))


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """One train shard of 24 samples, and one D_PT shard of 24 texts."""
    root = tmp_path_factory.mktemp("one_shard")
    train = write_shard_folder(root / "train", {"train": even_train_shards(1, 24)})
    pt = write_shard_folder(root / "pt", {"pt": [[pretrain_sample(i) for i in range(24)]]}, kind="pretrain")
    return train, pt


def build(folder, tokenizer, *, rank, world_size, num_workers=2, micro_batch_size=3, state=None,
          builder=build_train_loader):
    config = data_config(folder, num_workers=num_workers, pt_folder=folder)
    return builder(config, tokenizer=tokenizer, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS,
                   micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=0, state=state)


def take(loader, count):
    stream = iter(loader)
    batches = [next(stream) for _ in range(count)]
    stream.close()
    return batches


def first_pass_keys(batches):
    return [key for batch in batches for key, repeat in zip(batch["keys"], batch["is_repeat"].tolist()) if not repeat]


def test_parts_divide_evenly_over_the_readers():
    assert [parts_per_shard(shards, 4) for shards in (1, 2, 3, 4, 9)] == [4, 2, 4, 1, 1]
    assert parts_per_shard(3, 8) * 3 % 8 == 0 and parts_per_shard(6, 16) * 6 % 16 == 0


@pytest.mark.parametrize("builder,keys", [(build_train_loader, ONE_SHARD_KEYS),
                                          (build_pt_loader, sorted(f"p{i:05d}" for i in range(24)))],
                         ids=["train", "pt"])
def test_one_shard_feeds_two_ranks_of_two_workers_exactly_once_per_epoch(one_shard, tokenizer, builder, keys):
    folder = one_shard[0] if builder is build_train_loader else one_shard[1]
    per_rank = {}
    for rank in range(2):
        loader = build(folder, tokenizer, rank=rank, world_size=2, builder=builder)
        assert loader.steps_per_epoch == 4     # 24 samples / 4 readers = 6 each = 2 batches of 3, x 2 workers
        per_rank[rank] = take(loader, 8)       # two epochs
    for epoch in range(2):
        seen = [first_pass_keys(per_rank[rank][epoch * 4:(epoch + 1) * 4]) for rank in range(2)]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == keys   # every sample once: no padding was needed
    assert first_pass_keys(per_rank[0][:4]) != first_pass_keys(per_rank[0][4:])


def test_resume_in_a_shared_shard_continues_the_exact_key_sequence(one_shard, tokenizer):
    folder = one_shard[0]
    uninterrupted = {rank: take(build(folder, tokenizer, rank=rank, world_size=2), 7) for rank in range(2)}
    states = []
    for rank in range(2):
        loader = build(folder, tokenizer, rank=rank, world_size=2)
        take(loader, 3)
        states.append(loader.state_dict())
    state = LoaderState.from_rank_states(states)
    for rank in range(2):
        resumed = build(folder, tokenizer, rank=rank, world_size=2, state=state)
        assert [batch["keys"] for batch in take(resumed, 4)] == [batch["keys"] for batch in uninterrupted[rank][3:]]


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (3, 1)], ids=["to_1x1_unshared", "to_3x1_shared_by_3"])
def test_layout_change_from_shared_readers_loses_and_repeats_nothing(one_shard, tokenizer, world_size, num_workers):
    folder = one_shard[0]
    before, states = [], []
    for rank in range(2):                                  # 2 ranks x 2 workers share the tar 4 ways; stop at step 1
        loader = build(folder, tokenizer, rank=rank, world_size=2)
        before += first_pass_keys(take(loader, 1))
        states.append(loader.state_dict())
    state = LoaderState.from_rank_states(states)
    after, steps = [], set()
    for rank in range(world_size):
        loader = build(folder, tokenizer, rank=rank, world_size=world_size, num_workers=num_workers,
                       micro_batch_size=2, state=state)
        steps.add(loader.steps_in_epoch)
        after += first_pass_keys(take(loader, loader.steps_in_epoch))
    assert len(steps) == 1
    assert sorted(before + after) == ONE_SHARD_KEYS


def test_three_shards_for_four_readers_are_cut_into_balanced_parts(tmp_path, tokenizer):
    folder = write_shard_folder(tmp_path / "three", {"train": even_train_shards(3, 8)})
    units = reader_shards(read_split(folder, "train").shards, 4)
    assert len(units) == 12 and {unit.samples for unit in units} == {2}
    seen = []
    for rank in range(2):
        loader = build(folder, tokenizer, rank=rank, world_size=2, micro_batch_size=2)
        assert loader.steps_per_epoch == 6     # 3 parts of 2 samples per reader -> 3 batches, x 2 workers
        batches = take(loader, 6)
        assert not any(batch["is_repeat"].any() for batch in batches)
        seen += first_pass_keys(batches)
    assert sorted(seen) == ONE_SHARD_KEYS


def test_a_split_too_small_for_its_readers_is_refused_with_real_settings(tmp_path):
    folder = write_shard_folder(tmp_path / "tiny", {"train": even_train_shards(1, 3)})
    split = read_split(folder, "train")
    check_readers(split, world_size=1, num_workers=3)        # 3 samples for 3 readers: one each
    with pytest.raises(ConfigError) as caught:
        check_readers(split, world_size=2, num_workers=2)
    message = str(caught.value)
    assert "train-000000.tar" in message and "has 3 samples, shared by 4 readers" in message
    assert "data.num_workers" in message and "--max-shard-samples" in message and "--shard-samples" not in message


def test_the_trainer_refuses_a_too_small_split_before_building_any_model(tmp_path, tokenizer_dir):
    folder = write_shard_folder(tmp_path / "tiny", {"train": even_train_shards(1, 3),
                                                    "val": even_train_shards(1, 2, first_index=100)})
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "kd_pipeline.train", "--config", str(root / "configs" / "tiny_cpu.yaml"),
         f"data.shards={folder}", f"data.tokenizer={tokenizer_dir}", "data.num_workers=4",
         f"run.output_dir={tmp_path / 'run'}"], cwd=root, capture_output=True, text=True, timeout=600,
        env={**os.environ, "KD_STATUS_DIR": str(tmp_path / "status"), "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: train shard train-000000.tar") and "shared by 4 readers" in error
    # the models' own log lines (tokenizer, attention backend, engines) never came
    assert not re.search(r"kd_pipeline\.(tokenizer|models|engine)", result.stderr), result.stderr[-3000:]
    assert (tmp_path / "status" / "rank00000.rc").read_text() == "2\n"  # what a launcher reads
