"""Stage 1 through the real entry point on 2 CPU ranks: partitioning, files, learning, exact resume, partial saves."""

import json
import re
import shutil

import pytest
import torch

from kd_pipeline.checkpoint import MARKER, find_resume_tag
from tests.engine.conftest import STAGE1_STEPS as STEPS
from tests.engine.launch import final_weights, metrics, train

pytestmark = pytest.mark.slow
# A Python warning raised in our own code ("kd_pipeline/....py:12: UserWarning: ..."), or a transformers config
# complaint caused by a config we build.
OWN_WARNING = re.compile(r"kd_pipeline/\S+\.py:\d+: \w*Warning.*|\[transformers\] Model config: .*")
STEP_FILES = {MARKER, "config.yaml", "trainer_state.json", "rank_00000.pt", "rank_00001.pt",
              "loader_train_rank00000.json", "loader_train_rank00001.json",
              "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
              "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


@pytest.fixture(scope="module")
def uninterrupted(stage1_run):
    return stage1_run


def test_teacher_partitioned_frozen_without_optimizer_state(uninterrupted):
    for rank in (0, 1):
        report = json.loads((uninterrupted / f"engine_rank{rank}.json").read_text())
        teacher, student = report["teacher"], report["student"]
        assert abs(teacher["local_numel"] - teacher["full_numel"] / 2) <= 0.01 * teacher["full_numel"]
        assert teacher["trainable_tensors"] == 0 and teacher["tensors_with_grad"] == 0
        assert teacher["optimizer_state_numel"] == 0
        assert student["local_numel"] < student["full_numel"] and student["optimizer_state_numel"] > 0


def test_metrics_and_checkpoint_layout(uninterrupted):
    lines = metrics(uninterrupted)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        assert {"step", "loss", "ce", "kd", "align", "lr", "tokens_per_s", "data_wait_frac", "step_time_s"} <= set(line)
        # Table 1's stage 1 by default: the alignment is measured (align > 0) but adds nothing, and what each term
        # adds is logged and sums to the loss
        assert line["loss_align"] == 0.0 and line["align"] > 0
        assert line["loss_ce"] == pytest.approx(0.5 * line["ce"], rel=1e-5)
        assert line["loss"] == pytest.approx(line["loss_ce"] + line["loss_kd"], rel=1e-5)
    assert {"val_loss", "val_ce", "val_kd", "val_align"} <= set(lines[1]) and "val_loss" in lines[3]
    assert lines[-1]["loss"] < lines[0]["loss"], "the student's loss must go down"
    checkpoints = uninterrupted / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {"latest", "best", "step_00000002", "step_00000004"}
    assert (checkpoints / "latest").read_text() == "step_00000004"
    best = min(lines[1::2], key=lambda line: line["val_loss"])
    assert (checkpoints / "best").read_text() == f"step_{best['step']:08d}"
    for tag in ("step_00000002", "step_00000004"):
        assert {p.name for p in (checkpoints / tag).iterdir()} == STEP_FILES
        state = json.loads((checkpoints / tag / "trainer_state.json").read_text())
        assert state["step"] == int(tag[-8:]) and state["world_size"] == 2 and state["zero_stage"] == 3
    assert (uninterrupted / "config.yaml").is_file() and any((uninterrupted / "tensorboard").iterdir())


def test_resume_gives_identical_losses_and_weights(uninterrupted, synth_data, tmp_path):
    stopped = train(synth_data, tmp_path, [*STEPS, "run.stop_at_step=2"], check=False)
    assert stopped.returncode != 0 and "exitcode: 75" in stopped.stderr  # torchrun relays a worker's 75 as 1
    status = json.loads((tmp_path / "run_status.json").read_text())
    assert (status["status"], status["step"], status["checkpoint"]) == ("stopped_early", 2, "step_00000002")
    # The same command again (stop_at_step still set, as a requeued job has it) stops once: it runs to the end.
    resumed = train(synth_data, tmp_path, [*STEPS, "run.stop_at_step=2"])
    assert json.loads((tmp_path / "run_status.json").read_text())["status"] == "finished"
    assert not OWN_WARNING.findall(resumed.stderr), OWN_WARNING.findall(resumed.stderr)
    expected, resumed = metrics(uninterrupted), metrics(tmp_path)
    assert [line["step"] for line in resumed] == [1, 2, 3, 4]
    for want, got in zip(expected, resumed):
        for key in ("loss", "ce", "kd", "align", "lr"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)
    want_weights = final_weights(uninterrupted / "checkpoints" / "step_00000004")
    got_weights = final_weights(tmp_path / "checkpoints" / "step_00000004")
    assert want_weights.keys() == got_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], rtol=0, atol=1e-6, msg=name)


def test_partial_save_is_never_picked_up(uninterrupted, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", checkpoints)
    # A save that died before its marker: a newer folder without COMPLETE.json, even if `latest` named it.
    shutil.copytree(checkpoints / "step_00000004", checkpoints / "step_00000006")
    (checkpoints / "step_00000006" / MARKER).unlink()
    assert find_resume_tag(checkpoints) == "step_00000004"
    (checkpoints / "latest").write_text("step_00000006")
    assert find_resume_tag(checkpoints) == "step_00000004"
    # A corrupted newest checkpoint (one flipped byte) is detected and the previous one used.
    shard = checkpoints / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert find_resume_tag(checkpoints) == "step_00000002"
