"""Stage 2 (minillm) through the real entry point on 2 CPU ranks, initialised from a stage-1 run."""

import json

import pytest
import torch

from kd_pipeline.engine.metrics import METRICS
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
        assert {"loss", "pg_loss", "single_step_loss", "pt_loss", "align", "reward", "len_mixed", "w_mean",
                "w_max", "clip_frac", "rev_kl", "lr", "tokens_per_s", "data_wait_frac", "step_time_s"} <= set(line)
        assert 0 < line["len_mixed"] <= 24 and line["w_max"] >= line["w_mean"] > 0
        # what each term adds, weight x term, sums to the loss; delta_align is on with weight 1 (eq. 10)
        assert line["loss_align"] == pytest.approx(line["align"]) and line["align"] > 0
        assert line["loss"] == pytest.approx(sum(line[f"loss_{term}"] for term in
                                                 ("long_term", "single_step", "align", "pt")), rel=1e-5, abs=1e-7)
        assert line["rev_kl"] > 0 and 0 <= line["clip_frac"] <= 1
    validation = [lines[0], lines[4], lines[8]]
    for line in validation:
        assert {"val_loss", "val_rev_kl_seq", "val_len_student"} <= set(line)
        # val_loss is per answer TOKEN: the per-answer sum is it times the mean answer length.
        assert 0 < line["val_len_student"] <= 24
        assert line["val_rev_kl_seq"] == pytest.approx(line["val_loss"] * line["val_len_student"], rel=1e-5)
    best = min(validation[1:], key=lambda line: line["val_loss"])
    assert (stage2_run / "checkpoints" / "best").read_text() == f"step_{best['step']:08d}"


def test_both_stages_log_one_vocabulary(stage1_run, stage2_run):
    """Every key is in the vocabulary for its stage, and every term a stage has is on every line of that stage (the
    validation terms on validation lines): the same names for the same terms in stage 1 and stage 2."""
    for run, stage in ((stage1_run, "kd_sft"), (stage2_run, "minillm")):
        expected = {name for name, metric in METRICS.items() if stage in metric.stages}
        for line in metrics(run):
            keys = set(line) - {"step"}
            assert keys <= expected, (stage, keys - expected)
            validation = {name for name in expected if name.startswith("val_")}
            if line["step"] > 0:
                assert keys - validation == expected - validation, (stage, line["step"])
            if "val_loss" in line:
                assert validation <= keys, (stage, line["step"])
    shared = {name for name, metric in METRICS.items() if {"kd_sft", "minillm"} <= set(metric.stages.split(", "))}
    assert {"loss", "align", "lr", "tokens_per_s", "data_wait_frac", "step_time_s", "val_loss"} <= shared


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
        for key in ("loss", "pg_loss", "single_step_loss", "pt_loss", "align", "reward", "val_loss"):
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


# MiniLLM's ratios at micro scale: 4 x 8 x 2 ranks = 64 sequences per optimizer step, 4 PPO epochs, warm-up. A round
# is 12 rollouts / 4 = 3 micro-batches x 4 epochs = 12 micro-batches and a step 8: step 1 ends mid-round, step 2
# spans the end of round 0 and the start of round 1 (the next buffer is collected between two of its micro-batches).
# Validation at the last step only (train.eval_every=0 would turn it off entirely).
MINILLM_RATIOS = ["train.max_steps=3", "train.micro_batch_size=4", "train.grad_accum=8", "train.lr=1e-4",
                  "train.warmup_steps=2", "minillm.rollouts_per_rank=12", "minillm.ppo_epochs=4",
                  "minillm.max_new_tokens=12", "train.eval_every=3", "checkpoint.every_steps=1"]


def test_steps_spanning_rounds_at_minillm_ratios_resume_exactly(synth_data, stage1_run, tmp_path):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    _stage2(synth_data, stage1_run, uninterrupted, *MINILLM_RATIOS)
    stopped = _stage2(synth_data, stage1_run, resumed, *MINILLM_RATIOS, "run.stop_at_step=1", check=False)
    assert stopped.returncode != 0 and "exitcode: 75" in stopped.stderr
    _stage2(synth_data, stage1_run, resumed, *MINILLM_RATIOS)
    # Step 0 is the starting reverse KL, logged once before training (validation is on).
    expected, got = ([line for line in metrics(run) if line["step"] > 0] for run in (uninterrupted, resumed))
    assert [line["step"] for line in got] == [line["step"] for line in expected] == [1, 2, 3]
    assert expected[0]["lr"] < expected[1]["lr"], "warm-up"
    for want, line in zip(expected, got):
        for key in ("loss", "pg_loss", "single_step_loss", "pt_loss", "rev_kl", "clip_frac", "reward", "w_max"):
            assert line[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)
    assert got[2]["val_loss"] == pytest.approx(expected[2]["val_loss"], abs=1e-6)
