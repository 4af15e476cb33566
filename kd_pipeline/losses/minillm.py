"""Stage-2 policy-gradient pieces (paper eq. 6-10; MiniLLM's code where the paper is vague).

Pure tensor functions over (B, T) response tensors: B rollouts, T response positions, `mask` 1 on the response
tokens up to and including the first EOS and 0 after it. Everything is computed in fp32 (fp64 inputs stay fp64),
masked positions come out as 0, and every mean over tokens of an all-masked batch is 0.

Notation: q = student, p = teacher, p̃ = α·p + (1 − α)·q the sampling mixture, r_t = log p(y_t) − log q(y_t).

How the pieces combine into the stage-2 gradient of KL[q ‖ p] under y ∼ p̃:

- Unbiased form (verified exactly by enumeration in tests/losses/test_minillm_estimator.py): with the product
  weights w_t = Π_{k≤t} q/p̃, the single-step term is Σ_t w_t · KL_t(q ‖ p) and the long-term term weights each
  FUTURE REWARD by its own product weight (per-decision importance sampling):
      w = importance_weights(log_q, log_p̃, mask, mode="product")
      r = token_rewards(log_p, log_q, mask, reward_scaling=None, reward_clip=None)
      A = long_term_advantages(w * r, mask, variant="paper", gamma=1.0, normalise=False)
      loss = single_step_loss(kl, mask, w, reduction="sum") + reinforce_loss(log_q_new, A, ones, mask, reduction="sum")
  Eq. 8-9 as printed (w_t · R_{t+1} · ∇log q_t with unweighted R_{t+1}) is NOT unbiased: the rewards after t are
  drawn from p̃, not q, and nothing corrects them. The estimator test measures how far that moves the gradient.
- MiniLLM's practical form (the defaults here): per-step w_t = q(y_t)/p̃(y_t) used only inside the PPO ratio,
  advantage = discounted return INCLUDING r_t (γ = 0.95) divided by the remaining length, whitened; rewards
  divided by reward_scaling 0.5 and clipped to ±100; single-step term an unweighted token mean of KL(q ‖ p).
  Because its advantage includes r_t while the closed-form single-step term also carries E[r_t], the r_t part is
  counted twice in expectation; the estimator test records the resulting deviation.
"""

import math

import torch
import torch.distributed as dist

# exp(80) ≈ 5.5e34 is still finite in fp32 (max ≈ 3.4e38): unclipped product weights are capped here so a long
# run of unlikely tokens yields a huge but finite weight rather than inf (and inf · 0 = NaN downstream).
MAX_LOG_WEIGHT = 80.0
WHITEN_EPS = 1e-8
REDUCTIONS = ("mean", "sum")


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool view of a 0/1 mask of any dtype."""
    return mask.bool()


def _float(values: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32; fp64 stays fp64 (the exactness tests run in fp64)."""
    return values if values.dtype == torch.float64 else values.float()


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Masked reduction of a (B, T) tensor: "mean" over valid tokens (0 when there are none) or "sum"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}.")
    total = torch.where(_valid(mask), per_token, 0.0).sum()  # ()
    if reduction == "sum":
        return total
    return total / _valid(mask).sum().clamp(min=1)


def token_rewards(
    teacher_logprob: torch.Tensor,
    student_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    reward_scaling: float | None = 0.5,
    reward_clip: float | None = 100.0,
) -> torch.Tensor:
    """Per-token reward r_t = log p(y_t) − log q(y_t), divided by reward_scaling, clipped to ±reward_clip.

    MiniLLM's defaults (scaling 0.5, clip 100) are the defaults; None disables either step. Returns (B, T), 0 where
    mask is 0, detached (rewards are fixed targets of the rollout).
    """
    if reward_scaling is not None and reward_scaling <= 0:
        raise ValueError(f"token_rewards: reward_scaling={reward_scaling} must be positive (or None).")
    rewards = _float(teacher_logprob) - _float(student_logprob)  # (B, T)
    if reward_scaling is not None:
        rewards = rewards / reward_scaling
    if reward_clip is not None:
        rewards = rewards.clamp(min=-reward_clip, max=reward_clip)
    return torch.where(_valid(mask), rewards, 0.0).detach()


def importance_weights(
    student_logprob: torch.Tensor,
    mixed_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "per_step",
    clip: float | None = None,
) -> torch.Tensor:
    """Importance weights from the sampling mixture p̃ back to the student q, detached.

    mode "per_step" (MiniLLM's default): w_t = q(y_t) / p̃(y_t).
    mode "product" (paper eq. 9, exact): w_t = Π_{k≤t} q(y_k) / p̃(y_k) over the row's valid tokens.
    clip, if given, bounds every weight from above (truncated importance sampling). Returns (B, T), 0 where mask
    is 0.
    """
    if mode not in ("per_step", "product"):
        raise ValueError(f"importance_weights: mode={mode!r} must be 'per_step' or 'product'.")
    if clip is not None and clip <= 0:
        raise ValueError(f"importance_weights: clip={clip} must be positive (or None).")
    valid = _valid(mask)
    log_ratio = torch.where(valid, _float(student_logprob) - _float(mixed_logprob), 0.0)  # (B, T)
    log_weight = log_ratio if mode == "per_step" else log_ratio.cumsum(dim=-1)  # (B, T)
    log_cap = MAX_LOG_WEIGHT if clip is None else min(math.log(clip), MAX_LOG_WEIGHT)
    weights = log_weight.clamp(max=log_cap).exp()  # (B, T)
    return torch.where(valid, weights, 0.0).detach()


def _discount_matrix(length: int, gamma: float, *, strictly_future: bool, like: torch.Tensor) -> torch.Tensor:
    """(T, T) matrix D with D[t, k] = γ^(k − t) for k ≥ t (or γ^(k − t − 1) for k > t when strictly_future), else 0,
    so that returns = rewards @ D.T. A matrix product instead of a reversed Python loop: one kernel for all t."""
    positions = torch.arange(length, device=like.device)  # (T,)
    offset = positions[None, :] - positions[:, None]  # (T, T) k − t
    if strictly_future:
        offset = offset - 1
    exponent = offset.clamp(min=0).to(like.dtype)  # (T, T)
    discount = torch.pow(torch.full_like(exponent, gamma), exponent)  # (T, T); 0^0 = 1 keeps γ = 0 right
    return torch.where(offset >= 0, discount, 0.0)


def long_term_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    variant: str = "minillm",
    gamma: float = 0.95,
    normalise: bool = True,
) -> torch.Tensor:
    """Long-term advantage of each response token, detached.

    variant "minillm" (default, MiniLLM's code): G_t = Σ_{k≥t} γ^(k−t) r_k, the return INCLUDING r_t; normalised by
        the count of remaining valid tokens including t.
    variant "paper" (eq. 8-9): R_{t+1} = Σ_{k>t} γ^(k−t−1) r_k, the return EXCLUDING r_t (γ = 1 is the paper's);
        normalised by T − t − 1 with 0-based t and T the row's valid length, i.e. the number of valid tokens after
        t. For the last token that count is 0 and the sum empty: the normalised value is defined as 0 (the divisor
        is clamped to 1).
    normalise=False returns the raw returns (the exactness test uses γ = 1, no normalisation).

    rewards: (B, T), already 0 where mask is 0. Returns (B, T), 0 where mask is 0.
    """
    if variant not in ("minillm", "paper"):
        raise ValueError(f"long_term_advantages: variant={variant!r} must be 'minillm' or 'paper'.")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"long_term_advantages: gamma={gamma} must lie in [0, 1].")
    valid = _valid(mask)
    masked_rewards = torch.where(valid, _float(rewards), 0.0)  # (B, T)
    strictly_future = variant == "paper"
    discount = _discount_matrix(masked_rewards.shape[-1], gamma, strictly_future=strictly_future, like=masked_rewards)
    returns = masked_rewards @ discount.T  # (B, T)
    if normalise:
        valid_count = valid.to(masked_rewards.dtype)  # (B, T)
        remaining_from_t = valid_count.flip(-1).cumsum(-1).flip(-1)  # (B, T) valid tokens at k ≥ t
        remaining = remaining_from_t - valid_count if strictly_future else remaining_from_t  # (B, T)
        returns = returns / remaining.clamp(min=1.0)
    return torch.where(valid, returns, 0.0).detach()


def whiten(values: torch.Tensor, mask: torch.Tensor, *, distributed: bool = False) -> torch.Tensor:
    """(values − mean) / sqrt(var + 1e-8) over the valid tokens; 0 where mask is 0.

    Population variance, as MiniLLM/trlx. With distributed=True and torch.distributed initialised, the mean and
    variance are those of the valid tokens of ALL ranks (two all-reduces over the default group); in a single
    process distributed=True is the same as False.
    """
    valid = _valid(mask)
    masked_values = torch.where(valid, _float(values), 0.0)  # (B, T)
    reduce_across_ranks = distributed and dist.is_initialized()
    sum_and_count = torch.stack([masked_values.sum(), valid.sum().to(masked_values.dtype)])  # (2,)
    if reduce_across_ranks:
        dist.all_reduce(sum_and_count, op=dist.ReduceOp.SUM)
    count = sum_and_count[1].clamp(min=1.0)
    mean = sum_and_count[0] / count
    squared_deviation = torch.where(valid, (masked_values - mean) ** 2, 0.0).sum()  # ()
    if reduce_across_ranks:
        dist.all_reduce(squared_deviation, op=dist.ReduceOp.SUM)
    variance = squared_deviation / count
    whitened = (masked_values - mean) * torch.rsqrt(variance + WHITEN_EPS)  # (B, T)
    return torch.where(valid, whitened, 0.0)


def policy_gradient_loss(
    logprob_new: torch.Tensor,
    logprob_old: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLLM's PPO-clip loss on the importance-weighted ratio.

    ratio_t = exp(logprob_new − logprob_old) · w_t; loss = reduction over valid tokens of
    max(−A_t · ratio_t, −A_t · clip(ratio_t, 1 − ε, 1 + ε)). Gradients flow through logprob_new only.

    Args:
        logprob_new: (B, T) log q_θ(y_t) under the current parameters (with grad).
        logprob_old: (B, T) log q(y_t) when the rollout was taken.
        advantages, weights: (B, T) detached advantages and importance weights.
        mask: (B, T) valid response tokens.
        reduction: "mean" over valid tokens (MiniLLM) or "sum".

    Returns:
        (loss, clip_fraction): scalars; clip_fraction is the share of valid tokens where the clipped branch is
        the active one (detached).
    """
    valid = _valid(mask)
    log_ratio = torch.where(valid, _float(logprob_new) - _float(logprob_old).detach(), 0.0)  # (B, T)
    ratio = log_ratio.exp() * _float(weights).detach()  # (B, T)
    advantages = _float(advantages).detach()  # (B, T)
    unclipped_loss = -advantages * ratio  # (B, T)
    clipped_loss = -advantages * ratio.clamp(min=1.0 - clip_eps, max=1.0 + clip_eps)  # (B, T)
    per_token = torch.maximum(unclipped_loss, clipped_loss)  # (B, T)
    clip_active = (clipped_loss > unclipped_loss).to(per_token.dtype)  # (B, T)
    clip_fraction = _reduce(clip_active, mask, "mean").detach()
    return _reduce(per_token, mask, reduction), clip_fraction


def reinforce_loss(
    logprob_new: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """The unclipped estimator form: loss = reduction of −w_t · A_t · log q_θ(y_t), whose gradient is
    −Σ_t w_t A_t ∇log q_θ(y_t) (eq. 8's long-term term). logprob_new (B, T) carries the grad; advantages and
    weights (B, T) are detached."""
    per_token = -_float(weights).detach() * _float(advantages).detach() * _float(logprob_new)  # (B, T)
    return _reduce(per_token, mask, reduction)


def single_step_loss(
    per_token_reverse_kl: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Single-step term: reduction over valid tokens of w_t · KL(q_θ(·|ctx_t) ‖ p(·|ctx_t)).

    per_token_reverse_kl: (B, T) closed-form reverse KL at each response position (with grad), e.g. from
    `kd_pipeline.losses.token_kl(student_logits, teacher_logits, direction="reverse")`. weights: (B, T) detached
    importance weights, or None for MiniLLM's unweighted token mean.
    """
    per_token = _float(per_token_reverse_kl)  # (B, T)
    if weights is not None:
        per_token = per_token * _float(weights).detach()
    return _reduce(per_token, mask, reduction)


def policy_loss_share(
    logprob_old: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    single_step_weight: float = 1.0,
    long_term_weight: float = 1.0,
):
    """long_term_weight · policy_gradient_loss(logprob_new, logprob_old, advantages, weights, mask, clip_eps) +
    single_step_weight · single_step_loss(kl, mask) (both token means) as the ``loss_share`` of
    `kd_pipeline.losses.fused_token_kl`, which then forms this loss's gradient in its forward instead of recomputing
    logits in backward. ``long_term_weight=0`` leaves the single-step term alone (no policy-gradient term).

    Arguments as for those two losses, (B, T) each. Returns ``share(kl, logprob, positions)``: the loss's part
    from the tokens at the flat ``positions`` (both terms are sums over tokens divided by the valid count).
    """
    count = _valid(mask).sum().clamp(min=1)

    def share(kl: torch.Tensor, logprob: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        def pick(per_token: torch.Tensor) -> torch.Tensor:
            return per_token.reshape(-1)[positions][None]  # (1, C)

        single_sum = single_step_weight * kl.sum()
        if long_term_weight == 0:
            return single_sum / count
        policy_sum, _ = policy_gradient_loss(logprob[None], pick(logprob_old), pick(advantages), pick(weights),
                                             torch.ones_like(logprob[None]), clip_eps=clip_eps, reduction="sum")
        return (long_term_weight * policy_sum + single_sum) / count

    return share


def pretrain_loss(lm_ce: torch.Tensor, forward_kd: torch.Tensor, kd_ratio: float = 0.5) -> torch.Tensor:
    """Loss on the D_PT batch (eq. 7 plus MiniLLM's distillation term): (1 − kd_ratio)·LM + kd_ratio·KD."""
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"pretrain_loss: kd_ratio={kd_ratio} must lie in [0, 1].")
    return (1.0 - kd_ratio) * lm_ce + kd_ratio * forward_kd
