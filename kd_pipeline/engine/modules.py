"""The two modules DeepSpeed wraps: the trainable student (LLaVA + the feature map P) and the frozen teacher.

Why the loss is computed inside ``StudentModule.forward``: under ZeRO-3 a parameter is materialised only while a
module that owns (or registered) it runs its forward. The fused KL kernel needs the LM-head weight next to the final
hidden states without ever computing full logits, so the student module registers ``lm_head.weight`` as an external
parameter and applies the (pure) loss functions itself. The teacher's LM head is constant, so it is gathered once
into a plain tensor (``TeacherModule.head_weight``; V x H_t, about 330 MB in bf16 for a 13B teacher) instead.

Positions: LLaVA's hidden state at position i predicts token i+1, so the supervised terms work on
``hidden[:, :-1]`` against ``labels[:, 1:]`` (supervised where the shifted label is not -100), and the policy terms
on ``hidden[:, P-1:-1]`` against the T response tokens that follow a (left-padded) prompt of length P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kd_pipeline.losses import (FeatureProjector, alignment_loss, combine_stage1, fused_stage1_loss, fused_token_kl,
                                stage1_kd_terms, token_mean_ce)
from kd_pipeline.models import hidden_and_features
from kd_pipeline.models import unwrap_model as unwrap_llava
from kd_pipeline.prompts import IGNORE_INDEX


def _is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@dataclass
class TeacherOutputs:
    hidden: torch.Tensor                 # (B, L, Ht) final hidden states (or the slice a loss needs)
    features: torch.Tensor | None        # (N_img, T_img, Ht) projector outputs z_T(x); N_img may be 0
    head_weight: torch.Tensor            # (V, Ht) LM head, padding rows dropped


class TeacherModule(nn.Module):
    """Frozen teacher: hidden states and projector features under ``no_grad``; its LM head gathered once."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.llava = llava
        self.llava.requires_grad_(False)
        self.head_weight: torch.Tensor | None = None
        self.forward_count = 0  # ZeRO-3 gathers are collective: every rank must run the same number of forwards

    def gather_head(self, vocab_size: int) -> None:
        """Keep a full, persistent copy of the first ``vocab_size`` LM-head rows (padding rows dropped)."""
        import deepspeed

        weight = unwrap_llava(self.llava).lm_head.weight
        with deepspeed.zero.GatheredParameters([weight], enabled=_is_zero3_param(weight)):
            self.head_weight = weight[:vocab_size].detach().clone()

    @torch.no_grad()
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, features); a plain tuple so ZeRO-3's hooks can see the tensors (see ``run_teacher``)."""
        self.forward_count += 1
        return hidden_and_features(self.llava, batch)


def run_teacher(teacher_engine, batch: dict) -> TeacherOutputs:
    """The teacher engine's forward (collective under ZeRO-3) with its gathered LM head."""
    hidden, features = teacher_engine(batch)
    return TeacherOutputs(hidden, features, teacher_engine.module.head_weight)


@dataclass
class LossSettings:
    """The knobs of one supervised objective: stage 1 (alpha_kd, tau, lambda_align) or stage 2's PT loss
    (alpha_kd = kd_ratio, tau = 1, no alignment)."""
    alpha_kd: float = 0.0
    temperature: float = 1.0
    align_weight: float = 0.0
    fused: bool = True
    chunk_size: int | None = None  # tokens per fused-KL chunk; None picks the tuned default


@dataclass
class PolicySettings:
    """Stage-2 policy-gradient knobs (paper eq. 6-10, MiniLLM's code)."""
    clip_eps: float = 0.2
    single_step_weight: float = 1.0
    long_term_weight: float = 1.0  # 0: single-step only (no PPO term)
    align_weight: float = 0.0
    chunk_size: int | None = None


class StudentModule(nn.Module):
    """Trainable student plus the map P from its hidden size to the teacher's (identity when equal).

    ``forward(mode="supervised", ...)``: sft (no teacher) or stage 1 (teacher tensors given);
    ``forward(mode="minillm", ...)``: stage 2's policy terms on a rollout batch plus the PT loss on a D_PT batch,
    in ONE forward so DeepSpeed sees one forward and one backward per micro-batch.
    """

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

    def forward(self, mode: str = "supervised", **inputs) -> dict[str, torch.Tensor]:
        if mode == "supervised":
            return self.supervised_terms(**inputs)
        if mode == "minillm":
            return self.minillm_terms(**inputs)
        raise ValueError(f"unknown StudentModule mode {mode!r}")

    def supervised_terms(self, batch: dict, teacher: TeacherOutputs | None = None,
                         settings: LossSettings = LossSettings(),
                         token_count: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        """Stage-1 objective (paper eq. 1-5); with no teacher it is plain supervised fine-tuning (``sft``).

        ``token_count`` divides the token sums of ``ce`` and ``kd`` (default: this batch's supervised tokens; the
        training loop passes the step's global count, see ``losses/stage1.py``). Returns ``loss`` and each term:
        ``ce``, and with a teacher ``kd`` (already times tau^2) and ``align``, and what each adds to ``loss``
        (``loss_ce`` = (1 - alpha_kd) ce, ``loss_kd`` = alpha_kd kd, ``loss_align`` = lambda align; they sum to it).
        """
        hidden, features = hidden_and_features(self.llava, batch)  # (B, L, Hs), (N_img, T_img, Hs)
        targets = batch["labels"][:, 1:]  # (B, L-1)
        supervised = targets != IGNORE_INDEX  # (B, L-1)
        count = supervised.sum().clamp(min=1) if token_count is None else token_count
        student_rows = hidden[:, :-1][supervised]  # (N_sup, Hs)
        row_targets = targets[supervised]  # (N_sup,)
        if teacher is None:
            ce = token_mean_ce(student_rows.float() @ self.head_weight.float().T, row_targets, token_count=count)
            return {"ce": ce, "loss": ce + features.sum() * 0.0}  # text-only batch: zero projector gradients
        teacher_rows = teacher.hidden[:, :-1][supervised]  # (N_sup, Ht)
        if settings.fused:
            # Per-token weights are known here (alpha tau^2 / count on KL, -(1 - alpha) / count on log q), so the
            # fused loss forms the gradients inside its forward: no logits recomputation in backward.
            terms = fused_stage1_loss(student_rows, self.head_weight, teacher_rows, teacher.head_weight, row_targets,
                                      temperature=settings.temperature, alpha_kd=settings.alpha_kd,
                                      token_count=count, chunk_size=settings.chunk_size)
        else:
            terms = stage1_kd_terms(student_rows.float() @ self.head_weight.float().T,  # (N_sup, V)
                                    teacher_rows.float() @ teacher.head_weight.float().T,  # (N_sup, Vt)
                                    row_targets, temperature=settings.temperature, token_count=count)
            terms["loss"] = combine_stage1(terms["kd"], terms["ce"], settings.alpha_kd)
        terms["align"], terms["loss"] = self._add_alignment(terms["loss"], features, teacher.features,
                                                            settings.align_weight)
        terms.update(loss_ce=(1.0 - settings.alpha_kd) * terms["ce"].detach(),
                     loss_kd=settings.alpha_kd * terms["kd"].detach(),
                     loss_align=settings.align_weight * terms["align"].detach())
        return terms

    def minillm_terms(self, rollout: dict, rollout_teacher: TeacherOutputs, pt_batch: dict | None,
                      pt_teacher: TeacherOutputs | None, policy: PolicySettings,
                      pt_settings: LossSettings, pt_weight: float) -> dict[str, torch.Tensor]:
        """Stage 2 on one micro-batch (paper eq. 10): long_term_weight x PPO-clipped long-term term +
        single_step_weight x single-step reverse KL + pt_weight x PT loss (only when ``pt_batch`` is given) +
        align_weight x alignment (the mean squared error of the projector features on the rollout prompts).

        ``rollout`` holds the prompt+response sequences (``input_ids``/``attention_mask``/``position_ids``
        (B, P+T), ``pixel_values``) and per response token (B, T): ``response_mask``, ``old_logprob``,
        ``advantages``, ``weights``. ``rollout_teacher.hidden`` is the teacher's (B, T, Ht) at the positions that
        predict the response tokens (cached once per rollout round). Returns ``loss``, ``pg_loss``,
        ``single_step_loss``, ``align``, ``clip_frac`` (detached) and, with a PT batch, ``pt_loss``; and what each
        term adds to ``loss`` (``loss_long_term``, ``loss_single_step``, ``loss_align``, ``loss_pt``: weight x term,
        summing to ``loss``).
        """
        from kd_pipeline.losses.minillm import policy_gradient_loss, policy_loss_share, single_step_loss

        hidden, features = hidden_and_features(self.llava, rollout)  # (B, P+T, Hs)
        response = rollout["response_tokens"]  # (B, T)
        mask = rollout["response_mask"].bool()  # (B, T)
        prompt_length = rollout["input_ids"].shape[1] - response.shape[1]
        student_hidden = hidden[:, prompt_length - 1:-1]  # (B, T, Hs): position P-1+t predicts response token t
        # the share lets the fused head form this loss's gradient in its forward (no logits recompute in backward)
        share = policy_loss_share(rollout["old_logprob"], rollout["advantages"], rollout["weights"], mask,
                                  clip_eps=policy.clip_eps, single_step_weight=policy.single_step_weight,
                                  long_term_weight=policy.long_term_weight)
        reverse_kl, logprob_new = fused_token_kl(
            student_hidden, self.head_weight, rollout_teacher.hidden, rollout_teacher.head_weight,
            direction="reverse", chunk_size=policy.chunk_size, targets=response.masked_fill(~mask, IGNORE_INDEX),
            loss_share=share)
        pg_loss, clip_frac = policy_gradient_loss(logprob_new, rollout["old_logprob"], rollout["advantages"],
                                                  rollout["weights"], mask, clip_eps=policy.clip_eps)
        single = single_step_loss(reverse_kl, mask)
        loss = policy.long_term_weight * pg_loss + policy.single_step_weight * single
        align, loss = self._add_alignment(loss, features, rollout_teacher.features, policy.align_weight)
        terms = {"pg_loss": pg_loss, "single_step_loss": single, "align": align, "clip_frac": clip_frac,
                 "loss_long_term": policy.long_term_weight * pg_loss.detach(),
                 "loss_single_step": policy.single_step_weight * single.detach(),
                 "loss_align": policy.align_weight * align.detach()}
        if pt_batch is not None:
            # supervised_terms with alpha_kd = kd_ratio and tau = 1 is exactly (1 - kd_ratio) LM + kd_ratio KD
            # (MiniLLM's PT loss); its "loss" carries the gradient (the fused path returns kd/ce detached).
            terms["pt_loss"] = self.supervised_terms(pt_batch, pt_teacher, pt_settings)["loss"]
            terms["loss_pt"] = pt_weight * terms["pt_loss"].detach()
            loss = loss + pt_weight * terms["pt_loss"]
        terms["loss"] = loss
        return terms

    def _add_alignment(self, loss: torch.Tensor, features: torch.Tensor, teacher_features: torch.Tensor | None,
                       align_weight: float):
        """Add lambda_align x the alignment's mean squared error. With no image rows (a text-only batch) P still
        runs on the empty features and 0 x its output is added: ZeRO-3 reduces gradients per parameter across ranks,
        so every rank's P (and projector) must take part, here with exact zero gradients."""
        mapped = self.feature_map(features)  # (N_img, T_img, Ht)
        if features.shape[0] and teacher_features is not None and teacher_features.shape[0]:
            align = alignment_loss(mapped, teacher_features)
            return align, loss + align_weight * align
        return mapped.new_zeros(()), loss + mapped.sum() * 0.0
