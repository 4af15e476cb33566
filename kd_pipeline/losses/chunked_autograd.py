"""The chunked autograd Functions behind `kd_pipeline.losses.fused` (read its docstring first).

Both Functions take only the valid rows (ignored positions are dropped by the caller), flattened:
student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht), teacher_weight (V, Ht)
already truncated to the student's V, targets (N,) ids in [0, V) or None. Per chunk of C rows they
compute both models' logits (C, V) with fp32 GEMMs, the per-row statistics and the logits gradient
(`row_stats` / `row_logit_grad` of the selected backend), and contract that gradient into the
student's hidden and weight gradients right away, so no (N, V) tensor ever exists.

- `PerTokenKL`: outputs per-token (kl, target_logprob); forward keeps O(N) statistics, backward
  recomputes each chunk's logits and applies the upstream gradients, whatever they are.
- `WeightedKL`: takes the per-token weights, forms the gradients during the forward and returns
  the weighted sum; backward only scales the stored gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_pipeline.losses.row_maths import RowStats

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ChunkSettings:
    """How the Functions run: resolved by `kd_pipeline.losses.fused` from the public arguments."""

    reverse: bool
    temperature: float
    chunk_size: int
    backend: str  # "torch" or "triton", already resolved
    grad_enabled: bool  # grad mode at the call (forward itself always runs without it)


def _row_maths(backend: str):
    """The module providing row_stats / row_logit_grad for a resolved backend."""
    if backend == "triton":
        from kd_pipeline.losses import triton_kl  # lazy: triton is only needed on this path

        return triton_kl
    from kd_pipeline.losses import row_maths

    return row_maths


def _gemm_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the dtype its GEMMs run in: CUDA low precision stays (fp32 accumulation via
    out_dtype), anything else is upcast to fp32 once per call rather than once per chunk."""
    if weight.is_cuda and weight.dtype in _LOW_PRECISION:
        return weight
    return weight.float()


def _fp32_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right for 2-D operands, accumulated in and returned as fp32."""
    if right.is_cuda and right.dtype in _LOW_PRECISION:
        return torch.mm(left.to(right.dtype), right, out_dtype=torch.float32)
    return left.float() @ right.float()


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


def _optional_slice(per_token: torch.Tensor | None, chunk: slice) -> torch.Tensor | None:
    return None if per_token is None else per_token[chunk]


class _GradSink:
    """Receives each chunk's (C, V) logits gradient and contracts it into the student gradients."""

    def __init__(self, student_hidden, student_weight, student_operand, need_hidden, need_weight):
        self.student_hidden = student_hidden  # (N, Hs)
        self.student_operand = student_operand  # (V, Hs) in GEMM dtype
        self.hidden = (
            torch.zeros(student_hidden.shape, dtype=torch.float32, device=student_hidden.device)
            if need_hidden
            else None
        )  # (N, Hs) fp32
        self.weight = (
            torch.zeros(student_weight.shape, dtype=torch.float32, device=student_weight.device)
            if need_weight
            else None
        )  # (V, Hs) fp32

    def add(self, chunk: slice, grad_logits: torch.Tensor) -> None:
        """Contract one chunk's (C, V) fp32 logits gradient into the hidden and weight gradients."""
        hidden_chunk = self.student_hidden[chunk]  # (C, Hs)
        if self.student_operand.dtype == torch.float32:
            # fp32 operands (CPU, or fp32 models): write and accumulate in place, sparing a
            # (V, Hs) temporary per chunk
            if self.hidden is not None:
                torch.mm(grad_logits, self.student_operand, out=self.hidden[chunk])  # (C, Hs)
            if self.weight is not None:
                self.weight.addmm_(grad_logits.T, hidden_chunk.float())  # (V, Hs)
            return
        if self.hidden is not None:
            self.hidden[chunk] = _fp32_matmul(grad_logits, self.student_operand)  # (C, Hs)
        if self.weight is not None:
            self.weight += _fp32_matmul(grad_logits.T, hidden_chunk)  # (V, Hs)


class PerTokenKL(torch.autograd.Function):
    """Per-token (kl, target_logprob) of valid rows; backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, targets, settings):
        # student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht),
        # teacher_weight (V, Ht) truncated, targets (N,) or None, all rows valid
        rows = _row_maths(settings.backend)
        student_operand = _gemm_operand(student_weight)  # (V, Hs)
        teacher_operand = _gemm_operand(teacher_weight)  # (V, Ht)
        num_tokens = student_hidden.shape[0]
        kl = torch.zeros(num_tokens, dtype=torch.float32, device=student_hidden.device)  # (N,)
        target_logprob = torch.zeros_like(kl)  # (N,)
        # what backward needs besides kl: logsumexp of z/tau, of t/tau, and of z (targets only)
        lse = torch.zeros(3, num_tokens, dtype=torch.float32, device=student_hidden.device)
        for chunk in _chunks(num_tokens, settings.chunk_size):
            stats = rows.row_stats(
                _fp32_matmul(student_hidden[chunk], student_operand.T),  # (C, V)
                _fp32_matmul(teacher_hidden[chunk], teacher_operand.T),  # (C, V)
                _optional_slice(targets, chunk),
                reverse=settings.reverse,
                temperature=settings.temperature,
            )
            kl[chunk] = stats.kl
            lse[0, chunk], lse[1, chunk] = stats.student_lse, stats.teacher_lse
            if targets is not None:
                target_logprob[chunk], lse[2, chunk] = stats.target_logprob, stats.raw_student_lse
        ctx.settings = settings
        ctx.has_targets = targets is not None
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            targets if targets is not None else kl.new_empty(0, dtype=torch.long),
            kl,
            lse,
        )
        ctx.set_materialize_grads(False)
        return kl, target_logprob

    @staticmethod
    def backward(ctx, grad_kl, grad_logprob):
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kl, lse = (
            ctx.saved_tensors
        )
        settings = ctx.settings
        if not ctx.has_targets:
            targets = None
        student_lse, teacher_lse, raw_student_lse = lse  # (N,) each
        if targets is None:
            grad_logprob = None
        if grad_kl is None and grad_logprob is None:
            return None, None, None, None, None, None
        grad_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl.float()  # (N,)
        grad_logprob = None if grad_logprob is None else grad_logprob.float()  # (N,)

        rows = _row_maths(settings.backend)
        student_operand = _gemm_operand(student_weight)  # (V, Hs)
        teacher_operand = _gemm_operand(teacher_weight)  # (V, Ht)
        sink = _GradSink(
            student_hidden, student_weight, student_operand, *ctx.needs_input_grad[:2]
        )
        for chunk in _chunks(student_hidden.shape[0], settings.chunk_size):
            stats = RowStats(
                kl[chunk],
                student_lse[chunk],
                teacher_lse[chunk],
                None,
                raw_student_lse[chunk] if targets is not None else None,
            )
            grad_logits = rows.row_logit_grad(
                _fp32_matmul(student_hidden[chunk], student_operand.T),  # (C, V)
                _fp32_matmul(teacher_hidden[chunk], teacher_operand.T),  # (C, V)
                _optional_slice(targets, chunk),
                stats,
                grad_kl[chunk],
                _optional_slice(grad_logprob, chunk),
                reverse=settings.reverse,
                temperature=settings.temperature,
            )  # (C, V) fp32
            sink.add(chunk, grad_logits)
        grad_hidden = None if sink.hidden is None else sink.hidden.to(student_hidden.dtype)
        grad_weight = None if sink.weight is None else sink.weight.to(student_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


class WeightedKL(torch.autograd.Function):
    """Weighted sum of per-token kl and target_logprob; gradients formed inside the forward."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,  # (N, Hs), valid rows only
        student_weight,  # (V, Hs)
        teacher_hidden,  # (N, Ht)
        teacher_weight,  # (V, Ht), truncated
        targets,  # (N,) or None
        kl_weights,  # (N,) fp32
        logprob_weights,  # (N,) fp32 or None
        settings,
    ):
        rows = _row_maths(settings.backend)
        student_operand = _gemm_operand(student_weight)  # (V, Hs)
        teacher_operand = _gemm_operand(teacher_weight)  # (V, Ht)
        num_tokens = student_hidden.shape[0]
        # forward runs with grad mode off: whether gradients are wanted was decided by the caller
        need_hidden = settings.grad_enabled and ctx.needs_input_grad[0]
        need_weight = settings.grad_enabled and ctx.needs_input_grad[1]
        sink = _GradSink(student_hidden, student_weight, student_operand, need_hidden, need_weight)
        kl = torch.zeros(num_tokens, dtype=torch.float32, device=student_hidden.device)  # (N,)
        target_logprob = torch.zeros_like(kl)  # (N,)
        for chunk in _chunks(num_tokens, settings.chunk_size):
            student_logits = _fp32_matmul(student_hidden[chunk], student_operand.T)  # (C, V)
            teacher_logits = _fp32_matmul(teacher_hidden[chunk], teacher_operand.T)  # (C, V)
            chunk_targets = _optional_slice(targets, chunk)
            stats = rows.row_stats(
                student_logits,
                teacher_logits,
                chunk_targets,
                reverse=settings.reverse,
                temperature=settings.temperature,
            )
            kl[chunk] = stats.kl
            if targets is not None:
                target_logprob[chunk] = stats.target_logprob
            if need_hidden or need_weight:
                grad_logits = rows.row_logit_grad(
                    student_logits,
                    teacher_logits,
                    chunk_targets,
                    stats,
                    kl_weights[chunk],
                    _optional_slice(logprob_weights, chunk),
                    reverse=settings.reverse,
                    temperature=settings.temperature,
                )  # (C, V) fp32, written over the logits buffers
                sink.add(chunk, grad_logits)
        loss = torch.dot(kl_weights, kl)  # ()
        if logprob_weights is not None:
            loss = loss + torch.dot(logprob_weights, target_logprob)
        # Kept as ctx attributes, not saved tensors, so backward can hand them over without a
        # copy: these gradients are the largest buffers here (the weight's is V x Hs fp32).
        ctx.stored_grads = (sink.hidden, sink.weight)
        ctx.grad_dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.mark_non_differentiable(kl, target_logprob)
        return loss, kl, target_logprob

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_logprob):
        if ctx.stored_grads is None:
            raise RuntimeError(
                "fused_kl_loss stores its gradients once: backpropagate through its loss a single "
                "time (retain_graph is not supported); use fused_token_kl to backpropagate twice"
            )
        grads = []
        for stored, dtype in zip(ctx.stored_grads, ctx.grad_dtypes):
            grads.append(None if stored is None else stored.mul_(grad_loss).to(dtype))  # in place
        ctx.stored_grads = None
        return grads[0], grads[1], None, None, None, None, None, None
