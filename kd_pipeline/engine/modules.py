"""The two modules DeepSpeed wraps: the trainable student (LLaVA + the feature map P) and the frozen teacher.

Why the loss is computed inside ``StudentModule.forward``: under ZeRO-3 a parameter is materialised only while a
module that owns (or registered) it runs its forward. The fused KL kernel needs the LM-head weight next to the final
hidden states without ever computing full logits, so the student module registers ``lm_head.weight`` as an external
parameter and applies the (pure) loss functions itself. The teacher's LM head is constant, so it is gathered once
into a plain tensor (``TeacherModule.head_weight``; V x H_t, about 330 MB in bf16 for a 13B teacher) instead.

Positions: LLaVA's hidden state at position i predicts token i+1, so every term below works on
``hidden[:, :-1]`` against ``labels[:, 1:]`` (supervised where the shifted label is not -100).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_pipeline.losses import FeatureProjector, alignment_loss, fused_token_kl, token_kl
from kd_pipeline.models import unwrap_model as unwrap_llava
from kd_pipeline.prompts import IGNORE_INDEX


def _is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def llava_hidden_and_features(llava: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward through vision tower, projector and LLM, without the LM head.

    Returns the final hidden states ``(B, L, H)`` and the projector outputs z(x) ``(N_img, T_img, H)`` (paper eq. 4;
    ``None`` for a text-only batch). ``image_outputs.pooler_output`` is where transformers 5 keeps z(x).
    """
    core = unwrap_llava(llava)
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None and pixel_values.shape[0] == 0:
        pixel_values = None
    output = core.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=pixel_values, use_cache=False)
    features = None
    if output.image_outputs is not None:
        features = torch.stack(list(output.image_outputs.pooler_output))  # (N_img, T_img, H)
    return output.last_hidden_state, features


class TeacherModule(nn.Module):
    """Frozen teacher: hidden states and projector features under ``no_grad``; its LM head gathered once."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.llava = llava
        self.llava.requires_grad_(False)
        self.head_weight: torch.Tensor | None = None

    def gather_head(self, vocab_size: int) -> None:
        """Keep a full, persistent copy of the first ``vocab_size`` LM-head rows (padding rows dropped)."""
        import deepspeed

        weight = unwrap_llava(self.llava).lm_head.weight
        with deepspeed.zero.GatheredParameters([weight], enabled=_is_zero3_param(weight)):
            self.head_weight = weight[:vocab_size].detach().clone()

    @torch.no_grad()
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return llava_hidden_and_features(self.llava, batch)


class StudentModule(nn.Module):
    """Trainable student plus the map P from its hidden size to the teacher's (identity when equal)."""

    def __init__(self, llava: nn.Module, teacher_hidden_size: int | None):
        super().__init__()
        self.llava = llava
        student_hidden_size = unwrap_llava(llava).config.text_config.hidden_size
        self.feature_map = FeatureProjector(student_hidden_size, teacher_hidden_size or student_hidden_size)
        head = unwrap_llava(llava).lm_head.weight
        if _is_zero3_param(head):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, head)

    @property
    def head_weight(self) -> torch.Tensor:
        return unwrap_llava(self.llava).lm_head.weight

    def forward(self, batch: dict, teacher_hidden: torch.Tensor | None = None,
                teacher_head: torch.Tensor | None = None, teacher_features: torch.Tensor | None = None, *,
                alpha_kd: float = 0.0, temperature: float = 1.0, align_weight: float = 0.0, fused: bool = True,
                chunk_size: int = 1024) -> dict[str, torch.Tensor]:
        """Stage-1 objective (paper eq. 1-5); with no teacher inputs it is plain supervised fine-tuning (``sft``).

        Returns ``loss`` and each term: ``ce``, and with a teacher ``kd`` (already times tau^2) and ``align``.
        """
        hidden, features = llava_hidden_and_features(self.llava, batch)  # (B, L, Hs), (N_img, T_img, Hs)
        targets = batch["labels"][:, 1:]  # (B, L-1)
        student_hidden = hidden[:, :-1]  # (B, L-1, Hs)
        supervised = targets != IGNORE_INDEX  # (B, L-1)
        count = supervised.sum().clamp(min=1)
        weight = self.head_weight
        terms: dict[str, torch.Tensor] = {}
        if teacher_hidden is None:
            logits = student_hidden[supervised].float() @ weight.float().T  # (N_sup, V)
            logprob = torch.log_softmax(logits, dim=-1).gather(-1, targets[supervised].unsqueeze(-1)).squeeze(-1)
            terms["ce"] = -logprob.sum() / count
            terms["loss"] = terms["ce"] + self._touch_unused(hidden, features)
            return terms

        teacher_rows = teacher_hidden[:, :-1][supervised]  # (N_sup, Ht)
        student_rows = student_hidden[supervised]  # (N_sup, Hs)
        row_targets = targets[supervised]  # (N_sup,)
        if fused:
            kl, target_logprob = fused_token_kl(student_rows, weight, teacher_rows, teacher_head, direction="forward",
                                                temperature=temperature, chunk_size=chunk_size, targets=row_targets)
        else:
            student_logits = student_rows.float() @ weight.float().T  # (N_sup, V)
            teacher_logits = teacher_rows.float() @ teacher_head.float().T  # (N_sup, Vt)
            kl = token_kl(student_logits, teacher_logits, direction="forward", temperature=temperature)
            target_logprob = torch.log_softmax(student_logits, -1).gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        terms["kd"] = temperature ** 2 * kl.sum() / count
        terms["ce"] = -target_logprob.sum() / count
        loss = alpha_kd * terms["kd"] + (1.0 - alpha_kd) * terms["ce"]
        if features is not None and teacher_features is not None:
            terms["align"] = alignment_loss(self.feature_map(features), teacher_features)
            loss = loss + align_weight * terms["align"]
        else:
            terms["align"] = hidden.new_zeros(())
        terms["loss"] = loss + self._touch_unused(hidden, features)
        return terms

    def _touch_unused(self, hidden: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """A text-only micro-batch never runs the projector (nor P), but ZeRO-3 reduces gradients per parameter
        across ranks and every rank must take part: run both on one zero row inside this forward (so ZeRO-3
        gathers them) and add 0 times the result, which gives them exact zero gradients. LLaVA's own trick."""
        if features is not None:
            return hidden.new_zeros(())
        core = unwrap_llava(self.llava)
        vision_width = core.config.vision_config.hidden_size
        dummy = core.model.multi_modal_projector(hidden.new_zeros(1, 1, vision_width))  # (1, 1, Hs)
        return self.feature_map(dummy).sum() * 0.0
