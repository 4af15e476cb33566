"""Stage-1 loss terms (paper eq. 1-5): word-level KD, cross-entropy, their mix, feature alignment.

- Word-level KD (eq. 2): L_KD = tau^2 * KL(p_T || p_S), p = softmax(z / tau), averaged over the
  supervised (answer) tokens. The tau^2 keeps the gradient scale independent of tau (Hinton et al.).
- Cross-entropy of the student on the same tokens at temperature 1.
- Mix (eq. 3): L = alpha_kd * L_KD + (1 - alpha_kd) * L_CE.
- Feature alignment (eq. 4-5): the paper's mean squared error, L_align = 1/2 * mean over image tokens
  AND features of (z_T - P(z_S))^2; P maps the student's projector outputs (H_s) into the teacher's
  space (H_t), a learned FitNets-style regressor saved with the student. The paper writes L_align with
  a minus sign; it is minimised (method.md). A mean, not a sum over the hidden dimension: a sum grows
  with H_t (x5120 for GeoChat-13B) and swamped the task loss 17-fold in the first experiment
  (README, design 1). Table 1 adds it in stage 2 (eq. 10); in stage 1 it is an ablation.

Labels are aligned with the logits positions by the caller (the caller shifts); -100 marks tokens
without supervision. Means divide by the number of supervised tokens of the batch, or by a
`token_count` the caller passes: the training loop passes the step's global count of supervised
tokens over gradient-accumulation steps and ranks (divided by both, which DeepSpeed's averaging
multiplies back), so a step's gradient is the exact token mean whatever the split, as torchtune
does. The alignment term stays a mean over each micro-batch's image tokens. An all-ignored batch
gives 0 with zero gradients, never NaN.

`stage1_kd_terms` is the plain form on full logits (the reference); `fused_stage1_loss` computes the
same mix from hidden states chunk by chunk (`kd_pipeline.losses.fused`) and is the default for
training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_pipeline.losses.fused import fused_kl_loss
from kd_pipeline.losses.kl import IGNORE_INDEX, target_logprob, token_kl


def _check_alpha(alpha_kd: float) -> None:
    if not 0.0 <= alpha_kd <= 1.0:
        raise ValueError(f"alpha_kd={alpha_kd!r} must lie in [0, 1] (weight of the KD term)")


def _supervised_count(supervised: torch.Tensor, token_count: torch.Tensor | float | None):
    """Denominator of the token means: the given count (a global count divided by the number of micro-batches may be
    below 1), else this batch's count; 1 when it is 0, so an all-ignored batch gives 0."""
    if token_count is None:
        return supervised.sum().clamp(min=1)
    count = torch.as_tensor(token_count, dtype=torch.float32, device=supervised.device)
    return torch.where(count > 0, count, torch.ones_like(count))


def token_mean_ce(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    token_count: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-entropy -log q(label) per supervised token, from full logits (``sft``'s loss).

    Args:
        student_logits: (..., V) logits; labels: (...) aligned target ids, ignore_index = unsupervised.
        token_count: denominator; default: supervised tokens in this batch.

    Returns:
        fp32 scalar; 0 with zero gradient when nothing is supervised.
    """
    count = _supervised_count(labels != ignore_index, token_count)
    return -target_logprob(student_logits, labels, ignore_index=ignore_index).sum() / count


def stage1_kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int = IGNORE_INDEX,
    token_count: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """Word-level KD and cross-entropy on supervised tokens, from full logits (plain form).

    Args:
        student_logits: (B, T, V) student logits; gradients flow through them.
        teacher_logits: (B, T, V_t), V_t >= V (rows past V are padding and ignored).
        labels: (B, T) target ids aligned with the logits positions; ignore_index = unsupervised.
        temperature: tau of the KD term; the cross-entropy uses temperature 1.
        token_count: denominator of both means; default: supervised tokens in this batch.

    Returns:
        {"kd": tau^2 * mean KL(p_T || p_S), "ce": mean -log q(label)}, fp32 scalars.
    """
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' leading dimensions "
            f"{tuple(student_logits.shape[:-1])} (shift labels before calling)"
        )
    supervised = labels != ignore_index  # (B, T)
    count = _supervised_count(supervised, token_count)
    kl = token_kl(student_logits, teacher_logits, direction="forward", temperature=temperature)  # (B, T)
    # where(), not a product: an ignored position must not leak a non-finite KL into the sum
    kd = temperature**2 * torch.where(supervised, kl, 0.0).sum() / count
    ce = token_mean_ce(student_logits, labels, ignore_index=ignore_index, token_count=count)
    return {"kd": kd, "ce": ce}


def combine_stage1(kd: torch.Tensor, ce: torch.Tensor, alpha_kd: float) -> torch.Tensor:
    """Eq. 3: alpha_kd * kd + (1 - alpha_kd) * ce."""
    _check_alpha(alpha_kd)
    return alpha_kd * kd + (1.0 - alpha_kd) * ce


def fused_stage1_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha_kd: float,
    ignore_index: int = IGNORE_INDEX,
    token_count: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Eq. 3 from hidden states without (tokens x vocab) tensors: one fused pass gives KD and CE.

    Args:
        student_hidden: (B, T, Hs) student final hidden states; student_weight: (V, Hs) LM head.
        teacher_hidden: (B, T, Ht); teacher_weight: (V_t, Ht), V_t >= V. Constants.
        labels, temperature, ignore_index, token_count: as in `stage1_kd_terms`.
        alpha_kd: weight of the KD term.
        chunk_size, backend: see `fused_kl_loss`.

    Returns:
        {"loss": combine_stage1(kd, ce, alpha_kd) (differentiable), "kd": ..., "ce": ...}, where
        kd and ce equal `stage1_kd_terms` on the logits and are detached (for logging): the
        gradients are formed inside the forward with the weights known here.
    """
    _check_alpha(alpha_kd)
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the hidden states' leading dimensions "
            f"{tuple(student_hidden.shape[:-1])} (shift labels before calling)"
        )
    count = _supervised_count(labels != ignore_index, token_count).float()
    kd_weight = (alpha_kd * temperature**2 / count).detach()
    ce_weight = (-(1.0 - alpha_kd) / count).detach()  # CE is -logprob
    fused = fused_kl_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        direction="forward",
        temperature=temperature,
        targets=labels,
        ignore_index=ignore_index,
        kl_weights=kd_weight,
        logprob_weights=ce_weight,
        chunk_size=chunk_size,
        backend=backend,
    )
    kd = temperature**2 * fused.kl.sum() / count
    ce = -fused.target_logprob.sum() / count
    return {"loss": fused.loss, "kd": kd, "ce": ce}


def alignment_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 4 as the paper's mean squared error: 1/2 * mean over image tokens and features of (z_T - P(z_S))^2.

    Its value does not grow with the hidden size: features of the same per-element error give the same loss at
    H_t = 96 and at 5120.

    Args:
        student_features: (B, N, Ht) student projector outputs already mapped by P (FeatureProjector).
        teacher_features: (B, N, Ht) teacher projector outputs; constant (detached here).
        mask: optional (B, N) bool, True for image tokens to include.

    Returns:
        fp32 scalar; 0 with zero gradient if no token is included.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student features {tuple(student_features.shape)} must have the teacher's shape "
            f"{tuple(teacher_features.shape)}: map them with FeatureProjector first"
        )
    per_token = 0.5 * F.mse_loss(
        student_features.float(), teacher_features.detach().float(), reduction="none"
    ).mean(dim=-1)  # (B, N): mean over the Ht features
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(per_token.shape)}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return torch.where(mask, per_token, 0.0).sum() / mask.sum().clamp(min=1)


class FeatureProjector(nn.Module):
    """P: student image features (..., H_s) -> the teacher's feature space (..., H_t).

    A bias-free Linear(H_s, H_t) when the sizes differ (GeoChat-7B 4096 -> 13B 5120), the identity
    (no parameters) when they match. It is trained with the alignment loss and belongs in the
    student's checkpoints. Inputs are cast to the projector's dtype, so P can stay fp32 while the
    features arrive in bf16.
    """

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int):
        super().__init__()
        self.student_hidden_size = student_hidden_size
        self.teacher_hidden_size = teacher_hidden_size
        if student_hidden_size == teacher_hidden_size:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        """(..., H_s) -> (..., H_t)."""
        if student_features.shape[-1] != self.student_hidden_size:
            raise ValueError(
                f"student features end in {student_features.shape[-1]}, the projector expects "
                f"H_s = {self.student_hidden_size}"
            )
        if isinstance(self.proj, nn.Linear):
            student_features = student_features.to(self.proj.weight.dtype)
        return self.proj(student_features)
