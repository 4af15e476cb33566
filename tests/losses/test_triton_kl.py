"""The Triton kernels, run in Triton's CPU interpreter, equal the chunked torch path.

The kernels run in a child process (triton_interpreter_child.py) started with TRITON_INTERPRET=1,
because triton reads that variable when first imported and another module of the test session may
already have imported it. This process recomputes every case with the torch backend and compares.
"""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_pipeline.losses import fused_kl_loss, fused_token_kl, row_maths

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("triton_interpreter_child.py")
CASES = [
    f"{direction}|{temperature}|{targets}"
    for direction, temperature, targets in itertools.product(
        ("reverse", "forward"), (1.0, 1.7), ("targets", "none")
    )
]
FP32 = dict(atol=1e-5, rtol=5e-4)


def make_inputs():
    """Hs != Ht, padded teacher vocab, V not a power of two, mask and ignored targets."""
    generator = torch.Generator().manual_seed(0)
    num_tokens, student_size, teacher_size, vocab, teacher_vocab = 7, 8, 12, 1003, 1010
    targets = torch.randint(0, vocab, (num_tokens,), generator=generator)
    targets[3] = -100
    mask = torch.ones(num_tokens, dtype=torch.bool)
    mask[5] = False
    return {
        "student_hidden": torch.randn(num_tokens, student_size, generator=generator),
        "student_weight": torch.randn(vocab, student_size, generator=generator) * 0.9,
        "teacher_hidden": torch.randn(num_tokens, teacher_size, generator=generator),
        "teacher_weight": torch.randn(teacher_vocab, teacher_size, generator=generator) * 0.7,
        "targets": targets,
        "mask": mask,
        "grad_kl": torch.randn(num_tokens, generator=generator),
        "grad_logprob": torch.randn(num_tokens, generator=generator),
        "student_logits": torch.randn(3, vocab, generator=generator) * 3,
        "teacher_logits": torch.randn(3, vocab, generator=generator) * 3,
        "row_targets": torch.tensor([0, 500, vocab - 1]),
        "row_grad_kl": torch.randn(3, generator=generator),
        "row_grad_logprob": torch.randn(3, generator=generator),
    }


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(inputs, outputs of the Triton backend computed by the interpreter in a child process)."""
    folder = tmp_path_factory.mktemp("triton_interpreter")
    inputs = make_inputs()
    save_file(inputs, str(folder / "inputs.safetensors"))
    environment = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(CHILD), str(folder / "inputs.safetensors"), str(folder / "outputs.safetensors")],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"interpreter child failed:\n{result.stdout}\n{result.stderr}"
    return inputs, load_file(str(folder / "outputs.safetensors"))


def parse_case(case):
    direction, temperature, targets = case.split("|")
    return direction, float(temperature), targets == "targets"


@pytest.mark.parametrize("case", CASES)
def test_fused_token_kl_triton_equals_torch(interpreted, case):
    inputs, outputs = interpreted
    direction, temperature, use_targets = parse_case(case)
    student_hidden = inputs["student_hidden"].clone().requires_grad_()
    student_weight = inputs["student_weight"].clone().requires_grad_()
    out = fused_token_kl(
        student_hidden, student_weight, inputs["teacher_hidden"], inputs["teacher_weight"],
        direction=direction, temperature=temperature, chunk_size=3,
        targets=inputs["targets"] if use_targets else None, mask=inputs["mask"], backend="torch",
    )
    objective = (out.kl * inputs["grad_kl"]).sum()
    if use_targets:
        objective = objective + (out.target_logprob * inputs["grad_logprob"]).sum()
        torch.testing.assert_close(outputs[f"fused|{case}|target_logprob"], out.target_logprob.detach(), **FP32)
    objective.backward()
    torch.testing.assert_close(outputs[f"fused|{case}|kl"], out.kl.detach(), **FP32)
    torch.testing.assert_close(outputs[f"fused|{case}|hidden_grad"], student_hidden.grad, **FP32)
    torch.testing.assert_close(outputs[f"fused|{case}|weight_grad"], student_weight.grad, **FP32)


@pytest.mark.parametrize("case", CASES)
def test_fused_kl_loss_triton_equals_torch(interpreted, case):
    inputs, outputs = interpreted
    direction, temperature, use_targets = parse_case(case)
    student_hidden = inputs["student_hidden"].clone().requires_grad_()
    student_weight = inputs["student_weight"].clone().requires_grad_()
    out = fused_kl_loss(
        student_hidden, student_weight, inputs["teacher_hidden"], inputs["teacher_weight"],
        direction=direction, temperature=temperature, chunk_size=4,
        targets=inputs["targets"] if use_targets else None, mask=inputs["mask"],
        kl_weights=inputs["grad_kl"], logprob_weights=inputs["grad_logprob"] if use_targets else None,
        backend="torch",
    )
    out.loss.backward()
    torch.testing.assert_close(outputs[f"weighted|{case}|loss"], out.loss.detach().reshape(1), **FP32)
    torch.testing.assert_close(outputs[f"weighted|{case}|hidden_grad"], student_hidden.grad, **FP32)
    torch.testing.assert_close(outputs[f"weighted|{case}|weight_grad"], student_weight.grad, **FP32)


@pytest.mark.parametrize("case", CASES)
def test_row_kernels_over_several_vocab_blocks_equal_torch(interpreted, case):
    inputs, outputs = interpreted
    direction, temperature, use_targets = parse_case(case)
    row_targets = inputs["row_targets"] if use_targets else None
    stats = row_maths.row_stats(
        inputs["student_logits"], inputs["teacher_logits"], row_targets,
        reverse=direction == "reverse", temperature=temperature,
    )
    for name, expected in stats._asdict().items():
        if expected is None:
            assert f"rows|{case}|{name}" not in outputs
        else:
            torch.testing.assert_close(outputs[f"rows|{case}|{name}"], expected, **FP32)
    expected_grad = row_maths.row_logit_grad(
        inputs["student_logits"].clone(), inputs["teacher_logits"].clone(), row_targets, stats,
        inputs["row_grad_kl"], inputs["row_grad_logprob"] if use_targets else None,
        reverse=direction == "reverse", temperature=temperature,
    )
    torch.testing.assert_close(outputs[f"rows|{case}|logit_grad"], expected_grad, **FP32)
