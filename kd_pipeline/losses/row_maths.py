"""Per-row maths of the fused KL in torch: softmax statistics, loss and gradient w.r.t. the logits.

A "row" is one token: its student logits z (V,) and teacher logits t (V,) (teacher truncated to
the student's V). With a = z / tau, b = t / tau, q = softmax(a), p = softmax(b):
    reverse  KL(q || p) = sum_v q_v (log q_v - log p_v) = sum_v q_v (a_v - b_v) - lse(a) + lse(b)
    forward  KL(p || q) = sum_v p_v (log p_v - log q_v) = sum_v p_v (b_v - a_v) - lse(b) + lse(a)
    target log-prob     = z_y - logsumexp(z)          (temperature 1: the model's own distribution)
and the gradients w.r.t. z:
    d KL(q || p) / d z_v = q_v (log q_v - log p_v - KL) / tau = q_v ((a_v - b_v) - c) / tau,
                           c = lse(a) - lse(b) + KL
    d KL(p || q) / d z_v = (q_v - p_v) / tau
    d logprob   / d z_v = 1[v == y] - softmax(z)_v

`kd_pipeline.losses.triton_kl` implements the same two functions as Triton kernels with the same
contract (used on CUDA); this torch version serves the CPU and is the reference the kernels are
tested against. Both work on one chunk of C valid rows at a time, in fp32.

On CPU these functions are memory-bound passes over (C, V) buffers, and a fresh (C, V) allocation
costs more than the pass that fills it (above glibc's mmap threshold every allocation is new pages,
faulted in and zeroed by the kernel). So every pass writes into buffers that exist already: the
caller's logits buffers where the contract allows, and a `workspace` of two (C, V) buffers that the
caller allocates once per loss call (`new_workspace`) and hands to every chunk. Log-sum-exps are
computed in place (max, subtract, exp, sum) rather than by torch.logsumexp, which allocates, and
row dot products as a product into the workspace and a row sum (torch.linalg.vecdot allocates its
product too).
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


Workspace = tuple[torch.Tensor, torch.Tensor]


def new_workspace(rows: int, vocab_size: int, device: torch.device | str) -> Workspace:
    """Two (rows, V) fp32 scratch buffers for `row_stats` / `row_logit_grad` on chunks of up to
    ``rows`` rows."""
    return tuple(torch.empty(rows, vocab_size, dtype=torch.float32, device=device) for _ in range(2))


def _scratch(workspace: Workspace | None, like: torch.Tensor) -> Workspace:
    """Two (C, V) buffers shaped like ``like``: the workspace's first C rows, or new ones without it."""
    if workspace is None:
        return torch.empty_like(like), torch.empty_like(like)
    num_rows = like.shape[0]
    return workspace[0][:num_rows], workspace[1][:num_rows]


def _exp_and_lse(logits: torch.Tensor, inverse_temperature: float, out: torch.Tensor):
    """out <- exp(logits / tau - max); returns (logsumexp(logits / tau), sum of out) per row, both (C,)."""
    row_max = logits.amax(dim=-1)  # (C,)
    torch.sub(logits, row_max[:, None], out=out)  # (C, V)
    if inverse_temperature != 1.0:
        out.mul_(inverse_temperature)
    out.exp_()
    row_sum = out.sum(dim=-1)  # (C,)
    return row_max * inverse_temperature + row_sum.log(), row_sum


def row_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    reverse: bool,
    temperature: float,
    workspace: Workspace | None = None,
) -> RowStats:
    """Softmax statistics, KL and target log-prob of each row; the inputs are left intact.

    Args:
        student_logits, teacher_logits: (C, V) fp32.
        targets: (C,) int64 ids in [0, V), or None.
        reverse: True for KL(q || p), False for KL(p || q).
        temperature: divides both models' logits in the KL.
        workspace: `new_workspace` output with at least C rows, overwritten; None allocates.
    """
    inverse_temperature = 1.0 / temperature
    first, second = _scratch(workspace, student_logits)
    # the weighting distribution is q for reverse, p for forward; its unnormalised exp stays in `second`
    weighting_logits, other_logits = (
        (student_logits, teacher_logits) if reverse else (teacher_logits, student_logits)
    )
    other_lse, _ = _exp_and_lse(other_logits, inverse_temperature, out=first)  # (C,)
    weighting_lse, weighting_sum = _exp_and_lse(weighting_logits, inverse_temperature, out=second)
    difference = torch.sub(student_logits, teacher_logits, out=first)  # (C, V) tau (a - b)
    # sum_v w_v (a_v - b_v), with w = second / weighting_sum
    cross = torch.mul(second, difference, out=second).sum(dim=-1) * (
        inverse_temperature / weighting_sum
    )  # (C,)
    student_lse, teacher_lse = (
        (weighting_lse, other_lse) if reverse else (other_lse, weighting_lse)
    )
    if reverse:
        kl = cross - student_lse + teacher_lse  # sum q (a - b) - lse(a) + lse(b)
    else:
        kl = student_lse - teacher_lse - cross  # sum p (b - a) - lse(b) + lse(a)

    if targets is None:
        return RowStats(kl, student_lse, teacher_lse, None, None)
    if temperature == 1.0:
        raw_student_lse = student_lse
    else:
        raw_student_lse, _ = _exp_and_lse(student_logits, 1.0, out=first)  # (C,)
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
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Gradient of sum_c (grad_kl[c] * kl[c] + grad_logprob[c] * logprob[c]) w.r.t. student logits.

    Args:
        student_logits, teacher_logits: (C, V) fp32 of the chunk; both are overwritten (callers
            pass buffers they no longer need).
        targets: as in `row_stats`.
        stats: that chunk's `row_stats` output (target_logprob may be None here).
        grad_kl: (C,) fp32 weight of each row's KL.
        grad_logprob: (C,) fp32 weight of each row's target log-prob, or None (no such term).
        workspace: as in `row_stats`; used only at temperature != 1 with a log-prob term.

    Returns:
        (C, V) fp32 gradient, stored in the teacher logits' buffer.
    """
    inverse_temperature = 1.0 / temperature
    with_logprob = targets is not None and grad_logprob is not None
    raw_probs = None
    if with_logprob and temperature != 1.0:
        # softmax(z) at temperature 1 differs from q: taken from the raw logits before they are overwritten
        raw_probs, _ = _scratch(workspace, student_logits)
        torch.sub(student_logits, stats.raw_student_lse[:, None], out=raw_probs).exp_()  # (C, V)
    if reverse:
        # q ((a - b) - c) / tau, with (a - b) built in the teacher buffer and q in the student buffer
        grad_logits = torch.sub(student_logits, teacher_logits, out=teacher_logits)  # (C, V) tau (a - b)
        shift = stats.student_lse - stats.teacher_lse + stats.kl  # (C,) c
        if inverse_temperature != 1.0:
            grad_logits.mul_(inverse_temperature)
            student_logits.mul_(inverse_temperature)
        grad_logits.sub_(shift[:, None])
        q = student_logits.sub_(stats.student_lse[:, None]).exp_()  # (C, V)
        grad_logits.mul_(q)
    else:
        # (q - p) / tau, with p built in the teacher buffer and q in the student buffer
        if inverse_temperature != 1.0:
            teacher_logits.mul_(inverse_temperature)
            student_logits.mul_(inverse_temperature)
        p = teacher_logits.sub_(stats.teacher_lse[:, None]).exp_()  # (C, V)
        q = student_logits.sub_(stats.student_lse[:, None]).exp_()  # (C, V)
        grad_logits = torch.sub(q, p, out=teacher_logits)
    grad_logits.mul_((grad_kl * inverse_temperature)[:, None])  # (C, V)

    if with_logprob:
        # - grad_logprob * softmax(z), which is q at temperature 1
        grad_logits.addcmul_(q if raw_probs is None else raw_probs, grad_logprob[:, None], value=-1.0)
        grad_logits.scatter_add_(1, targets[:, None], grad_logprob[:, None])
    return grad_logits
