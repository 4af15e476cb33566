"""fused_token_kl with a loss share (stage 2's call): gradients formed in forward, checked in backward.

The caller's loss is stage 2's (PPO-clipped policy term on the target log-probs + single-step reverse KL token
mean, from kd_pipeline.losses.minillm; its share from minillm.policy_loss_share); the reference is the same loss on fp64 logits written out in
test_fused_kl. Backward must give the reference gradients whatever the caller does with the outputs, and must
not recompute logits for rows whose upstream gradient the share predicted.
"""

import pytest
import torch

from kd_pipeline.losses import chunked_autograd, fused_token_kl
from kd_pipeline.losses.minillm import policy_gradient_loss, policy_loss_share, single_step_loss
from tests.losses.test_fused_kl import (
    LargestTensor,
    assert_close,
    leaf_inputs,
    naive_kl,
    naive_logprob,
)

BATCH, STEPS, VOCAB = 3, 9, 1003
SINGLE_STEP_WEIGHT, CLIP_EPS = 0.7, 0.2


def stage2_problem(dtype=torch.float32, seed=0, teacher_size=24):
    """A (3, 9) rollout batch: padded ends, old log-probs off by up to +-0.5 so that some ratios clip."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    mask = torch.ones(BATCH, STEPS, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 3:] = False
    targets = torch.randint(0, VOCAB, (BATCH, STEPS), generator=generator).masked_fill(~mask, -100)
    return dict(
        student_hidden=randn(BATCH, STEPS, 16),
        student_weight=randn(VOCAB, 16, scale=2.5 / 16**0.5),
        teacher_hidden=randn(BATCH, STEPS, teacher_size),
        teacher_weight=randn(1010, teacher_size, scale=2.5 / teacher_size**0.5),
        targets=targets,
        mask=mask,
        logprob_offset=torch.rand(BATCH, STEPS, generator=generator, dtype=torch.float64) - 0.5,
        advantages=torch.randn(BATCH, STEPS, generator=generator, dtype=torch.float64),
        weights=torch.rand(BATCH, STEPS, generator=generator, dtype=torch.float64) + 0.5,
    )


def stage2_loss(kl, logprob, problem, old_logprob):
    """What StudentModule.minillm_terms builds from the per-token outputs."""
    policy, clip_fraction = policy_gradient_loss(logprob, old_logprob, problem["advantages"], problem["weights"],
                                                 problem["mask"], clip_eps=CLIP_EPS)
    return policy + SINGLE_STEP_WEIGHT * single_step_loss(kl, problem["mask"]), clip_fraction


def stage2_share(problem, old_logprob):
    return policy_loss_share(old_logprob, problem["advantages"], problem["weights"], problem["mask"],
                             clip_eps=CLIP_EPS, single_step_weight=SINGLE_STEP_WEIGHT)


def reference(problem):
    """fp64 per-token values, old log-probs, and the gradients of stage2_loss."""
    student_hidden = problem["student_hidden"].double().requires_grad_()
    student_weight = problem["student_weight"].double().requires_grad_()
    student_logits = student_hidden @ student_weight.T  # (B, T, V)
    teacher_logits = problem["teacher_hidden"].double() @ problem["teacher_weight"].double().T
    kl = torch.where(problem["mask"], naive_kl(student_logits, teacher_logits, "reverse", 1.0), 0.0)
    logprob = torch.where(problem["mask"], naive_logprob(student_logits, problem["targets"]), 0.0)
    old_logprob = (logprob.detach() + problem["logprob_offset"]).masked_fill(~problem["mask"], 0.0)
    loss, clip_fraction = stage2_loss(kl, logprob, problem, old_logprob)
    assert 0.0 < clip_fraction < 1.0  # both branches of the PPO clip are exercised
    loss.backward()
    return old_logprob, student_hidden.grad, student_weight.grad


class CountRecomputedRows:
    """Counts rows whose logits backward recomputes (calls of the chunk loop's GEMMs after forward)."""

    def __init__(self, monkeypatch):
        self.rows = 0
        self.counting = False
        original = chunked_autograd._ChunkLoop.chunk_logits

        def counted(loop, rows):
            student_logits, teacher_logits = original(loop, rows)
            if self.counting:
                self.rows += student_logits.shape[0]
            return student_logits, teacher_logits

        monkeypatch.setattr(chunked_autograd._ChunkLoop, "chunk_logits", counted)


def run_fused(problem, loss_share, chunk_size=4):
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    out = fused_token_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, direction="reverse",
                         chunk_size=chunk_size, targets=problem["targets"], mask=problem["mask"],
                         loss_share=loss_share, backend="torch")
    return out, student_hidden, student_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [4, 5, 64])
def test_stage2_share_gives_the_fp64_gradients_without_recomputing(monkeypatch, dtype, chunk_size):
    problem = stage2_problem(dtype)
    old_logprob, expected_hidden_grad, expected_weight_grad = reference(problem)
    counter = CountRecomputedRows(monkeypatch)
    out, student_hidden, student_weight = run_fused(problem, stage2_share(problem, old_logprob), chunk_size)
    loss, _ = stage2_loss(out.kl, out.target_logprob, problem, old_logprob)
    counter.counting = True
    loss.backward()
    assert counter.rows == 0
    assert student_hidden.grad.dtype == dtype and student_weight.grad.dtype == dtype
    assert_close(student_hidden.grad, expected_hidden_grad, dtype)
    assert_close(student_weight.grad, expected_weight_grad, dtype)


def test_a_common_factor_such_as_gradient_accumulation_only_scales(monkeypatch):
    problem = stage2_problem()
    old_logprob, expected_hidden_grad, expected_weight_grad = reference(problem)
    counter = CountRecomputedRows(monkeypatch)
    out, student_hidden, student_weight = run_fused(problem, stage2_share(problem, old_logprob))
    loss, _ = stage2_loss(out.kl, out.target_logprob, problem, old_logprob)
    counter.counting = True
    (loss / 4).backward()
    assert counter.rows == 0
    assert_close(student_hidden.grad, expected_hidden_grad / 4, torch.float32)
    assert_close(student_weight.grad, expected_weight_grad / 4, torch.float32)


def test_rows_the_share_did_not_predict_are_recomputed_and_exact(monkeypatch):
    problem = stage2_problem()
    old_logprob, _, _ = reference(problem)
    extra = torch.zeros(BATCH, STEPS, dtype=torch.float64)
    extra[1, 2], extra[1, 7], extra[0, 0] = 3.0, -2.0, 0.5  # a term the share does not know about
    student_hidden = problem["student_hidden"].double().requires_grad_()
    student_weight = problem["student_weight"].double().requires_grad_()
    student_logits = student_hidden @ student_weight.T
    teacher_logits = problem["teacher_hidden"].double() @ problem["teacher_weight"].double().T
    kl = torch.where(problem["mask"], naive_kl(student_logits, teacher_logits, "reverse", 1.0), 0.0)
    logprob = torch.where(problem["mask"], naive_logprob(student_logits, problem["targets"]), 0.0)
    (stage2_loss(kl, logprob, problem, old_logprob)[0] + (extra * kl).sum()).backward()

    counter = CountRecomputedRows(monkeypatch)
    out, fused_hidden, fused_weight = run_fused(problem, stage2_share(problem, old_logprob))
    loss = stage2_loss(out.kl, out.target_logprob, problem, old_logprob)[0] + (extra * out.kl).sum()
    counter.counting = True
    loss.backward()
    assert counter.rows == 3
    assert_close(fused_hidden.grad, student_hidden.grad, torch.float32)
    assert_close(fused_weight.grad, student_weight.grad, torch.float32)


def test_a_wrong_share_costs_time_not_correctness():
    problem = stage2_problem()
    old_logprob, expected_hidden_grad, expected_weight_grad = reference(problem)
    out, student_hidden, student_weight = run_fused(problem, lambda kl, logprob, positions: 5 * logprob.sum())
    stage2_loss(out.kl, out.target_logprob, problem, old_logprob)[0].backward()
    assert_close(student_hidden.grad, expected_hidden_grad, torch.float32)
    assert_close(student_weight.grad, expected_weight_grad, torch.float32)


def test_a_second_backward_recomputes_instead_of_reusing_handed_over_gradients():
    problem = stage2_problem()
    old_logprob, expected_hidden_grad, expected_weight_grad = reference(problem)
    out, student_hidden, student_weight = run_fused(problem, stage2_share(problem, old_logprob))
    loss, _ = stage2_loss(out.kl, out.target_logprob, problem, old_logprob)
    loss.backward(retain_graph=True)
    loss.backward()
    assert_close(student_hidden.grad, 2 * expected_hidden_grad, torch.float32)
    assert_close(student_weight.grad, 2 * expected_weight_grad, torch.float32)


def test_a_non_finite_upstream_gradient_reaches_the_gradients_as_without_a_share():
    # loss scalers detect an overflow by inf / NaN gradients: the stored finite ones must not hide it
    problem = stage2_problem()
    old_logprob, _, _ = reference(problem)
    upstream = torch.ones(BATCH, STEPS)
    upstream[1, 4] = float("inf")
    out, student_hidden, student_weight = run_fused(problem, stage2_share(problem, old_logprob))
    ((stage2_loss(out.kl, out.target_logprob, problem, old_logprob)[0]) + (upstream * out.kl).sum()).backward()
    assert not torch.isfinite(student_hidden.grad[1, 4]).all() and torch.isfinite(student_hidden.grad[0]).all()
    assert not torch.isfinite(student_weight.grad).all()


def test_the_share_sees_every_valid_token_once_by_its_flat_position():
    problem = stage2_problem()
    seen = []

    def share(kl, logprob, positions):
        seen.append(positions)
        assert kl.shape == logprob.shape == positions.shape and kl.requires_grad
        return kl.sum()

    run_fused(problem, share)
    assert torch.equal(torch.cat(seen), problem["mask"].reshape(-1).nonzero().squeeze(1))


def test_the_share_is_not_called_without_gradients_and_must_return_a_scalar():
    problem = stage2_problem()

    def never(kl, logprob, positions):
        raise AssertionError("called under no_grad")

    with torch.no_grad():
        run_fused(problem, never)
    with pytest.raises(ValueError, match="0-d tensor"):
        run_fused(problem, lambda kl, logprob, positions: kl)


def test_no_tokens_by_vocab_tensor_exists_with_a_share():
    problem = stage2_problem(teacher_size=8)
    old_logprob, _, _ = reference(problem)
    with LargestTensor() as fused_mode:
        out, _, _ = run_fused(problem, stage2_share(problem, old_logprob), chunk_size=4)
        stage2_loss(out.kl, out.target_logprob, problem, old_logprob)[0].backward()
    # the largest: one chunk of logits (chunk x V) or the student's weight gradient (V x H), not tokens x V
    assert fused_mode.largest <= max(4 * VOCAB, VOCAB * 16) < BATCH * STEPS * VOCAB
