"""Fixtures of the GPU tier (every test here is marked ``gpu``; tests/conftest.py skips them without CUDA)."""

import pytest
import torch


@pytest.fixture
def exact_fp32():
    """fp32 GEMMs and convolutions in full fp32 (no TF32) for the duration of a test, so CUDA results can be held to
    fp32 tolerances; the previous settings come back afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
