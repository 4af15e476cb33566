"""Stage-1 terms (word-level KD, CE, their mix), the alignment term and the projector P against
fp64 naive references written here."""

import pytest
import torch

from kd_pipeline.losses import (
    FeatureProjector,
    alignment_loss,
    combine_stage1,
    fused_stage1_loss,
    stage1_kd_terms,
)

FP32 = dict(atol=1e-5, rtol=5e-4)


def naive_softmax(logits):
    shifted = logits.double() - logits.double().max(dim=-1, keepdim=True).values
    return torch.exp(shifted) / torch.exp(shifted).sum(dim=-1, keepdim=True)


def naive_stage1(student_logits, teacher_logits, labels, temperature):
    """tau^2 * mean KL(p_T || p_S) and mean CE over labelled positions, by explicit loops over
    the supervised positions."""
    vocab = student_logits.shape[-1]
    kd_terms, ce_terms = [], []
    for batch, position in (labels != -100).nonzero().tolist():
        p_teacher = naive_softmax(teacher_logits[batch, position, :vocab] / temperature)
        p_student = naive_softmax(student_logits[batch, position] / temperature)
        kd_terms.append((p_teacher * torch.log(p_teacher / p_student)).sum())
        label = labels[batch, position]
        ce_terms.append(-torch.log(naive_softmax(student_logits[batch, position])[label]))
    if not kd_terms:
        return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    return temperature**2 * torch.stack(kd_terms).mean(), torch.stack(ce_terms).mean()


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, length, student_size, teacher_size, vocab, teacher_vocab = 2, 5, 8, 12, 1003, 1010
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :3] = -100  # prompt tokens
    labels[1, -1] = -100  # padding
    return dict(
        student_hidden=torch.randn(batch, length, student_size, generator=generator, dtype=torch.float64),
        student_weight=torch.randn(vocab, student_size, generator=generator, dtype=torch.float64) * 0.9,
        teacher_hidden=torch.randn(batch, length, teacher_size, generator=generator, dtype=torch.float64),
        teacher_weight=torch.randn(teacher_vocab, teacher_size, generator=generator, dtype=torch.float64) * 0.7,
        labels=labels,
    )


def test_stage1_kd_terms_match_fp64_with_tau_squared_and_masking():
    batch = make_batch()
    teacher_logits = batch["teacher_hidden"] @ batch["teacher_weight"].T  # (B, T, Vt)
    student_logits = (batch["student_hidden"] @ batch["student_weight"].T).float().requires_grad_()
    terms = stage1_kd_terms(student_logits, teacher_logits.float(), batch["labels"], temperature=2.0)
    (terms["kd"] + 2.0 * terms["ce"]).backward()

    reference_logits = student_logits.detach().double().requires_grad_()
    expected_kd, expected_ce = naive_stage1(reference_logits, teacher_logits, batch["labels"], 2.0)
    (expected_kd + 2.0 * expected_ce).backward()

    torch.testing.assert_close(terms["kd"].double(), expected_kd, **FP32)
    torch.testing.assert_close(terms["ce"].double(), expected_ce, **FP32)
    torch.testing.assert_close(student_logits.grad.double(), reference_logits.grad, **FP32)
    assert torch.all(student_logits.grad[batch["labels"] == -100] == 0)


def test_global_token_count_replaces_the_batch_count():
    batch = make_batch(seed=1)
    student_logits = (batch["student_hidden"] @ batch["student_weight"].T).float()
    teacher_logits = (batch["teacher_hidden"] @ batch["teacher_weight"].T).float()
    local = stage1_kd_terms(student_logits, teacher_logits, batch["labels"], temperature=1.5)
    supervised = int((batch["labels"] != -100).sum())
    scaled = stage1_kd_terms(
        student_logits, teacher_logits, batch["labels"], temperature=1.5, token_count=4 * supervised
    )
    torch.testing.assert_close(scaled["kd"], local["kd"] / 4)
    torch.testing.assert_close(scaled["ce"], local["ce"] / 4)


def test_all_ignored_batch_gives_zero_terms_and_zero_gradients():
    batch = make_batch(seed=2)
    labels = torch.full_like(batch["labels"], -100)
    student_logits = (batch["student_hidden"] @ batch["student_weight"].T).float().requires_grad_()
    teacher_logits = (batch["teacher_hidden"] @ batch["teacher_weight"].T).float()
    terms = stage1_kd_terms(student_logits, teacher_logits, labels, temperature=2.0)
    combine_stage1(terms["kd"], terms["ce"], 0.5).backward()
    assert terms["kd"].item() == 0.0 and terms["ce"].item() == 0.0
    assert torch.all(student_logits.grad == 0)

    student_hidden = batch["student_hidden"].float().requires_grad_()
    student_weight = batch["student_weight"].float().requires_grad_()
    fused = fused_stage1_loss(
        student_hidden, student_weight, batch["teacher_hidden"].float(),
        batch["teacher_weight"].float(), labels, temperature=2.0, alpha_kd=0.5,
    )
    fused["loss"].backward()
    assert fused["loss"].item() == 0.0 and fused["kd"].item() == 0.0 and fused["ce"].item() == 0.0
    assert torch.all(student_hidden.grad == 0) and torch.all(student_weight.grad == 0)


def test_combine_stage1_mixes_with_alpha_and_refuses_alpha_outside_unit_interval():
    kd, ce = torch.tensor(3.0), torch.tensor(5.0)
    assert combine_stage1(kd, ce, 0.25).item() == pytest.approx(0.25 * 3.0 + 0.75 * 5.0)
    assert combine_stage1(kd, ce, 1.0).item() == pytest.approx(3.0)
    assert combine_stage1(kd, ce, 0.0).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="alpha_kd"):
        combine_stage1(kd, ce, 1.5)


@pytest.mark.parametrize("alpha_kd", [0.3, 1.0])
def test_fused_stage1_loss_matches_fp64_mix_and_gradients(alpha_kd):
    batch = make_batch(seed=3)
    student_hidden = batch["student_hidden"].float().requires_grad_()
    student_weight = batch["student_weight"].float().requires_grad_()
    fused = fused_stage1_loss(
        student_hidden, student_weight, batch["teacher_hidden"].float(),
        batch["teacher_weight"].float(), batch["labels"], temperature=2.0, alpha_kd=alpha_kd,
        chunk_size=3,
    )
    fused["loss"].backward()

    reference_hidden = batch["student_hidden"].clone().requires_grad_()
    reference_weight = batch["student_weight"].clone().requires_grad_()
    expected_kd, expected_ce = naive_stage1(
        reference_hidden @ reference_weight.T,
        batch["teacher_hidden"] @ batch["teacher_weight"].T,
        batch["labels"],
        2.0,
    )
    expected_loss = alpha_kd * expected_kd + (1 - alpha_kd) * expected_ce
    expected_loss.backward()

    torch.testing.assert_close(fused["kd"].double(), expected_kd, **FP32)
    torch.testing.assert_close(fused["ce"].double(), expected_ce, **FP32)
    torch.testing.assert_close(fused["loss"].double(), expected_loss, **FP32)
    torch.testing.assert_close(student_hidden.grad.double(), reference_hidden.grad, **FP32)
    torch.testing.assert_close(student_weight.grad.double(), reference_weight.grad, **FP32)


def naive_alignment(student_features, teacher_features, mask):
    """1/2 x the mean squared error over the included tokens and every feature, element by element in fp64."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch, token in mask.nonzero().tolist():
        for feature in range(teacher_features.shape[-1]):
            difference = (teacher_features[batch, token, feature].double()
                          - student_features[batch, token, feature].double())
            total = total + 0.5 * difference * difference
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("use_mask", [False, True])
def test_alignment_loss_matches_fp64_and_leaves_teacher_constant(use_mask):
    generator = torch.Generator().manual_seed(4)
    student_features = torch.randn(2, 6, 12, generator=generator).requires_grad_()
    teacher_features = torch.randn(2, 6, 12, generator=generator).requires_grad_()
    mask = torch.rand(2, 6, generator=generator) > 0.4 if use_mask else torch.ones(2, 6, dtype=torch.bool)
    loss = alignment_loss(student_features, teacher_features, mask if use_mask else None)
    loss.backward()

    reference_student = student_features.detach().double().requires_grad_()
    expected = naive_alignment(reference_student, teacher_features.detach(), mask)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, **FP32)
    torch.testing.assert_close(student_features.grad.double(), reference_student.grad, **FP32)
    assert teacher_features.grad is None


def test_alignment_with_nothing_masked_in_is_zero_with_zero_gradient():
    student_features = torch.randn(1, 4, 6).requires_grad_()
    loss = alignment_loss(student_features, torch.randn(1, 4, 6), torch.zeros(1, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(student_features.grad == 0)


def test_alignment_is_a_mean_whose_value_does_not_grow_with_the_hidden_size():
    """The paper's mean squared error: features with the same per-element error give the same loss at H = 16 and
    at GeoChat-13B's 5120 (a sum over the hidden dimension, the first version's, grows 320-fold)."""
    generator = torch.Generator().manual_seed(7)
    losses = {}
    for hidden in (16, 5120):
        teacher_features = torch.randn(2, 3, hidden, generator=generator)
        error = torch.where(torch.rand(2, 3, hidden, generator=generator) < 0.5, -0.3, 0.3)  # |error| 0.3 everywhere
        losses[hidden] = alignment_loss(teacher_features + error, teacher_features).item()
    assert losses[16] == pytest.approx(0.5 * 0.3 ** 2, rel=1e-5)
    assert losses[5120] == pytest.approx(losses[16], rel=1e-5)


def test_projector_gradient_matches_closed_form():
    """d/dW 1/2 mean_{t,h} (z_T - W z_S)^2 = (W z_S - z_T) z_S^T / (tokens x Ht), in fp64."""
    generator = torch.Generator().manual_seed(5)
    projector = FeatureProjector(8, 12)
    student_features = torch.randn(2, 5, 8, generator=generator)
    teacher_features = torch.randn(2, 5, 12, generator=generator)
    alignment_loss(projector(student_features.to(torch.bfloat16)), teacher_features).backward()

    weight = projector.proj.weight.detach().double()  # (Ht, Hs)
    flat_student = student_features.to(torch.bfloat16).double().reshape(-1, 8)  # (B*N, Hs)
    residual = flat_student @ weight.T - teacher_features.double().reshape(-1, 12)  # (B*N, Ht)
    expected_grad = residual.T @ flat_student / (flat_student.shape[0] * 12)  # (Ht, Hs)
    assert projector.proj.bias is None
    torch.testing.assert_close(projector.proj.weight.grad.double(), expected_grad, **FP32)


def test_projector_is_identity_without_parameters_when_sizes_match():
    projector = FeatureProjector(16, 16)
    features = torch.randn(3, 16)
    assert list(projector.parameters()) == []
    assert torch.equal(projector(features), features)
    with pytest.raises(ValueError, match="H_s = 16"):
        projector(torch.randn(3, 8))
