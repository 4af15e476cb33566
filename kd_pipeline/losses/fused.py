"""Fused, chunked KL between student and teacher next-token distributions, from hidden states.

Both entry points compute the values of
`token_kl(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)` (and, given
targets, the student's log-probability of each target token) without ever holding an (N, V) tensor
of either model: tokens are processed in chunks of `chunk_size` rows, so the loss head needs
O(chunk_size x V) memory instead of O(N x V).

Two entry points, because "when are the gradients formed" has two right answers:

- `fused_token_kl` returns *per-token* values (kl, target_logprob) that the caller weights freely,
  including weights known only after the forward (stage 2's PPO-clipped ratio depends on the
  log-prob itself). The weight gradient of sum_t g_t * kl_t is sum_t g_t * dlogits_t^T h_t: it
  cannot be stored per token without an (N, V) tensor, and the g_t are unknown in forward. So
  forward keeps O(N) statistics (log-sum-exps and the KL) and backward recomputes each chunk's
  logits (two GEMMs), forms the chunk's logits gradient scaled by the upstream gradients, and
  contracts it into the hidden and weight gradients at once. Exact for any upstream gradient, at
  the cost of 6 GEMMs instead of the plain path's 4.
- `fused_kl_loss` takes the per-token weights up front and returns the reduced loss
  sum_t kl_weights_t * kl_t + logprob_weights_t * target_logprob_t. Each chunk's gradient is
  formed inside the forward and contracted right away (Liger's pattern: 4 GEMMs, no recompute);
  backward only scales the stored hidden/weight gradients by the scalar upstream gradient. Use it
  whenever the weights are known in forward (stage 1's tau^2 / count and -1 / count, stage 2's
  single-step and pre-training terms). The per-token values come back detached, for logging.

Precision: logits come from fp32 GEMMs (CPU: fp32 operands; CUDA with bf16/fp16 operands:
`torch.mm(..., out_dtype=torch.float32)`, i.e. fp32 accumulation and output), never from a
low-precision GEMM cast afterwards (Liger's known 4-23 % gradient error). Logits gradients are
fp32; returned gradients have the dtype of the corresponding input.

Ignored positions (mask False, or target == ignore_index when targets are given) are dropped before
the chunk loop: they cost nothing, return 0 and receive exactly zero gradient; an all-ignored batch
gives zeros and zero gradients. The teacher side is a constant (no gradient reaches teacher_hidden
or teacher_weight) and teacher vocabulary rows past the student's V (padding) are ignored. Student
and teacher hidden sizes may differ.

The per-row maths has two backends with one contract (`row_stats` / `row_logit_grad`): torch in
`kd_pipeline.losses.row_maths` (CPU) and Triton kernels in `kd_pipeline.losses.triton_kl` (CUDA),
the latter imported lazily, only when used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kd_pipeline.losses.kl import (
    IGNORE_INDEX,
    check_direction,
    check_temperature,
    check_vocab_sizes,
)
from kd_pipeline.losses.row_maths import RowStats

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
# Tokens per chunk are chosen so one chunk's fp32 logits take about this many bytes (per model):
# measured on CPU with bench/bench_kd_loss.py, where larger chunks bought no speed, only memory.
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class FusedTokenKL(NamedTuple):
    """Per-token outputs of `fused_token_kl`, shaped like the hidden states' leading dims."""

    kl: torch.Tensor
    """(...) fp32 KL per token; 0 at ignored positions."""
    target_logprob: torch.Tensor | None
    """(...) fp32 log q(target) at temperature 1; 0 at ignored positions; None without targets."""


class FusedKLLoss(NamedTuple):
    """Outputs of `fused_kl_loss`."""

    loss: torch.Tensor
    """() fp32 sum of kl_weights * kl + logprob_weights * target_logprob; differentiable."""
    kl: torch.Tensor
    """(...) fp32 per-token KL, detached; 0 at ignored positions."""
    target_logprob: torch.Tensor | None
    """(...) fp32 per-token target log-prob, detached; None without targets."""


@dataclass(frozen=True)
class _ChunkSettings:
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
        if self.hidden is not None:
            self.hidden[chunk] = _fp32_matmul(grad_logits, self.student_operand)  # (C, Hs)
        if self.weight is not None:
            self.weight += _fp32_matmul(grad_logits.T, self.student_hidden[chunk])  # (V, Hs)


class _PerTokenKL(torch.autograd.Function):
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


class _WeightedKL(torch.autograd.Function):
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
                )  # (C, V) fp32, may reuse student_logits
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


def default_chunk_size(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 (tokens x vocab) logits take about chunk_bytes."""
    return max(1, chunk_bytes // (4 * vocab_size))


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401  (probing whether the CUDA kernels can run)
    except ImportError:
        logger.warning("triton is not importable: the fused KL uses the chunked torch path on CUDA")
        return "torch"
    return "triton"


def _keep(per_token: torch.Tensor | None, valid_index: torch.Tensor | None) -> torch.Tensor | None:
    if per_token is None or valid_index is None:
        return per_token
    return per_token.index_select(0, valid_index)


@dataclass(frozen=True)
class _ValidTokens:
    """The valid rows of the flattened inputs, and how to put per-token results back."""

    student_hidden: torch.Tensor  # (N_valid, Hs)
    teacher_hidden: torch.Tensor  # (N_valid, Ht), detached
    targets: torch.Tensor | None  # (N_valid,) ids in [0, V)
    valid_index: torch.Tensor | None  # (N_valid,) positions in the flat tokens; None if all valid
    num_tokens: int
    token_shape: torch.Size

    def keep(self, per_token: torch.Tensor | None) -> torch.Tensor | None:
        """(N, ...) -> (N_valid, ...) for a flat per-token tensor."""
        return _keep(per_token, self.valid_index)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(N_valid,) -> token_shape with zeros at ignored positions (differentiable)."""
        if self.valid_index is None:
            return values.reshape(self.token_shape)
        zeros = torch.zeros(self.num_tokens, dtype=values.dtype, device=values.device)
        return zeros.index_copy(0, self.valid_index, values).reshape(self.token_shape)


def _select_valid_tokens(
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask, ignore_index
) -> _ValidTokens:
    """Check the inputs' shapes and keep the rows that are neither masked nor ignored."""
    token_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != token_shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} must have the same leading (token) dimensions"
        )
    for name, weight, hidden in (
        ("student", student_weight, student_hidden),
        ("teacher", teacher_weight, teacher_hidden),
    ):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"{name} weight {tuple(weight.shape)} must be (vocab, hidden) with hidden = "
                f"{hidden.shape[-1]}, the last dimension of the {name} hidden states"
            )
    vocab_size = student_weight.shape[0]
    check_vocab_sizes(vocab_size, teacher_weight.shape[0])
    for name, per_token in (("targets", targets), ("mask", mask)):
        if per_token is not None and per_token.shape != token_shape:
            raise ValueError(
                f"{name} {tuple(per_token.shape)} must match the hidden states' leading "
                f"dimensions {tuple(token_shape)}"
            )
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = use the token), got {mask.dtype}")
    if targets is not None and (targets.dtype.is_floating_point or targets.dtype == torch.bool):
        raise ValueError(f"targets must hold integer token ids, got {targets.dtype}")

    flat_student = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, Hs)
    flat_teacher = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # (N, Ht)
    num_tokens = flat_student.shape[0]
    valid = torch.ones(num_tokens, dtype=torch.bool, device=flat_student.device)  # (N,)
    if mask is not None:
        valid &= mask.reshape(-1)
    flat_targets = None
    if targets is not None:
        flat_targets = targets.reshape(-1).long()  # (N,)
        valid &= flat_targets != ignore_index
        supervised = flat_targets[valid]
        if supervised.numel() and (supervised.min() < 0 or supervised.max() >= vocab_size):
            raise ValueError(
                f"targets must be token ids in [0, {vocab_size}) or ignore_index={ignore_index}; "
                f"got values in [{int(supervised.min())}, {int(supervised.max())}]"
            )
    valid_index = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # (N_valid,)
    return _ValidTokens(
        student_hidden=_keep(flat_student, valid_index),
        teacher_hidden=_keep(flat_teacher, valid_index),
        targets=_keep(flat_targets, valid_index),
        valid_index=valid_index,
        num_tokens=num_tokens,
        token_shape=token_shape,
    )


def _settings(direction, temperature, chunk_size, backend, vocab_size, device) -> _ChunkSettings:
    check_direction(direction)
    check_temperature(temperature)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
    return _ChunkSettings(
        reverse=direction == "reverse",
        temperature=float(temperature),
        chunk_size=int(chunk_size),
        backend=_resolve_backend(backend, device),
        grad_enabled=torch.is_grad_enabled(),
    )


def fused_token_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    direction: str,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    targets: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> FusedTokenKL:
    """Per-token KL (and target log-prob) from hidden states and LM-head weights, chunk by chunk.

    Args:
        student_hidden: (..., Hs) final hidden states of the student; gradients flow to it.
        student_weight: (V, Hs) student LM-head weight; gradients flow to it if it requires grad.
        teacher_hidden: (..., Ht) teacher hidden states (same leading dims; Ht may differ from Hs).
        teacher_weight: (V_t, Ht) teacher LM-head weight, V_t >= V: rows past V are padding and
            ignored. The teacher side is treated as a constant.
        direction: "reverse" for KL(q || p) or "forward" for KL(p || q) (p teacher, q student).
        temperature: divides both models' logits in the KL; not used for the target log-prob.
        chunk_size: tokens per chunk; default `default_chunk_size(V)` (about 32 MiB of logits).
        targets: (...) int64 token ids aligned with the hidden positions (the caller shifts);
            ignore_index marks positions without a target. Given, the student's log-probability of
            each target (temperature 1) is returned too, differentiable, so cross-entropy is
            -sum(target_logprob) / count from the same pass.
        mask: (...) bool, False marks positions to ignore (prompt, padding).
        ignore_index: the target value meaning "no target here".
        backend: "auto" (Triton on CUDA when importable, else torch), "torch" or "triton".

    Returns:
        FusedTokenKL(kl, target_logprob) of (...) fp32 tensors: at valid positions equal to
        `token_kl(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)` and
        `target_logprob(student_hidden @ student_weight.T, targets)`; 0 with zero gradient at
        ignored positions (mask False, or targets == ignore_index). Backward is exact for any
        upstream gradient on either output and recomputes the logits chunk by chunk.
    """
    settings = _settings(
        direction, temperature, chunk_size, backend, student_weight.shape[0], student_hidden.device
    )
    tokens = _select_valid_tokens(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask, ignore_index
    )
    kl, target_logprob = _PerTokenKL.apply(
        tokens.student_hidden,
        student_weight,
        tokens.teacher_hidden,
        teacher_weight.detach()[: student_weight.shape[0]],
        tokens.targets,
        settings,
    )  # (N_valid,), (N_valid,)
    return FusedTokenKL(
        kl=tokens.scatter(kl),
        target_logprob=tokens.scatter(target_logprob) if targets is not None else None,
    )


def fused_kl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    direction: str,
    kl_weights: torch.Tensor | float,
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    logprob_weights: torch.Tensor | float | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> FusedKLLoss:
    """Weighted KL (+ weighted target log-prob) loss with gradients formed during the forward.

    loss = sum over valid positions t of kl_weights[t] * kl[t] + logprob_weights[t] * logprob[t],
    where kl and logprob are exactly `fused_token_kl`'s outputs. Inputs as in `fused_token_kl`;
    in addition:

    Args:
        kl_weights: (...) per-token weights of the KL (or one float for all tokens), constants.
            Stage 1: tau**2 * alpha_kd / count; stage 2 single-step term: 1 / count.
        logprob_weights: (...) per-token weights of the target log-prob (or one float); needs
            targets. Cross-entropy with weight beta over `count` tokens is -beta / count.

    Returns:
        FusedKLLoss(loss, kl, target_logprob): loss is a differentiable fp32 scalar whose backward
        only scales gradients stored by the forward (no recompute); kl and target_logprob are the
        detached per-token values (...) for logging, 0 at ignored positions.
    """
    if logprob_weights is not None and targets is None:
        raise ValueError("logprob_weights weigh the log-prob of target tokens: pass targets too")
    settings = _settings(
        direction, temperature, chunk_size, backend, student_weight.shape[0], student_hidden.device
    )
    tokens = _select_valid_tokens(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask, ignore_index
    )

    def flat_weights(name: str, weights: torch.Tensor | float) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float32, device=student_hidden.device)
        if weights.dim() == 0:
            weights = weights.expand(tokens.num_tokens)
        elif weights.shape != tokens.token_shape:
            raise ValueError(
                f"{name} {tuple(weights.shape)} must be a float or match the hidden states' "
                f"leading dimensions {tuple(tokens.token_shape)}"
            )
        return tokens.keep(weights.detach().reshape(-1).float())  # (N_valid,)

    loss, kl, target_logprob = _WeightedKL.apply(
        tokens.student_hidden,
        student_weight,
        tokens.teacher_hidden,
        teacher_weight.detach()[: student_weight.shape[0]],
        tokens.targets,
        flat_weights("kl_weights", kl_weights),
        None if logprob_weights is None else flat_weights("logprob_weights", logprob_weights),
        settings,
    )
    return FusedKLLoss(
        loss=loss,
        kl=tokens.scatter(kl),
        target_logprob=tokens.scatter(target_logprob) if targets is not None else None,
    )
