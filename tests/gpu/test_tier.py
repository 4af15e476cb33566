"""The GPU tier's plumbing, on any machine: `pytest -m gpu` collects the tier and skips it with the reason where CUDA
is absent; neither tests/conftest.py nor the Makefile forces the CPU where CUDA (an NVIDIA GPU) is present."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip path, which only exists without CUDA")
def test_gpu_tier_is_collected_and_skipped_with_the_reason_without_cuda():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--strict-markers", "-rs",
                             "-p", "no:cacheprovider", "tests/gpu"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert skipped >= 40 and "passed" not in summary and "failed" not in summary, summary
    assert "needs a CUDA GPU (torch.cuda.is_available() is False here)" in result.stdout
    assert "test_tier" not in result.stdout  # this module's tests are not in the tier


@pytest.mark.parametrize("cuda", [False, True])
def test_conftest_sets_the_cpu_accelerator_only_without_cuda(cuda):
    probe = ("import torch; torch.cuda.is_available = lambda: {cuda}; import tests.conftest, os; "
             "print(os.environ.get('DS_ACCELERATOR', '<unset>'))").format(cuda=cuda)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == ("<unset>" if cuda else "cpu")


def make_accelerator(tmp_path: Path, nvidia_smi_exit: int | None, env: dict) -> str:
    """DS_ACCELERATOR as the Makefile exports it to its recipes, with a stand-in ``nvidia-smi`` on PATH (exiting
    with ``nvidia_smi_exit``) or none at all."""
    path = os.environ["PATH"]
    if nvidia_smi_exit is not None:
        fake = tmp_path / "bin"
        fake.mkdir(parents=True)
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA H200'\nexit {nvidia_smi_exit}\n")
        (fake / "nvidia-smi").chmod(0o755)
        path = f"{fake}:{path}"
    else:
        path = ":".join(part for part in path.split(":") if not (Path(part) / "nvidia-smi").exists())
    result = subprocess.run(["make", "-s", "--eval", 'print-accelerator: ; @echo "[$$DS_ACCELERATOR]"',
                             "print-accelerator"], cwd=ROOT, env={**env, "PATH": path}, capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_makefile_leaves_the_accelerator_alone_where_a_gpu_is_visible(tmp_path):
    assert make_accelerator(tmp_path, 0, CLEAN_ENV) == "[]"


@pytest.mark.parametrize("nvidia_smi_exit", [None, 9])
def test_makefile_picks_the_cpu_without_a_gpu(tmp_path, nvidia_smi_exit):
    assert make_accelerator(tmp_path, nvidia_smi_exit, CLEAN_ENV) == "[cpu]"


def test_makefile_keeps_an_accelerator_the_user_chose(tmp_path):
    assert make_accelerator(tmp_path, 9, {**CLEAN_ENV, "DS_ACCELERATOR": "cuda"}) == "[cuda]"
    assert make_accelerator(tmp_path / "gpu", 0, {**CLEAN_ENV, "DS_ACCELERATOR": "cpu"}) == "[cpu]"
