"""token_kl / target_logprob / fused_token_kl / fused_kl_loss against an fp64 naive reference.

The reference is written here independently of the package: explicit max-shifted softmax, log and
sum in float64, with gradients from autograd on that explicit formula.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd_pipeline.losses import fused_kl_loss, fused_token_kl, target_logprob, token_kl

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.bfloat16: dict(atol=5e-3, rtol=5e-2),
}


def naive_log_softmax(logits):
    """fp64 log-softmax written out: log(exp(x - max) / sum exp(x - max))."""
    logits = logits.double()
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    exp = torch.exp(shifted)
    return torch.log(exp / exp.sum(dim=-1, keepdim=True))


def naive_kl(student_logits, teacher_logits, direction, temperature):
    vocab = student_logits.shape[-1]
    log_q = naive_log_softmax(student_logits.double() / temperature)
    log_p = naive_log_softmax(teacher_logits[..., :vocab].double() / temperature)
    if direction == "reverse":
        return (torch.exp(log_q) * (log_q - log_p)).sum(dim=-1)
    return (torch.exp(log_p) * (log_p - log_q)).sum(dim=-1)


def naive_logprob(student_logits, targets):
    log_q = naive_log_softmax(student_logits)
    picked = log_q.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets == -100, 0.0, picked)


def make_problem(num_tokens, student_hidden, teacher_hidden, vocab, teacher_vocab, dtype, seed=0):
    """Random hidden states and LM heads whose logits have std ~ 2.5 (peaked distributions)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    targets = torch.randint(0, vocab, (num_tokens,), generator=generator)
    targets[1::4] = -100
    mask = torch.ones(num_tokens, dtype=torch.bool)
    mask[2::5] = False
    return dict(
        student_hidden=randn(num_tokens, student_hidden),
        student_weight=randn(vocab, student_hidden, scale=2.5 / student_hidden**0.5),
        teacher_hidden=randn(num_tokens, teacher_hidden),
        teacher_weight=randn(teacher_vocab, teacher_hidden, scale=2.5 / teacher_hidden**0.5),
        targets=targets,
        mask=mask,
        grad_kl=torch.randn(num_tokens, generator=generator, dtype=torch.float64),
        grad_logprob=torch.randn(num_tokens, generator=generator, dtype=torch.float64),
    )


def naive_objective(problem, direction, temperature):
    """fp64 reference: per-token kl/logprob (0 where ignored) and grads of the weighted sum."""
    student_hidden = problem["student_hidden"].double().requires_grad_()
    student_weight = problem["student_weight"].double().requires_grad_()
    student_logits = student_hidden @ student_weight.T
    teacher_logits = problem["teacher_hidden"].double() @ problem["teacher_weight"].double().T
    valid = problem["mask"] & (problem["targets"] != -100)
    kl = torch.where(valid, naive_kl(student_logits, teacher_logits, direction, temperature), 0.0)
    logprob = torch.where(valid, naive_logprob(student_logits, problem["targets"]), 0.0)
    objective = (problem["grad_kl"] * kl).sum() + (problem["grad_logprob"] * logprob).sum()
    objective.backward()
    return kl.detach(), logprob.detach(), objective.detach(), student_hidden.grad, student_weight.grad


def leaf_inputs(problem):
    return (
        problem["student_hidden"].clone().requires_grad_(),
        problem["student_weight"].clone().requires_grad_(),
        problem["teacher_hidden"],
        problem["teacher_weight"],
    )


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype])


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_kl_matches_fp64_with_padded_teacher_vocab(direction, dtype):
    generator = torch.Generator().manual_seed(1)
    student_logits = (torch.randn(2, 5, 1003, generator=generator) * 3).to(dtype).requires_grad_()
    teacher_logits = (torch.randn(2, 5, 1011, generator=generator) * 3).to(dtype)
    upstream = torch.randn(2, 5, generator=generator)

    kl = token_kl(student_logits, teacher_logits, direction=direction, temperature=2.0)
    (kl * upstream).sum().backward()
    reference_logits = student_logits.detach().double().requires_grad_()
    expected = naive_kl(reference_logits, teacher_logits, direction, 2.0)
    (expected * upstream.double()).sum().backward()

    assert kl.dtype == torch.float32 and kl.shape == (2, 5)
    assert_close(kl, expected, dtype)
    assert_close(student_logits.grad, reference_logits.grad, dtype)


def test_target_logprob_matches_fp64_and_ignores_minus_100():
    generator = torch.Generator().manual_seed(2)
    student_logits = (torch.randn(3, 4, 1003, generator=generator) * 3).requires_grad_()
    targets = torch.randint(0, 1003, (3, 4), generator=generator)
    targets[0, :2] = -100
    logprob = target_logprob(student_logits, targets)
    logprob.sum().backward()
    reference_logits = student_logits.detach().double().requires_grad_()
    expected = naive_logprob(reference_logits, targets)
    expected.sum().backward()

    assert_close(logprob, expected, torch.float32)
    assert_close(student_logits.grad, reference_logits.grad, torch.float32)
    assert torch.all(logprob[0, :2] == 0) and torch.all(student_logits.grad[0, :2] == 0)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_fused_token_kl_matches_fp64(direction, dtype, temperature):
    """Padded teacher vocab, Hs != Ht, mask + ignored targets, arbitrary upstream gradients."""
    problem = make_problem(23, 16, 24, 1003, 1010, dtype)
    expected_kl, expected_logprob, _, expected_hidden_grad, expected_weight_grad = naive_objective(
        problem, direction, temperature
    )
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    out = fused_token_kl(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        direction=direction,
        temperature=temperature,
        chunk_size=4,
        targets=problem["targets"],
        mask=problem["mask"],
    )
    ((out.kl * problem["grad_kl"]).sum() + (out.target_logprob * problem["grad_logprob"]).sum()).backward()

    assert out.kl.dtype == torch.float32 and out.target_logprob.dtype == torch.float32
    assert_close(out.kl, expected_kl, dtype)
    assert_close(out.target_logprob, expected_logprob, dtype)
    assert student_hidden.grad.dtype == dtype and student_weight.grad.dtype == dtype
    assert_close(student_hidden.grad, expected_hidden_grad, dtype)
    assert_close(student_weight.grad, expected_weight_grad, dtype)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_fused_token_kl_large_odd_vocab(direction):
    problem = make_problem(5, 8, 12, 32003, 32064, torch.float32, seed=3)
    problem["mask"][:] = True
    problem["targets"][:] = torch.arange(5) * 6400
    expected_kl, expected_logprob, _, expected_hidden_grad, expected_weight_grad = naive_objective(
        problem, direction, 2.0
    )
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    out = fused_token_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight,
        direction=direction, temperature=2.0, chunk_size=2, targets=problem["targets"],
    )
    ((out.kl * problem["grad_kl"]).sum() + (out.target_logprob * problem["grad_logprob"]).sum()).backward()

    assert_close(out.kl, expected_kl, torch.float32)
    assert_close(out.target_logprob, expected_logprob, torch.float32)
    assert_close(student_hidden.grad, expected_hidden_grad, torch.float32)
    assert_close(student_weight.grad, expected_weight_grad, torch.float32)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_loss_matches_fp64_with_per_token_weights(direction, dtype):
    problem = make_problem(19, 12, 20, 1003, 1024, dtype, seed=4)
    expected_kl, expected_logprob, expected_loss, expected_hidden_grad, expected_weight_grad = (
        naive_objective(problem, direction, 1.5)
    )
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    out = fused_kl_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        direction=direction,
        temperature=1.5,
        chunk_size=5,
        targets=problem["targets"],
        mask=problem["mask"],
        kl_weights=problem["grad_kl"],
        logprob_weights=problem["grad_logprob"],
    )
    # an upstream factor other than 1 must scale the gradients stored by the forward
    (3.0 * out.loss).backward()

    assert not out.kl.requires_grad and not out.target_logprob.requires_grad
    assert_close(out.loss, expected_loss, dtype)
    assert_close(out.kl, expected_kl, dtype)
    assert_close(out.target_logprob, expected_logprob, dtype)
    assert_close(student_hidden.grad, 3.0 * expected_hidden_grad, dtype)
    assert_close(student_weight.grad, 3.0 * expected_weight_grad, dtype)


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_equals_unchunked(weighted):
    problem = make_problem(17, 8, 8, 1003, 1003, torch.float32, seed=5)
    results = []
    for chunk_size in (1, 3, 17):
        student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
        common = dict(direction="reverse", temperature=1.3, chunk_size=chunk_size,
                      targets=problem["targets"], mask=problem["mask"])
        if weighted:
            out = fused_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                kl_weights=problem["grad_kl"], logprob_weights=problem["grad_logprob"],
                                **common)
            out.loss.backward()
        else:
            out = fused_token_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, **common)
            ((out.kl * problem["grad_kl"]).sum() + (out.target_logprob * problem["grad_logprob"]).sum()).backward()
        results.append((out.kl, out.target_logprob, student_hidden.grad, student_weight.grad))
    for chunked in results[:-1]:
        for actual, expected in zip(chunked, results[-1]):
            assert_close(actual, expected, torch.float32)  # GEMM blocking may reorder sums


@pytest.mark.parametrize("ignore_by", ["mask", "targets"])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_gives_zero_and_zero_gradients(ignore_by, weighted):
    problem = make_problem(6, 8, 8, 1003, 1003, torch.float32, seed=6)
    targets = problem["targets"].clone()
    mask = torch.ones(6, dtype=torch.bool)
    if ignore_by == "mask":
        mask[:] = False
    else:
        targets[:] = -100
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    common = dict(direction="forward", temperature=2.0, targets=targets, mask=mask)
    if weighted:
        out = fused_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                            kl_weights=1.0, logprob_weights=-1.0, **common)
        loss = out.loss
    else:
        out = fused_token_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, **common)
        loss = out.kl.sum() - out.target_logprob.sum()
    loss.backward()

    assert loss.item() == 0.0
    assert torch.all(out.kl == 0) and torch.all(out.target_logprob == 0)
    assert torch.all(student_hidden.grad == 0) and torch.all(student_weight.grad == 0)


def test_ignored_rows_get_exactly_zero_gradient_and_batch_shape_is_kept():
    problem = make_problem(12, 8, 8, 1003, 1003, torch.float32, seed=7)
    student_hidden = problem["student_hidden"].reshape(3, 4, 8).clone().requires_grad_()
    mask = problem["mask"].reshape(3, 4)
    out = fused_token_kl(
        student_hidden, problem["student_weight"], problem["teacher_hidden"].reshape(3, 4, 8),
        problem["teacher_weight"], direction="reverse", mask=mask,
    )
    out.kl.sum().backward()

    assert out.kl.shape == (3, 4) and out.target_logprob is None
    assert torch.all(out.kl[~mask] == 0) and torch.all(out.kl[mask] > 0)
    assert torch.all(student_hidden.grad[~mask] == 0)
    assert torch.all(student_hidden.grad[mask].abs().sum(-1) > 0)


def test_frozen_student_head_gets_no_weight_gradient():
    problem = make_problem(7, 8, 8, 1003, 1003, torch.float32, seed=8)
    student_hidden = problem["student_hidden"].clone().requires_grad_()
    frozen_weight = problem["student_weight"]
    out = fused_token_kl(student_hidden, frozen_weight, problem["teacher_hidden"],
                         problem["teacher_weight"], direction="reverse")
    out.kl.sum().backward()
    expected_kl, _, _, expected_hidden_grad, _ = naive_objective(
        {**problem, "mask": torch.ones(7, dtype=torch.bool), "targets": torch.zeros(7, dtype=torch.long),
         "grad_kl": torch.ones(7, dtype=torch.float64), "grad_logprob": torch.zeros(7, dtype=torch.float64)},
        "reverse", 1.0,
    )
    assert frozen_weight.grad is None
    assert_close(student_hidden.grad, expected_hidden_grad, torch.float32)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for output in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(output, torch.Tensor):
                self.largest = max(self.largest, output.numel())
        return result


@pytest.mark.parametrize("weighted", [False, True])
def test_no_tokens_by_vocab_tensor_exists(weighted):
    num_tokens, hidden, vocab, chunk_size = 64, 8, 1003, 8
    problem = make_problem(num_tokens, hidden, hidden, vocab, vocab, torch.float32, seed=9)
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    with LargestTensor() as fused_mode:
        if weighted:
            fused_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                          direction="reverse", kl_weights=1.0, chunk_size=chunk_size).loss.backward()
        else:
            fused_token_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                           direction="reverse", chunk_size=chunk_size).kl.sum().backward()
    with LargestTensor() as plain_mode:
        token_kl(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T,
                 direction="reverse").sum().backward()

    # the largest fused tensors: one chunk of logits (chunk x V) and the weight gradient (V x H)
    assert fused_mode.largest <= max(chunk_size * vocab, vocab * hidden)
    assert plain_mode.largest >= num_tokens * vocab


def test_weighted_loss_under_no_grad_returns_values_only():
    problem = make_problem(9, 8, 8, 1003, 1003, torch.float32, seed=10)
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    with torch.no_grad():
        out = fused_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                            direction="forward", kl_weights=0.5)
    expected = naive_kl(problem["student_hidden"] @ problem["student_weight"].T,
                        problem["teacher_hidden"] @ problem["teacher_weight"].T, "forward", 1.0)
    assert not out.loss.requires_grad
    assert_close(out.loss, 0.5 * expected.sum(), torch.float32)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(teacher_weight=torch.zeros(1000, 8)), "teacher vocabulary"),
        (dict(direction="sideways"), "direction"),
        (dict(temperature=0.0), "temperature"),
        (dict(targets=torch.full((4,), 1003)), r"\[0, 1003\)"),
        (dict(mask=torch.ones(4)), "bool"),
        (dict(teacher_hidden=torch.zeros(5, 8)), "leading"),
        (dict(student_weight=torch.zeros(1003, 7)), "student weight"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_inputs_are_refused_with_a_message(change, message):
    inputs = dict(
        student_hidden=torch.zeros(4, 8), student_weight=torch.zeros(1003, 8),
        teacher_hidden=torch.zeros(4, 8), teacher_weight=torch.zeros(1003, 8), direction="reverse",
    )
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        fused_token_kl(
            inputs.pop("student_hidden"), inputs.pop("student_weight"),
            inputs.pop("teacher_hidden"), inputs.pop("teacher_weight"), **inputs,
        )


def test_importing_the_package_does_not_import_triton():
    code = (
        "import sys, kd_pipeline.losses\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'kd_pipeline.losses.triton_kl' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_weighted_loss_refuses_a_second_backward_instead_of_reusing_consumed_gradients():
    problem = make_problem(5, 8, 8, 1003, 1003, torch.float32, seed=11)
    student_hidden, student_weight, teacher_hidden, teacher_weight = leaf_inputs(problem)
    out = fused_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                        direction="reverse", kl_weights=1.0)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single"):
        out.loss.backward()
