"""Running a launch script with the real trainer from tests: start it under the stand-in Slurm tools, watch its
metrics, find its rank processes in /proc (for killing or stopping one), and clean up after it."""

from __future__ import annotations

import signal
import sys
import uuid
from pathlib import Path

from tests.engine.launch import free_port
from tests.hpc.conftest import signal_tagged, start_script, wait_for

CONFIG = "configs/tiny_cpu.yaml"
JOB_TIMEOUT = 900


def data_overrides(synth_data: dict, output_dir: Path) -> list[str]:
    return [f"data.shards={synth_data['shards']}", f"data.tokenizer={synth_data['tokenizer']}",
            f"data.pt_shards={synth_data['pt_shards']}", f"run.output_dir={output_dir}"]


class Job:
    """One run of a launch script with the real trainer, started on construction (its own MASTER_PORT and a tag in
    its environment that finds its processes); ``wait_for_steps`` while it trains, ``finish`` for its exit."""

    def __init__(self, cluster, script: str, output_dir: Path, overrides: list[str], *, nodes: int, nproc: int,
                 env: dict | None = None):
        self.cluster, self.output_dir = cluster, output_dir
        self.tag = uuid.uuid4().hex  # finds this job's processes in /proc
        self.log_file = cluster.root / f"{script}.{self.tag}.log"
        job_env = cluster.env(nodes=nodes, nproc_per_node=nproc, extra={
            "MASTER_PORT": str(free_port()), "KD_PYTHON": sys.executable, "KD_TEST_JOB_TAG": self.tag, **(env or {})})
        self.process = start_script(script, [CONFIG, *overrides], job_env, self.log_file)

    def wait_for_steps(self, count: int, timeout: float = JOB_TIMEOUT) -> None:
        path = self.output_dir / "metrics.jsonl"
        wait_for(lambda: path.is_file() and len(path.read_text().splitlines()) >= count, timeout,
                 f"{count} logged steps", self.process, self.log_file)

    def finish(self, timeout: float = JOB_TIMEOUT) -> tuple[int, str]:
        try:
            self.process.wait(timeout=timeout)
        except BaseException:
            self.kill_all()  # a hung job must not outlive its test
            raise
        return self.process.returncode, self.log_file.read_text()

    def signal_all(self, signum: int) -> int:
        """``signum`` to every process of the job, as Slurm sends TERM on preemption or scancel."""
        return signal_tagged(self.tag, signum)

    def processes(self) -> list[tuple[int, list[bytes], bytes, bytes]]:
        """(pid, environment, command line, parent's command line) of every process of this job."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
                parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                parent_cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
            except OSError:
                continue
            if f"KD_TEST_JOB_TAG={self.tag}".encode() in environ:
                found.append((int(entry.name), environ, cmdline, parent_cmdline))
        return found

    def rank_pid(self, rank: int) -> int:
        """The training process of ``rank``: ``python -u -m kd_pipeline.train`` whose parent has another command
        line (srun's names the trainer among its arguments; a process forked from the trainer would have the same
        one). Its DataLoader workers come from its forkserver (``python -c ...``). Its rank is SLURM_PROCID under
        srun, RANK under local_distill.sh."""
        trainer = b"-u\0-m\0kd_pipeline.train\0"
        found = [pid for pid, environ, cmdline, parent_cmdline in self.processes()
                 if (f"SLURM_PROCID={rank}".encode() in environ or f"RANK={rank}".encode() in environ)
                 and trainer in cmdline and cmdline != parent_cmdline and b"fake_slurm.py" not in cmdline]
        assert len(found) == 1, f"expected one training process of rank {rank}, found {found}"
        return found[0]

    def kill_all(self) -> None:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            signal_tagged(self.tag, signum)


def requeues(cluster) -> list[list[str]]:
    return [call["argv"] for call in cluster.calls("scontrol") if call["argv"][0] == "requeue"]
