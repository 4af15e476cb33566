"""The chunked autograd Functions behind `kd_pipeline.losses.fused` (read its docstring first).

Both Functions take only the valid rows (ignored positions are dropped by the caller), flattened:
student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht), teacher_weight (V, Ht)
already truncated to the student's V, targets (N,) ids in [0, V) or None. Per chunk of C rows they
compute both models' logits (C, V) with fp32 GEMMs, the per-row statistics and the logits gradient
(`row_stats` / `row_logit_grad` of the selected backend), and contract that gradient into the
student's hidden and weight gradients right away, so no (N, V) tensor ever exists. The (C, V)
buffers (logits, and the torch row maths' workspace) are allocated once per call and reused by
every chunk: on CPU a fresh 64 MiB buffer costs more than the pass that fills it.

- `PerTokenKL`: outputs per-token (kl, target_logprob). Without a loss share, forward keeps O(N)
  statistics and backward recomputes each chunk's logits (6 GEMMs in all). With one (the caller's
  loss as a sum of per-token terms, stage 2's case), forward also forms the gradient of that loss
  (4 GEMMs); backward compares the upstream gradients it receives with the planned ones: a common
  scale (gradient accumulation, loss scaling) just scales the stored gradients, and the rows that
  still differ are recomputed with the difference, by linearity. Exact whatever the caller does.
- `WeightedKL`: takes the per-token weights, forms the gradients during the forward and returns
  the weighted sum; backward only scales the stored gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd_pipeline.losses.row_maths import RowStats, new_workspace

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Planned and received upstream gradients are the same loss differentiated twice (rounding apart);
# rows whose difference stays below this share of the gradient are not recomputed.
PLAN_TOLERANCE = 1e-5

# (kl, target_logprob or None, chunk of valid rows) -> that chunk's share of the caller's loss
ChunkLossShare = Callable[[torch.Tensor, torch.Tensor | None, slice], torch.Tensor]


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


def _fp32_matmul(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """left @ right for 2-D operands, accumulated in and returned as fp32 (into ``out`` for fp32 operands)."""
    if right.is_cuda and right.dtype in _LOW_PRECISION:
        return torch.mm(left.to(right.dtype), right, out_dtype=torch.float32)
    if out is not None:
        return torch.mm(left.float(), right.float(), out=out)
    return left.float() @ right.float()


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


def _optional_slice(per_token: torch.Tensor | None, chunk) -> torch.Tensor | None:
    return None if per_token is None else per_token[chunk]


class _ChunkLoop:
    """One call's chunk loop: the GEMM operands and the (C, V) buffers every chunk reuses."""

    def __init__(self, student_hidden, student_weight, teacher_hidden, teacher_weight, targets, settings):
        self.student_hidden = student_hidden  # (N, Hs)
        self.teacher_hidden = teacher_hidden  # (N, Ht)
        self.targets = targets  # (N,) or None
        self.settings = settings
        self.rows = _row_maths(settings.backend)
        self.student_operand = _gemm_operand(student_weight)  # (V, Hs)
        self.teacher_operand = _gemm_operand(teacher_weight)  # (V, Ht)
        rows = min(settings.chunk_size, student_hidden.shape[0])
        vocab_size, device = student_weight.shape[0], student_hidden.device
        low_precision = self.student_operand.dtype in _LOW_PRECISION
        # CUDA low-precision GEMMs allocate their fp32 output (the caching allocator makes that cheap)
        self.logits = None if low_precision else new_workspace(rows, vocab_size, device)
        self.workspace = new_workspace(rows, vocab_size, device) if settings.backend == "torch" else None

    def row_kwargs(self) -> dict:
        return {"reverse": self.settings.reverse, "temperature": self.settings.temperature,
                "workspace": self.workspace}

    def chunk_logits(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' fp32 logits (C, V) of ``rows`` (a slice or an index tensor of rows)."""
        student_hidden, teacher_hidden = self.student_hidden[rows], self.teacher_hidden[rows]
        count = student_hidden.shape[0]
        student_out, teacher_out = (None, None) if self.logits is None else (buffer[:count] for buffer in self.logits)
        return (_fp32_matmul(student_hidden, self.student_operand.T, out=student_out),
                _fp32_matmul(teacher_hidden, self.teacher_operand.T, out=teacher_out))

    def forward_pass(self, chunk_weights=None, sink=None):
        """Per-token kl, target_logprob (N,) and log-sum-exps (3, N); with a sink, each chunk's logits
        gradient, weighted by ``chunk_weights(chunk, stats) -> (kl weights, logprob weights or None)``,
        is contracted into it."""
        num_tokens, device = self.student_hidden.shape[0], self.student_hidden.device
        kl = torch.zeros(num_tokens, dtype=torch.float32, device=device)  # (N,)
        target_logprob = torch.zeros_like(kl)  # (N,)
        # what a backward recompute needs besides kl: logsumexp of z/tau, of t/tau, and of z (targets only)
        lse = torch.zeros(3, num_tokens, dtype=torch.float32, device=device)
        for chunk in _chunks(num_tokens, self.settings.chunk_size):
            student_logits, teacher_logits = self.chunk_logits(chunk)
            chunk_targets = _optional_slice(self.targets, chunk)
            stats = self.rows.row_stats(student_logits, teacher_logits, chunk_targets, **self.row_kwargs())
            kl[chunk] = stats.kl
            lse[0, chunk], lse[1, chunk] = stats.student_lse, stats.teacher_lse
            if self.targets is not None:
                target_logprob[chunk], lse[2, chunk] = stats.target_logprob, stats.raw_student_lse
            if sink is not None:
                kl_weights, logprob_weights = chunk_weights(chunk, stats)  # (C,), (C,) or None
                grad_logits = self.rows.row_logit_grad(
                    student_logits, teacher_logits, chunk_targets, stats, kl_weights, logprob_weights,
                    **self.row_kwargs(),
                )  # (C, V) fp32, written over the logits buffers
                sink.add(chunk, grad_logits)
        return kl, target_logprob, lse

    def recompute_pass(self, kl, lse, grad_kl, grad_logprob, sink, rows=None) -> None:
        """Recompute the logits of ``rows`` (index tensor; None: all) and contract their gradient,
        weighted by grad_kl / grad_logprob (N,), into the sink."""
        student_lse, teacher_lse, raw_student_lse = lse  # (N,) each
        num_rows = self.student_hidden.shape[0] if rows is None else rows.shape[0]
        for piece in _chunks(num_rows, self.settings.chunk_size):
            chunk = piece if rows is None else rows[piece]
            stats = RowStats(kl[chunk], student_lse[chunk], teacher_lse[chunk], None,
                             raw_student_lse[chunk] if self.targets is not None else None)
            grad_logits = self.rows.row_logit_grad(
                *self.chunk_logits(chunk), _optional_slice(self.targets, chunk), stats,
                grad_kl[chunk], _optional_slice(grad_logprob, chunk), **self.row_kwargs(),
            )  # (C, V) fp32
            sink.add(chunk, grad_logits)


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

    def add(self, rows, grad_logits: torch.Tensor) -> None:
        """Contract one chunk's (C, V) fp32 logits gradient into the hidden and weight gradients; ``rows``
        is a slice (rows seen for the first time: written) or an index tensor (accumulated)."""
        hidden_rows = self.student_hidden[rows]  # (C, Hs)
        accumulate = not isinstance(rows, slice)
        if self.student_operand.dtype == torch.float32:
            # fp32 operands (CPU, or fp32 models): write and accumulate in place, sparing a
            # (V, Hs) temporary per chunk
            if self.hidden is not None and accumulate:
                self.hidden.index_add_(0, rows, grad_logits @ self.student_operand)  # (C, Hs)
            elif self.hidden is not None:
                torch.mm(grad_logits, self.student_operand, out=self.hidden[rows])  # (C, Hs)
            if self.weight is not None:
                self.weight.addmm_(grad_logits.T, hidden_rows.float())  # (V, Hs)
            return
        if self.hidden is not None and accumulate:
            self.hidden.index_add_(0, rows, _fp32_matmul(grad_logits, self.student_operand))
        elif self.hidden is not None:
            self.hidden[rows] = _fp32_matmul(grad_logits, self.student_operand)  # (C, Hs)
        if self.weight is not None:
            self.weight += _fp32_matmul(grad_logits.T, hidden_rows)  # (V, Hs)


def _share_gradients(loss_share: ChunkLossShare, stats: RowStats, chunk: slice):
    """d share / d kl and d share / d target_logprob (C,) each: the upstream gradients the caller's loss
    will send to these rows."""
    with torch.enable_grad():
        kl = stats.kl.detach().requires_grad_()
        logprob = None if stats.target_logprob is None else stats.target_logprob.detach().requires_grad_()
        leaves = [kl] if logprob is None else [kl, logprob]
        share = loss_share(kl, logprob, chunk)
        if not isinstance(share, torch.Tensor) or share.dim() != 0:
            raise ValueError("loss_share must return a 0-d tensor: these tokens' share of the loss")
        if not share.requires_grad:
            grads = [None] * len(leaves)
        else:
            grads = torch.autograd.grad(share, leaves, allow_unused=True)
    grad_kl = torch.zeros_like(kl) if grads[0] is None else grads[0].float()
    if logprob is None:
        return grad_kl, None
    return grad_kl, torch.zeros_like(logprob) if grads[1] is None else grads[1].float()


def _common_scale(received: torch.Tensor, planned: torch.Tensor) -> torch.Tensor:
    """The factor s with received = s * planned on most entries (the median ratio: rows a share did not
    predict cannot move it), 0 for an all-zero plan; a 0-d tensor. Any s is exact: backward recomputes
    whatever received - s * planned leaves."""
    predicted = planned != 0
    if not bool(predicted.any()):
        return planned.new_zeros(())
    return (received[predicted] / planned[predicted]).median()


class PerTokenKL(torch.autograd.Function):
    """Per-token (kl, target_logprob) of valid rows; gradients formed in forward when a loss share is
    given (checked in backward), else recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, targets, settings,
                loss_share):
        # student_hidden (N, Hs), student_weight (V, Hs), teacher_hidden (N, Ht),
        # teacher_weight (V, Ht) truncated, targets (N,) or None, all rows valid
        loop = _ChunkLoop(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, settings)
        need_hidden = settings.grad_enabled and ctx.needs_input_grad[0]
        need_weight = settings.grad_enabled and ctx.needs_input_grad[1]
        sink, planned = None, None
        if loss_share is not None and (need_hidden or need_weight):
            sink = _GradSink(student_hidden, student_weight, loop.student_operand, need_hidden, need_weight)
            planned = torch.zeros(2, student_hidden.shape[0], dtype=torch.float32, device=student_hidden.device)

            def chunk_weights(chunk, stats):
                grad_kl, grad_logprob = _share_gradients(loss_share, stats, chunk)
                planned[0, chunk] = grad_kl
                if grad_logprob is not None:
                    planned[1, chunk] = grad_logprob
                return grad_kl, grad_logprob

            kl, target_logprob, lse = loop.forward_pass(chunk_weights, sink)
        else:
            kl, target_logprob, lse = loop.forward_pass()
        ctx.settings = settings
        ctx.has_targets = targets is not None
        # Kept as a ctx attribute, not a saved tensor, so backward can hand the gradients over without a copy.
        ctx.stored_grads = None if sink is None else (sink.hidden, sink.weight)
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            targets if targets is not None else kl.new_empty(0, dtype=torch.long),
            kl,
            lse,
            planned if planned is not None else kl.new_empty(0),
        )
        ctx.set_materialize_grads(False)
        return kl, target_logprob

    @staticmethod
    def backward(ctx, grad_kl, grad_logprob):
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kl, lse, planned = (
            ctx.saved_tensors
        )
        if not ctx.has_targets:
            targets, grad_logprob = None, None
        stored, ctx.stored_grads = ctx.stored_grads, None  # a second backward recomputes everything
        if grad_kl is None and grad_logprob is None and stored is None:
            return None, None, None, None, None, None, None
        grad_kl = torch.zeros_like(kl) if grad_kl is None else grad_kl.float()  # (N,)
        if targets is not None:
            grad_logprob = torch.zeros_like(kl) if grad_logprob is None else grad_logprob.float()  # (N,)

        loop = _ChunkLoop(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, ctx.settings)
        sink = _GradSink(student_hidden, student_weight, loop.student_operand, *ctx.needs_input_grad[:2])
        rows = None
        if stored is not None:
            received = torch.stack([grad_kl, grad_logprob if targets is not None else torch.zeros_like(kl)])
            scale = _common_scale(received, planned)
            residual = received - scale * planned  # (2, N)
            differs = residual.abs() > PLAN_TOLERANCE * torch.maximum(received.abs(), (scale * planned).abs())
            differs |= ~torch.isfinite(received)  # inf / NaN upstream (e.g. an fp16 overflow) must reach the grads
            rows = differs.any(dim=0).nonzero().squeeze(1)  # (R,)
            if rows.numel():
                logger.debug("fused_token_kl: %d of %d rows differ from the planned gradients; recomputing them",
                             rows.numel(), kl.shape[0])
            grad_kl, grad_logprob = residual[0], residual[1] if targets is not None else None
            sink.hidden = None if stored[0] is None else stored[0].mul_(scale)
            sink.weight = None if stored[1] is None else stored[1].mul_(scale)
        if rows is None or rows.numel():
            loop.recompute_pass(kl, lse, grad_kl, grad_logprob, sink, rows)
        grad_hidden = None if sink.hidden is None else sink.hidden.to(student_hidden.dtype)
        grad_weight = None if sink.weight is None else sink.weight.to(student_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


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
        loop = _ChunkLoop(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, settings)
        # forward runs with grad mode off: whether gradients are wanted was decided by the caller
        need_hidden = settings.grad_enabled and ctx.needs_input_grad[0]
        need_weight = settings.grad_enabled and ctx.needs_input_grad[1]
        sink = None
        if need_hidden or need_weight:
            sink = _GradSink(student_hidden, student_weight, loop.student_operand, need_hidden, need_weight)
        kl, target_logprob, _ = loop.forward_pass(
            lambda chunk, _stats: (kl_weights[chunk], _optional_slice(logprob_weights, chunk)), sink
        )
        loss = torch.dot(kl_weights, kl)  # ()
        if logprob_weights is not None:
            loss = loss + torch.dot(logprob_weights, target_logprob)
        # Kept as ctx attributes, not saved tensors, so backward can hand them over without a
        # copy: these gradients are the largest buffers here (the weight's is V x Hs fp32).
        ctx.stored_grads = (None, None) if sink is None else (sink.hidden, sink.weight)
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
