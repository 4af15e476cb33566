"""Per-row maths of the fused KL in torch: softmax statistics, loss and gradient w.r.t. the logits.

A "row" is one token: its student logits z (V,) and teacher logits t (V,) (teacher truncated to
the student's V). With a = z / tau, b = t / tau, q = softmax(a), p = softmax(b):
    reverse  KL(q || p) = sum_v q_v (log q_v - log p_v) = sum_v q_v (a_v - b_v) - lse(a) + lse(b)
    forward  KL(p || q) = sum_v p_v (log p_v - log q_v) = sum_v p_v (b_v - a_v) - lse(b) + lse(a)
    target log-prob     = z_y - logsumexp(z)          (temperature 1: the model's own distribution)
and the gradients w.r.t. z:
    d KL(q || p) / d z_v = q_v (log q_v - log p_v - KL) / tau
    d KL(p || q) / d z_v = (q_v - p_v) / tau
    d logprob   / d z_v = 1[v == y] - softmax(z)_v

`kd_pipeline.losses.triton_kl` implements the same two functions as Triton kernels with the same
contract (used on CUDA); this torch version serves the CPU and is the reference the kernels are
tested against. Both work on one chunk of C valid rows at a time, in fp32. The chunk's (C, V)
buffers set the fused loss's peak memory, so both functions keep few of them alive: `row_stats`
two besides its inputs (plus logsumexp's transient one), `row_logit_grad` one, writing into the
logits buffers it is given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowStats(NamedTuple):
    """Per-row statistics of one chunk: the outputs, and what the gradient needs later."""

    kl: torch.Tensor  # (C,) fp32
    student_lse: torch.Tensor  # (C,) logsumexp(z / tau)
    teacher_lse: torch.Tensor  # (C,) logsumexp(t / tau)
    target_logprob: torch.Tensor | None  # (C,) z_y - logsumexp(z); None without targets
    raw_student_lse: torch.Tensor | None  # (C,) logsumexp(z) at temperature 1; None without targets


def row_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    reverse: bool,
    temperature: float,
) -> RowStats:
    """Softmax statistics, KL and target log-prob of each row; the inputs are left intact.

    Args:
        student_logits, teacher_logits: (C, V) fp32.
        targets: (C,) int64 ids in [0, V), or None.
        reverse: True for KL(q || p), False for KL(p || q).
        temperature: divides both models' logits in the KL.
    """
    inverse_temperature = 1.0 / temperature
    # One scaled buffer serves both logsumexps and then becomes the weighting distribution
    # (q for reverse, p for forward), so at most two (C, V) temporaries live besides the inputs.
    weighting_logits, other_logits = (
        (student_logits, teacher_logits) if reverse else (teacher_logits, student_logits)
    )
    scaled = other_logits * inverse_temperature  # (C, V)
    other_lse = torch.logsumexp(scaled, dim=-1)  # (C,)
    torch.mul(weighting_logits, inverse_temperature, out=scaled)  # (C, V)
    weighting_lse = torch.logsumexp(scaled, dim=-1)  # (C,)
    weighting = scaled.sub_(weighting_lse[:, None]).exp_()  # (C, V) q or p
    student_lse, teacher_lse = (
        (weighting_lse, other_lse) if reverse else (other_lse, weighting_lse)
    )
    difference = (student_logits - teacher_logits).mul_(inverse_temperature)  # (C, V) a - b
    cross = torch.linalg.vecdot(weighting, difference)  # (C,) sum_v w_v (a_v - b_v)
    del scaled, weighting, difference
    if reverse:
        kl = cross - student_lse + teacher_lse  # sum q (a - b) - lse(a) + lse(b)
    else:
        kl = student_lse - teacher_lse - cross  # sum p (b - a) - lse(b) + lse(a)

    if targets is None:
        return RowStats(kl, student_lse, teacher_lse, None, None)
    if temperature == 1.0:
        raw_student_lse = student_lse
    else:
        raw_student_lse = torch.logsumexp(student_logits, dim=-1)  # (C,)
    target_logits = student_logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    return RowStats(kl, student_lse, teacher_lse, target_logits - raw_student_lse, raw_student_lse)


def row_logit_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    stats: RowStats,
    grad_kl: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    *,
    reverse: bool,
    temperature: float,
) -> torch.Tensor:
    """Gradient of sum_c (grad_kl[c] * kl[c] + grad_logprob[c] * logprob[c]) w.r.t. student logits.

    Args:
        student_logits, teacher_logits: (C, V) fp32 of the chunk; both are overwritten (callers
            pass buffers they no longer need).
        targets: as in `row_stats`.
        stats: that chunk's `row_stats` output (target_logprob may be None here).
        grad_kl: (C,) fp32 weight of each row's KL.
        grad_logprob: (C,) fp32 weight of each row's target log-prob, or None (no such term).

    Returns:
        (C, V) fp32 gradient, stored in one of the two input buffers.
    """
    inverse_temperature = 1.0 / temperature
    log_q = student_logits.mul_(inverse_temperature).sub_(stats.student_lse[:, None])  # (C, V)
    log_p = teacher_logits.mul_(inverse_temperature).sub_(stats.teacher_lse[:, None])  # (C, V)
    q = log_q.exp()  # (C, V), the one new buffer
    if reverse:
        # q (log q - log p - KL), built in the log_p buffer
        grad_logits = log_p.neg_().add_(log_q).sub_(stats.kl[:, None]).mul_(q)
    else:
        # q - p, built in the log_p buffer
        grad_logits = log_p.exp_().neg_().add_(q)
    grad_logits.mul_((grad_kl * inverse_temperature)[:, None])  # (C, V)

    if targets is not None and grad_logprob is not None:
        # softmax(z) = exp(z - lse(z)) with z = tau * (log q + lse(a)), built in the q buffer
        raw_probs = q
        if temperature != 1.0:
            shift = temperature * stats.student_lse - stats.raw_student_lse  # (C,)
            torch.mul(log_q, temperature, out=raw_probs).add_(shift[:, None]).exp_()
        grad_logits.sub_(raw_probs.mul_(grad_logprob[:, None]))
        grad_logits.scatter_add_(1, targets[:, None], grad_logprob[:, None])
    return grad_logits
