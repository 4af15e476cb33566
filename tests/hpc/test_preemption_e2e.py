"""The real launch scripts and the real trainer on CPU ranks, under stand-in Slurm tools that deliver signals as Slurm
does (fake_slurm.py: srun signals every process of its tasks; a TERM "to the job" reaches every process of it):
USR1 to the batch shell (the time limit) and TERM to every process (preemption, scancel) each end with a complete
checkpoint, exit 75 and one requeue; the requeue limit fails the job with a message; a rank killed during a save;
exact resume across requeues and topologies (2 nodes x 1 rank, 1 node x 2 ranks); a 2 -> 1 rank resume through a
universal checkpoint.

Every run reads ``data.shuffle_buffer=1``: without sample shuffling a worker's stream is its shards in order, so the
1 rank x 2 workers run after the world-size change reads, micro-batch for micro-batch, what ranks 0 and 1 read
(``worker_shards`` deals the same shards to both layouts); with ``train.grad_accum=2`` its steps then match the
2-rank steps sample for sample, and the losses can be compared exactly.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from kd_pipeline.checkpoint import MARKER, verify_checkpoint
from tests.engine.launch import final_weights, metrics
from tests.hpc.conftest import JOB_ID, make_cluster
from tests.hpc.jobs import Job, data_overrides, requeues

pytestmark = pytest.mark.slow
STEPS = ["train.max_steps=6", "train.eval_every=2", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
         "train.lr=3e-3", "data.shuffle_buffer=1"]
COMPARED = ("loss", "ce", "kd", "align", "lr")


def assert_same_losses(got: list[dict], want: list[dict], steps: list[int], tolerance: float) -> None:
    by_step = {line["step"]: line for line in got}
    expected = {line["step"]: line for line in want}
    for step in steps:
        for key in COMPARED:
            assert by_step[step][key] == pytest.approx(expected[step][key], abs=tolerance), (step, key)


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """An uninterrupted job, 1 node x 2 ranks."""
    root = tmp_path_factory.mktemp("reference")
    cluster = make_cluster(root / "cluster")
    output_dir = root / "run"
    job = Job(cluster, "slurm_distill.sh", output_dir, [*STEPS, *data_overrides(synth_data, output_dir)], nodes=1,
              nproc=2)
    code, output = job.finish()
    assert code == 0, output[-6000:]
    return {"output_dir": output_dir, "cluster": cluster, "log": output}


@pytest.fixture(scope="module")
def preempted(synth_data, tmp_path_factory):
    """One output folder through three job runs: (1) 2 nodes x 1 rank, USR1 to the batch shell after step 1;
    (2) the requeued job, with rank 1 killed in the middle of the save of step 4; (3) the job resubmitted on
    1 node x 2 ranks, finishing."""
    root = tmp_path_factory.mktemp("preempted")
    cluster = make_cluster(root / "cluster")
    output_dir = root / "run"
    overrides = [*STEPS, *data_overrides(synth_data, output_dir)]
    runs = {}

    first = Job(cluster, "slurm_distill.sh", output_dir, overrides, nodes=2, nproc=1)
    first.wait_for_steps(1)
    first.process.send_signal(signal.SIGUSR1)
    runs["stopped"] = first.finish()
    runs["stopped_latest"] = (output_dir / "checkpoints" / "latest").read_text()
    runs["stopped_requeues"] = requeues(cluster)

    second = Job(cluster, "slurm_distill.sh", output_dir, overrides, nodes=2, nproc=1,
                 env={"KD_TEST_KILL_IN_SAVE": "1:4"})
    runs["killed"] = second.finish()
    runs["killed_latest"] = (output_dir / "checkpoints" / "latest").read_text()
    runs["killed_step4"] = sorted(path.name for path in (output_dir / "checkpoints" / "step_00000004").iterdir())
    runs["killed_requeues"] = requeues(cluster)

    third = Job(cluster, "slurm_distill.sh", output_dir, overrides, nodes=1, nproc=2)
    runs["finished"] = third.finish()
    return {"output_dir": output_dir, "cluster": cluster, **runs}


@pytest.fixture(scope="module")
def terminated(synth_data, tmp_path_factory):
    """One output folder through three job runs on 1 node x 2 ranks: (1) TERM to every process of the job after
    step 1 (preemption); (2) the requeued job (SLURM_RESTART_COUNT=1) with KD_MAX_REQUEUES=1, TERM again after one
    more step: stopped, but not requeued past the limit; (3) the job resubmitted by hand, finishing."""
    root = tmp_path_factory.mktemp("terminated")
    cluster = make_cluster(root / "cluster")
    output_dir = root / "run"
    overrides = [*STEPS, *data_overrides(synth_data, output_dir)]
    runs = {}
    first = Job(cluster, "slurm_distill.sh", output_dir, overrides, nodes=1, nproc=2)
    first.wait_for_steps(1)
    runs["signalled"] = first.signal_all(signal.SIGTERM)
    runs["preempted"] = first.finish()
    runs["preempted_latest"] = (output_dir / "checkpoints" / "latest").read_text()
    runs["preempted_requeues"] = requeues(cluster)

    second = Job(cluster, "slurm_distill.sh", output_dir, overrides, nodes=1, nproc=2,
                 env={"SLURM_RESTART_COUNT": "1", "KD_MAX_REQUEUES": "1"})
    done = len(metrics(output_dir))
    second.wait_for_steps(done + 1)
    second.signal_all(signal.SIGTERM)
    runs["limited"] = second.finish()
    runs["limited_latest"] = (output_dir / "checkpoints" / "latest").read_text()
    runs["limited_requeues"] = requeues(cluster)

    third = Job(cluster, "slurm_distill.sh", output_dir, overrides, nodes=1, nproc=2)
    runs["finished"] = third.finish()
    return {"output_dir": output_dir, "cluster": cluster, **runs}


def test_uninterrupted_job(reference):
    assert [line["step"] for line in metrics(reference["output_dir"])] == [1, 2, 3, 4, 5, 6]
    assert requeues(reference["cluster"]) == []
    assert "world size 2 (1 node(s) x 2 ranks); batch: 4 samples x 1 accumulation x 2 ranks" in reference["log"]
    (srun,) = reference["cluster"].calls("srun")
    assert "--kill-on-bad-exit=1" in srun["argv"] and srun["statuses"] == [0, 0]
    # each srun task is a rank (no launcher): its Slurm rank is the trainer's rank
    assert [task["SLURM_PROCID"] for task in srun["tasks"]] == ["0", "1"]


def test_usr1_to_the_batch_shell_saves_exits_75_and_requeues(preempted):
    code, output = preempted["stopped"]
    assert code == 75, output[-6000:]
    assert "stop requested (SIGUSR1)" in output
    assert preempted["stopped_requeues"] == [["requeue", str(JOB_ID)]]
    stopped_at = int(preempted["stopped_latest"][-8:])
    assert stopped_at in (1, 2, 3), f"the stop came too late to test a resume ({stopped_at})"
    folder = preempted["output_dir"] / "checkpoints" / preempted["stopped_latest"]
    assert verify_checkpoint(folder) is None  # complete, checksums included


def test_term_to_every_process_saves_exits_75_and_requeues_once(terminated):
    code, output = terminated["preempted"]
    assert code == 75, output[-6000:]
    assert terminated["signalled"] >= 5  # batch shell, srun, 2 ranks, their loader workers
    assert "stop requested (SIGTERM)" in output
    assert terminated["preempted_requeues"] == [["requeue", str(JOB_ID)]]
    stopped_at = int(terminated["preempted_latest"][-8:])
    assert stopped_at in (1, 2, 3, 4), f"the stop came too late to test a resume ({stopped_at})"
    assert verify_checkpoint(terminated["output_dir"] / "checkpoints" / terminated["preempted_latest"]) is None


def test_a_stop_past_the_requeue_limit_fails_with_a_message(terminated):
    code, output = terminated["limited"]
    assert code == 3, output[-6000:]
    assert "already requeued 1 times (KD_MAX_REQUEUES=1): not requeueing again" in output
    assert terminated["limited_requeues"] == terminated["preempted_requeues"]  # no second requeue
    limited_at = int(terminated["limited_latest"][-8:])
    assert int(terminated["preempted_latest"][-8:]) < limited_at < 6
    assert verify_checkpoint(terminated["output_dir"] / "checkpoints" / terminated["limited_latest"]) is None
    code, output = terminated["finished"]
    assert code == 0, output[-6000:]
    assert f"at step {limited_at}" in output


def test_terminated_and_resumed_job_reproduces_the_uninterrupted_losses(terminated, reference):
    got, want = metrics(terminated["output_dir"]), metrics(reference["output_dir"])
    assert [line["step"] for line in got] == [1, 2, 3, 4, 5, 6]
    assert_same_losses(got, want, [1, 2, 3, 4, 5, 6], tolerance=1e-6)


def test_rank_killed_during_a_save_resumes_from_the_previous_complete_checkpoint(preempted):
    code, output = preempted["killed"]
    assert code not in (0, 75), output[-6000:]
    assert "KD_TEST_KILL_IN_SAVE=1:4: killing rank 1" in output
    assert preempted["killed_requeues"] == preempted["stopped_requeues"], "a crash must not be requeued"
    assert MARKER not in preempted["killed_step4"] and "rank_00001.pt" not in preempted["killed_step4"]
    previous = preempted["killed_latest"]
    assert previous in ("step_00000002", "step_00000003")
    code, output = preempted["finished"]
    assert code == 0, output[-6000:]
    assert f"resumed from {preempted['output_dir'] / 'checkpoints' / previous} at step {int(previous[-8:])}" in output


def test_requeued_and_resumed_job_reproduces_the_uninterrupted_losses_and_weights(preempted, reference):
    got, want = metrics(preempted["output_dir"]), metrics(reference["output_dir"])
    assert [line["step"] for line in got] == [1, 2, 3, 4, 5, 6]
    assert_same_losses(got, want, [1, 2, 3, 4, 5, 6], tolerance=1e-6)
    for step in (2, 4, 6):
        assert got[step - 1]["val_loss"] == pytest.approx(want[step - 1]["val_loss"], abs=1e-6)
    got_weights = final_weights(preempted["output_dir"] / "checkpoints" / "step_00000006")
    want_weights = final_weights(reference["output_dir"] / "checkpoints" / "step_00000006")
    assert got_weights.keys() == want_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], rtol=0, atol=1e-6, msg=name)


def test_two_ranks_to_one_rank_through_a_universal_checkpoint(reference, synth_data, tmp_path):
    output_dir = tmp_path / "run"
    checkpoints = output_dir / "checkpoints"
    shutil.copytree(reference["output_dir"] / "checkpoints" / "step_00000002", checkpoints / "step_00000002")
    (checkpoints / "latest").write_text("step_00000002")
    cluster = make_cluster(tmp_path / "cluster")
    # One rank, two loader workers, two micro-batches per step: the 2-rank steps sample for sample.
    job = Job(cluster, "local_distill.sh", output_dir,
              [*STEPS, *data_overrides(synth_data, output_dir), "data.num_workers=2", "train.grad_accum=2"],
              nodes=1, nproc=1)
    code, output = job.finish()
    assert code == 0, output[-6000:]
    assert "world size changed from 2 to 1" in output and "re-partitioning what is left of epoch 0" in output
    universal = checkpoints / "step_00000002_universal"
    assert verify_checkpoint(universal) is None and (universal / "zero").is_dir()
    want = metrics(reference["output_dir"])
    # Step 3's loss checks the restored weights; step 4's the restored Adam moments, step count and schedule.
    assert_same_losses(metrics(output_dir), want, [3, 4], tolerance=1e-5)
    got_weights = final_weights(checkpoints / "step_00000004")
    want_weights = final_weights(reference["output_dir"] / "checkpoints" / "step_00000004")
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], rtol=0, atol=1e-5, msg=name)
    state = json.loads((checkpoints / "step_00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 1
