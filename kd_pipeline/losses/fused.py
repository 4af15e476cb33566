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
  cannot be stored per token without an (N, V) tensor. Two ways out:
  * `loss_share` given (stage 2): the caller states, as a function of a chunk's per-token values,
    that chunk's share of the loss it will build from the outputs (a sum of per-token terms, e.g.
    the PPO term plus the single-step mean). Forward then forms each chunk's gradient with the
    upstream weights that share implies (autograd on O(C) values) and contracts it right away:
    4 GEMMs, like `fused_kl_loss`. Backward checks the upstream gradients it actually receives:
    a common factor (gradient accumulation, loss scaling) scales the stored gradients, and rows
    that still differ are recomputed with the difference (linearity), so the result is exact for
    any upstream gradient; only a share that does not match the loss costs time.
  * no `loss_share`: forward keeps O(N) statistics (log-sum-exps and the KL) and backward
    recomputes each chunk's logits (two GEMMs), forms the chunk's logits gradient scaled by the
    upstream gradients, and contracts it into the hidden and weight gradients at once: 6 GEMMs.
- `fused_kl_loss` takes the per-token weights up front and returns the reduced loss
  sum_t kl_weights_t * kl_t + logprob_weights_t * target_logprob_t. Each chunk's gradient is
  formed inside the forward and contracted right away (Liger's pattern: 4 GEMMs, no recompute);
  backward only scales the stored hidden/weight gradients by the scalar upstream gradient. Use it
  whenever the weights are known in forward (stage 1's tau^2 / count and -1 / count, stage 2's
  pre-training term). The per-token values come back detached, for logging.

Measured on this project's 2-core CPU (bench/bench_kd_loss.py, N 4096, H 1024, V 32000, reverse
KL, process CPU time on a shared machine; the README's benchmark table has the current run):
`fused_token_kl` with a loss share and `fused_kl_loss` take about the plain path's time at 0.11-0.15x
its peak memory; without a share `fused_token_kl` pays its two recomputed GEMMs. The per-row maths
works in (C, V) buffers allocated once per call (`row_maths`).

Precision: logits come from fp32 GEMMs (CPU: fp32 operands; CUDA with bf16/fp16 operands:
`torch.mm(..., out_dtype=torch.float32)`, i.e. fp32 accumulation and output), never from a
low-precision GEMM cast afterwards (Liger's known 4-23 % gradient error). Logits gradients are
fp32; returned gradients have the dtype of the corresponding input.

Ignored positions (mask False, or target == ignore_index when targets are given) are dropped before
the chunk loop: they cost nothing, return 0 and receive exactly zero gradient; an all-ignored batch
gives zeros and zero gradients. The teacher side is a constant (no gradient reaches teacher_hidden
or teacher_weight) and teacher vocabulary rows past the student's V (padding) are ignored. Student
and teacher hidden sizes may differ.

This module holds the public API (argument checks, dropping ignored rows, putting results back);
the autograd Functions live in `kd_pipeline.losses.chunked_autograd`. The per-row maths has two
backends with one contract (`row_stats` / `row_logit_grad`): torch in `kd_pipeline.losses.row_maths`
(CPU) and Triton kernels in `kd_pipeline.losses.triton_kl` (CUDA), the latter imported lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kd_pipeline.losses.chunked_autograd import ChunkSettings, PerTokenKL, WeightedKL
from kd_pipeline.losses.kl import (
    IGNORE_INDEX,
    check_direction,
    check_temperature,
    check_vocab_sizes,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
# Tokens per chunk are chosen so one chunk's fp32 logits take about this many bytes (per model).
# CPU: measured with bench/bench_kd_loss.py (GEMMs of fewer rows run markedly slower; a few chunk
# buffers must stay well under the plain path's footprint). CUDA: a starting point for the GPU run.
DEFAULT_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}


# loss_share(kl (C,), target_logprob (C,) or None, positions (C,) int64) -> 0-d share of the loss
LossShare = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


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


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk so that one chunk's fp32 (tokens x vocab) logits take about
    DEFAULT_CHUNK_BYTES of the device type (64 MiB on CPU, 256 MiB on CUDA)."""
    device_type = torch.device(device).type
    chunk_bytes = DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cpu"])
    return max(1, chunk_bytes // (4 * vocab_size))


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors; on CPU it runs only in Triton's interpreter "
            "(TRITON_INTERPRET=1 set before triton is first imported). Use backend='torch' on CPU."
        )
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

    def positions(self) -> torch.Tensor:
        """(N_valid,) int64 index of each valid row in the flattened tokens."""
        if self.valid_index is not None:
            return self.valid_index
        return torch.arange(self.num_tokens, device=self.student_hidden.device)

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


def _settings(direction, temperature, chunk_size, backend, vocab_size, device) -> ChunkSettings:
    check_direction(direction)
    check_temperature(temperature)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size, device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
    return ChunkSettings(
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
    loss_share: LossShare | None = None,
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
        chunk_size: tokens per chunk; default `default_chunk_size(V, device)` (64 MiB of fp32
            logits per model on CPU, 256 MiB on CUDA).
        targets: (...) int64 token ids aligned with the hidden positions (the caller shifts);
            ignore_index marks positions without a target. Given, the student's log-probability of
            each target (temperature 1) is returned too, differentiable, so cross-entropy is
            -sum(target_logprob) / count from the same pass.
        mask: (...) bool, False marks positions to ignore (prompt, padding).
        ignore_index: the target value meaning "no target here".
        backend: "auto" (Triton on CUDA when importable, else torch), "torch" or "triton".
        loss_share: optional ``loss_share(kl, target_logprob, positions) -> 0-d tensor``: the share
            of the loss the caller will backpropagate that the given tokens contribute, where kl
            and target_logprob are (C,) values of some valid tokens (target_logprob None without
            targets) and positions (C,) int64 their indices into the flattened leading dims (so
            ``per_token.reshape(-1)[positions]`` picks the caller's data for them). The loss must be
            the sum of these shares over all valid tokens, each token's term depending on its own
            values only (a token mean divides by a count fixed beforehand). Given, the gradients
            are formed in forward (see the module docstring); backward stays exact regardless.

    Returns:
        FusedTokenKL(kl, target_logprob) of (...) fp32 tensors: at valid positions equal to
        `token_kl(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)` and
        `target_logprob(student_hidden @ student_weight.T, targets)`; 0 with zero gradient at
        ignored positions (mask False, or targets == ignore_index). Backward is exact for any
        upstream gradient on either output: it recomputes the logits chunk by chunk, of the tokens
        whose upstream gradient the loss share did not predict (all of them without a share).
    """
    settings = _settings(
        direction, temperature, chunk_size, backend, student_weight.shape[0], student_hidden.device
    )
    tokens = _select_valid_tokens(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, mask, ignore_index
    )
    chunk_share = None
    if loss_share is not None:
        positions = tokens.positions()  # (N_valid,)

        def chunk_share(kl, target_logprob, chunk):  # chunk: a slice of the valid rows
            return loss_share(kl, target_logprob, positions[chunk])

    kl, target_logprob = PerTokenKL.apply(
        tokens.student_hidden,
        student_weight,
        tokens.teacher_hidden,
        teacher_weight.detach()[: student_weight.shape[0]],
        tokens.targets,
        settings,
        chunk_share,
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
        only scales gradients stored by the forward (no recompute), and runs once (no
        retain_graph); kl and target_logprob are the detached per-token values (...) for logging,
        0 at ignored positions.
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

    loss, kl, target_logprob = WeightedKL.apply(
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
