"""A stand-in for ``python -m deepspeed.launcher.runner`` with the same process tree (runner -> launch -> ranks),
so the launch scripts' logic (arguments, environment, signal forwarding, exit codes) is tested in seconds.

Used as ``KD_PYTHON`` through a wrapper written by ``install_stub_python``. Each runner writes
``$KD_STUB_DIR/runner_node<node_rank>.json`` (its argv, selected environment, the hostfile's lines); each rank
writes ``rank<global rank>.json`` when it exits (what it received). ``$KD_STUB_RANK_BEHAVIOUR``:

- ``exit:<code>``: every rank exits with ``code`` at once;
- ``wait_for_stop``: ranks wait (up to 60 s) for USR1 or TERM, then exit 75 like the trainer after its save;
  a behaviour per global rank can follow, as in ``wait_for_stop,rank1=exit:3`` (rank 1 exits 3 at once).

The runner and launch levels install no handler for USR1: a launch script that signals them instead of the ranks
kills them, and the test sees it in the exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RESUME_EXIT_CODE = 75


def runner(argv: list[str]) -> int:
    node_rank = argv[argv.index("--node_rank") + 1]
    hostfile = Path(argv[argv.index("--hostfile") + 1])
    hosts = [line.split()[0] for line in hostfile.read_text().splitlines() if line.strip()]
    slots = {int(line.split("slots=")[1]) for line in hostfile.read_text().splitlines() if line.strip()}
    record = {"argv": argv, "hostfile": hostfile.read_text().splitlines(), "pid": os.getpid(),
              "env": {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_END_TIME",
                                                          "TORCH_NCCL_ASYNC_ERROR_HANDLING", "SLURM_PROCID",
                                                          "OMP_NUM_THREADS")}}
    Path(os.environ["KD_STUB_DIR"], f"runner_node{node_rank}.json").write_text(json.dumps(record))
    nproc = slots.pop()
    first_rank = int(node_rank) * nproc
    launch = subprocess.Popen([sys.executable, __file__, "launch", str(first_rank), str(nproc), str(len(hosts))])
    return launch.wait()


def launch(first_rank: int, nproc: int, nodes: int) -> int:
    ranks = [subprocess.Popen([sys.executable, __file__, "rank", str(first_rank + local), str(nodes * nproc)])
             for local in range(nproc)]
    codes = [process.wait() for process in ranks]
    failed = [code for code in codes if code != 0]
    return failed[0] if failed else 0


def rank(global_rank: int, world_size: int) -> int:
    behaviour = os.environ.get("KD_STUB_RANK_BEHAVIOUR", "exit:0")
    parts = dict(part.split("=", 1) for part in behaviour.split(",")[1:])
    mode = parts.get(f"rank{global_rank}", behaviour.split(",")[0])
    received: list[str] = []
    signal.signal(signal.SIGUSR1, lambda signum, _frame: received.append(signal.Signals(signum).name))
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signal.Signals(signum).name))
    Path(os.environ["KD_STUB_DIR"], f"rank{global_rank}.ready").write_text(str(os.getpid()))
    if mode.startswith("exit:"):
        code = int(mode.split(":")[1])
    else:
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        code = RESUME_EXIT_CODE if received else 1
    Path(os.environ["KD_STUB_DIR"], f"rank{global_rank}.json").write_text(
        json.dumps({"received": received, "exit": code, "world_size": world_size}))
    return code


def install_stub_python(path: Path) -> Path:
    """An executable that behaves like ``python -u -m deepspeed.launcher.runner ...`` for the launch scripts."""
    path.write_text('#!/bin/sh\n'
                    '[ "$1 $2 $3" = "-u -m deepspeed.launcher.runner" ] || { echo "stub: unexpected $*" >&2; exit 99; }\n'
                    'shift 3\n'
                    f'exec "{sys.executable}" "{Path(__file__).resolve()}" runner "$@"\n')
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    role, arguments = sys.argv[1], sys.argv[2:]
    if role == "runner":
        sys.exit(runner(arguments))
    if role == "launch":
        sys.exit(launch(*map(int, arguments)))
    sys.exit(rank(*map(int, arguments)))
