"""Encoders (raw tar sample -> tokens, labels, image), collation and the rate-limited bad-sample log."""

import json
import logging

import numpy as np
import pytest
import torch

from kd_pipeline.data.collate import collate_left_padded, collate_right_padded, padding_batch
from kd_pipeline.data.samples import (BadSample, BadSampleLog, EncodedItem, EncodingSettings, InstructEncoder,
                                      PretrainEncoder, PromptEncoder)
from kd_pipeline.prompts import IGNORE_INDEX, encode_conversation, expand_image, render, tokenize_with_image
from kd_pipeline.tokenizer import image_token_id

from shard_fixtures import IMAGE_SIZE, NUM_IMAGE_TOKENS, instruct_sample, pretrain_sample


def raw(sample) -> dict:
    out = {"__key__": sample.key, "json": json.dumps(sample.record).encode()}
    if sample.image is not None:
        out[sample.ext] = sample.image
    return out


@pytest.fixture(scope="module")
def settings(tokenizer):
    return EncodingSettings(tokenizer=tokenizer, image_token_id=image_token_id(tokenizer),
                            num_image_tokens=NUM_IMAGE_TOKENS, image_size=IMAGE_SIZE, max_image_pixels=10**6)


def test_instruct_sample_equals_prompts_encoding(settings, tokenizer):
    sample = instruct_sample(7, turns=2)
    item = InstructEncoder(settings)(raw(sample))
    reference = encode_conversation(sample.record["conversations"], tokenizer, image_token_id=settings.image_token_id,
                                    num_image_tokens=NUM_IMAGE_TOKENS)
    assert item.key == sample.key
    assert item.input_ids == reference.input_ids and item.labels == reference.labels
    assert item.pixel_values.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert item.input_ids.count(settings.image_token_id) == NUM_IMAGE_TOKENS
    assert any(label != IGNORE_INDEX for label in item.labels)


def test_truncation_is_kept_and_flagged(settings, tokenizer):
    sample = instruct_sample(1)
    text_ids = tokenize_with_image(render(sample.record["conversations"]), tokenizer, settings.image_token_id)
    keep = text_ids.index(settings.image_token_id) + 3      # cut a few tokens after the image placeholder
    item = InstructEncoder(EncodingSettings(**{**settings.__dict__, "max_length": keep}))(raw(sample))
    assert item.truncated and len(item.input_ids) == keep - 1 + NUM_IMAGE_TOKENS
    assert item.input_ids[-2:] == text_ids[keep - 2:keep]

    too_short = EncodingSettings(**{**settings.__dict__, "max_length": keep - 3})
    with pytest.raises(BadSample, match="image_truncated"):
        InstructEncoder(too_short)(raw(sample))


@pytest.mark.parametrize("mutate, reason", [
    (lambda s: s.update(json=b"{not json"), "bad_json"),
    (lambda s: s.pop("png"), "missing_image"),
    (lambda s: s.update(json=json.dumps({**json.loads(s["json"]), "conversations": "x"}).encode()), "bad_record"),
    (lambda s: s.update(json=json.dumps({**json.loads(s["json"]), "image_ext": None}).encode()), "unexpected_image"),
    (lambda s: s.update(png=s["png"][:-30]), "unreadable_image"),
])
def test_bad_samples_raise_with_reason(settings, mutate, reason):
    sample = raw(instruct_sample(2))
    mutate(sample)
    with pytest.raises(BadSample) as error:
        InstructEncoder(settings)(sample)
    assert error.value.reason == reason


def test_image_token_and_image_must_agree(settings):
    text_only = instruct_sample(3, with_image=False)
    text_only.record["conversations"][0]["value"] += " <image>"
    with pytest.raises(BadSample, match="image_token_without_image"):
        InstructEncoder(settings)(raw(text_only))
    with_image = instruct_sample(4)
    with_image.record["conversations"][0]["value"] = "no placeholder"
    with pytest.raises(BadSample, match="image_without_token"):
        InstructEncoder(settings)(raw(with_image))


def test_text_is_rejected_before_the_image_is_decoded(settings):
    sample = instruct_sample(5)
    sample.record["conversations"][1]["from"] = "human"    # broken alternation
    encoder = InstructEncoder(settings)
    with pytest.raises(BadSample, match="bad_record"):
        encoder(raw(sample))
    assert encoder.images_decoded == 0


def test_prompt_ends_at_the_last_human_turn(settings, tokenizer):
    sample = instruct_sample(6, turns=2)
    item = PromptEncoder(settings)(raw(sample))
    text = render(sample.record["conversations"][:3], open_answer=True)
    assert text.endswith("USER: What is in the picture 6 1? ASSISTANT:")
    ids = tokenize_with_image(text, tokenizer, settings.image_token_id)
    assert item.input_ids == expand_image(ids, ids, settings.image_token_id, NUM_IMAGE_TOKENS)[0]
    assert item.labels is None and item.pixel_values is not None


def test_overlong_prompt_is_skipped(settings):
    short = EncodingSettings(**{**settings.__dict__, "max_length": 10})
    with pytest.raises(BadSample, match="prompt_too_long"):
        PromptEncoder(short)(raw(instruct_sample(8)))


def test_pretrain_text_is_bos_text_eos_all_supervised(settings, tokenizer):
    sample = pretrain_sample(3)
    item = PretrainEncoder(settings)(raw(sample))
    expected = tokenizer(sample.record["text"]).input_ids + [tokenizer.eos_token_id]
    assert item.input_ids == expected and item.labels == expected
    assert item.input_ids[0] == tokenizer.bos_token_id and item.pixel_values is None

    short = EncodingSettings(**{**settings.__dict__, "max_length": 5})
    cut = PretrainEncoder(short)(raw(sample))
    assert cut.truncated and cut.input_ids == expected[:5]


def test_pretrain_caption_follows_the_image_block(settings, tokenizer):
    item = PretrainEncoder(settings)(raw(pretrain_sample(4, with_image=True)))
    image_id = settings.image_token_id
    assert item.input_ids[0] == tokenizer.bos_token_id
    assert item.input_ids[1:1 + NUM_IMAGE_TOKENS] == [image_id] * NUM_IMAGE_TOKENS
    assert item.labels[1:1 + NUM_IMAGE_TOKENS] == [IGNORE_INDEX] * NUM_IMAGE_TOKENS
    assert item.input_ids[-1] == tokenizer.eos_token_id and item.labels[-1] == tokenizer.eos_token_id
    assert item.pixel_values.shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def _item(key, ids, with_image):
    pixels = np.full((3, IMAGE_SIZE, IMAGE_SIZE), float(ids[0]), dtype=np.float32) if with_image else None
    return EncodedItem(key, ids, [i + 100 for i in ids], pixels, truncated=key == "b")


def test_right_padding_labels_and_image_order():
    items = [_item("a", [5, 6, 7], True), _item("b", [8], False), _item("c", [9, 10], True)]
    batch = collate_right_padded(items, pad_id=0, image_size=IMAGE_SIZE)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[105, 106, 107], [108, -100, -100], [109, 110, -100]]
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [5.0, 9.0]   # images of rows a then c
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["keys"] == ["a", "b", "c"] and batch["num_truncated"] == 1


def test_left_padding_for_prompts():
    items = [_item("a", [5, 6, 7], False), _item("b", [8], False)]
    batch = collate_left_padded(items, pad_id=0, image_size=IMAGE_SIZE)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE) and "labels" not in batch


def test_padding_batch_is_fully_masked_with_one_image():
    batch = padding_batch(bos_id=1, image_token_id=400, num_image_tokens=4, image_size=IMAGE_SIZE)
    assert batch["input_ids"].tolist() == [[1, 400, 400, 400, 400]]
    assert bool((batch["labels"] == IGNORE_INDEX).all()) and batch["keys"] == []
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(batch["has_image"], torch.tensor([True]))


def test_bad_sample_log_is_rate_limited(caplog):
    errors = BadSampleLog("test", first=2, every=5)
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.data.samples"):
        for index in range(12):
            errors.record(f"k{index}", "bad_json", "boom")
        errors.record("x", "unreadable_image", "boom")
    logged = [record.getMessage() for record in caplog.records]
    assert errors.counts == {"bad_json": 12, "unreadable_image": 1}
    # occurrences 1, 2, then every 5th (5, 10) of bad_json; the first of unreadable_image
    assert [m.split("occurrence ")[1].split(")")[0] for m in logged] == ["1", "2", "5", "10", "1"]
