"""The loaders end to end on shards written per the contract: partition across ranks x workers (real DataLoader
worker processes), equal steps with uneven shards, exact resume, the layout-change rule, bad samples, validation,
pre-training and prompt batches."""

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kd_pipeline.data import (LoaderState, LoaderStateError, build_eval_loader, build_prompt_loader, build_pt_loader,
                              build_train_loader, images)
from kd_pipeline.prompts import IGNORE_INDEX
from kd_pipeline.tokenizer import image_token_id

from shard_fixtures import (IMAGE_SIZE, NUM_IMAGE_TOKENS, data_config, even_train_shards, instruct_sample,
                      pretrain_sample, write_shard_folder)

pytestmark = pytest.mark.timeout(300)


def build(folder, tokenizer, *, rank=0, world_size=1, micro_batch_size=3, num_workers=2, state=None, seed=0,
          builder=build_train_loader, packing=True, **extra):
    return builder(data_config(folder, num_workers=num_workers, packing=packing), tokenizer=tokenizer,
                   image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS, micro_batch_size=micro_batch_size,
                   rank=rank, world_size=world_size, seed=seed, state=state, **extra)


def take(loader, count):
    stream = iter(loader)
    batches = [next(stream) for _ in range(count)]
    stream.close()   # shuts the DataLoader workers down
    return batches


def first_pass_keys(batches):
    return [key for batch in batches for key, repeat in zip(batch["keys"], batch["is_repeat"].tolist()) if not repeat]


@pytest.fixture(scope="module")
def with_bad_samples(tmp_path_factory):
    """8 shards x 6; one truncated image (s00006) and one unparsable JSON (s00031)."""
    shards = even_train_shards(8, 6)
    shards[1][0].image = shards[1][0].image[:-40]
    shards[5][1].json_bytes = b'{"conversations": ['
    return write_shard_folder(tmp_path_factory.mktemp("bad"), {"train": shards})


EVEN_KEYS = sorted(f"s{i:05d}" for i in range(48))


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_split(even_shards, tokenizer):
    epochs = {}
    for rank in range(2):
        loader = build(even_shards, tokenizer, rank=rank, world_size=2)
        assert loader.steps_per_epoch == 8    # 48 samples / 2 ranks / 3 per batch
        batches = take(loader, 16)
        assert all(len(batch["keys"]) == 3 and not batch["is_repeat"].any() for batch in batches)
        epochs[rank] = [first_pass_keys(batches[:8]), first_pass_keys(batches[8:])]
    for epoch in range(2):
        rank0, rank1 = epochs[0][epoch], epochs[1][epoch]
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == EVEN_KEYS
    assert epochs[0][0] != epochs[0][1]      # a new shard order and shuffle each epoch


def test_batches_have_the_documented_fields(even_shards, tokenizer):
    batch = take(build(even_shards, tokenizer, num_workers=0, packing=False), 1)[0]   # packed: test_packing.py
    rows, length = batch["input_ids"].shape
    assert rows == 3 and batch["labels"].shape == batch["attention_mask"].shape == (rows, length)
    assert batch["pixel_values"].shape == (int(batch["has_image"].sum()), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.float32
    image_rows = (batch["input_ids"] == image_token_id(tokenizer)).sum(dim=1)          # (B,)
    assert image_rows.tolist() == [NUM_IMAGE_TOKENS * int(h) for h in batch["has_image"]]
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())


def test_resume_mid_epoch_continues_the_exact_key_sequence(with_bad_samples, tokenizer):
    uninterrupted = {rank: take(build(with_bad_samples, tokenizer, rank=rank, world_size=2), 13) for rank in range(2)}
    reference_stats = {}
    for rank in range(2):
        loader = build(with_bad_samples, tokenizer, rank=rank, world_size=2)
        take(loader, 13)
        reference_stats[rank] = loader.stats

    first_halves, states = {}, []
    for rank in range(2):
        loader = build(with_bad_samples, tokenizer, rank=rank, world_size=2)
        first_halves[rank] = take(loader, 3)            # odd: the next batch is due from worker 1
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert states[0]["next_worker"] == 1
    state = LoaderState.from_rank_states(states)
    for rank in range(2):
        resumed = build(with_bad_samples, tokenizer, rank=rank, world_size=2, state=state)
        assert (resumed.epoch, resumed.step_in_epoch) == (0, 3)
        second_half = take(resumed, 10)                 # crosses the epoch end (8 steps per epoch)
        assert resumed.epoch == 1
        keys = [batch["keys"] for batch in first_halves[rank] + second_half]
        assert keys == [batch["keys"] for batch in uninterrupted[rank]]
        for ours, theirs in zip(second_half, uninterrupted[rank][3:]):
            assert torch.equal(ours["input_ids"], theirs["input_ids"])
            assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        # same work as without the stop: the skipped samples were neither decoded nor counted twice
        assert resumed.stats == reference_stats[rank]
    # each bad sample is met (and counted) again in later epochs and padding passes
    assert set(reference_stats[0]["skipped"]) | set(reference_stats[1]["skipped"]) == {"unreadable_image", "bad_json"}


def test_resumed_worker_does_not_decode_the_samples_it_skips(even_shards, tokenizer, monkeypatch):
    loader = build(even_shards, tokenizer, num_workers=0)
    take(loader, 5)
    state = LoaderState.from_rank_states([loader.state_dict()])
    calls = []
    original = images.preprocess_image
    monkeypatch.setattr(images, "preprocess_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = build(even_shards, tokenizer, num_workers=0, state=state)
    batches = take(resumed, 4)
    assert len(calls) == sum(int(batch["has_image"].sum()) for batch in batches) > 0


def test_uneven_shards_give_equal_steps_on_every_rank_and_never_hang(tmp_path, tokenizer):
    sizes = [1, 9, 2, 7, 3, 5, 4, 8]                     # 39 samples
    start = list(itertools.accumulate([0] + sizes))
    shards = [[instruct_sample(start[n] + i) for i in range(size)] for n, size in enumerate(sizes)]
    folder = write_shard_folder(tmp_path / "uneven", {"train": shards})
    per_rank = {}
    for rank in range(2):
        loader = build(folder, tokenizer, rank=rank, world_size=2, micro_batch_size=2)
        # the largest share any worker can be dealt: 2 shards (8 / 4 readers), at most 9 + 8 = 17 samples
        # -> 9 batches per worker, 2 workers -> 18 steps
        assert loader.steps_per_epoch == 18
        per_rank[rank] = take(loader, 37)                # two epochs and one more batch
    for epoch in range(2):
        seen = []
        for rank in range(2):
            epoch_batches = per_rank[rank][epoch * 18:(epoch + 1) * 18]
            assert all(len(batch["keys"]) == 2 for batch in epoch_batches)
            seen += first_pass_keys(epoch_batches)
        assert sorted(seen) == sorted(f"s{i:05d}" for i in range(39))    # every sample once, the rest flagged
    assert sum(int(b["is_repeat"].sum()) for r in range(2) for b in per_rank[r][:18]) == 2 * 18 * 2 - 39


def test_bad_samples_are_skipped_counted_and_never_fatal(tmp_path, tokenizer):
    shards = even_train_shards(2, 5)
    shards[0][1].image = shards[0][1].image[:-40]                    # s00001: truncated image bytes
    shards[0][3].json_bytes = b"{oops"                               # s00003: unparsable JSON
    shards[1][1].image = None                                         # s00006: JSON names an image the tar lacks
    folder = write_shard_folder(tmp_path / "bad", {"train": shards})
    loader = build(folder, tokenizer, num_workers=1, micro_batch_size=2)
    batches = take(loader, loader.steps_per_epoch)
    # counted per occurrence: the padding pass that fills the last batches may meet a bad sample again
    assert set(loader.stats["skipped"]) == {"unreadable_image", "bad_json", "missing_image"}
    good = sorted(f"s{i:05d}" for i in range(10) if i not in (1, 3, 6))
    assert sorted(first_pass_keys(batches)) == good
    assert loader.stats["samples"] == 2 * loader.steps_per_epoch


def test_world_size_change_finishes_the_epoch_without_loss_or_repeat(even_shards, tokenizer):
    before, states = [], []
    for rank in range(2):                                     # 2 ranks x 2 workers x 3 per batch, stop after 3 steps
        loader = build(even_shards, tokenizer, rank=rank, world_size=2)
        before += first_pass_keys(take(loader, 3))
        states.append(loader.state_dict())
    state = LoaderState.from_rank_states(states)

    single = build(even_shards, tokenizer, num_workers=1, micro_batch_size=2, state=state)   # 1 rank x 1 worker
    assert (single.epoch, single.steps_in_epoch, single.steps_per_epoch) == (0, 15, 24)      # (48 - 18) / 2
    uninterrupted_rest = take(single, 16)
    assert sorted(before + first_pass_keys(uninterrupted_rest[:15])) == EVEN_KEYS
    assert single.epoch == 1 and single.steps_in_epoch == 24   # the next epoch runs in the new layout

    # a stop inside the re-partitioned epoch resumes exactly (the earlier layout travels in the state) ...
    single = build(even_shards, tokenizer, num_workers=1, micro_batch_size=2, state=state)
    middle = take(single, 4)
    middle_state = LoaderState.from_rank_states([single.state_dict()])
    assert middle_state.previous is not None
    again = build(even_shards, tokenizer, num_workers=1, micro_batch_size=2, state=middle_state)
    assert [b["keys"] for b in middle + take(again, 11)] == [b["keys"] for b in uninterrupted_rest[:15]]

    # ... and a second layout change (to 3 ranks) still loses and repeats nothing
    after = []
    steps = set()
    for rank in range(3):
        loader = build(even_shards, tokenizer, rank=rank, world_size=3, num_workers=1, micro_batch_size=2,
                       state=middle_state)
        steps.add(loader.steps_in_epoch)
        after += first_pass_keys(take(loader, loader.steps_in_epoch))
    assert len(steps) == 1
    assert sorted(before + first_pass_keys(middle) + after) == EVEN_KEYS


def test_state_saved_at_an_epoch_end_starts_the_next_epoch_in_any_layout(even_shards, tokenizer):
    loader = build(even_shards, tokenizer, num_workers=0, micro_batch_size=4)
    take(loader, loader.steps_per_epoch)
    state = LoaderState.from_rank_states([loader.state_dict()])
    assert (state.epoch, state.first.step_in_epoch) == (1, 0)
    resized = build(even_shards, tokenizer, rank=1, world_size=2, num_workers=0, micro_batch_size=4, state=state)
    assert (resized.epoch, resized.steps_in_epoch) == (1, resized.steps_per_epoch)


def test_state_of_another_loader_or_seed_is_refused(even_shards, tokenizer):
    loader = build(even_shards, tokenizer, num_workers=0)
    take(loader, 1)
    state = LoaderState.from_rank_states([loader.state_dict()])
    with pytest.raises(LoaderStateError, match="seed"):
        build(even_shards, tokenizer, num_workers=0, seed=1, state=state)
    with pytest.raises(LoaderStateError, match="loader 'train' but this run has 'prompt'"):
        build(even_shards, tokenizer, num_workers=0, state=state, builder=build_prompt_loader)


def test_validation_is_exactly_once_with_equal_batch_counts(tmp_path, tokenizer):
    val = [[instruct_sample(100 + i) for i in range(6)], [instruct_sample(106 + i) for i in range(5)]]
    val[1][2].json_bytes = b"not json"                               # s00108, index 8 -> rank 2
    folder = write_shard_folder(tmp_path / "val", {"train": even_train_shards(1, 1), "val": val})
    seen, counts = [], set()
    for rank in range(3):
        loader = build_eval_loader(data_config(folder), tokenizer=tokenizer, image_size=IMAGE_SIZE,
                                   num_image_tokens=NUM_IMAGE_TOKENS, micro_batch_size=2, rank=rank, world_size=3)
        batches = list(loader)
        assert len(batches) == loader.num_batches == 2               # ceil(ceil(11 / 3) / 2)
        counts.add(len(batches))
        real = [b for b in batches if not b["is_padding"]]
        own = [f"s{100 + i:05d}" for i in range(11) if i % 3 == rank and i != 8]
        assert [key for b in real for key in b["keys"]] == own
        for padding in (b for b in batches if b["is_padding"]):
            assert padding["keys"] == [] and bool((padding["labels"] == IGNORE_INDEX).all())
        if rank == 2:
            assert loader.stats["skipped"] == {"bad_json": 1} and len(real) == 1
        seen += [key for b in real for key in b["keys"]]
    assert sorted(seen) == sorted(f"s{100 + i:05d}" for i in range(11) if i != 8)
    capped = build_eval_loader(data_config(folder), tokenizer=tokenizer, image_size=IMAGE_SIZE,
                               num_image_tokens=NUM_IMAGE_TOKENS, micro_batch_size=2, rank=0, world_size=3,
                               max_batches=1)
    assert capped.num_batches == 1 and len(list(capped)) == 1


def test_pretrain_loader_supervises_all_text(tmp_path, tokenizer):
    pt = [[pretrain_sample(3 * shard + i, with_image=(i == 0)) for i in range(3)] for shard in range(2)]
    folder = write_shard_folder(tmp_path / "pt", {"pt": pt}, kind="pretrain")
    config = data_config(tmp_path / "unused", num_workers=1, pt_folder=folder, packing=False)  # packed: test_packing
    loader = build_pt_loader(config, tokenizer=tokenizer, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS,
                             micro_batch_size=3, rank=0, world_size=1, seed=0)
    batches = take(loader, loader.steps_per_epoch)
    assert sorted(first_pass_keys(batches)) == [f"p{i:05d}" for i in range(6)]
    for batch in batches:
        real = batch["attention_mask"] == 1
        is_image = batch["input_ids"] == image_token_id(tokenizer)
        assert torch.equal(batch["labels"][real & ~is_image], batch["input_ids"][real & ~is_image])
        assert bool((batch["labels"][~real | is_image] == IGNORE_INDEX).all())
        ends = real.sum(dim=1) - 1                                                     # (B,)
        assert batch["input_ids"][torch.arange(3), ends].tolist() == [tokenizer.eos_token_id] * 3
    assert sum(int(b["has_image"].sum()) for b in batches) == 2


def test_prompt_loader_left_pads_prompts_ending_in_an_open_answer(tmp_path, tokenizer):
    shards = [[instruct_sample(4 * shard + i, turns=1 + i % 2, with_image=i != 3) for i in range(4)]
              for shard in range(2)]
    folder = write_shard_folder(tmp_path / "prompts", {"train": shards})
    loader = build(folder, tokenizer, micro_batch_size=4, num_workers=1, builder=build_prompt_loader,
                   max_prompt_length=256)
    batches = take(loader, loader.steps_per_epoch)
    assert sorted(first_pass_keys(batches)) == [f"s{i:05d}" for i in range(8)]
    for batch in batches:
        assert "labels" not in batch and batch["attention_mask"][:, -1].all()
        for row in range(4):
            ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
            assert batch["attention_mask"][row].tolist() == sorted(batch["attention_mask"][row].tolist())
            text = tokenizer.decode([t for t in ids if t != image_token_id(tokenizer)])
            assert text.endswith("ASSISTANT:") and "</s>" not in text.split("USER:")[-1]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def loader_workers() -> list[int]:
    """The DataLoader's worker processes: the children of this process's forkserver."""
    servers = [pid for pid in children(os.getpid())
               if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1, f"expected one forkserver child, found {servers}"
    return children(servers[0])


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_outlive_stop_signals_from_outside(even_shards, tokenizer):
    """Slurm signals every process of a step: a USR1 or TERM reaching the DataLoader workers from another process
    leaves them working (the rank decides and saves); the rank's own TERM, multiprocessing's way of ending leftover
    workers when the rank exits, still ends them."""
    uninterrupted = take(build(even_shards, tokenizer, rank=0, world_size=2), 6)
    stream = iter(build(even_shards, tokenizer, rank=0, world_size=2))
    batches = [next(stream) for _ in range(2)]
    workers = loader_workers()
    assert len(workers) == 2
    for pid in workers:
        for name in ("USR1", "TERM"):  # sent by `kill`, another process, as slurmstepd does
            subprocess.run(["kill", f"-{name}", str(pid)], check=True)
    time.sleep(1)
    batches += [next(stream) for _ in range(4)]
    assert [batch["keys"] for batch in batches] == [batch["keys"] for batch in uninterrupted]
    assert all(running(pid) for pid in workers)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)  # from the rank itself
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "the rank's TERM must end its workers"
    stream.close()
