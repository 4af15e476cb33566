"""The student's supervised terms (outside DeepSpeed) against independent computations: transformers' own loss for
``sft``, the plain stage-1 functions on full logits for ``kd_sft``, and the fused path against the plain one."""

import pytest
import torch

from kd_pipeline.config import ModelConfig
from kd_pipeline.engine.modules import LossSettings, StudentModule, TeacherModule, TeacherOutputs
from kd_pipeline.losses import stage1_kd_terms
from kd_pipeline.models import build_model
from kd_pipeline.prompts import IGNORE_INDEX

VOCAB, IMAGE = 64, 63
IMAGE_TOKENS = 16  # 56 px / patch 14 = 4 x 4


def _batch() -> dict:
    """Two right-padded samples: BOS, 16 image tokens, a question, and an answer of 4 and 9 supervised tokens."""
    generator = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for answer in (4, 9):
        question = torch.randint(3, 60, (5,), generator=generator).tolist()
        reply = torch.randint(3, 60, (answer,), generator=generator).tolist()
        ids = [1] + [IMAGE] * IMAGE_TOKENS + question + reply
        rows.append(ids)
        labels.append([IGNORE_INDEX] * (len(ids) - answer) + reply)
    width = max(len(row) for row in rows)
    return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
            "labels": torch.tensor([label + [IGNORE_INDEX] * (width - len(label)) for label in labels]),
            "pixel_values": torch.randn(2, 3, 56, 56, generator=generator)}


def _student(teacher_hidden: int | None) -> StudentModule:
    torch.manual_seed(0)
    return StudentModule(build_model(ModelConfig(), vocab_size=VOCAB, image_token_id=IMAGE), teacher_hidden)


def test_sft_cross_entropy_equals_transformers_loss():
    student, batch = _student(None), _batch()
    terms = student.supervised_terms(batch)
    reference = student.llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    torch.testing.assert_close(terms["ce"], reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], reference, rtol=1e-5, atol=1e-6)
    # A global count (as the training loop passes) replaces the batch's 13 supervised tokens as the denominator.
    halved = student.supervised_terms(batch, token_count=26.0)
    torch.testing.assert_close(halved["ce"], reference / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("token_count", [None, 39.0])
def test_stage1_fused_and_plain_paths_agree_with_the_reference(token_count):
    torch.manual_seed(1)
    teacher = TeacherModule(build_model(ModelConfig(hidden_size=96, num_layers=3, intermediate_size=192),
                                        vocab_size=VOCAB, image_token_id=IMAGE, frozen=True))
    teacher.gather_head(VOCAB)
    batch = _batch()
    hidden, features = teacher(batch)
    teacher_outputs = TeacherOutputs(hidden, features, teacher.head_weight)
    settings = LossSettings(alpha_kd=0.3, temperature=2.0, align_weight=0.5, fused=True, chunk_size=4)
    results = {}
    for fused in (True, False):
        student = _student(96)
        terms = student.supervised_terms(batch, teacher_outputs, LossSettings(**{**settings.__dict__, "fused": fused}),
                                         token_count=token_count)
        terms["loss"].backward()
        results[fused] = (terms, {name: param.grad.clone() for name, param in student.named_parameters()
                                  if param.grad is not None})
    (fused_terms, fused_grads), (plain_terms, plain_grads) = results[True], results[False]
    # Independent reference: full logits from each model's own LM head, labels shifted by hand.
    student = _student(96)
    student_logits = student.llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   pixel_values=batch["pixel_values"]).logits[:, :-1]  # (B, L-1, V)
    teacher_logits = hidden[:, :-1] @ teacher.head_weight.T  # (B, L-1, V)
    reference = stage1_kd_terms(student_logits, teacher_logits, batch["labels"][:, 1:], temperature=2.0,
                                token_count=token_count)
    for name in ("kd", "ce"):
        torch.testing.assert_close(fused_terms[name], reference[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain_terms[name], reference[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_terms["loss"], plain_terms["loss"], rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and "feature_map.proj.weight" in fused_grads
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
