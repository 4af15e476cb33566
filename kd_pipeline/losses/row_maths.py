"""Per-row maths of the fused KL in torch: softmax statistics, loss and gradient w.r.t. the logits.

A "row" is one token: its student logits z (V,) and teacher logits t (V,) (teacher truncated to
the student's V). With a = z / tau, b = t / tau, q = softmax(a), p = softmax(b):
    reverse  KL(q || p) = sum_v q_v (log q_v - log p_v)
    forward  KL(p || q) = sum_v p_v (log p_v - log q_v)
    target log-prob     = z_y - logsumexp(z)          (temperature 1: the model's own distribution)
and the gradients w.r.t. z:
    d KL(q || p) / d z_v = q_v (log q_v - log p_v - KL) / tau
    d KL(p || q) / d z_v = (q_v - p_v) / tau
    d logprob   / d z_v = 1[v == y] - softmax(z)_v

`kd_pipeline.losses.triton_kl` implements the same two functions as Triton kernels with the same
contract (used on CUDA); this torch version serves the CPU and is the reference the kernels are
tested against. Both work on one chunk of C valid rows at a time, in fp32.
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
    """Softmax statistics, KL and target log-prob of each row.

    Args:
        student_logits, teacher_logits: (C, V) fp32; not modified.
        targets: (C,) int64 ids in [0, V), or None.
        reverse: True for KL(q || p), False for KL(p || q).
        temperature: divides both models' logits in the KL.
    """
    inverse_temperature = 1.0 / temperature
    student_log_probs = student_logits * inverse_temperature  # (C, V)
    teacher_log_probs = teacher_logits * inverse_temperature  # (C, V)
    student_lse = torch.logsumexp(student_log_probs, dim=-1)  # (C,)
    teacher_lse = torch.logsumexp(teacher_log_probs, dim=-1)  # (C,)
    student_log_probs.sub_(student_lse[:, None])  # (C, V) log q
    teacher_log_probs.sub_(teacher_lse[:, None])  # (C, V) log p
    if reverse:
        weighting_probs = student_log_probs.exp()  # (C, V) q
        log_ratio = student_log_probs.sub_(teacher_log_probs)  # (C, V) log q - log p
    else:
        weighting_probs = teacher_log_probs.exp()  # (C, V) p
        log_ratio = teacher_log_probs.sub_(student_log_probs)  # (C, V) log p - log q
    kl = torch.linalg.vecdot(weighting_probs, log_ratio)  # (C,) one fused multiply-sum pass

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
        student_logits, teacher_logits, targets: as in `row_stats` (same chunk).
        stats: that chunk's `row_stats` output (target_logprob may be None here).
        grad_kl: (C,) fp32 weight of each row's KL.
        grad_logprob: (C,) fp32 weight of each row's target log-prob, or None (no such term).

    Returns:
        (C, V) fp32. This torch version allocates it and leaves the inputs intact; callers must
        only rely on the contract "student_logits may be overwritten" (the Triton version does).
    """
    inverse_temperature = 1.0 / temperature
    student_log_probs = student_logits * inverse_temperature - stats.student_lse[:, None]  # (C, V)
    teacher_log_probs = teacher_logits * inverse_temperature - stats.teacher_lse[:, None]  # (C, V)
    student_probs = student_log_probs.exp()  # (C, V) q
    if reverse:
        grad_logits = student_log_probs.sub_(teacher_log_probs).sub_(stats.kl[:, None])
        grad_logits.mul_(student_probs)  # q (log q - log p - KL)
    else:
        grad_logits = student_probs.sub(teacher_log_probs.exp_())  # q - p
    grad_logits.mul_((grad_kl * inverse_temperature)[:, None])  # (C, V)

    if targets is not None and grad_logprob is not None:
        if temperature == 1.0:
            raw_probs = student_probs  # softmax(z) is q when tau == 1
        else:
            raw_probs = (student_logits - stats.raw_student_lse[:, None]).exp_()  # (C, V)
        grad_logits.sub_(raw_probs.mul_(grad_logprob[:, None]))
        grad_logits.scatter_add_(1, targets[:, None], grad_logprob[:, None])
    return grad_logits
