"""Stage 2 (minillm) through the real entry point on 2 CPU ranks, initialised from a stage-1 run."""

import json

import pytest
import torch

from tests.engine.launch import final_weights, metrics, train

pytestmark = pytest.mark.slow
# A round = 4 rollouts per rank / 2 per micro-batch x 2 PPO epochs = 4 steps; checkpoints every 2 steps fall
# mid-round (steps 2 and 6), which is what exact resume must survive.
STEPS = ["train.eval_every=4", "checkpoint.every_steps=2", "train.lr=1e-3"]


def _stage2(synth_data, stage1_run, output_dir, *extra, check=True):
    return train(synth_data, output_dir, ["train.max_steps=8", f"run.init_from={stage1_run}", *STEPS, *extra],
                 config="tiny_cpu_stage2.yaml", check=check)


@pytest.fixture(scope="module")
def stage2_run(synth_data, stage1_run, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("stage2_full")
    _stage2(synth_data, stage1_run, output_dir)
    return output_dir


def test_equal_teacher_forwards_and_telemetry(stage2_run):
    counts = [json.loads((stage2_run / f"engine_rank{rank}.json").read_text())["teacher"]["forward_count"]
              for rank in (0, 1)]
    assert counts[0] == counts[1] > 0
    lines = metrics(stage2_run)
    assert [line["step"] for line in lines] == list(range(0, 9))
    for line in lines[1:]:
        assert {"loss", "pg_loss", "single_step_loss", "pt_loss", "align_loss", "reward", "len_mixed", "w_mean",
                "w_max", "clip_frac", "lr"} <= set(line)
        assert 0 < line["len_mixed"] <= 24 and line["w_max"] >= line["w_mean"] > 0
    for line in (lines[0], lines[4], lines[8]):
        assert {"val_loss", "rev_kl", "len_student"} <= set(line)


def test_reverse_kl_on_held_out_prompts_goes_down(stage2_run):
    lines = metrics(stage2_run)
    assert lines[8]["val_loss"] < lines[0]["val_loss"], [lines[i]["val_loss"] for i in (0, 4, 8)]


def test_mid_round_resume_gives_identical_losses(stage2_run, synth_data, stage1_run, tmp_path):
    stopped = _stage2(synth_data, stage1_run, tmp_path, "run.stop_at_step=6", check=False)
    assert stopped.returncode != 0 and "exitcode: 75" in stopped.stderr  # torchrun relays a worker's 75 as 1
    assert json.loads((tmp_path / "run_status.json").read_text())["status"] == "stopped_early"
    _stage2(synth_data, stage1_run, tmp_path)
    expected, resumed = metrics(stage2_run), metrics(tmp_path)
    assert [line["step"] for line in resumed] == [line["step"] for line in expected]
    for want, got in zip(expected, resumed):
        for key in ("loss", "pg_loss", "single_step_loss", "pt_loss", "align_loss", "reward", "val_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)


def test_init_from_loads_the_stage1_weights(synth_data, stage1_run, tmp_path):
    """With a zero learning rate, stage 2's first checkpoint holds exactly stage 1's best weights (P included):
    the weights must be loaded before ZeRO-3's optimizer takes its fp32 master copies."""
    train(synth_data, tmp_path, ["train.max_steps=1", "train.lr=0.0", f"run.init_from={stage1_run}",
                                 "train.eval_every=0", "checkpoint.every_steps=1"], config="tiny_cpu_stage2.yaml")
    best = (stage1_run / "checkpoints" / "best").read_text().strip()
    expected = final_weights(stage1_run / "checkpoints" / best)
    loaded = final_weights(tmp_path / "checkpoints" / "step_00000001")
    assert expected.keys() == loaded.keys() and any(key.startswith("feature_map.") for key in expected)
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=0, msg=name)
