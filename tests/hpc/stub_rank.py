"""A stand-in for ``python -u -m kd_pipeline.train`` (one rank), so the launch scripts' logic (arguments,
environment, signal handling, exit codes, requeue) is tested in seconds. ``python -m kd_pipeline.plan ...`` (the
scripts' batch check) is handed to the real interpreter.

Used as ``KD_PYTHON`` through a wrapper written by ``install_stub_python``. Each rank finds its rank as the trainer
does (RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS), starts one child that ignores USR1 and TERM (as the
trainer's DataLoader workers do), writes ``$KD_STUB_DIR/rank<r>.ready`` once its handlers are installed and
``rank<r>.json`` when it exits (argv, environment, signals received, exit code), and, like the trainer, its exit
code to ``$KD_STATUS_DIR/rank<r>.rc``. ``$KD_STUB_RANK_BEHAVIOUR``:

- ``exit:<code>``: every rank exits with ``code`` at once;
- ``exit_when_all_started:<code>``: exits with ``code`` once every rank of the world is ready (a failure that
  comes after the others installed their handlers);
- ``wait_for_stop``: ranks wait (up to 240 s) for USR1 or TERM, then exit 75 like the trainer after its save;
- ``slow_stop``: ranks wait 240 s whatever they receive (a save that takes long), then exit 75;
a behaviour per global rank can follow, as in ``wait_for_stop,rank1=exit:3`` (rank 1 exits 3 at once).
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
RECORDED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_NTASKS", "SLURM_CPUS_PER_TASK", "SLURM_JOB_END_TIME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "KD_STATUS_DIR")


def ranks_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) by the rule of ``kd_pipeline.runtime.discover_ranks``."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))


def worker() -> int:
    """The stand-in DataLoader worker: ignores the stop signals and ends with its rank."""
    for stop_signal in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.1)
    return 0


def rank(argv: list[str]) -> int:
    global_rank, world_size, local_rank = ranks_from_environment()
    behaviour = os.environ.get("KD_STUB_RANK_BEHAVIOUR", "exit:0")
    parts = dict(part.split("=", 1) for part in behaviour.split(",")[1:])
    mode = parts.get(f"rank{global_rank}", behaviour.split(",")[0])
    received: list[str] = []
    for stop_signal in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(stop_signal, lambda signum, _frame: received.append(signal.Signals(signum).name))
    child = subprocess.Popen([sys.executable, __file__, "worker"])
    stub_dir = Path(os.environ["KD_STUB_DIR"])
    (stub_dir / f"rank{global_rank}.ready").write_text(str(os.getpid()))
    if mode.startswith("exit:"):
        code = int(mode.split(":")[1])
    elif mode.startswith("exit_when_all_started:"):
        deadline = time.monotonic() + 240
        while len(list(stub_dir.glob("rank*.ready"))) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
        code = int(mode.split(":")[1])
    else:
        deadline = time.monotonic() + 240
        while (mode == "slow_stop" or not received) and time.monotonic() < deadline:
            time.sleep(0.05)
        code = RESUME_EXIT_CODE if received else 1
    status_dir = os.environ.get("KD_STATUS_DIR")
    if status_dir:
        Path(status_dir).mkdir(parents=True, exist_ok=True)
        Path(status_dir, f"rank{global_rank:05d}.rc").write_text(f"{code}\n")
    (stub_dir / f"rank{global_rank}.json").write_text(json.dumps({
        "argv": argv, "received": received, "exit": code, "world_size": world_size, "local_rank": local_rank,
        "env": {key: os.environ.get(key) for key in RECORDED_ENV}}))
    child.kill()
    child.wait()
    return code


def install_stub_python(path: Path) -> Path:
    """An executable that behaves like ``python -u -m kd_pipeline.train ...`` for the launch scripts."""
    path.write_text('#!/bin/sh\n'
                    'if [ "$1 $2" = "-m kd_pipeline.plan" ]; then exec "' + sys.executable + '" "$@"; fi\n'
                    '[ "$1 $2 $3" = "-u -m kd_pipeline.train" ] || { echo "stub: unexpected $*" >&2; exit 99; }\n'
                    'shift 3\n'
                    f'exec "{sys.executable}" "{Path(__file__).resolve()}" rank "$@"\n')
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        sys.exit(worker())
    sys.exit(rank(sys.argv[2:]))
