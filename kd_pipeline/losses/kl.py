"""Plain (unfused) per-token quantities of the next-token distributions: the reference form.

p = teacher, q = student. Every function here takes full logits, so both models' (tokens x vocab)
distributions exist in memory at once; `kd_pipeline.losses.fused` computes the same values chunk by
chunk from hidden states and is checked against these functions.

Shared conventions (used by the fused path as well):
- Maths in fp32 whatever the input dtype: log-softmax in bf16/fp16 gives -inf log-probs and
  inf/nan rewards on long contexts (method.md, known failures).
- Vocabulary padding: the teacher's vocabulary may carry more padding rows than the student's;
  the teacher's logits are truncated to the student's first V entries. A teacher with *fewer*
  entries than the student means different tokenizers, which is refused.
- The temperature divides the logits of both models before the softmax of the KL; the
  log-probability of target tokens is always the student's own distribution (temperature 1),
  because cross-entropy and stage-2 rewards need the model's actual probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIRECTIONS = ("forward", "reverse")
IGNORE_INDEX = -100


def check_direction(direction: str) -> None:
    """Raise a ValueError naming the accepted values when `direction` is not one of them."""
    if direction not in DIRECTIONS:
        raise ValueError(
            f"direction={direction!r} is not a KL direction: use 'reverse' for KL(q || p) "
            "(student || teacher, mode-seeking, stage 2) or 'forward' for KL(p || q) (stage 1)"
        )


def check_temperature(temperature: float) -> None:
    """Raise a ValueError when the softmax temperature is not a positive finite number."""
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature={temperature!r} must be a positive finite number")


def check_vocab_sizes(student_vocab: int, teacher_vocab: int) -> None:
    """Refuse a teacher vocabulary smaller than the student's (a different tokenizer)."""
    if teacher_vocab < student_vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) is smaller than the student's ({student_vocab}): "
            "only extra padding rows on the teacher side can be truncated; the two models must "
            "share a tokenizer"
        )


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    direction: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL divergence between the teacher's and the student's next-token distributions.

    Args:
        student_logits: (..., V) student logits z_S, any float dtype; gradients flow through it.
        teacher_logits: (..., V_t) teacher logits z_T with V_t >= V; only the first V entries are
            used (padding rows). Typically computed without grad; it is not detached here.
        direction: "reverse" for KL(q || p) = sum_v q log(q / p); "forward" for
            KL(p || q) = sum_v p log(p / q); with p = softmax(z_T / temperature),
            q = softmax(z_S / temperature).
        temperature: softmax temperature applied to both models' logits.

    Returns:
        (...) fp32 per-token KL, e.g. (N,) for (N, V) inputs or (B, T) for (B, T, V) inputs.
        No masking and no temperature**2 factor: callers combine tokens as they need.
    """
    check_direction(direction)
    check_temperature(temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same leading (token) dimensions"
        )
    vocab_size = student_logits.shape[-1]
    check_vocab_sizes(vocab_size, teacher_logits.shape[-1])

    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    teacher_log_probs = F.log_softmax(
        teacher_logits[..., :vocab_size].float() / temperature, dim=-1
    )  # (..., V)
    # F.kl_div(input, target, log_target=True) is exp(target) * (target - input) elementwise,
    # i.e. the KL of `target` from `input`: reverse KL puts the student in the `target` slot.
    if direction == "reverse":
        elementwise = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        elementwise = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    return elementwise.sum(dim=-1)  # (...)


def target_logprob(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Log-probability of the target tokens under the student (temperature 1), per token.

    Args:
        student_logits: (..., V) logits, any float dtype.
        targets: (...) int64 token ids aligned with the logits positions (the caller shifts);
            `ignore_index` marks positions without a target.

    Returns:
        (...) fp32 log q(target); 0 with zero gradient at ignored positions, so
        cross-entropy = -sum(logprob) / number of supervised tokens.
    """
    if student_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} must match the logits' leading dimensions "
            f"{tuple(student_logits.shape[:-1])}"
        )
    vocab_size = student_logits.shape[-1]
    # cross_entropy upcasts internally only for some dtypes: upcast explicitly to keep fp32 maths.
    flat_logits = student_logits.float().reshape(-1, vocab_size)  # (N, V)
    negative_logprob = F.cross_entropy(
        flat_logits, targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    )  # (N,), 0 at ignored positions
    return (-negative_logprob).reshape(targets.shape)
