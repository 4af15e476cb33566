"""Rank discovery in one place (``kd_pipeline.runtime``): torchrun/deepspeed's variables, one srun task per rank,
or a single process; the rendezvous defaults under srun; the GPU each local rank takes; the exit-status record the
launchers read."""

import os

import pytest
import torch

from kd_pipeline import runtime
from kd_pipeline.runtime import RankInfo, discover_ranks, first_slurm_host


@pytest.mark.parametrize("environ,expected", [
    ({}, RankInfo(0, 1, 0, "single")),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, RankInfo(3, 8, 3, "torch")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, RankInfo(5, 16, 1, "slurm")),
    # the step's own task count wins over the job's (a job of 16 tasks running an 8-task step)
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "5"},
     RankInfo(5, 8, 5, "slurm")),
    # a launcher inside a Slurm task (torchrun/deepspeed) sets RANK: it wins over the task's SLURM_PROCID
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, RankInfo(1, 2, 0, "torch")),
], ids=["single", "torchrun", "srun", "srun_step", "launcher_in_slurm"])
def test_discover_ranks(environ, expected):
    assert discover_ranks(environ) == expected


@pytest.mark.parametrize("environ,message", [
    ({"SLURM_PROCID": "8", "SLURM_NTASKS": "8"}, "rank 8 (local 0) does not fit a world of 8"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
])
def test_inconsistent_launcher_variables_are_refused(environ, message):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        discover_ranks(environ)


@pytest.mark.parametrize("nodelist,host", [("gpu[03-04,07],cpu1", "gpu03"), ("node7", "node7"),
                                           ("a-b[1-2]", "a-b1"), ("n1,n2", "n1")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_srun_rendezvous_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first so that monkeypatch restores the variable's absence after the test: export_rendezvous writes
        # os.environ itself, and a RANK/WORLD_SIZE left behind makes later tests (webdataset readers) multi-node
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[12-13]")
    runtime.export_rendezvous(RankInfo(9, 16, 1, "slurm"))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    monkeypatch.setenv("MASTER_PORT", "31000")  # what the launch script exported stays
    runtime.export_rendezvous(RankInfo(9, 16, 1, "slurm"))
    assert os.environ["MASTER_PORT"] == "31000"


@pytest.mark.parametrize("visible,local_rank,expected", [(8, 3, 3), (1, 5, 0), (2, 1, 1), (2, 2, None)],
                         ids=["own_index", "one_bound_per_task", "visible_subset", "more_ranks_than_gpus"])
def test_gpu_of_a_local_rank(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(2 + index) for index in range(visible)))
    if expected is None:
        with pytest.raises(RuntimeError, match="local rank 2 has no GPU: this process sees 2 devices "
                                               r"\(CUDA_VISIBLE_DEVICES=2,3\)"):
            runtime.cuda_device_index(local_rank)
    else:
        assert runtime.cuda_device_index(local_rank) == expected


def test_exit_status_record(tmp_path, monkeypatch):
    monkeypatch.delenv(runtime.STATUS_DIR_ENV, raising=False)
    runtime.record_exit_status(3, 75)  # no folder asked for: nothing written anywhere
    monkeypatch.setenv(runtime.STATUS_DIR_ENV, str(tmp_path / "status"))
    runtime.record_exit_status(3, 75)
    assert (tmp_path / "status" / "rank00003.rc").read_text() == "75\n"
