"""launch/slurm_distill.sh and launch/local_distill.sh under stand-in Slurm tools that signal every process of a
step (fake_slurm.py) and stand-in ranks (stub_rank.py: a rank plus a child that ignores stop signals, like the
trainer and its DataLoader workers): arguments, environment, ranks, signals, exit codes, requeue and its limit,
and bad input refused in one line before any rank starts."""

from __future__ import annotations

import json
import os
import signal
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from tests.hpc.conftest import JOB_ID, signal_tagged, start_script, wait_for

CONFIG = "configs/tiny_cpu.yaml"
OVERRIDES = ["train.max_steps=4", "run.output_dir=/tmp/somewhere"]
END_TIME = "2031-05-01T12:30:00"


def run_job(fake_cluster, stub_python, *, nodes: int, nproc: int, behaviour: str, stop=None,
            extra_env: dict | None = None, script: str = "slurm_distill.sh", args: list[str] | None = None):
    """Run a job to its end; ``stop(process, tag)`` is called once every rank is up."""
    stub, stub_dir = stub_python
    tag = uuid.uuid4().hex
    env = fake_cluster.env(nodes=nodes, nproc_per_node=nproc, extra={
        "KD_PYTHON": str(stub), "KD_STUB_DIR": str(stub_dir), "KD_STUB_RANK_BEHAVIOUR": behaviour,
        "KD_FAKE_END_TIME": END_TIME, "KD_TEST_JOB_TAG": tag, **(extra_env or {})})
    log_file = fake_cluster.root / "job.log"
    process = start_script(script, args if args is not None else [CONFIG, *OVERRIDES], env, log_file)
    try:
        if stop is not None:
            world = nodes * nproc
            wait_for(lambda: len(list(stub_dir.glob("rank*.ready"))) == world, 240, "all ranks to start", process,
                     log_file)
            stop(process, tag)
        process.wait(timeout=300)
    finally:
        signal_tagged(tag, signal.SIGKILL)  # nothing of a failed test outlives it
    return process.returncode, log_file.read_text()


def rank_reports(stub_dir: Path) -> dict[int, dict]:
    return {int(path.stem[4:]): json.loads(path.read_text()) for path in stub_dir.glob("rank*.json")}


def requeues(fake_cluster) -> list[list[str]]:
    return [call["argv"] for call in fake_cluster.calls("scontrol") if call["argv"][0] == "requeue"]


def usr1_to_the_batch_shell(process, _tag):
    process.send_signal(signal.SIGUSR1)


def term_to_every_process_of_the_job(_process, tag):
    """Preemption with a grace time, or scancel: TERM to the batch shell, srun, the ranks and their children."""
    assert signal_tagged(tag, signal.SIGTERM) >= 4


@pytest.mark.parametrize("nodes,nproc", [(2, 1), (1, 2)])
def test_one_task_per_rank_with_its_slurm_rank_and_the_job_environment(fake_cluster, stub_python, nodes, nproc):
    code, output = run_job(fake_cluster, stub_python, nodes=nodes, nproc=nproc, behaviour="exit:0",
                           extra_env={"SLURM_CPUS_PER_TASK": "3", "CUDA_VISIBLE_DEVICES": "2,3"})
    assert code == 0, output
    world = nodes * nproc
    (srun,) = fake_cluster.calls("srun")
    assert srun["argv"][:5] == [f"--nodes={nodes}", f"--ntasks={world}", f"--ntasks-per-node={nproc}",
                                "--kill-on-bad-exit=1", "--cpus-per-task=3"]
    # the ranks are srun's tasks themselves: no launcher between Slurm and the trainer
    assert srun["argv"][5:] == [str(stub_python[0]), "-u", "-m", "kd_pipeline.train", "--config", CONFIG, *OVERRIDES]
    assert f"world size {world} ({nodes} node(s) x {nproc} ranks)" in output
    assert f"4 samples x 1 accumulation x {world} ranks = {4 * world} samples per optimizer step" in output
    expected_end = str(int(datetime.fromisoformat(END_TIME).timestamp()))
    reports = rank_reports(stub_python[1])
    assert sorted(reports) == list(range(world))
    for global_rank, report in reports.items():
        env = report["env"]
        assert env["SLURM_PROCID"] == str(global_rank) and report["world_size"] == world
        assert report["local_rank"] == global_rank % nproc and env["RANK"] is None  # Slurm's variables only
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(20000 + JOB_ID % 20000)
        assert env["SLURM_JOB_END_TIME"] == expected_end  # from `scontrol show job`: Slurm did not set it
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["SLURM_CPUS_PER_TASK"] == "3"
        assert env["CUDA_VISIBLE_DEVICES"] == "2,3"  # left alone: each rank picks its local rank's visible GPU
        assert report["received"] == [] and report["exit"] == 0
    assert requeues(fake_cluster) == []


def test_srun_options_cpus_per_task_and_gpu_binding(fake_cluster, stub_python):
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="exit:0",
                           extra_env={"SLURM_CPUS_PER_TASK": "3", "SRUN_CPUS_PER_TASK": "5",
                                      "KD_SRUN_ARGS": "--gpus-per-task=1 --gpu-bind=closest"})
    assert code == 0, output
    argv = fake_cluster.calls("srun")[0]["argv"]
    assert argv[4:7] == ["--cpus-per-task=5", "--gpus-per-task=1", "--gpu-bind=closest"]  # SRUN_CPUS_PER_TASK wins


@pytest.mark.parametrize("stop", [usr1_to_the_batch_shell, term_to_every_process_of_the_job],
                         ids=["usr1_to_batch_shell", "term_to_every_process"])
def test_a_stop_signal_checkpoints_exits_75_and_requeues_once(fake_cluster, stub_python, stop):
    code, output = run_job(fake_cluster, stub_python, nodes=2, nproc=1, behaviour="wait_for_stop", stop=stop)
    assert code == 75, output
    reports = rank_reports(stub_python[1])
    assert sorted(reports) == [0, 1] and all(report["exit"] == 75 and report["received"]
                                            for report in reports.values())
    (srun,) = fake_cluster.calls("srun")
    assert "SIGUSR1" in srun["forwarded"]  # the batch shell forwards the stop through srun in both cases
    if stop is usr1_to_the_batch_shell:
        # srun signalled every process of the step: each rank and each rank's child
        assert srun["forwarded_to"][0] == 4 and all(report["received"][0] == "SIGUSR1" for report in reports.values())
    assert requeues(fake_cluster) == [["requeue", str(JOB_ID)]]
    assert "requeueing job 4242 (restart 1 of at most 20)" in output


def test_a_stop_by_the_trainer_itself_requeues(fake_cluster, stub_python):
    """run.stop_before_end_minutes: the ranks exit 75 with no signal involved."""
    code, output = run_job(fake_cluster, stub_python, nodes=2, nproc=1, behaviour="exit:75")
    assert code == 75, output
    assert requeues(fake_cluster) == [["requeue", str(JOB_ID)]]


@pytest.mark.parametrize("restarts,requeued", [("19", True), ("20", False)])
def test_requeue_limit(fake_cluster, stub_python, restarts, requeued):
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="exit:75",
                           extra_env={"SLURM_RESTART_COUNT": restarts})
    if requeued:
        assert code == 75 and requeues(fake_cluster) == [["requeue", str(JOB_ID)]], output
        return
    assert code == 3 and requeues(fake_cluster) == [], output
    assert "already requeued 20 times (KD_MAX_REQUEUES=20): not requeueing again" in output


def test_a_failed_rank_ends_the_others_and_is_not_requeued(fake_cluster, stub_python):
    code, output = run_job(fake_cluster, stub_python, nodes=2, nproc=1, behaviour="wait_for_stop,rank1=exit_when_all_started:3")
    assert code not in (0, 75), output
    (srun,) = fake_cluster.calls("srun")
    assert [0, "SIGTERM"] in srun["killed"], "srun --kill-on-bad-exit must end rank 0 once rank 1 failed"
    # rank 0 took that TERM for a stop request and recorded 75, but rank 1's 3 says the run failed
    assert sorted(path.read_text().strip() for path in fake_cluster.status_dir.glob("rank*.rc")) == ["3", "75"]
    assert requeues(fake_cluster) == []


def test_a_requeued_job_starts_with_fresh_rank_statuses(fake_cluster, stub_python):
    fake_cluster.status_dir.mkdir(parents=True)
    (fake_cluster.status_dir / "rank00000.rc").write_text("75\n")  # left by the run before the requeue
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="exit:0")
    assert code == 0, output
    assert requeues(fake_cluster) == []


@pytest.mark.parametrize("args,extra_env,message", [
    ([], {}, "usage: sbatch launch/slurm_distill.sh CONFIG"),
    (["configs/missing.yaml"], {}, "config configs/missing.yaml does not exist"),
    ([CONFIG], {"KD_NPROC_PER_NODE": ""}, "no GPUs found on the node: set KD_NPROC_PER_NODE"),
    ([CONFIG], {"KD_NPROC_PER_NODE": "two"}, "KD_NPROC_PER_NODE=two is not a positive integer"),
    ([CONFIG], {"KD_NPROC_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "2"}, "but the node has 2 GPUs"),
    ([CONFIG], {"KD_NPROC_PER_NODE": "4", "SLURM_NTASKS_PER_NODE": "2"}, "submit with --ntasks-per-node=4"),
    ([CONFIG], {"SLURM_JOB_ID": ""}, "submit with sbatch"),
    ([CONFIG, "train.global_batch_size=16"], {},
     "train.global_batch_size=16 needs 4 ranks at 4 x 1 per rank, but this launch has 1"),
    ([CONFIG, "train.bogus=1"], {}, "unknown key train.bogus"),
], ids=["usage", "missing_config", "no_gpus", "not_a_number", "more_ranks_than_gpus", "more_than_allocated",
        "not_slurm", "batch_disagrees", "bad_key"])
def test_bad_input_is_one_line_before_any_rank_starts(fake_cluster, stub_python, args, extra_env, message):
    no_gpu = fake_cluster.bin_dir / "nvidia-smi"  # this machine has no GPU whatever the test machine has
    no_gpu.write_text("#!/bin/sh\nexit 9\n")
    no_gpu.chmod(0o755)
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="exit:0", args=args,
                           extra_env=extra_env)
    assert code == 2 and message in output, output
    assert len([line for line in output.splitlines() if "error" in line]) == 1, output
    assert not fake_cluster.calls("srun") and not list(stub_python[1].glob("rank*"))


# ------------------------------------------------------------------------------------------------ one machine


def ctrl_c(process, _tag):
    """What a terminal does: SIGINT to the foreground process group (the script's; the ranks have their own)."""
    os.killpg(process.pid, signal.SIGINT)


def ctrl_c_twice(process, tag):
    ctrl_c(process, tag)
    wait_for(lambda: "asking the ranks to save" in (process.log_file.read_text()), 120, "the first Ctrl-C")
    ctrl_c(process, tag)


@pytest.mark.parametrize("behaviour,stop,expected", [
    ("exit:0", None, 0), ("exit:2", None, 2), ("wait_for_stop", usr1_to_the_batch_shell, 75),
    ("wait_for_stop", lambda process, _tag: process.send_signal(signal.SIGTERM), 75), ("wait_for_stop", ctrl_c, 75),
], ids=["finished", "bad_config", "usr1", "term", "ctrl_c"])
def test_local_script_passes_exit_codes_and_stops_gracefully(fake_cluster, stub_python, behaviour, stop, expected):
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=2, behaviour=behaviour, stop=stop,
                           script="local_distill.sh", extra_env={"MASTER_PORT": "29999"})
    assert code == expected, output
    reports = rank_reports(stub_python[1])
    assert sorted(reports) == [0, 1]
    for global_rank, report in reports.items():
        assert report["argv"] == ["--config", CONFIG, *OVERRIDES]
        env = report["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(global_rank), str(global_rank), "2")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29999")
        if stop is not None:  # only the ranks were asked, and only once; never killed
            assert report["received"] == ["SIGUSR1"] and report["exit"] == 75
    assert "world size 2; batch: 4 samples x 1 accumulation x 2 ranks = 8" in output
    assert not fake_cluster.calls("srun")


def test_local_script_second_ctrl_c_aborts(fake_cluster, stub_python):
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="slow_stop",
                           stop=ctrl_c_twice, script="local_distill.sh")
    assert code == 130 and "INT again: aborting the ranks" in output, output


def test_local_script_ranks_follow_cuda_visible_devices_and_a_failure_ends_the_others(fake_cluster, stub_python):
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="wait_for_stop,rank1=exit_when_all_started:3",
                           script="local_distill.sh",
                           extra_env={"KD_NPROC_PER_NODE": "", "CUDA_VISIBLE_DEVICES": "3,5"})
    assert code == 3, output
    reports = rank_reports(stub_python[1])
    assert sorted(reports) == [0, 1] and reports[0]["env"]["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert reports[0]["received"] == ["SIGTERM"]  # ended because rank 1 failed
    assert "failed with exit code 3: ending the others" in output
