"""The typed progress records and the rules when a resumed run's config disagrees with its checkpoint."""

import json
import logging

import pytest
import torch

from kd_pipeline.checkpoint import CheckpointError, TrainerState, load_trainer_state
from kd_pipeline.config import dump_config, load_config
from kd_pipeline.progress import RolloutProgress, check_resume

STAGE2 = ["run.stage=minillm", "run.init_from=runs/stage1"]


def _checkpoint(folder, overrides, *, stage=None, zero_stage=3):
    """A checkpoint folder as far as the rules read it: trainer_state.json and the resolved config.yaml."""
    config = load_config(None, overrides)
    folder.mkdir(parents=True, exist_ok=True)
    state = TrainerState(step=4, zero_stage=zero_stage, stage=stage or config.run.stage, rollout_round=1)
    (folder / "trainer_state.json").write_text(state.to_json())
    dump_config(config, folder / "config.yaml")
    return folder


def test_the_same_config_carries_everything_over(tmp_path):
    folder = _checkpoint(tmp_path / "step", STAGE2)
    check = check_resume(folder, load_config(None, [*STAGE2, "checkpoint.universal=never"]), zero_stage=3)
    assert not check.new_round and check.config_wins == {}  # checkpoint.universal is resolved per run


@pytest.mark.parametrize("saved_stage,stage_now", [("kd_sft", "minillm"), ("minillm", "kd_sft")])
def test_another_stage_is_refused(tmp_path, saved_stage, stage_now):
    folder = _checkpoint(tmp_path / "step", STAGE2, stage=saved_stage)
    now = load_config(None, [f"run.stage={stage_now}", "run.init_from=runs/stage1"])
    with pytest.raises(CheckpointError, match=f"run.stage={saved_stage} and this run is run.stage={stage_now}"):
        check_resume(folder, now, zero_stage=3)


def test_another_zero_stage_is_refused(tmp_path):
    folder = _checkpoint(tmp_path / "step", [], zero_stage=2)
    with pytest.raises(CheckpointError, match="ZeRO stage 2 shards .* stage 3"):
        check_resume(folder, load_config(None, []), zero_stage=3)


def test_another_student_shape_is_refused_by_key(tmp_path):
    folder = _checkpoint(tmp_path / "step", [])
    with pytest.raises(CheckpointError, match="student.hidden_size=64 there, 128 here"):
        check_resume(folder, load_config(None, ["student.hidden_size=128"]), zero_stage=3)


@pytest.mark.parametrize("change", ["minillm.rollouts_per_rank=16", "train.micro_batch_size=4",
                                    "minillm.ppo_epochs=2", "teacher.num_layers=4"])
def test_a_changed_round_layout_or_teacher_starts_a_new_round(tmp_path, caplog, change):
    folder = _checkpoint(tmp_path / "step", STAGE2)
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.progress"):
        check = check_resume(folder, load_config(None, [*STAGE2, change]), zero_stage=3)
    assert check.new_round and check.config_wins == {}
    assert change.split("=")[0] in caplog.text and "new round" in caplog.text


def test_other_changes_are_carried_over_with_the_config_winning(tmp_path):
    folder = _checkpoint(tmp_path / "step", [*STAGE2, "train.lr=1e-4"])
    check = check_resume(folder, load_config(None, [*STAGE2, "train.lr=2e-4", "train.max_steps=300"]), zero_stage=3)
    assert not check.new_round
    assert check.config_wins == {"train.lr": (1e-4, 2e-4), "train.max_steps": (100, 300)}
    # In stage 1 the round keys mean nothing: a changed micro-batch size is carried over, not a "new round".
    folder = _checkpoint(tmp_path / "stage1", [])
    check = check_resume(folder, load_config(None, ["train.micro_batch_size=4"]), zero_stage=3)
    assert not check.new_round and set(check.config_wins) == {"train.micro_batch_size"}


def test_trainer_state_round_trip_and_legacy_extra(tmp_path):
    state = TrainerState(step=7, best_val_loss=0.5, best_tag="step_00000006", world_size=2, stage="minillm",
                         rollout_round=3)
    (tmp_path / "trainer_state.json").write_text(state.to_json())
    assert load_trainer_state(tmp_path) == state
    legacy = {"step": 7, "world_size": 2, "stage": "minillm", "extra": {"round": 5}}
    (tmp_path / "trainer_state.json").write_text(json.dumps(legacy))
    assert load_trainer_state(tmp_path).rollout_round == 5


def _progress(seed: int) -> RolloutProgress:
    generator = torch.Generator().manual_seed(seed)
    generator.manual_seed(seed)
    return RolloutProgress(generator)


def test_rollout_progress_payload_round_trip(tmp_path):
    saved = _progress(1)
    torch.rand(3, generator=saved.generator)  # move the stream on
    saved.buffer = [{"input_ids": torch.arange(6).reshape(2, 3), "pixel_values": torch.ones(2, 3, 4, 4)}]
    saved.position, saved.round_stats = 3, {"reward": 0.25, "w_max": 2.0}
    torch.save({"rng": {}, "rollout": saved.payload()}, tmp_path / "rank_00000.pt")
    payload = torch.load(tmp_path / "rank_00000.pt", weights_only=True)["rollout"]

    restored = _progress(99)
    restored.restore(payload, torch.device("cpu"), new_round=False)
    assert torch.equal(torch.rand(4, generator=restored.generator), torch.rand(4, generator=saved.generator))
    assert restored.position == 3 and restored.round_stats == saved.round_stats
    assert torch.equal(restored.buffer[0]["input_ids"], saved.buffer[0]["input_ids"])

    dropped = _progress(99)
    dropped.restore(payload, torch.device("cpu"), new_round=True)
    assert dropped.buffer is None and dropped.position == 0 and dropped.round_stats == {}


def test_rollout_progress_reads_the_flat_legacy_rank_file():
    saved = _progress(2)
    legacy = {"rng": {}, "generator": saved.generator.get_state(), "buffer": None, "position": 0, "round_stats": {}}
    restored = _progress(3)
    restored.restore(legacy, torch.device("cpu"), new_round=False)
    assert torch.equal(restored.generator.get_state(), saved.generator.get_state()) and restored.buffer is None
