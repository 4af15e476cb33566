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


def _rollout(generator: torch.Generator) -> dict:
    """Two left-padded prompts (BOS, 16 image tokens, a question) with 5-token responses, the second ending after 3
    tokens (mask 0 after its EOS), and the per-token policy inputs stage 2 caches per round."""
    prompts = [[1] + [IMAGE] * IMAGE_TOKENS + torch.randint(3, 60, (length,), generator=generator).tolist()
               for length in (6, 4)]
    width = max(len(prompt) for prompt in prompts)
    response = torch.randint(3, 60, (2, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    input_ids = torch.tensor([[0] * (width - len(prompt)) + prompt for prompt in prompts])
    attention_mask = torch.cat([torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts]),
                                mask], dim=1)
    return {"input_ids": torch.cat([input_ids, response], dim=1), "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "pixel_values": torch.randn(2, 3, 56, 56, generator=generator), "response_tokens": response,
            "response_mask": mask, "old_logprob": -torch.rand(2, 5, generator=generator),
            "advantages": torch.randn(2, 5, generator=generator), "weights": torch.ones(2, 5)}


@pytest.mark.parametrize("long_term_weight", [0.0, 1.0])
def test_stage2_terms_add_up_and_a_zero_long_term_weight_leaves_single_step_and_alignment(long_term_weight):
    """What each stage-2 term adds (loss_*) sums to the loss; with minillm.long_term_weight=0 (arm E_ss) the loss
    and its gradient are exactly single-step reverse KL + alignment, computed here from full logits in fp64."""
    from kd_pipeline.engine.modules import PolicySettings
    from kd_pipeline.losses import alignment_loss

    torch.manual_seed(1)
    teacher = TeacherModule(build_model(ModelConfig(hidden_size=96, num_layers=3, intermediate_size=192),
                                        vocab_size=VOCAB, image_token_id=IMAGE, frozen=True))
    teacher.gather_head(VOCAB)
    rollout = _rollout(torch.Generator().manual_seed(2))
    length = rollout["response_tokens"].shape[1]
    teacher_hidden, teacher_features = teacher(rollout)
    rollout_teacher = TeacherOutputs(teacher_hidden[:, -length - 1:-1], teacher_features, teacher.head_weight)
    student = _student(96)
    policy = PolicySettings(clip_eps=0.2, single_step_weight=1.0, long_term_weight=long_term_weight, align_weight=0.7)
    terms = student.minillm_terms(rollout, rollout_teacher, None, None, policy, LossSettings(), 0.0)
    terms["loss"].backward()
    added = sum(float(value) for name, value in terms.items() if name.startswith("loss_"))
    assert float(terms["loss"].detach()) == pytest.approx(added, rel=1e-6)
    assert float(terms["loss_align"]) == pytest.approx(0.7 * float(terms["align"]), rel=1e-6)
    if long_term_weight:
        assert float(terms["loss_long_term"]) == pytest.approx(float(terms["pg_loss"]), rel=1e-6) != 0.0
        return
    grads = {name: param.grad.clone() for name, param in student.named_parameters() if param.grad is not None}

    reference = _student(96).double()  # same weights, fp64, plain full-logits path
    mask = rollout["response_mask"].bool()
    batch = {key: (value.double() if key == "pixel_values" else value) for key, value in rollout.items()}
    output = reference.llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                             output_hidden_states=True)
    student_logp = output.logits[:, -length - 1:-1].log_softmax(-1)  # (B, T, V)
    teacher_logp = (teacher_hidden[:, -length - 1:-1].double() @ teacher.head_weight.double().T).log_softmax(-1)
    reverse_kl = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)  # (B, T)
    image_features = reference.llava.model.get_image_features(pixel_values=batch["pixel_values"])
    image_features = image_features.pooler_output if hasattr(image_features, "pooler_output") else image_features
    if isinstance(image_features, (list, tuple)):
        image_features = torch.stack(list(image_features))
    mapped = reference.feature_map(image_features.reshape(2, IMAGE_TOKENS, -1))
    expected = reverse_kl[mask].mean() + 0.7 * alignment_loss(mapped, teacher_features.double())
    expected.backward()
    assert float(terms["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    for name, param in reference.named_parameters():
        if param.grad is not None and name in grads:
            torch.testing.assert_close(grads[name].double(), param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert "feature_map.proj.weight" in grads
