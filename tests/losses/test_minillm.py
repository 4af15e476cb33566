"""Stage-2 loss pieces against brute-force Python loops and hand-written references, masks included."""

import math

import pytest
import torch

from kd_pipeline.losses.minillm import (
    importance_weights,
    long_term_advantages,
    policy_gradient_loss,
    pretrain_loss,
    reinforce_loss,
    single_step_loss,
    token_rewards,
    whiten,
)

# Rows of lengths 4, 2, 1 and 0 (all masked) in a (4, 4) batch.
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def random_values(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(MASK.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_token_rewards_scale_clip_and_mask():
    teacher_logprob, student_logprob = random_values(0, 40.0), random_values(1, 40.0)
    rewards = token_rewards(teacher_logprob, student_logprob, MASK, reward_scaling=0.5, reward_clip=100.0)
    for row in range(4):
        for t in range(4):
            expected = 0.0
            if MASK[row, t]:
                expected = max(-100.0, min(100.0, (teacher_logprob[row, t] - student_logprob[row, t]).item() / 0.5))
            assert rewards[row, t].item() == pytest.approx(expected, abs=1e-12)
    assert (rewards.abs() == 100.0).any(), "the clip must be exercised by this data"
    unscaled = token_rewards(teacher_logprob, student_logprob, MASK, reward_scaling=None, reward_clip=None)
    torch.testing.assert_close(unscaled, torch.where(MASK.bool(), teacher_logprob - student_logprob, 0.0))


@pytest.mark.parametrize("mode", ["per_step", "product"])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_importance_weights_match_a_loop(mode, clip):
    student_logprob, mixed_logprob = random_values(2) - 1.0, random_values(3) - 1.0
    weights = importance_weights(student_logprob, mixed_logprob, MASK, mode=mode, clip=clip)
    for row in range(4):
        running_log = 0.0
        for t in range(4):
            step_log = (student_logprob[row, t] - mixed_logprob[row, t]).item()
            running_log += step_log
            expected = 0.0
            if MASK[row, t]:
                expected = math.exp(step_log if mode == "per_step" else running_log)
                expected = expected if clip is None else min(expected, clip)
            assert weights[row, t].item() == pytest.approx(expected, rel=1e-12)
    assert not weights.requires_grad


def test_huge_product_weights_stay_finite():
    student_logprob = torch.zeros(1, 200)
    mixed_logprob = torch.full((1, 200), -5.0)  # each step multiplies the product by e^5
    weights = importance_weights(student_logprob, mixed_logprob, torch.ones(1, 200), mode="product")
    assert torch.isfinite(weights).all() and weights.max() > 1e30


def brute_force_advantages(rewards, mask, variant, gamma, normalise):
    """Reference: plain Python sums over each row's valid tokens."""
    result = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        length = int(mask[row].sum())
        values = [rewards[row, k].item() for k in range(length)]
        for t in range(length):
            if variant == "minillm":
                total = sum(gamma ** (k - t) * values[k] for k in range(t, length))
                count = length - t
            else:
                total = sum(gamma ** (k - t - 1) * values[k] for k in range(t + 1, length))
                count = length - t - 1
            result[row, t] = total / max(count, 1) if normalise else total
    return result


@pytest.mark.parametrize("gamma", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("variant", ["minillm", "paper"])
@pytest.mark.parametrize("normalise", [True, False])
def test_long_term_advantages_match_a_brute_force_loop(gamma, variant, normalise):
    rewards = torch.where(MASK.bool(), random_values(4), 0.0)
    advantages = long_term_advantages(rewards, MASK, variant=variant, gamma=gamma, normalise=normalise)
    expected = brute_force_advantages(rewards, MASK, variant, gamma, normalise)
    torch.testing.assert_close(advantages, expected, atol=1e-12, rtol=1e-12)
    assert torch.all(advantages[~MASK.bool()] == 0)


def test_paper_variant_gives_zero_to_each_rows_last_token():
    rewards = torch.where(MASK.bool(), random_values(5), 0.0)
    advantages = long_term_advantages(rewards, MASK, variant="paper", gamma=1.0, normalise=True)
    assert advantages[0, 3] == 0 and advantages[1, 1] == 0 and advantages[2, 0] == 0
    assert advantages[0, 2] == rewards[0, 3]


def test_whiten_uses_valid_tokens_only():
    values = random_values(6, 3.0) + 2.0
    values_with_garbage = torch.where(MASK.bool(), values, 1e6)
    whitened = whiten(values_with_garbage, MASK)
    valid_values = values[MASK.bool()]
    mean, variance = valid_values.mean(), valid_values.var(unbiased=False)
    torch.testing.assert_close(whitened[MASK.bool()], (valid_values - mean) / torch.sqrt(variance + 1e-8))
    assert torch.all(whitened[~MASK.bool()] == 0)
    torch.testing.assert_close(whiten(values_with_garbage, MASK, distributed=True), whitened)
    assert torch.equal(whiten(values, torch.zeros_like(MASK)), torch.zeros_like(values))


def reference_ppo(logprob_new, logprob_old, advantages, weights, mask, clip_eps):
    """Reference PPO-clip per token, then mean over valid tokens."""
    ratio = torch.exp(logprob_new - logprob_old) * weights
    per_token = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    valid = mask.bool()
    return per_token[valid].mean()


def test_policy_gradient_loss_matches_reference_value_gradient_and_clip_fraction():
    logprob_old = random_values(7) - 2.0
    logprob_new = (logprob_old + 0.3 * random_values(8)).requires_grad_(True)
    advantages, weights = random_values(9), torch.exp(0.3 * random_values(10))
    loss, clip_fraction = policy_gradient_loss(logprob_new, logprob_old, advantages, weights, MASK, clip_eps=0.2)
    (gradient,) = torch.autograd.grad(loss, logprob_new)
    reference_new = logprob_new.detach().clone().requires_grad_(True)
    reference = reference_ppo(reference_new, logprob_old, advantages, weights, MASK, 0.2)
    (reference_gradient,) = torch.autograd.grad(reference, reference_new)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(gradient, reference_gradient)
    ratio = torch.exp(logprob_new.detach() - logprob_old) * weights
    clipped = -advantages * ratio.clamp(0.8, 1.2) > -advantages * ratio
    assert clip_fraction.item() == pytest.approx(clipped[MASK.bool()].double().mean().item())
    assert 0 < clip_fraction < 1, "this data must exercise both branches"


def test_masked_positions_cannot_poison_the_losses():
    logprob_new = torch.where(MASK.bool(), random_values(11), -math.inf).requires_grad_(True)
    logprob_old = torch.where(MASK.bool(), random_values(12), -math.inf)
    advantages, weights = torch.where(MASK.bool(), random_values(13), math.nan), torch.ones(MASK.shape)
    loss, _ = policy_gradient_loss(logprob_new, logprob_old, advantages, weights, MASK)
    (gradient,) = torch.autograd.grad(loss, logprob_new)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all()
    all_masked = torch.zeros_like(MASK)
    assert policy_gradient_loss(logprob_new, logprob_old, advantages, weights, all_masked)[0].item() == 0.0
    assert single_step_loss(random_values(14), all_masked).item() == 0.0


def test_reinforce_loss_gradient_is_minus_weight_times_advantage():
    logprob_new = random_values(15).requires_grad_(True)
    advantages, weights = random_values(16), random_values(17).abs()
    loss = reinforce_loss(logprob_new, advantages, weights, MASK, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, logprob_new)
    torch.testing.assert_close(gradient, torch.where(MASK.bool(), -weights * advantages, 0.0))
    mean_loss = reinforce_loss(logprob_new, advantages, weights, MASK)
    torch.testing.assert_close(mean_loss, loss / MASK.sum())


def test_single_step_loss_reductions_and_weights():
    kl, weights = random_values(18).abs(), random_values(19).abs()
    valid = MASK.bool()
    torch.testing.assert_close(single_step_loss(kl, MASK), kl[valid].mean())
    torch.testing.assert_close(single_step_loss(kl, MASK, weights, reduction="sum"), (kl * weights)[valid].sum())
    with pytest.raises(ValueError, match="reduction"):
        single_step_loss(kl, MASK, reduction="token")


def test_pretrain_loss_mixes_lm_and_kd():
    lm_ce, forward_kd = torch.tensor(2.0), torch.tensor(6.0)
    assert pretrain_loss(lm_ce, forward_kd).item() == pytest.approx(4.0)
    assert pretrain_loss(lm_ce, forward_kd, kd_ratio=0.25).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="kd_ratio"):
        pretrain_loss(lm_ce, forward_kd, kd_ratio=1.5)
