"""Checkpoint saving under failure (permissions, a full disk, a rank killed mid-save), leftovers, pruning of
universal siblings, the resume decision for a changed world size, and the stop/failure reporting of the trainer.

One process, no process group: ``save_checkpoint`` with ``world_size=1`` and a stand-in engine that writes what
DeepSpeed's ZeRO-3 save writes for one rank, with ``torch.save`` as DeepSpeed does."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_pipeline import checkpoint as ckpt
from kd_pipeline.config import load_config
from kd_pipeline.engine.ds_config import resolve_ds_config
from kd_pipeline.engine.stopping import StopController, install_failure_report
from kd_pipeline.recipes.common import prepare_resume
from kd_pipeline.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_FILES = {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}


class StandInEngine:
    """``save_checkpoint`` as a one-rank ZeRO-3 DeepSpeed engine: two torch.save files under ``dir/tag``."""

    def __init__(self, numel: int = 1000):
        self.numel = numel
        self.failure: Exception | None = None

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        assert save_latest is False
        if self.failure is not None:
            raise self.failure
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": torch.arange(self.numel, dtype=torch.float32)},
                   folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        torch.save({"exp_avg": torch.ones(self.numel)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def save(engine, checkpoint_dir: Path, step: int, world_size_saved: int = 1) -> str:
    state = ckpt.TrainerState(step=step, world_size=world_size_saved)
    return ckpt.save_checkpoint(engine, checkpoint_dir, state, rank=0, world_size=1,
                                rank_state={"rng": torch.get_rng_state()}, config_yaml="run: {}\n", keep_last=3,
                                loader_states={"train": {"format": 1, "step": step}})


def test_permission_error_stops_with_a_clear_message_and_keeps_the_previous(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    engine = StandInEngine()
    save(engine, checkpoints, 2)
    engine.failure = PermissionError(errno.EACCES, "Permission denied", str(checkpoints / "step_00000004"))
    with pytest.raises(ckpt.CheckpointError) as caught:
        save(engine, checkpoints, 4)
    message = str(caught.value)
    assert "step_00000004" in message and "Permission denied" in message and "permissions" in message
    assert "(step_00000002) is intact" in message
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert ckpt.find_resume_tag(checkpoints) == "step_00000002"
    assert ckpt.verify_checkpoint(checkpoints / "step_00000002") is None


def test_full_disk_during_torch_save_is_reported_with_free_space(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past the limit (EFBIG), as a full disk refuses them (ENOSPC);
    torch.save reports either as a RuntimeError from its C++ stream, which must still become a CheckpointError."""
    checkpoints = tmp_path / "checkpoints"
    engine = StandInEngine(numel=200_000)  # 800 kB per file
    save(engine, checkpoints, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(ckpt.CheckpointError) as caught:
            save(engine, checkpoints, 4)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "torch.save failed" in str(caught.value) and "GiB free" in str(caught.value)
    assert not (checkpoints / "step_00000004" / ckpt.MARKER).exists()
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert ckpt.find_resume_tag(checkpoints) == "step_00000002"


def test_a_leftover_folder_of_the_same_step_never_reaches_the_new_marker(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    leftover = checkpoints / "step_00000004"
    leftover.mkdir(parents=True)
    (leftover / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"from a 2-rank save that was killed")
    save(StandInEngine(), checkpoints, 4)
    marker = json.loads((leftover / ckpt.MARKER).read_text())
    assert DEEPSPEED_FILES <= set(marker["files"])
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" not in marker["files"]
    assert {path.name for path in leftover.iterdir()} == set(marker["files"]) | {ckpt.MARKER}


def test_kill_hook_leaves_a_partial_folder_that_resume_skips(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save(StandInEngine(), checkpoints, 2)
    child = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]\n"
             "from pathlib import Path\n"
             "from test_checkpoint_robustness import StandInEngine, save\n"
             f"save(StandInEngine(), Path({str(checkpoints)!r}), 4)\n")
    result = subprocess.run([sys.executable, "-c", child], env={**os.environ, ckpt.KILL_IN_SAVE_ENV: "0:4"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    partial = checkpoints / "step_00000004"
    assert {path.name for path in partial.iterdir()} == DEEPSPEED_FILES  # DeepSpeed's files, nothing of ours
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert ckpt.find_resume_tag(checkpoints) == "step_00000002"


def test_pruning_takes_universal_siblings_along(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(StandInEngine(numel=10), checkpoints, step)
        (checkpoints / f"step_{step:08d}_universal" / "zero").mkdir(parents=True)
    (checkpoints / "step_00000009_universal").mkdir()  # its checkpoint is gone
    ckpt.prune(checkpoints, keep_last=2, protect=set())
    assert sorted(path.name for path in checkpoints.iterdir() if path.is_dir()) == [
        "step_00000002", "step_00000002_universal", "step_00000003", "step_00000003_universal"]


# ------------------------------------------------------------------------------------------------ resume decision


def one_rank() -> Runtime:
    return Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dtype=torch.float32)


def tiny_config(output_dir: Path, universal: str):
    return load_config(str(ROOT / "configs" / "tiny_cpu.yaml"),
                       [f"run.output_dir={output_dir}", f"checkpoint.universal={universal}"])


def test_changed_world_size_resumes_through_universal_or_is_refused(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    save(StandInEngine(numel=10), checkpoints, 2, world_size_saved=2)
    folder = checkpoints / "step_00000002"
    converted = []
    monkeypatch.setattr(ckpt, "convert_to_universal",
                        lambda source: converted.append(source) or ckpt.universal_folder(source))

    with pytest.raises(ckpt.CheckpointError, match="saved by 2 ranks and this run has 1"):
        prepare_resume(tiny_config(tmp_path, "never"), one_rank())
    assert converted == []

    resume = prepare_resume(tiny_config(tmp_path, "auto"), one_rank())
    assert converted == [folder]
    assert (resume.folder, resume.engine_folder) == (folder, checkpoints / "step_00000002_universal")
    assert resume.config.checkpoint.universal == "always"
    ds_config = resolve_ds_config(resume.config, world_size=1, dtype=torch.float32, hidden_size=64)
    assert ds_config["checkpoint"] == {"load_universal": True}
    teacher_config = resolve_ds_config(resume.config, world_size=1, dtype=torch.float32, hidden_size=96,
                                       for_teacher=True)
    assert "checkpoint" not in teacher_config


def test_same_world_size_loads_the_checkpoint_itself(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    save(StandInEngine(numel=10), checkpoints, 2, world_size_saved=1)
    monkeypatch.setattr(ckpt, "convert_to_universal", lambda source: pytest.fail("no conversion expected"))
    resume = prepare_resume(tiny_config(tmp_path, "auto"), one_rank())
    assert resume.engine_folder == resume.folder == checkpoints / "step_00000002"
    assert resume.config.checkpoint.universal == "never"
    assert "checkpoint" not in resolve_ds_config(resume.config, world_size=1, dtype=torch.float32, hidden_size=64)


def test_fresh_start_has_nothing_to_resume(tmp_path):
    resume = prepare_resume(tiny_config(tmp_path, "auto"), one_rank())
    assert resume.folder is None and resume.engine_folder is None


# ----------------------------------------------------------------------------------------- stopping and failures


@pytest.fixture
def restored_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_stop_before_the_job_end_time(monkeypatch, restored_signal_handlers):
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 90))
    assert StopController(stop_before_end_minutes=2).should_stop()  # deadline = end - 120 s: already past
    stopper = StopController(stop_before_end_minutes=1)            # deadline = end - 60 s: 30 s ahead
    assert not stopper.should_stop() and stopper.requested_by is None
    monkeypatch.setenv("SLURM_JOB_END_TIME", "not-a-time")
    assert StopController(stop_before_end_minutes=1).deadline is None


def test_a_signal_sets_the_flag_and_the_next_boundary_stops(restored_signal_handlers):
    stopper = StopController()
    assert not stopper.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stopper.should_stop() and stopper.requested_by == "SIGUSR1"


@pytest.mark.parametrize("pending_together", [False, True])
def test_term_names_the_stop_whatever_the_order(restored_signal_handlers, caplog, pending_together):
    """Preemption: TERM reaches every process and the batch shell forwards USR1; the log names TERM, the cause,
    whether USR1 came second or both were pending at once (Python then runs the USR1 handler first)."""
    stopper = StopController()
    if pending_together:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGTERM})
    else:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
    with caplog.at_level(logging.WARNING):
        assert stopper.should_stop()
    assert stopper.requested_by == "SIGTERM" and "stop requested (SIGTERM)" in caplog.text
    os.kill(os.getpid(), signal.SIGUSR1)  # a later USR1 does not rename it either
    assert stopper.requested_by == "SIGTERM"


WATCHDOG_CHILD = """
import sys, time
from kd_pipeline.engine.stopping import StepWatchdog
watchdog = StepWatchdog(timeout_minutes=0.5 / 60)  # dumps after 0.4 s in one step

def step_that_finishes():
    time.sleep(0.05)

def step_blocked_in_a_collective():
    time.sleep(1.5)

with watchdog.step():
    step_that_finishes()
time.sleep(0.8)  # past the first step's deadline: it was disarmed, so nothing is written
print("between steps", file=sys.stderr, flush=True)
with watchdog.step():
    step_blocked_in_a_collective()
print("the rank went on", file=sys.stderr, flush=True)
"""


def test_a_rank_stuck_in_a_step_dumps_its_stacks_and_goes_on():
    """StepWatchdog: only a step that outlasts 0.8 x the timeout writes a dump, naming the function it is stuck in
    (written by faulthandler's C thread while the main thread sleeps); the rank is not stopped by it."""
    result = subprocess.run([sys.executable, "-c", WATCHDOG_CHILD], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    before, _, after = result.stderr.partition("between steps")
    assert "Timeout" not in before and "Thread" not in before, before
    assert "Timeout (0:00:00.400000)!" in after and "step_blocked_in_a_collective" in after, after
    assert after.rstrip().endswith("the rank went on") and after.count("Timeout (") == 1


def test_failure_report_names_the_rank_and_the_last_completed_step(caplog, monkeypatch):
    calls = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args))
    state = ckpt.TrainerState(step=3)
    install_failure_report(5, state)
    state.step = 7  # the loop moves on after installation; the report reads the step at failure time
    error = torch.distributed.DistBackendError("Connection closed by peer [127.0.0.1]:1234")
    handlers = {number: signal.getsignal(number) for number in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with caplog.at_level(logging.CRITICAL):
            sys.excepthook(type(error), error, None)
        # a failing rank keeps its own exit status: the launcher's TERM while it shuts down is ignored
        assert {signal.getsignal(number) for number in handlers} == {signal.SIG_IGN}
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert "rank 5 failed after step 7 was completed" in caplog.text
    assert "peer rank died or stopped responding" in caplog.text
    assert len(calls) == 1 and calls[0][1] is error  # the usual traceback still follows


# ------------------------------------------------------------------------------ rank 0 converts, the others wait


def _conversion_worker(rank: int, init_file: str, result_dir: str) -> None:
    """One of two gloo ranks with a 2 s process-group timeout, waiting through two 4 s stand-in conversions: one
    that succeeds (of step 2), one that fails (of step 4)."""
    import datetime

    import torch.distributed as dist

    from kd_pipeline.recipes import common

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))

    def convert(folder: Path) -> Path:
        time.sleep(4)
        if folder.name == "step_00000004":
            raise ckpt.CheckpointError("disk full while converting")
        return ckpt.universal_folder(folder)

    ckpt.convert_to_universal = convert  # this spawned process only
    common.CONVERSION_POLL_SECONDS = 0.5
    runtime = Runtime(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), dtype=torch.float32)
    results = []
    for step in (2, 4):
        try:
            results.append(str(common._convert_on_rank0(Path(f"/ckpt/step_{step:08d}"), runtime)))
        except ckpt.CheckpointError as error:
            results.append(f"error: {error}")
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_other_ranks_wait_out_a_conversion_longer_than_the_timeout_and_share_its_outcome(tmp_path):
    torch.multiprocessing.spawn(_conversion_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        converted, failed = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert converted == "/ckpt/step_00000002_universal"
        assert failed.startswith("error: rank 0 could not convert /ckpt/step_00000004") and "disk full" in failed
