"""On CUDA: the fused KL (Triton kernels and the chunked torch path) against the fp64 references of
tests/losses/test_fused_kl.py, the row kernels against the torch row maths, and the fused losses in bf16 within the
tolerances those tests document for bf16 (atol 5e-3, rtol 5e-2)."""

import pytest
import torch

from kd_pipeline.losses import fused_kl_loss, fused_stage1_loss, fused_token_kl, row_maths, stage1_kd_terms
from tests.losses.test_fused_kl import TOLERANCES, make_problem, naive_objective

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
VOCABS = {"small": (1003, 1010), "llama": (32001, 32064)}  # V odd, padded teacher; 32001 spans 8 blocks of 4096


def on_cuda(problem: dict) -> dict:
    return {name: value.to(DEVICE) for name, value in problem.items()}


def leaves(problem: dict):
    return (problem["student_hidden"].clone().requires_grad_(), problem["student_weight"].clone().requires_grad_(),
            problem["teacher_hidden"], problem["teacher_weight"])


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.detach().double().cpu(), expected.double().cpu(), **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_fused_token_kl_on_cuda_matches_fp64(exact_fp32, backend, direction, temperature, vocab):
    problem = make_problem(23, 16, 24, *VOCABS[vocab], torch.float32)
    expected_kl, expected_logprob, _, expected_hidden_grad, expected_weight_grad = naive_objective(
        problem, direction, temperature)
    cuda = on_cuda(problem)
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaves(cuda)
    out = fused_token_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, direction=direction,
                         temperature=temperature, chunk_size=4, targets=cuda["targets"], mask=cuda["mask"],
                         backend=backend)
    ((out.kl * cuda["grad_kl"].float()).sum() + (out.target_logprob * cuda["grad_logprob"].float()).sum()).backward()
    assert out.kl.device.type == torch.device(DEVICE).type
    assert_close(out.kl, expected_kl, torch.float32)
    assert_close(out.target_logprob, expected_logprob, torch.float32)
    assert_close(student_hidden.grad, expected_hidden_grad, torch.float32)
    assert_close(student_weight.grad, expected_weight_grad, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_fused_kl_loss_on_cuda_matches_fp64(exact_fp32, backend, direction, vocab):
    problem = make_problem(19, 12, 20, *VOCABS[vocab], torch.float32, seed=4)
    expected_kl, expected_logprob, expected_loss, expected_hidden_grad, expected_weight_grad = naive_objective(
        problem, direction, 1.5)
    cuda = on_cuda(problem)
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaves(cuda)
    out = fused_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, direction=direction,
                        temperature=1.5, chunk_size=5, targets=cuda["targets"], mask=cuda["mask"],
                        kl_weights=cuda["grad_kl"].float(), logprob_weights=cuda["grad_logprob"].float(),
                        backend=backend)
    (3.0 * out.loss).backward()
    assert_close(out.loss, expected_loss, torch.float32)
    assert_close(out.kl, expected_kl, torch.float32)
    assert_close(out.target_logprob, expected_logprob, torch.float32)
    assert_close(student_hidden.grad, 3.0 * expected_hidden_grad, torch.float32)
    assert_close(student_weight.grad, 3.0 * expected_weight_grad, torch.float32)


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("with_targets", [True, False])
def test_triton_row_kernels_equal_the_torch_row_maths_on_cuda(reverse, with_targets):
    from kd_pipeline.losses import triton_kl

    generator = torch.Generator().manual_seed(3)
    rows, vocab = 7, 32001
    student = (torch.randn(rows, vocab, generator=generator) * 3).to(DEVICE)
    teacher = (torch.randn(rows, vocab, generator=generator) * 3).to(DEVICE)
    targets = torch.tensor([0, 4095, 4096, 16000, 31999, 32000, 7]).to(DEVICE) if with_targets else None
    grad_kl = torch.randn(rows, generator=generator).to(DEVICE)
    grad_logprob = torch.randn(rows, generator=generator).to(DEVICE) if with_targets else None
    expected = row_maths.row_stats(student, teacher, targets, reverse=reverse, temperature=1.3)
    got = triton_kl.row_stats(student.clone(), teacher.clone(), targets, reverse=reverse, temperature=1.3)
    for name, value in expected._asdict().items():
        if value is None:
            assert getattr(got, name) is None
        else:
            torch.testing.assert_close(getattr(got, name), value, atol=1e-5, rtol=5e-4, msg=name)
    expected_grad = row_maths.row_logit_grad(student.clone(), teacher.clone(), targets, expected, grad_kl,
                                             grad_logprob, reverse=reverse, temperature=1.3)
    got_grad = triton_kl.row_logit_grad(student.clone(), teacher.clone(), targets, got, grad_kl, grad_logprob,
                                        reverse=reverse, temperature=1.3)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=5e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_fused_losses_in_bf16_on_cuda_within_the_documented_tolerance(backend, direction):
    """bf16 hidden states and LM heads (what training feeds the loss head) against fp64 maths on the same values."""
    problem = make_problem(64, 64, 96, *VOCABS["llama"], torch.bfloat16, seed=7)
    expected_kl, expected_logprob, expected_loss, expected_hidden_grad, expected_weight_grad = naive_objective(
        problem, direction, 1.0)
    cuda = on_cuda(problem)
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaves(cuda)
    out = fused_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, direction=direction,
                        chunk_size=16, targets=cuda["targets"], mask=cuda["mask"],
                        kl_weights=cuda["grad_kl"].float(), logprob_weights=cuda["grad_logprob"].float(),
                        backend=backend)
    out.loss.backward()
    assert student_hidden.grad.dtype == torch.bfloat16 and student_weight.grad.dtype == torch.bfloat16
    assert_close(out.loss, expected_loss, torch.bfloat16)
    assert_close(out.kl, expected_kl, torch.bfloat16)
    assert_close(out.target_logprob, expected_logprob, torch.bfloat16)
    assert_close(student_hidden.grad, expected_hidden_grad, torch.bfloat16)
    assert_close(student_weight.grad, expected_weight_grad, torch.bfloat16)


def test_fused_stage1_loss_in_bf16_on_cuda_matches_the_fp32_plain_terms(exact_fp32):
    """Stage 1's default loss head (fused, bf16, Triton on CUDA) against ``stage1_kd_terms`` in fp32 on the same
    bf16 values: kd, ce and the mixed loss within the bf16 tolerance."""
    generator = torch.Generator().manual_seed(11)
    tokens, student_size, teacher_size, vocab = 96, 64, 96, 32001

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=DEVICE, dtype=torch.bfloat16)

    student_hidden = randn(tokens, student_size).requires_grad_()
    student_weight = randn(vocab, student_size, scale=2.5 / student_size ** 0.5).requires_grad_()
    teacher_hidden = randn(tokens, teacher_size)
    teacher_weight = randn(vocab + 63, teacher_size, scale=2.5 / teacher_size ** 0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(DEVICE)
    labels[::3] = -100
    fused = fused_stage1_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                              temperature=2.0, alpha_kd=0.5, chunk_size=32)
    fused["loss"].backward()

    reference_hidden = student_hidden.detach().float().requires_grad_()
    reference_weight = student_weight.detach().float().requires_grad_()
    terms = stage1_kd_terms(reference_hidden @ reference_weight.T, teacher_hidden.float() @ teacher_weight.float().T,
                            labels, temperature=2.0)
    (0.5 * terms["kd"] + 0.5 * terms["ce"]).backward()
    assert_close(fused["kd"], terms["kd"], torch.bfloat16)
    assert_close(fused["ce"], terms["ce"], torch.bfloat16)
    assert_close(fused["loss"], 0.5 * terms["kd"] + 0.5 * terms["ce"], torch.bfloat16)
    assert_close(student_hidden.grad, reference_hidden.grad, torch.bfloat16)
    assert_close(student_weight.grad, reference_weight.grad, torch.bfloat16)
