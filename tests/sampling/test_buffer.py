"""Decoding a buffer in large batches gives each micro-batch the rollout it would get on its own."""

import torch

from kd_pipeline.sampling import MixedRollout, decode_in_batches, sample_mixed
from kd_pipeline.sampling.buffer import concat_prompts, split_rollout

FIELDS = ("tokens", "mask", "student_logprob", "teacher_logprob", "mixed_logprob")


def test_concat_pads_on_the_left_and_keeps_image_rows_in_order():
    first = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.full((1, 3, 2, 2), 1.0)}
    text_only = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
                 "pixel_values": torch.zeros(0, 3, 2, 2)}
    second = {"input_ids": torch.tensor([[0, 9], [3, 4]]), "attention_mask": torch.tensor([[0, 1], [1, 1]]),
              "pixel_values": torch.full((2, 3, 2, 2), 2.0)}
    merged = concat_prompts([first, text_only, second], pad_token_id=0)
    assert merged["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 9], [0, 3, 4]]
    assert merged["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]
    assert merged["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]


def test_split_trims_each_block_to_its_longest_answer():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    rollout = MixedRollout(tokens=torch.arange(12).reshape(3, 4), mask=mask, student_logprob=-mask.float(),
                           teacher_logprob=-2 * mask.float(), mixed_logprob=-3 * mask.float())
    first, second = split_rollout(rollout, [2, 1])
    assert first.tokens.tolist() == [[0, 1], [4, 5]] and first.mask.tolist() == [[1, 1], [1, 0]]
    assert second.tokens.tolist() == [[8, 9, 10]] and second.teacher_logprob.tolist() == [[-2.0, -2.0, -2.0]]


def _trim(rollout: MixedRollout) -> MixedRollout:
    length = int(rollout.lengths.max())
    return MixedRollout(**{name: getattr(rollout, name)[:, :length] for name in FIELDS})


def test_buffer_batched_rollouts_equal_per_micro_batch_rollouts(tiny_llava, llava_ids, image_prompts):
    """top_k=1 makes every draw the mixture's argmax, independent of how uniforms are grouped: then decoding four
    micro-batches two at a time or all at once (re-padded to one width) must give each micro-batch exactly its own
    rollout, and the number of decode calls depends only on the number of batches."""
    student = tiny_llava(32, seed=0, eos_bias=0.25)  # answers of 1 to 7 tokens
    teacher = tiny_llava(48, seed=1)
    input_ids, attention_mask, pixel_values = image_prompts
    # Four micro-batches of different prompt widths: rows of the three prompts, one text-only batch.
    batches = [{"input_ids": input_ids[:2], "attention_mask": attention_mask[:2], "pixel_values": pixel_values[:2]},
               {"input_ids": input_ids[2:, -5:], "attention_mask": attention_mask[2:, -5:],
                "pixel_values": pixel_values[2:]},
               {"input_ids": torch.tensor([[0, 1, 5], [1, 7, 8]]),
                "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                "pixel_values": torch.zeros(0, *pixel_values.shape[1:])},
               {"input_ids": input_ids[1:], "attention_mask": attention_mask[1:], "pixel_values": pixel_values[1:]}]

    calls = []

    def decode(prompts):
        calls.append(prompts["input_ids"].shape[0])
        images = prompts["pixel_values"]
        return sample_mixed(student, teacher, prompts["input_ids"], prompts["attention_mask"],
                            images if images is not None and images.shape[0] else None, mix_alpha=0.3,
                            max_new_tokens=10, eos_token_id=llava_ids.eos, pad_token_id=llava_ids.pad, top_k=1,
                            generator=torch.Generator().manual_seed(0))

    alone = [_trim(decode(batch)) for batch in batches]
    calls.clear()
    batched = decode_in_batches(batches, 2, decode, pad_token_id=llava_ids.pad)
    whole = decode_in_batches(batches, 0, decode, pad_token_id=llava_ids.pad)
    assert calls == [3, 4, 7]  # rows of the decodes: batches 1-2, batches 3-4, then all four
    assert any(rollout.mask.sum() < rollout.mask.numel() for rollout in alone), "some rows must end early"
    for expected, got_batched, got_whole in zip(alone, batched, whole):
        for got in (got_batched, got_whole):
            assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.mask, expected.mask)
            for name in FIELDS[2:]:
                torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
