"""Padding-free packing (``data.packing``): the row plan, the packed layout, the loader contract (the same samples per
step and the same resume state as padding), and, on CPU, the loss and gradients of a packed batch equal to the
padded batch's for sft and kd_sft with sdpa, eager and the one-row (flash-attn) layout."""

import itertools

import numpy as np
import pytest
import torch

from kd_pipeline.data import build_pt_loader, build_train_loader, packing
from kd_pipeline.data.collate import collate_packed, collate_right_padded
from kd_pipeline.prompts import IGNORE_INDEX
from tests import batch_cases as cases

from shard_fixtures import (IMAGE_SIZE, NUM_IMAGE_TOKENS, RawSample, data_config, instruct_sample, png_bytes,
                            write_shard_folder)


def unpack(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every sample of a packed batch in layout order, read back through position_ids."""
    samples = []
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        positions = batch["position_ids"][row][real].tolist()
        ids, labels = batch["input_ids"][row][real].tolist(), batch["labels"][row][real].tolist()
        starts = [index for index, position in enumerate(positions) if position == 0] + [len(positions)]
        samples += [(ids[start:end], labels[start:end]) for start, end in itertools.pairwise(starts)]
    return samples


# ------------------------------------------------------------------------------------------- plan and layout


def test_plan_rows_is_first_fit_decreasing_within_capacity():
    assert packing.plan_rows([20, 9, 11, 8, 12, 7], 20) == [[0], [4, 3], [2, 1], [5]]
    assert packing.plan_rows([3, 3, 3], 3) == [[0], [1], [2]]              # ties keep index order
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 30, size=rng.integers(1, 9)).tolist()
        rows = packing.plan_rows(lengths, max(lengths))
        assert sorted(itertools.chain(*rows)) == list(range(len(lengths)))
        assert all(sum(lengths[index] for index in row) <= max(lengths) for row in rows)
    with pytest.raises(ValueError, match="cannot fit"):
        packing.plan_rows([5, 9], 8)


def test_packed_layout_restarts_positions_and_holds_the_padded_samples():
    items = cases.micro_batch()
    padded = collate_right_padded(items, pad_id=cases.PAD_ID, image_size=cases.IMAGE_SIZE)
    packed = collate_packed(items, pad_id=cases.PAD_ID, image_size=cases.IMAGE_SIZE)
    assert packed["packed"] and packed["input_ids"].shape == (4, 20)
    assert packed["keys"] == ["k0", "k4", "k3", "k2", "k1", "k5"]       # layout order: row by row
    assert packed["position_ids"][1].tolist() == list(range(12)) + list(range(8))
    assert packed["position_ids"][3].tolist() == list(range(7)) + list(range(13))   # the pad tail restarts too
    by_key = {item.key: item for item in items}
    for key, (ids, labels) in zip(packed["keys"], unpack(packed)):
        assert ids == by_key[key].input_ids
        assert labels == [IGNORE_INDEX] + by_key[key].labels[1:]    # a sample's first position is never a target
    # Pads are ignored; the images follow the image blocks in layout order.
    assert bool((packed["labels"][packed["attention_mask"] == 0] == IGNORE_INDEX).all())
    assert packed["has_image"].tolist() == [True, False, True, True, False, False]
    expected_pixels = np.stack([by_key[key].pixel_values for key in ("k0", "k3", "k2")])
    assert torch.equal(packed["pixel_values"], torch.from_numpy(expected_pixels))
    # The supervised tokens after the shift, the count every loss divides by, are the padded batch's.
    supervised = (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert (packed["labels"][:, 1:] != IGNORE_INDEX).sum() == supervised
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())


def test_token_fractions_by_hand():
    fractions = packing.token_fractions([5, 3, 4, 2, 1, 7], micro_batch_size=3)
    # [5 3 4]: padded 3 x 5, packed rows [5] [4] [3] = 15; [2 1 7]: padded 3 x 7, packed [7] [2 1] = 14; real 22.
    assert fractions == pytest.approx({"padded": 22 / 36, "packed_rows": 22 / 29, "packed_flat": 1.0})


# ------------------------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def varied_shards(tmp_path_factory):
    """4 train shards x 6 samples: every fourth an 8-round conversation (over twice as long), every third text-only."""
    shards = [[instruct_sample(6 * shard + i, with_image=(6 * shard + i) % 3 != 2, turns=8 if i % 4 == 0 else 1)
               for i in range(6)] for shard in range(4)]
    return write_shard_folder(tmp_path_factory.mktemp("varied"), {"train": shards})


def pretrain_record(index: int, words: int, with_image: bool) -> RawSample:
    record = {"id": str(index), "task": "pretrain", "text": " ".join(["a red ship near the harbour"] * words)}
    if with_image:
        record.update(image=f"img/{index}.png", image_ext="png", width=30, height=30)
    return RawSample(f"p{index:05d}", record, png_bytes(30, 30, seed=index) if with_image else None)


def test_train_loader_packs_the_same_samples_per_step_with_the_same_resume_state(varied_shards, tokenizer):
    loaders = {mode: build_train_loader(data_config(varied_shards, num_workers=2, packing=mode), tokenizer=tokenizer,
                                        image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS, micro_batch_size=4,
                                        rank=0, world_size=1, seed=0) for mode in (False, True)}
    assert loaders[False].steps_per_epoch == loaders[True].steps_per_epoch == 6
    streams = {mode: iter(loader) for mode, loader in loaders.items()}
    fewer_rows = 0
    for _ in range(9):       # into the second epoch
        padded, packed = next(streams[False]), next(streams[True])
        assert sorted(packed["keys"]) == sorted(padded["keys"])
        rows = {key: (padded["input_ids"][row][padded["attention_mask"][row].bool()].tolist(),
                      padded["labels"][row][padded["attention_mask"][row].bool()].tolist())
                for row, key in enumerate(padded["keys"])}
        for key, (ids, labels) in zip(packed["keys"], unpack(packed)):
            assert ids == rows[key][0] and labels[1:] == rows[key][1][1:]
        assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
        fewer_rows += packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert fewer_rows > 0, "precondition: some micro-batch actually packed"
    assert loaders[True].state_dict() == loaders[False].state_dict()
    for stream in streams.values():
        stream.close()


def test_pretrain_batches_pack_with_every_text_token_supervised_but_each_first(tmp_path, tokenizer):
    shards = [[pretrain_record(3 * shard + i, words=1 + 4 * (i == 1), with_image=(i == 0)) for i in range(3)]
              for shard in range(2)]
    folder = write_shard_folder(tmp_path / "pt", {"pt": shards}, kind="pretrain")
    loader = build_pt_loader(data_config(tmp_path / "unused", num_workers=1, pt_folder=folder), tokenizer=tokenizer,
                             image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS, micro_batch_size=3, rank=0,
                             world_size=1, seed=0)
    stream = iter(loader)
    batches = [next(stream) for _ in range(loader.steps_per_epoch)]
    stream.close()
    assert any(batch["input_ids"].shape[0] < 3 for batch in batches), "precondition: some batch packed"
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for batch in batches:
        for ids, labels in unpack(batch):
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
            assert labels == [IGNORE_INDEX] + [IGNORE_INDEX if token == image_id else token for token in ids[1:]]


# ------------------------------------------------------------------------------------------- losses


@pytest.fixture(params=["sdpa", "eager", "one_row"])
def attention(request, monkeypatch):
    """The attention the packed batch is run with; ``one_row`` is flash-attn's layout (every real token in one
    unpadded row), run here with sdpa, which reads the sample boundaries from the position ids the same way."""
    if request.param == "one_row":
        monkeypatch.setattr(packing, "FLASH_BACKENDS", ("sdpa",))
        return "sdpa"
    return request.param


@pytest.mark.parametrize("stage", sorted(cases.KD_SETTINGS))
def test_packed_loss_and_gradients_equal_the_padded_batch(attention, stage):
    items = cases.micro_batch()
    padded = collate_right_padded(items, pad_id=cases.PAD_ID, image_size=cases.IMAGE_SIZE)
    packed = collate_packed(items, pad_id=cases.PAD_ID, image_size=cases.IMAGE_SIZE)
    student, teacher = cases.student_and_teacher(stage, attention)
    want_terms, want_grads = cases.loss_and_grads(student, teacher, padded, cases.KD_SETTINGS[stage])
    got_terms, got_grads = cases.loss_and_grads(student, teacher, packed, cases.KD_SETTINGS[stage])
    assert got_terms.keys() == want_terms.keys() and want_terms["loss"] > 0
    for name, value in want_terms.items():
        assert got_terms[name] == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # The test can fail: the packed rows run with their token mask as a 2-D attention mask let samples see each
    # other, and the loss moves.
    leaky_terms, _ = cases.loss_and_grads(student, teacher, {**packed, "packed": False}, cases.KD_SETTINGS[stage])
    assert abs(leaky_terms["loss"] - want_terms["loss"]) > 1e-3
