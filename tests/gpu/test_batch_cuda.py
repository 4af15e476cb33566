"""One micro-batch's loss terms and gradients on CUDA against the CPU (fp32: to 1e-4; bf16, as training runs: within
bf16 rounding), and packed against padded on CUDA with sdpa and, when flash-attn is installed, flash_attention_2
(its varlen kernel on the one unpadded row of ``packing.forward_batch``)."""

import pytest
import torch
from transformers.utils import is_flash_attn_2_available

from kd_pipeline.data.collate import collate_packed, collate_right_padded
from kd_pipeline.recipes.common import to_device
from tests import batch_cases as cases

pytestmark = pytest.mark.gpu
STAGES = sorted(cases.KD_SETTINGS)
needs_flash_attn = pytest.mark.skipif(not is_flash_attn_2_available(),
                                      reason="flash-attn is not installed (pip install -e .[gpu])")


def batches(dtype: torch.dtype, device: str) -> dict:
    items = cases.micro_batch()
    return {"padded": to_device(collate_right_padded(items, pad_id=cases.PAD_ID, image_size=cases.IMAGE_SIZE),
                                torch.device(device), dtype),
            "packed": to_device(collate_packed(items, pad_id=cases.PAD_ID, image_size=cases.IMAGE_SIZE),
                                torch.device(device), dtype)}


def run(stage: str, attention: str, dtype: torch.dtype, device: str, layout: str):
    student, teacher = cases.student_and_teacher(stage, attention, dtype=dtype, device=device)
    return cases.loss_and_grads(student, teacher, batches(dtype, device)[layout], cases.KD_SETTINGS[stage])


def assert_same(got, want, *, tolerance: float):
    """Terms and every gradient element within ``tolerance`` (relative and absolute): the fp32 comparison."""
    got_terms, got_grads = got
    want_terms, want_grads = want
    assert got_terms.keys() == want_terms.keys() and got_grads.keys() == want_grads.keys()
    for name, value in want_terms.items():
        assert got_terms[name] == pytest.approx(value, rel=tolerance, abs=tolerance), name
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name].float().cpu(), grad.float().cpu(), rtol=tolerance,
                                   atol=tolerance, msg=name)


def assert_within_rounding(got, want, *, term_tolerance: float, grad_fraction: float):
    """Terms within ``term_tolerance``; each gradient within ``grad_fraction`` of its largest element (bf16 keeps
    about 3 significant digits, so element-wise relative checks would fail on the near-zero elements)."""
    got_terms, got_grads = got
    want_terms, want_grads = want
    assert got_terms.keys() == want_terms.keys() and got_grads.keys() == want_grads.keys()
    for name, value in want_terms.items():
        assert got_terms[name] == pytest.approx(value, rel=term_tolerance, abs=term_tolerance), name
    for name, grad in want_grads.items():
        grad = grad.float().cpu()
        error = (got_grads[name].float().cpu() - grad).abs().max().item()
        assert error <= grad_fraction * grad.abs().max().item() + 1e-4, (name, error)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("stage", STAGES)
def test_fp32_losses_on_cuda_equal_the_cpu(exact_fp32, stage, layout):
    assert_same(run(stage, "sdpa", torch.float32, "cuda", layout), run(stage, "sdpa", torch.float32, "cpu", layout),
                tolerance=1e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_losses_on_cuda_are_the_fp32_cpu_losses_within_bf16_rounding(stage):
    """Weights rounded to bf16 and every activation in bf16 (as training runs): a sanity bound, not an fp32 one."""
    assert_within_rounding(run(stage, "sdpa", torch.bfloat16, "cuda", "packed"),
                           run(stage, "sdpa", torch.float32, "cpu", "padded"), term_tolerance=3e-2, grad_fraction=0.1)


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("flash_attention_2", marks=needs_flash_attn)])
@pytest.mark.parametrize("stage", STAGES)
def test_packed_equals_padded_on_cuda_in_bf16(stage, attention):
    """Same bf16 weights and inputs: the layouts differ only in summation order and attention kernel."""
    assert_within_rounding(run(stage, attention, torch.bfloat16, "cuda", "packed"),
                           run(stage, attention, torch.bfloat16, "cuda", "padded"), term_tolerance=1e-2,
                           grad_fraction=0.03)
