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


def assert_matches(got, want, *, tolerance: float, grad_fraction: float | None = None):
    """Loss terms within ``tolerance`` (relative and absolute). Gradients: every element within ``tolerance`` (the fp32
    comparison) or, given ``grad_fraction``, within that fraction of the gradient's largest element (bf16 keeps about
    3 significant digits, so element-wise relative checks would fail on its near-zero elements)."""
    got_terms, got_grads = got
    want_terms, want_grads = want
    assert got_terms.keys() == want_terms.keys() and got_grads.keys() == want_grads.keys()
    for name, value in want_terms.items():
        assert got_terms[name] == pytest.approx(value, rel=tolerance, abs=tolerance), name
    for name, grad in want_grads.items():
        grad, actual = grad.float().cpu(), got_grads[name].float().cpu()
        if grad_fraction is None:
            torch.testing.assert_close(actual, grad, rtol=tolerance, atol=tolerance, msg=name)
        else:
            error = (actual - grad).abs().max().item()
            assert error <= grad_fraction * grad.abs().max().item() + 1e-4, (name, error)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("stage", STAGES)
def test_fp32_losses_on_cuda_equal_the_cpu(exact_fp32, stage, layout):
    assert_matches(run(stage, "sdpa", torch.float32, "cuda", layout), run(stage, "sdpa", torch.float32, "cpu", layout),
                   tolerance=1e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_losses_on_cuda_are_the_fp32_cpu_losses_within_bf16_rounding(stage):
    """Weights rounded to bf16 and every activation in bf16 (as training runs): a sanity bound, not an fp32 one."""
    assert_matches(run(stage, "sdpa", torch.bfloat16, "cuda", "packed"),
                   run(stage, "sdpa", torch.float32, "cpu", "padded"), tolerance=3e-2, grad_fraction=0.1)


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("flash_attention_2", marks=needs_flash_attn)])
@pytest.mark.parametrize("stage", STAGES)
def test_packed_equals_padded_on_cuda_in_bf16(stage, attention):
    """Same bf16 weights and inputs: the layouts differ only in summation order and attention kernel."""
    assert_matches(run(stage, attention, torch.bfloat16, "cuda", "packed"),
                   run(stage, attention, torch.bfloat16, "cuda", "padded"), tolerance=1e-2, grad_fraction=0.03)
