"""The real launch scripts, the real DeepSpeed launcher and the real trainer on CPU ranks, under stand-in Slurm tools
(fake_slurm.py): preemption with USR1 and requeue, a rank killed during a save, exact resume across requeues and
topologies (2 nodes x 1 rank, 1 node x 2 ranks), and a 2 -> 1 rank resume through a universal checkpoint.

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
STEPS = ["train.max_steps=4", "train.eval_every=2", "checkpoint.every_steps=2", "train.lr=3e-3",
         "data.shuffle_buffer=1"]
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


def test_uninterrupted_job(reference):
    assert [line["step"] for line in metrics(reference["output_dir"])] == [1, 2, 3, 4]
    assert requeues(reference["cluster"]) == []
    assert "node 0 (" in reference["log"] and "--node_rank 0" in reference["log"]
    (srun,) = reference["cluster"].calls("srun")
    assert "--kill-on-bad-exit=1" in srun["argv"] and srun["statuses"] == [0]


def test_usr1_to_the_batch_shell_saves_exits_75_and_requeues(preempted):
    code, output = preempted["stopped"]
    assert code == 75, output[-6000:]
    assert "stop requested (SIGUSR1)" in output
    assert preempted["stopped_requeues"] == [["requeue", str(JOB_ID)]]
    stopped_at = int(preempted["stopped_latest"][-8:])
    assert stopped_at in (1, 2, 3), f"the stop came too late to test a resume ({stopped_at})"
    folder = preempted["output_dir"] / "checkpoints" / preempted["stopped_latest"]
    assert verify_checkpoint(folder) is None  # complete, checksums included


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
    assert [line["step"] for line in got] == [1, 2, 3, 4]
    assert_same_losses(got, want, [1, 2, 3, 4], tolerance=1e-6)
    for step in (2, 4):
        assert got[step - 1]["val_loss"] == pytest.approx(want[step - 1]["val_loss"], abs=1e-6)
    got_weights = final_weights(preempted["output_dir"] / "checkpoints" / "step_00000004")
    want_weights = final_weights(reference["output_dir"] / "checkpoints" / "step_00000004")
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
