"""Fixtures for running the launch scripts under stand-in Slurm tools (fake_slurm.py) and, for the fast tests, a
stand-in rank (stub_rank.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hpc.fake_slurm import install_fake_slurm, read_log
from tests.hpc.stub_rank import install_stub_python

ROOT = Path(__file__).resolve().parents[2]
JOB_ID = 4242


@dataclass
class FakeCluster:
    """A Slurm job's batch environment on this machine; ``env(...)`` builds the environment of one job run."""
    root: Path
    bin_dir: Path
    log_path: Path
    status_dir: Path

    def env(self, *, nodes: int, nproc_per_node: int, extra: dict | None = None) -> dict:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "MASTER_"))}
        nodelist = "node[1-2]" if nodes == 2 else "node1" if nodes == 1 else f"node[1-{nodes}]"
        env.update(PATH=f"{self.bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID=str(JOB_ID),
                   SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
                   SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NAME="kd_distill", KD_NPROC_PER_NODE=str(nproc_per_node),
                   KD_FAKE_SLURM_LOG=str(self.log_path), KD_STATUS_DIR=str(self.status_dir),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        env.update(extra or {})
        return env

    def log(self) -> list[dict]:
        return read_log(self.log_path)

    def calls(self, tool: str) -> list[dict]:
        return [entry for entry in self.log() if entry["tool"] == tool]


def make_cluster(root: Path) -> FakeCluster:
    root.mkdir(parents=True, exist_ok=True)
    return FakeCluster(root=root, bin_dir=install_fake_slurm(root / "bin"), log_path=root / "slurm_calls.jsonl",
                       status_dir=root / "status")


@pytest.fixture
def fake_cluster(tmp_path) -> FakeCluster:
    return make_cluster(tmp_path)


@pytest.fixture
def stub_python(tmp_path) -> tuple[Path, Path]:
    """(the KD_PYTHON stand-in, the folder its runners and ranks report to)."""
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    return install_stub_python(tmp_path / "stub_python"), stub_dir


def start_script(script: str, args: list[str], env: dict, log_file: Path) -> subprocess.Popen:
    """Start ``bash launch/<script> ARGS`` in the repository root, output to ``log_file``, in a session of its own
    (as a batch shell or a terminal's foreground job: a signal to its process group reaches no test process)."""
    handle = open(log_file, "w")
    process = subprocess.Popen(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=env, stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=terminal_signals)
    process.log_file = log_file
    return process


def terminal_signals() -> None:
    """SIGINT as a terminal's shell leaves it: a test run in the background of a shell inherits SIGINT ignored,
    and a shell started with a signal ignored can never trap it (POSIX), so Ctrl-C could not be tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tagged_processes(tag: str) -> list[int]:
    """Every process whose environment carries ``KD_TEST_JOB_TAG=tag``: one job's batch shell and all below it."""
    found = []
    marker = f"KD_TEST_JOB_TAG={tag}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def signal_tagged(tag: str, signum: int) -> int:
    """Send ``signum`` to every process of one job (``tagged_processes``), as Slurm does on preemption or scancel;
    returns how many there were."""
    pids = tagged_processes(tag)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return len(pids)


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None,
             log_file: Path | None = None) -> None:
    """Poll ``condition`` until true; fail with ``what`` (and the script's output) on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            output = log_file.read_text()[-4000:] if log_file else ""
            raise AssertionError(f"the script exited ({process.returncode}) before {what}:\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def send_signal(process: subprocess.Popen, signum: int = signal.SIGUSR1) -> None:
    os.kill(process.pid, signum)
