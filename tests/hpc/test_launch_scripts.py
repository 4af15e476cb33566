"""launch/slurm_distill.sh and launch/local_distill.sh under stand-in Slurm tools and a stand-in DeepSpeed launcher
(same process tree: runner -> launch -> ranks): arguments, environment, node ranks, signal forwarding, requeue."""

from __future__ import annotations

import json
import signal
from datetime import datetime
from pathlib import Path

import pytest

from tests.hpc.conftest import JOB_ID, start_script, wait_for

CONFIG = "configs/tiny_cpu.yaml"
OVERRIDES = ["train.max_steps=4", "run.output_dir=/tmp/somewhere"]
END_TIME = "2031-05-01T12:30:00"


def run_job(fake_cluster, stub_python, *, nodes: int, nproc: int, behaviour: str, stop_signal: int | None = None,
            extra_env: dict | None = None, script: str = "slurm_distill.sh", args: list[str] | None = None):
    """Run a job to its end; with ``stop_signal``, send it to the batch shell once every rank is up."""
    stub, stub_dir = stub_python
    env = fake_cluster.env(nodes=nodes, nproc_per_node=nproc, extra={
        "KD_PYTHON": str(stub), "KD_STUB_DIR": str(stub_dir), "KD_STUB_RANK_BEHAVIOUR": behaviour,
        "KD_FAKE_END_TIME": END_TIME, **(extra_env or {})})
    log_file = fake_cluster.root / "job.log"
    process = start_script(script, args if args is not None else [CONFIG, *OVERRIDES], env, log_file)
    if stop_signal is not None:
        world = nodes * nproc
        wait_for(lambda: len(list(stub_dir.glob("rank*.ready"))) == world, 60, "all ranks to start", process,
                 log_file)
        process.send_signal(stop_signal)
    process.wait(timeout=120)
    return process.returncode, log_file.read_text()


def rank_reports(stub_dir: Path) -> dict[int, dict]:
    return {int(path.stem[4:]): json.loads(path.read_text()) for path in stub_dir.glob("rank*.json")}


@pytest.mark.parametrize("nodes,nproc", [(2, 1), (1, 2)])
def test_launch_command_environment_and_node_ranks(fake_cluster, stub_python, nodes, nproc):
    code, output = run_job(fake_cluster, stub_python, nodes=nodes, nproc=nproc, behaviour="exit:0")
    assert code == 0, output
    stub_dir = stub_python[1]
    (srun,) = fake_cluster.calls("srun")
    assert srun["argv"][:4] == [f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                                "--kill-on-bad-exit=1"]
    assert srun["argv"][4:6] == ["bash", "-c"] and srun["argv"][7:] == ["kd-node", CONFIG, *OVERRIDES]
    expected_end = str(int(datetime.fromisoformat(END_TIME).timestamp()))
    assert [task["SLURM_PROCID"] for task in srun["tasks"]] == [str(node) for node in range(nodes)]
    for task in srun["tasks"]:
        assert task["MASTER_ADDR"] == "127.0.0.1" and task["MASTER_PORT"] == str(20000 + JOB_ID % 20000)
        assert task["SLURM_JOB_END_TIME"] == expected_end  # from `scontrol show job`, Slurm did not set it
        assert task["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and task["KD_NPROC_PER_NODE"] == str(nproc)
    hosts = [f"127.0.0.{index + 1}" for index in range(nodes)]
    for node in range(nodes):
        runner = json.loads((stub_dir / f"runner_node{node}.json").read_text())
        argv = runner["argv"]
        assert argv[:11] == ["--no_ssh", "--node_rank", str(node), "--hostfile", argv[4], "--master_addr",
                             "127.0.0.1", "--master_port", str(20000 + JOB_ID % 20000), "--module",
                             "kd_pipeline.train"]
        assert argv[11:] == ["--config", CONFIG, *OVERRIDES]
        assert runner["env"]["SLURM_PROCID"] == str(node)  # the node rank is the node's own, not the batch shell's
        assert runner["hostfile"] == [f"{host} slots={nproc}" for host in hosts]
    reports = rank_reports(stub_dir)
    assert sorted(reports) == list(range(nodes * nproc))
    assert all(report["world_size"] == nodes * nproc and report["received"] == [] for report in reports.values())
    assert fake_cluster.calls("scontrol")[0]["argv"] == ["show", "hostnames", "node[1-2]" if nodes == 2 else "node1"]
    assert not [call for call in fake_cluster.calls("scontrol") if call["argv"][0] == "requeue"]


@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_reaches_every_rank_and_requeues(fake_cluster, stub_python, stop_signal):
    code, output = run_job(fake_cluster, stub_python, nodes=2, nproc=1, behaviour="wait_for_stop",
                           stop_signal=stop_signal)
    assert code == 75, output
    reports = rank_reports(stub_python[1])
    # Only the ranks got it, always as USR1 (the launchers above them would have died of it: exit code != 75).
    assert {rank: report["received"] for rank, report in reports.items()} == {0: ["SIGUSR1"], 1: ["SIGUSR1"]}
    (srun,) = fake_cluster.calls("srun")
    assert srun["forwarded"] == ["SIGUSR1"]
    requeues = [call["argv"] for call in fake_cluster.calls("scontrol") if call["argv"][0] == "requeue"]
    assert requeues == [["requeue", str(JOB_ID)]]
    # srun's own statuses may already show --kill-on-bad-exit ending the node that exited second (the first 75 is
    # non-zero): what each node's launcher returned is in its status file, which the requeue decision reads.
    assert sorted(path.read_text().strip() for path in fake_cluster.status_dir.glob("node*.rc")) == ["75", "75"]


def test_stop_by_the_trainer_itself_requeues(fake_cluster, stub_python):
    """run.stop_before_end_minutes: the ranks exit 75 with no signal involved."""
    code, output = run_job(fake_cluster, stub_python, nodes=2, nproc=1, behaviour="exit:75")
    assert code == 75, output
    assert [call["argv"] for call in fake_cluster.calls("scontrol") if call["argv"][0] == "requeue"] == [
        ["requeue", str(JOB_ID)]]


def test_a_failed_node_ends_the_others_and_is_not_requeued(fake_cluster, stub_python):
    code, output = run_job(fake_cluster, stub_python, nodes=2, nproc=1, behaviour="wait_for_stop,rank1=exit:3")
    assert code not in (0, 75), output
    (srun,) = fake_cluster.calls("srun")
    assert [0, "SIGTERM"] in srun["killed"], "srun --kill-on-bad-exit must end node 0 once node 1 failed"
    assert (fake_cluster.status_dir / "node1.rc").read_text().strip() == "3"
    assert "ranks 1-1 ended with exit code 3" in output  # the log names the failed node's ranks
    assert not [call for call in fake_cluster.calls("scontrol") if call["argv"][0] == "requeue"]


def test_rerun_of_a_requeued_job_starts_with_fresh_node_statuses(fake_cluster, stub_python):
    fake_cluster.status_dir.mkdir(parents=True)
    (fake_cluster.status_dir / "node0.rc").write_text("75\n")  # left by the run before the requeue
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="exit:0")
    assert code == 0, output
    assert not [call for call in fake_cluster.calls("scontrol") if call["argv"][0] == "requeue"]


@pytest.mark.parametrize("args,extra_env,message", [
    ([], {}, "usage: sbatch launch/slurm_distill.sh CONFIG"),
    (["configs/missing.yaml"], {}, "config configs/missing.yaml does not exist"),
    ([CONFIG], {"KD_NPROC_PER_NODE": ""}, "set KD_NPROC_PER_NODE"),
    ([CONFIG], {"SLURM_JOB_ID": ""}, "submit with sbatch"),
])
def test_bad_invocations_exit_2_with_a_clear_message(fake_cluster, stub_python, args, extra_env, message):
    no_gpu = fake_cluster.bin_dir / "nvidia-smi"  # this machine has no GPU whatever the test machine has
    no_gpu.write_text("#!/bin/sh\nexit 9\n")
    no_gpu.chmod(0o755)
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=1, behaviour="exit:0", args=args,
                           extra_env=extra_env)
    assert code == 2 and message in output, output
    assert not fake_cluster.calls("srun")


@pytest.mark.parametrize("behaviour,stop_signal,expected", [("exit:0", None, 0), ("exit:2", None, 2),
                                                            ("wait_for_stop", signal.SIGUSR1, 75)])
def test_local_script_passes_exit_codes_and_forwards_stop(fake_cluster, stub_python, behaviour, stop_signal,
                                                          expected):
    code, output = run_job(fake_cluster, stub_python, nodes=1, nproc=2, behaviour=behaviour, stop_signal=stop_signal,
                           script="local_distill.sh", extra_env={"MASTER_PORT": "29999"})
    assert code == expected, output
    runner = json.loads((stub_python[1] / "runner_node0.json").read_text())
    assert runner["argv"][:3] == ["--no_ssh", "--node_rank", "0"] and runner["hostfile"] == ["localhost slots=2"]
    assert runner["argv"][5:] == ["--master_addr", "127.0.0.1", "--master_port", "29999", "--module",
                                  "kd_pipeline.train", "--config", CONFIG, *OVERRIDES]
    reports = rank_reports(stub_python[1])
    assert sorted(reports) == [0, 1]
    if stop_signal is not None:
        assert all(report["received"] == ["SIGUSR1"] for report in reports.values())
    assert not fake_cluster.calls("srun")
