"""Stand-ins for ``srun``, ``scontrol`` and ``sbatch`` that let ``launch/*.sh`` run on one machine in tests.

``python fake_slurm.py <tool> ARGS...`` (``install_fake_slurm`` writes ``srun``/``scontrol``/``sbatch`` wrappers on
a PATH folder). Every call appends one JSON line to ``$KD_FAKE_SLURM_LOG``: the tool, its arguments and, for srun,
each task's Slurm variables and the variables the launch script exports, plus the signals it forwarded.

- ``srun``: starts ``ntasks`` tasks of the command on this machine (``ntasks-per-node`` to a node), each in its own
  session with ``SLURM_PROCID``/``SLURM_NODEID``/``SLURM_LOCALID``/``SLURM_NTASKS``/``SLURM_STEP_NUM_TASKS``/
  ``SLURMD_NODENAME`` (and ``SLURM_CPUS_PER_TASK`` from ``--cpus-per-task``). USR1, USR2, TERM and INT that srun
  receives reach EVERY process of every task's session, children included (as slurmstepd signals every pid of the
  step's cgroup): a launcher inside a task gets them too. With ``--kill-on-bad-exit=1`` it ends every process of
  the other tasks (TERM, then KILL after ``KILL_WAIT_SECONDS``, Slurm's KillWait) once one exits non-zero. Like
  slurmstepd it ends only when every process of every task's session is gone (leftovers get TERM, then KILL after
  ``KILL_WAIT_SECONDS``); exits with the worst task status (a task ended by signal N counts as 128 + N). Unknown
  options are refused, so a typo in a launch script fails the test.
- ``scontrol show hostnames LIST``: expands ``node[1-2]``/``a,b`` to one loopback address per host (127.0.0.1,
  127.0.0.2, ...: distinct names that all reach this machine). ``scontrol show job ID``: one line with
  ``EndTime=$KD_FAKE_END_TIME`` (default 2099-01-01T00:00:00). ``scontrol requeue ID``: recorded only.
- ``sbatch [options] SCRIPT ARGS``: recorded; prints ``Submitted batch job N`` (or ``N`` with ``--parsable``), N
  counting up from ``$KD_FAKE_FIRST_JOB_ID`` (default 1000) through the log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_WAIT_SECONDS = 10.0
RECORDED_ENV = ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_END_TIME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                "NCCL_ASYNC_ERROR_HANDLING", "KD_NPROC_PER_NODE", "KD_HOSTS", "OMP_NUM_THREADS",
                "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "KD_STATUS_DIR", "CUDA_VISIBLE_DEVICES")
SRUN_VALUE_OPTIONS = {"--nodes": "nodes", "-N": "nodes", "--ntasks": "ntasks", "-n": "ntasks",
                      "--ntasks-per-node": "ntasks_per_node", "--kill-on-bad-exit": "kill_on_bad_exit",
                      "--cpus-per-task": "cpus_per_task", "-c": "cpus_per_task", "--gpus-per-task": "gpus_per_task",
                      "--gpu-bind": "gpu_bind"}


def record(entry: dict) -> None:
    log_path = os.environ.get("KD_FAKE_SLURM_LOG")
    if log_path:
        with open(log_path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[1-2,5],gpu7`` -> ``node1 node2 node5 gpu7`` (the bracket forms Slurm writes)."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{width}d}")
    return hosts


def loopback_hosts(nodelist: str) -> list[str]:
    return [f"127.0.0.{index + 1}" for index, _ in enumerate(expand_nodelist(nodelist))]


def parse_srun(argv: list[str]) -> tuple[dict, list[str]]:
    options = {"kill_on_bad_exit": "0"}
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        name, has_value, value = argv[index].partition("=")
        if name not in SRUN_VALUE_OPTIONS:
            sys.exit(f"fake srun: unsupported option {argv[index]!r}")
        if not has_value and name == "--kill-on-bad-exit":
            value = "1"
        elif not has_value:
            index += 1
            value = argv[index]
        options[SRUN_VALUE_OPTIONS[name]] = value
        index += 1
    if index == len(argv):
        sys.exit("fake srun: no command given")
    return options, argv[index:]


def status_of(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def srun(argv: list[str]) -> int:
    options, command = parse_srun(argv)
    nodes = int(options.get("nodes") or os.environ["SLURM_JOB_NUM_NODES"])
    per_node = int(options.get("ntasks_per_node") or 1)
    ntasks = int(options.get("ntasks") or nodes * per_node)
    hosts = loopback_hosts(os.environ["SLURM_JOB_NODELIST"])
    entry = {"tool": "srun", "argv": argv, "tasks": [], "forwarded": [], "killed": []}
    tasks = []
    for task in range(ntasks):
        env = {**os.environ, "SLURM_PROCID": str(task), "SLURM_NODEID": str(task // per_node),
               "SLURM_LOCALID": str(task % per_node), "SLURM_NTASKS": str(ntasks), "SLURM_STEP_ID": "0",
               "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURMD_NODENAME": hosts[task // per_node]}
        if "cpus_per_task" in options:
            env["SLURM_CPUS_PER_TASK"] = options["cpus_per_task"]
        tasks.append(subprocess.Popen(command, env=env, start_new_session=True))
        entry["tasks"].append({key: env.get(key) for key in ("SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID",
                                                              "SLURM_NTASKS", "SLURMD_NODENAME",
                                                              "SLURM_CPUS_PER_TASK", *RECORDED_ENV)})

    def forward(signum, _frame) -> None:
        """Every process of every task, as slurmstepd signals the step's cgroup."""
        members = _session_members({process.pid for process in tasks})
        entry["forwarded"].append(signal.Signals(signum).name)
        entry.setdefault("forwarded_to", []).append(len(members))
        for pid in members:
            _kill_quietly(pid, signum)

    for forwarded in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(forwarded, forward)
    kill_deadline = None
    while any(process.poll() is None for process in tasks):
        failed = [process for process in tasks if process.poll() not in (None, 0)]
        if failed and options["kill_on_bad_exit"] == "1" and kill_deadline is None:
            kill_deadline = time.monotonic() + KILL_WAIT_SECONDS
            _signal_groups(tasks, signal.SIGTERM, entry)
        if kill_deadline is not None and time.monotonic() > kill_deadline:
            _signal_groups(tasks, signal.SIGKILL, entry)
        time.sleep(0.1)
    entry["statuses"] = [status_of(process.returncode) for process in tasks]
    _sweep_sessions([process.pid for process in tasks], entry)
    record(entry)
    return max(entry["statuses"])


def _session_members(session_ids: set[int]) -> list[int]:
    """Live processes (not zombies) whose session is one of ``session_ids``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in session_ids and fields[0] != "Z":  # fields: state, ppid, pgrp, session, ...
            members.append(int(stat.parent.name))
    return members


def _sweep_sessions(session_ids: list[int], entry: dict) -> None:
    """What is left of the tasks' sessions (orphaned ranks) gets TERM, then KILL after ``KILL_WAIT_SECONDS``."""
    sessions = set(session_ids)
    leftovers = _session_members(sessions)
    if not leftovers:
        return
    entry["swept"] = len(leftovers)
    for pid in leftovers:
        _kill_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while _session_members(sessions) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _session_members(sessions):
        _kill_quietly(pid, signal.SIGKILL)


def _kill_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _signal_groups(tasks: list[subprocess.Popen], signum: int, entry: dict) -> None:
    """Every process of each task still running (its session), as --kill-on-bad-exit does."""
    for task, process in enumerate(tasks):
        if process.poll() is None:
            entry["killed"].append([task, signal.Signals(signum).name])
            for pid in _session_members({process.pid}):
                _kill_quietly(pid, signum)


def scontrol(argv: list[str]) -> int:
    record({"tool": "scontrol", "argv": argv})
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(loopback_hosts(argv[2] if len(argv) > 2 else os.environ["SLURM_JOB_NODELIST"])))
        return 0
    if argv[:2] == ["show", "job"]:
        end = os.environ.get("KD_FAKE_END_TIME", "2099-01-01T00:00:00")
        print(f"JobId={argv[2]} JobName=kd JobState=RUNNING StartTime=2024-01-01T00:00:00 EndTime={end} "
              f"Partition=test")
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2:
        return 0
    print(f"fake scontrol: unsupported command {argv}", file=sys.stderr)
    return 1


def sbatch(argv: list[str]) -> int:
    log_path = os.environ.get("KD_FAKE_SLURM_LOG")
    earlier = 0
    if log_path and Path(log_path).is_file():
        earlier = sum('"tool": "sbatch"' in line for line in Path(log_path).read_text().splitlines())
    job_id = int(os.environ.get("KD_FAKE_FIRST_JOB_ID", "1000")) + earlier
    record({"tool": "sbatch", "argv": argv, "job_id": job_id})
    print(job_id if "--parsable" in argv else f"Submitted batch job {job_id}")
    return 0


def install_fake_slurm(bin_dir: Path, python: str = sys.executable) -> Path:
    """Write ``srun``, ``scontrol`` and ``sbatch`` wrappers into ``bin_dir`` (prepend it to PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in ("srun", "scontrol", "sbatch"):
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nexec "{python}" "{Path(__file__).resolve()}" {tool} "$@"\n')
        wrapper.chmod(0o755)
    return bin_dir


def read_log(log_path: Path) -> list[dict]:
    if not log_path.is_file():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    tools = {"srun": srun, "scontrol": scontrol, "sbatch": sbatch}
    if len(sys.argv) < 2 or sys.argv[1] not in tools:
        sys.exit(f"usage: fake_slurm.py {{{','.join(tools)}}} ARGS...")
    sys.exit(tools[sys.argv[1]](sys.argv[2:]))
