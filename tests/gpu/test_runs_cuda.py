"""Stage 1 and stage 2 on one GPU through the real entry point (torchrun, nccl, ZeRO-3, bf16), tiny models, packed
batches (the default), with sdpa and, when flash-attn is installed, flash_attention_2."""

import json
import math

import pytest
from transformers.utils import is_flash_attn_2_available

from tests.engine.launch import metrics, train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
ATTENTIONS = ["sdpa", pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    not is_flash_attn_2_available(), reason="flash-attn is not installed (pip install -e .[gpu])"))]
ON_GPU = {"DS_ACCELERATOR": "cuda"}  # tests/engine/launch.py asks for the CPU by default


def attention_overrides(attention: str) -> list[str]:
    return [f"student.attn_implementation={attention}", f"teacher.attn_implementation={attention}"]


def assert_finite(lines: list[dict]) -> None:
    for line in lines:
        for key, value in line.items():
            if isinstance(value, float):
                assert math.isfinite(value), (line["step"], key, value)


@pytest.fixture(scope="module", params=ATTENTIONS)
def stage1_on_gpu(request, synth_data, tmp_path_factory):
    """(attention, output folder, the finished process) of a 4-step stage-1 run on one GPU."""
    output_dir = tmp_path_factory.mktemp(f"stage1_cuda_{request.param}")
    result = train(synth_data, output_dir, ["train.max_steps=4", "train.eval_every=2", "checkpoint.every_steps=2",
                                            "train.lr=3e-3", *attention_overrides(request.param)],
                   nproc=1, env=ON_GPU, timeout=600)
    return request.param, output_dir, result


def test_stage1_trains_on_one_gpu_in_bf16(stage1_on_gpu):
    attention, output_dir, result = stage1_on_gpu
    assert "torch.bfloat16" in result.stderr and f"attention backend: {attention}" in result.stderr
    lines = metrics(output_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert_finite(lines)
    assert {"loss", "ce", "kd", "align", "val_loss"} <= set(lines[-1])
    assert lines[-1]["loss"] < lines[0]["loss"], "the student's loss must go down"
    checkpoints = output_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    state = json.loads((checkpoints / "step_00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == 4


def test_stage2_trains_on_one_gpu_from_the_stage1_run(stage1_on_gpu, synth_data, tmp_path):
    attention, stage1_dir, _ = stage1_on_gpu
    result = train(synth_data, tmp_path, ["train.max_steps=4", f"run.init_from={stage1_dir}", "train.eval_every=4",
                                          "checkpoint.every_steps=4", *attention_overrides(attention)],
                   config="tiny_cpu_stage2.yaml", nproc=1, env=ON_GPU, timeout=600)
    assert "torch.bfloat16" in result.stderr
    lines = metrics(tmp_path)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    assert_finite(lines)
    for line in lines[1:]:
        assert {"loss", "pg_loss", "single_step_loss", "pt_loss", "reward", "len_mixed"} <= set(line)
    validation = {"val_loss", "val_rev_kl_seq", "val_len_student"}
    assert validation <= set(lines[0]) and validation <= set(lines[4])
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
