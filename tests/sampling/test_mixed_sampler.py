"""sample_mixed on a bigram stub: sampling statistics, recorded log-probs, filters, EOS handling, the finished check."""

import math

import pytest
import torch

import kd_pipeline.sampling.mixed as mixed_module
from kd_pipeline.sampling import draw_tokens, mixture_log_probs, sample_mixed
from tests.sampling.conftest import BigramStub

VOCAB = 5
EOS = 4
PAD = 0
ROWS = 20000


def bigram_tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct student and teacher bigram logits (V, V)."""
    generator = torch.Generator().manual_seed(seed)
    student_table = torch.randn(VOCAB, VOCAB, generator=generator)
    teacher_table = 2.0 * torch.randn(VOCAB, VOCAB, generator=generator)
    return student_table, teacher_table


def expected_sequence_probs(student_table, teacher_table, mix_alpha, first_context):
    """Exact probabilities of the 2-token responses in fp64, flattened as (y1, y2) with y2 = PAD after EOS."""
    student_probs = torch.softmax(student_table.double(), dim=-1)  # (V, V)
    teacher_probs = torch.softmax(teacher_table.double(), dim=-1)  # (V, V)
    mixture = mix_alpha * teacher_probs + (1 - mix_alpha) * student_probs  # (V, V)
    joint = mixture[first_context][:, None] * mixture  # (V, V) p̃(y1) p̃(y2 | y1)
    joint[EOS] = 0.0
    joint[EOS, PAD] = mixture[first_context, EOS]
    return joint.flatten()


def sequence_counts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)


@pytest.mark.parametrize("mix_alpha", [0.0, 0.2, 1.0])
def test_sequences_follow_the_mixture(bigram_stub, chi_square, mix_alpha):
    student_table, teacher_table = bigram_tables()
    prompts = torch.full((ROWS, 1), 1)
    rollout = sample_mixed(
        bigram_stub(student_table), bigram_stub(teacher_table), prompts, torch.ones_like(prompts),
        mix_alpha=mix_alpha, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD,
        generator=torch.Generator().manual_seed(11),
    )
    counts = sequence_counts(rollout.tokens)
    statistic, critical = chi_square(counts, expected_sequence_probs(student_table, teacher_table, mix_alpha, 1))
    assert statistic < critical, f"alpha={mix_alpha}: chi2 {statistic:.1f} above {critical:.1f}"
    # The same samples must be rejected against the other endpoint: the check has power.
    other_alpha = 1.0 if mix_alpha < 0.5 else 0.0
    wrong, wrong_critical = chi_square(counts, expected_sequence_probs(student_table, teacher_table, other_alpha, 1))
    assert wrong > wrong_critical


def test_recorded_log_probs_are_raw_and_weights_are_one_without_teacher(bigram_stub):
    student_table, teacher_table = bigram_tables(seed=1)
    prompts = torch.tensor([[1], [3], [0]])
    for mix_alpha in (0.0, 0.2, 1.0):
        rollout = sample_mixed(
            bigram_stub(student_table), bigram_stub(teacher_table), prompts, torch.ones_like(prompts),
            mix_alpha=mix_alpha, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD,
            generator=torch.Generator().manual_seed(5),
        )
        previous = torch.cat([prompts, rollout.tokens[:, :-1]], dim=1)  # (B, T) context token of each position
        valid = rollout.mask.bool()
        student_ref = torch.log_softmax(student_table.double(), -1)[previous, rollout.tokens]  # (B, T)
        teacher_ref = torch.log_softmax(teacher_table.double(), -1)[previous, rollout.tokens]
        mixture_ref = torch.log(
            mix_alpha * teacher_ref.exp() + (1 - mix_alpha) * student_ref.exp()
        )
        for recorded, reference in ((rollout.student_logprob, student_ref), (rollout.teacher_logprob, teacher_ref),
                                    (rollout.mixed_logprob, mixture_ref)):
            assert recorded.dtype == torch.float32
            torch.testing.assert_close(recorded[valid].double(), reference[valid], atol=1e-5, rtol=1e-5)
            assert torch.all(recorded[~valid] == 0)
        if mix_alpha == 0.0:
            weights = (rollout.student_logprob - rollout.mixed_logprob).exp()
            assert torch.all(weights[valid] == 1.0)


def test_eos_is_a_target_and_rows_pad_afterwards(bigram_stub):
    # After token 1 the next token is EOS; no context ever leads to token 1 or (other than 1) to EOS.
    table = torch.zeros(VOCAB, VOCAB)
    table[:, EOS] = -50.0
    table[:, 1] = -50.0
    table[1, EOS] = 50.0
    prompts = torch.tensor([[1], [2]])
    rollout = sample_mixed(
        bigram_stub(table), bigram_stub(table), prompts, torch.ones_like(prompts),
        max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
    )
    assert rollout.tokens[0].tolist() == [EOS, PAD, PAD, PAD, PAD]
    assert rollout.mask[0].tolist() == [1, 0, 0, 0, 0]
    assert rollout.mask[1].tolist() == [1, 1, 1, 1, 1]
    assert rollout.lengths.tolist() == [1, 5]
    for values in (rollout.student_logprob, rollout.teacher_logprob, rollout.mixed_logprob):
        assert torch.all(values[0, 1:] == 0) and torch.isfinite(values).all()


def test_cached_calls_feed_one_token_with_the_full_mask_and_next_position(bigram_stub):
    student_table, teacher_table = bigram_tables(seed=2)
    student = bigram_stub(student_table)
    prompts = torch.tensor([[PAD, PAD, 1], [2, 3, 1]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    sample_mixed(student, bigram_stub(teacher_table), prompts, mask, torch.zeros(2, 3, 4, 4), max_new_tokens=3,
                 eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0), check_every=100)
    first, *later = student.calls
    assert first["had_pixels"] and not first["had_cache"] and first["input_length"] == 3
    assert first["position_ids"].tolist() == [[0, 0, 0], [0, 1, 2]]
    for step, call in enumerate(later, start=1):
        assert call["had_cache"] and not call["had_pixels"] and call["input_length"] == 1
        assert call["mask_length"] == 3 + step
    # Left padding does not count: row 0's first new token sits at position 1, row 1's at position 3.
    assert later[0]["position_ids"].tolist() == [[1], [3]]


def test_filters_restrict_support_and_weights_stay_finite(bigram_stub):
    student_table, teacher_table = bigram_tables(seed=3)
    prompts = torch.full((400, 1), 1)
    rollout = sample_mixed(
        bigram_stub(student_table), bigram_stub(teacher_table), prompts, torch.ones_like(prompts),
        max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD, top_k=2, temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    student_tempered = torch.softmax(student_table[1].double() / 0.7, -1)
    teacher_tempered = torch.softmax(teacher_table[1].double() / 0.7, -1)
    mixture = 0.2 * teacher_tempered + 0.8 * student_tempered  # (V,)
    top_two = mixture.topk(2).indices
    kept = torch.zeros(VOCAB, dtype=torch.double)
    kept[top_two] = mixture[top_two] / mixture[top_two].sum()
    sampled = rollout.tokens[:, 0]
    assert set(sampled.tolist()) == set(top_two.tolist())
    torch.testing.assert_close(rollout.mixed_logprob[:, 0].double(), kept[sampled].log(), atol=1e-5, rtol=1e-5)
    raw_student = torch.log_softmax(student_table[1].double(), -1)[sampled]
    torch.testing.assert_close(rollout.student_logprob[:, 0].double(), raw_student, atol=1e-5, rtol=1e-5)


def test_top_p_keeps_the_smallest_nucleus():
    student_logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    _, _, sampling = mixture_log_probs(student_logits, student_logits, mix_alpha=0.2, top_p=0.75)
    assert torch.isinf(sampling[0, 2:]).all()
    torch.testing.assert_close(sampling[0, :2].exp(), torch.tensor([0.625, 0.375]))


def test_draw_tokens_never_picks_a_token_without_mass():
    logprob = torch.log(torch.tensor([[0.0, 0.5, 0.5, 0.0]])).expand(1000, 4)
    tokens = draw_tokens(logprob, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 2}


def test_teacher_padding_rows_are_dropped_and_a_smaller_teacher_vocab_is_refused(bigram_stub):
    student_table, teacher_table = bigram_tables(seed=4)
    padded_teacher = torch.cat([teacher_table, torch.full((VOCAB, 3), 30.0)], dim=1)  # huge logits on padding rows
    prompts = torch.tensor([[1], [2]])
    rollout = sample_mixed(
        bigram_stub(student_table), bigram_stub(padded_teacher), prompts, torch.ones_like(prompts),
        max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
    )
    assert rollout.tokens.max() < VOCAB
    previous = torch.cat([prompts, rollout.tokens[:, :-1]], dim=1)
    valid = rollout.mask.bool()
    reference = torch.log_softmax(teacher_table.double(), -1)[previous, rollout.tokens]
    torch.testing.assert_close(rollout.teacher_logprob[valid].double(), reference[valid], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="teacher's vocabulary"):
        sample_mixed(bigram_stub(padded_teacher), bigram_stub(student_table), prompts, torch.ones_like(prompts),
                     max_new_tokens=1, eos_token_id=EOS, pad_token_id=PAD)


def test_finished_check_runs_every_check_every_steps(bigram_stub, monkeypatch):
    always_eos = torch.full((VOCAB, VOCAB), -50.0)
    always_eos[:, EOS] = 50.0
    checks = []
    real_check = mixed_module._all_rows_finished
    monkeypatch.setattr(mixed_module, "_all_rows_finished",
                        lambda finished, sync_ranks: checks.append(1) or real_check(finished, sync_ranks))
    prompts = torch.tensor([[1], [2]])
    rollout = sample_mixed(bigram_stub(always_eos), bigram_stub(always_eos), prompts, torch.ones_like(prompts),
                           max_new_tokens=20, eos_token_id=EOS, pad_token_id=PAD, check_every=4)
    assert rollout.tokens.shape == (2, 4) and len(checks) == 1
    assert rollout.mask.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    checks.clear()
    never_eos = torch.zeros(VOCAB, VOCAB)
    never_eos[:, EOS] = -50.0
    rollout = sample_mixed(bigram_stub(never_eos), bigram_stub(never_eos), prompts, torch.ones_like(prompts),
                           max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD, check_every=4)
    assert rollout.tokens.shape == (2, 10) and len(checks) == 2  # after steps 4 and 8, not after the last


def test_same_generator_state_gives_the_same_rollout(bigram_stub):
    student_table, teacher_table = bigram_tables(seed=5)
    prompts = torch.tensor([[1], [2], [3]])
    generator = torch.Generator().manual_seed(9)
    saved_state = generator.get_state()
    runs = []
    for _ in range(2):
        generator.set_state(saved_state)
        runs.append(sample_mixed(bigram_stub(student_table), bigram_stub(teacher_table), prompts,
                                 torch.ones_like(prompts), max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
                                 generator=generator))
    assert torch.equal(runs[0].tokens, runs[1].tokens)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mix_alpha": 1.5}, "mix_alpha"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"check_every": 0}, "check_every"),
        ({"sync_ranks": True}, "process group"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(bigram_stub, overrides, message):
    table = torch.zeros(VOCAB, VOCAB)
    prompts = torch.tensor([[1]])
    arguments = {"max_new_tokens": 2, "eos_token_id": EOS, "pad_token_id": PAD} | overrides
    with pytest.raises(ValueError, match=message):
        sample_mixed(bigram_stub(table), bigram_stub(table), prompts, torch.ones_like(prompts), **arguments)


def test_right_padded_prompts_are_refused(bigram_stub):
    table = torch.zeros(VOCAB, VOCAB)
    prompts = torch.tensor([[1, 2], [1, PAD]])
    with pytest.raises(ValueError, match="LEFT"):
        sample_mixed(bigram_stub(table), bigram_stub(table), prompts, torch.tensor([[1, 1], [1, 0]]),
                     max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)


def test_banned_tokens_are_never_sampled_and_logprobs_stay_raw():
    """The <image> placeholder must never be generated; q and p stay the models' raw log-probs, p~ renormalised."""
    vocab, banned = 6, 4
    student, teacher = BigramStub(torch.zeros(vocab, vocab)), BigramStub(torch.zeros(vocab, vocab))  # uniform
    input_ids = torch.ones(64, 2, dtype=torch.long)
    rollout = sample_mixed(student, teacher, input_ids, torch.ones_like(input_ids), mix_alpha=0.5,
                           max_new_tokens=6, eos_token_id=vocab + 10, pad_token_id=0,
                           generator=torch.Generator().manual_seed(0), banned_token_ids=(banned,))
    assert not (rollout.tokens == banned).any()
    assert torch.allclose(rollout.student_logprob, torch.full_like(rollout.student_logprob, -math.log(vocab)))
    assert torch.allclose(rollout.mixed_logprob, torch.full_like(rollout.mixed_logprob, -math.log(vocab - 1)))
