"""Triton kernels for the per-row work of the fused KL: one program per token row.

Same contract as `kd_pipeline.losses.row_maths` (read that module for the formulas); the fused
loss in `kd_pipeline.losses.fused` calls these on CUDA, on one chunk of (C, V) fp32 logits at a time.

- `_row_stats_kernel` walks the row's vocabulary in blocks of BLOCK_V with an online softmax:
  running maxima and rescaled sums of exp for z / tau (student), t / tau (teacher) and, with targets,
  z (temperature 1). The KL needs one more running sum, over the weighting distribution w
  (q for reverse, p for forward), of exp(w_v - max_w) * (log-ratio numerator), because
      KL(q || p) = sum_v q_v (a_v - b_v) - lse(a) + lse(b),  a = z / tau, b = t / tau
      KL(p || q) = sum_v p_v (b_v - a_v) - lse(b) + lse(a)
  so one pass over the logits gives the loss, the log-sum-exps and the target log-prob.
- `_row_logit_grad_kernel` makes a second pass using those statistics and writes the row's gradient
  w.r.t. the student logits (scaled by the upstream weights) over the student logits, in place:
  the caller only needs the gradient afterwards, and this saves a (C, V) buffer.

This module imports triton at import time; `kd_pipeline.losses` imports it only when the Triton
backend is selected. On CPU it runs in Triton's interpreter (TRITON_INTERPRET=1 set before triton is
first imported), which is how the tests check it against the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_pipeline.losses.row_maths import RowStats

# Largest vocabulary block one program handles per loop step: bigger blocks mean fewer loop steps
# but more registers per program.
MAX_BLOCK_V = 4096


@triton.jit
def _row_stats_kernel(
    student_ptr,  # (C, V) fp32 student logits z
    teacher_ptr,  # (C, V) fp32 teacher logits t
    targets_ptr,  # (C,) int64, read only if HAS_TARGETS
    kl_ptr,  # (C,) out
    student_lse_ptr,  # (C,) out: logsumexp(z / tau)
    teacher_lse_ptr,  # (C,) out: logsumexp(t / tau)
    logprob_ptr,  # (C,) out if HAS_TARGETS: z_y - logsumexp(z)
    raw_lse_ptr,  # (C,) out if HAS_TARGETS: logsumexp(z)
    vocab_size,
    student_row_stride,
    teacher_row_stride,
    inverse_temperature,
    REVERSE: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    student_max = float("-inf")
    student_sum = 0.0
    teacher_max = float("-inf")
    teacher_sum = 0.0
    raw_max = float("-inf")
    raw_sum = 0.0
    cross_sum = 0.0  # sum_v exp(w_v - max_w) * (a_v - b_v) reverse, (b_v - a_v) forward
    for block_start in range(0, vocab_size, BLOCK_V):
        offsets = block_start + tl.arange(0, BLOCK_V)
        in_vocab = offsets < vocab_size
        # lanes past the vocabulary: 0 in the difference, -inf (exp -> 0) in the softmax sums
        student_logits = tl.load(student_row + offsets, mask=in_vocab, other=0.0)
        teacher_logits = tl.load(teacher_row + offsets, mask=in_vocab, other=0.0)
        difference = (student_logits - teacher_logits) * inverse_temperature
        student_scaled = tl.where(in_vocab, student_logits * inverse_temperature, float("-inf"))
        teacher_scaled = tl.where(in_vocab, teacher_logits * inverse_temperature, float("-inf"))

        new_student_max = tl.maximum(student_max, tl.max(student_scaled, axis=0))
        student_rescale = tl.exp(student_max - new_student_max)
        student_exp = tl.exp(student_scaled - new_student_max)
        student_sum = student_sum * student_rescale + tl.sum(student_exp, axis=0)
        student_max = new_student_max

        new_teacher_max = tl.maximum(teacher_max, tl.max(teacher_scaled, axis=0))
        teacher_rescale = tl.exp(teacher_max - new_teacher_max)
        teacher_exp = tl.exp(teacher_scaled - new_teacher_max)
        teacher_sum = teacher_sum * teacher_rescale + tl.sum(teacher_exp, axis=0)
        teacher_max = new_teacher_max

        if REVERSE:
            cross_sum = cross_sum * student_rescale + tl.sum(student_exp * difference, axis=0)
        else:
            cross_sum = cross_sum * teacher_rescale - tl.sum(teacher_exp * difference, axis=0)

        if HAS_TARGETS:
            student_raw = tl.where(in_vocab, student_logits, float("-inf"))
            new_raw_max = tl.maximum(raw_max, tl.max(student_raw, axis=0))
            raw_sum = raw_sum * tl.exp(raw_max - new_raw_max) + tl.sum(
                tl.exp(student_raw - new_raw_max), axis=0
            )
            raw_max = new_raw_max

    student_lse = student_max + tl.log(student_sum)
    teacher_lse = teacher_max + tl.log(teacher_sum)
    if REVERSE:
        kl = cross_sum / student_sum - student_lse + teacher_lse
    else:
        kl = cross_sum / teacher_sum - teacher_lse + student_lse
    tl.store(kl_ptr + row, kl)
    tl.store(student_lse_ptr + row, student_lse)
    tl.store(teacher_lse_ptr + row, teacher_lse)
    if HAS_TARGETS:
        raw_lse = raw_max + tl.log(raw_sum)
        target = tl.load(targets_ptr + row)
        tl.store(logprob_ptr + row, tl.load(student_row + target) - raw_lse)
        tl.store(raw_lse_ptr + row, raw_lse)


@triton.jit
def _row_logit_grad_kernel(
    student_ptr,  # (C, V) fp32 student logits z, overwritten with the gradient
    teacher_ptr,  # (C, V) fp32 teacher logits t
    targets_ptr,  # (C,) int64, read only if HAS_LOGPROB_GRAD
    kl_ptr,  # (C,)
    student_lse_ptr,  # (C,)
    teacher_lse_ptr,  # (C,)
    raw_lse_ptr,  # (C,) read only if HAS_LOGPROB_GRAD
    grad_kl_ptr,  # (C,)
    grad_logprob_ptr,  # (C,) read only if HAS_LOGPROB_GRAD
    vocab_size,
    student_row_stride,
    teacher_row_stride,
    inverse_temperature,
    REVERSE: tl.constexpr,
    HAS_LOGPROB_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    kl = tl.load(kl_ptr + row)
    student_lse = tl.load(student_lse_ptr + row)
    teacher_lse = tl.load(teacher_lse_ptr + row)
    kl_scale = tl.load(grad_kl_ptr + row) * inverse_temperature
    if HAS_LOGPROB_GRAD:
        target = tl.load(targets_ptr + row)
        raw_lse = tl.load(raw_lse_ptr + row)
        logprob_scale = tl.load(grad_logprob_ptr + row)
    for block_start in range(0, vocab_size, BLOCK_V):
        offsets = block_start + tl.arange(0, BLOCK_V)
        in_vocab = offsets < vocab_size
        student_logits = tl.load(student_row + offsets, mask=in_vocab, other=0.0)
        teacher_logits = tl.load(teacher_row + offsets, mask=in_vocab, other=0.0)
        student_log_probs = student_logits * inverse_temperature - student_lse
        teacher_log_probs = teacher_logits * inverse_temperature - teacher_lse
        student_probs = tl.exp(student_log_probs)
        if REVERSE:
            grad = student_probs * (student_log_probs - teacher_log_probs - kl) * kl_scale
        else:
            grad = (student_probs - tl.exp(teacher_log_probs)) * kl_scale
        if HAS_LOGPROB_GRAD:
            is_target = tl.where(offsets == target, 1.0, 0.0)
            grad += logprob_scale * (is_target - tl.exp(student_logits - raw_lse))
        tl.store(student_row + offsets, grad, mask=in_vocab)


def _block_size(vocab_size: int, block_size: int | None) -> int:
    if block_size is not None:
        return block_size
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dtype != torch.float32 or teacher_logits.dtype != torch.float32:
        raise ValueError(
            f"the Triton KL kernels take fp32 logits, got {student_logits.dtype} (student) and "
            f"{teacher_logits.dtype} (teacher)"
        )
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be (C, V), teacher truncated to V"
        )
    if student_logits.stride(-1) != 1 or teacher_logits.stride(-1) != 1:
        raise ValueError("the Triton KL kernels need logits rows that are contiguous in memory")


def row_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    reverse: bool,
    temperature: float,
    block_size: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RowStats:
    """Triton twin of `row_maths.row_stats`: (C, V) fp32 logits -> per-row statistics (C,).
    ``workspace`` is accepted for the common contract and unused: the kernels keep their state in registers."""
    _check_logits(student_logits, teacher_logits)
    num_rows, vocab_size = student_logits.shape
    outputs = torch.empty(5, num_rows, dtype=torch.float32, device=student_logits.device)
    kl, student_lse, teacher_lse, target_logprob, raw_student_lse = outputs  # (C,) each
    if num_rows:
        _row_stats_kernel[(num_rows,)](
            student_logits,
            teacher_logits,
            targets if targets is not None else kl,
            kl,
            student_lse,
            teacher_lse,
            target_logprob,
            raw_student_lse,
            vocab_size,
            student_logits.stride(0),
            teacher_logits.stride(0),
            1.0 / temperature,
            REVERSE=reverse,
            HAS_TARGETS=targets is not None,
            BLOCK_V=_block_size(vocab_size, block_size),
        )
    if targets is None:
        return RowStats(kl, student_lse, teacher_lse, None, None)
    return RowStats(kl, student_lse, teacher_lse, target_logprob, raw_student_lse)


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
    block_size: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton twin of `row_maths.row_logit_grad`; overwrites and returns student_logits (C, V).
    ``workspace`` is unused, as in `row_stats`."""
    _check_logits(student_logits, teacher_logits)
    num_rows, vocab_size = student_logits.shape
    has_logprob_grad = targets is not None and grad_logprob is not None
    grad_kl = grad_kl.float().contiguous()  # (C,)
    if num_rows:
        _row_logit_grad_kernel[(num_rows,)](
            student_logits,
            teacher_logits,
            targets if has_logprob_grad else grad_kl,
            stats.kl.contiguous(),
            stats.student_lse.contiguous(),
            stats.teacher_lse.contiguous(),
            stats.raw_student_lse.contiguous() if has_logprob_grad else grad_kl,
            grad_kl,
            grad_logprob.float().contiguous() if has_logprob_grad else grad_kl,
            vocab_size,
            student_logits.stride(0),
            teacher_logits.stride(0),
            1.0 / temperature,
            REVERSE=reverse,
            HAS_LOGPROB_GRAD=has_logprob_grad,
            BLOCK_V=_block_size(vocab_size, block_size),
        )
    return student_logits
