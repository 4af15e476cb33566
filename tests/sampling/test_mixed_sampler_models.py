"""sample_mixed on real tiny transformers models: KV cache vs full recompute, image encoded once, statistics."""

import torch

from kd_pipeline.sampling import sample_mixed


def count_vision_calls(model) -> list[int]:
    """Counts forwards of the model's vision tower (the image-feature computation)."""
    calls = []
    model.model.vision_tower.register_forward_hook(lambda module, inputs, output: calls.append(1))
    return calls


def test_kv_cache_matches_full_recompute_with_images_left_padding_and_early_stops(tiny_llava, image_prompts,
                                                                                  llava_ids):
    student = tiny_llava(32, seed=0, eos_bias=2.5)
    teacher = tiny_llava(48, seed=1, eos_bias=2.5, vocab_size=llava_ids.vocab + 2)  # padded teacher vocab
    input_ids, attention_mask, pixel_values = image_prompts
    student_vision_calls, teacher_vision_calls = count_vision_calls(student), count_vision_calls(teacher)
    rollouts = {}
    for use_cache in (True, False):
        student_vision_calls.clear()
        teacher_vision_calls.clear()
        rollouts[use_cache] = sample_mixed(
            student, teacher, input_ids, attention_mask, pixel_values, max_new_tokens=10,
            eos_token_id=llava_ids.eos, pad_token_id=llava_ids.pad, generator=torch.Generator().manual_seed(4),
            use_cache=use_cache, check_every=3,
        )
        steps = rollouts[use_cache].tokens.shape[1]
        expected_calls = 1 if use_cache else steps
        assert len(student_vision_calls) == expected_calls and len(teacher_vision_calls) == expected_calls
    cached, recomputed = rollouts[True], rollouts[False]
    lengths = cached.lengths.tolist()
    # Preconditions of this test: rows stop at different times and at least one before the end.
    assert len(set(lengths)) > 1 and min(lengths) < cached.tokens.shape[1], lengths
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert torch.equal(cached.mask, recomputed.mask)
    for field in ("student_logprob", "teacher_logprob", "mixed_logprob"):
        torch.testing.assert_close(getattr(cached, field), getattr(recomputed, field), atol=1e-5, rtol=1e-5)


def test_recorded_log_probs_match_a_direct_forward_of_the_full_sequence(tiny_llava, image_prompts, llava_ids):
    student = tiny_llava(32, seed=2, eos_bias=1.0)
    teacher = tiny_llava(48, seed=3, eos_bias=1.0)
    input_ids, attention_mask, pixel_values = image_prompts
    rollout = sample_mixed(student, teacher, input_ids, attention_mask, pixel_values, mix_alpha=0.3,
                           max_new_tokens=6, eos_token_id=llava_ids.eos, pad_token_id=llava_ids.pad,
                           generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([input_ids, rollout.tokens], dim=1)  # (B, P + T)
    full_mask = torch.cat([attention_mask, rollout.mask], dim=1)  # (B, P + T)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_length = input_ids.shape[1]
    with torch.no_grad():
        references = {}
        for name, model in (("student", student), ("teacher", teacher)):
            logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions,
                           pixel_values=pixel_values).logits  # (B, P + T, V)
            response_logits = logits[:, prompt_length - 1:-1].double()  # (B, T, V) predicting each response token
            references[name] = torch.log_softmax(response_logits, -1).gather(-1, rollout.tokens[..., None])[..., 0]
    valid = rollout.mask.bool()
    for name in ("student", "teacher"):
        recorded = getattr(rollout, f"{name}_logprob")
        torch.testing.assert_close(recorded[valid].double(), references[name][valid], atol=1e-5, rtol=1e-5)
    mixture = torch.log(0.3 * references["teacher"].exp() + 0.7 * references["student"].exp())
    torch.testing.assert_close(rollout.mixed_logprob[valid].double(), mixture[valid], atol=1e-5, rtol=1e-5)


def test_llama_without_images_kv_cache_matches_full_recompute(tiny_llama, llava_ids):
    student, teacher = tiny_llama(32, seed=4), tiny_llama(64, seed=5)
    input_ids = torch.tensor([[llava_ids.pad, llava_ids.pad, 1, 5], [1, 6, 7, 8]])
    attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    runs = [
        sample_mixed(student, teacher, input_ids, attention_mask, max_new_tokens=8, eos_token_id=llava_ids.eos,
                     pad_token_id=llava_ids.pad, generator=torch.Generator().manual_seed(2), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].mixed_logprob, runs[1].mixed_logprob, atol=1e-5, rtol=1e-5)


def test_with_alpha_one_the_first_token_follows_the_teacher_given_an_image(tiny_llava, llava_ids, chi_square):
    student = tiny_llava(32, seed=6)
    teacher = tiny_llava(48, seed=7)
    # Sharpen the teacher so its distribution differs clearly from the near-uniform student.
    teacher.lm_head.weight.data *= 40.0
    rows = 3000
    prompt = torch.tensor([[1] + [llava_ids.image_token] * 4 + [5]])
    image = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    input_ids, pixel_values = prompt.expand(rows, -1), image.expand(rows, -1, -1, -1)
    rollout = sample_mixed(student, teacher, input_ids, torch.ones_like(input_ids), pixel_values, mix_alpha=1.0,
                           max_new_tokens=1, eos_token_id=llava_ids.eos, pad_token_id=llava_ids.pad,
                           generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher(input_ids=prompt, pixel_values=image).logits[0, -1].double(), -1)
        student_probs = torch.softmax(student(input_ids=prompt, pixel_values=image).logits[0, -1].double(), -1)
    counts = torch.bincount(rollout.tokens[:, 0], minlength=llava_ids.vocab)
    statistic, critical = chi_square(counts, teacher_probs)
    assert statistic < critical, (statistic, critical)
    wrong_statistic, wrong_critical = chi_square(counts, student_probs)
    assert wrong_statistic > wrong_critical
    assert torch.equal(rollout.mixed_logprob, rollout.teacher_logprob)
