"""A rank that dies (SIGKILL) or stops responding (SIGSTOP) in the middle of training, 2 nodes x 1 rank under
launch/slurm_distill.sh with the real trainer: the job fails within ``deepspeed.timeout_minutes`` instead of hanging,
the surviving rank's log names itself and the last completed step (and, when it waited out the timeout, where
it was: its stacks), and nothing is requeued."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests.engine.launch import metrics
from tests.hpc.conftest import make_cluster
from tests.hpc.jobs import Job, data_overrides, requeues

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped_responding"])
def test_a_lost_rank_fails_the_job_within_the_timeout(synth_data, tmp_path, failure):
    output_dir = tmp_path / "run"
    cluster = make_cluster(tmp_path / "cluster")
    timeout_minutes = 0.5
    job = Job(cluster, "slurm_distill.sh", output_dir,
              ["train.max_steps=200", "checkpoint.every_steps=100", "train.eval_every=0",
               f"deepspeed.timeout_minutes={timeout_minutes}", *data_overrides(synth_data, output_dir)],
              nodes=2, nproc=1)
    job.wait_for_steps(1)
    os.kill(job.rank_pid(1), failure)
    try:
        # The bound that tells a failure from a hang: the timeout plus teardown, on this loaded machine.
        code, output = job.finish(timeout=timeout_minutes * 60 + 180)
    finally:
        job.kill_all()  # whatever is left if the job hung (a stopped rank)
    assert code not in (0, 75), output[-6000:]
    reported = re.search(r"rank 0 failed after step (\d+) was completed", output)
    assert reported, output[-6000:]
    assert int(reported.group(1)) == metrics(output_dir)[-1]["step"] >= 1
    if failure == signal.SIGKILL:  # the dead rank's status reaches the batch script unchanged (128 + 9)
        assert code == 137 and "training ended with exit code 137" in output
    if failure == signal.SIGSTOP:  # nothing closed a connection: only the process-group timeout can end the wait
        assert re.search(r"rank 0 failed after step \d+ was completed: .*(timed out|timeout)", output, re.IGNORECASE)
        assert "(a peer rank died or stopped responding within deepspeed.timeout_minutes)" in output
        # the waiting rank wrote its stacks (StepWatchdog, 0.8 x 30 s) before its collective timed out
        dump = output.index("Timeout (0:00:24)!")
        assert dump < output.index("rank 0 failed after step") and "kd_pipeline/recipes/" in output[dump:], output[-6000:]
    assert requeues(cluster) == []
