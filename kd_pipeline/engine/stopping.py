"""Stop early, together: a signal (USR1 from Slurm's ``--signal``, TERM) or the job's end time approaching sets a
flag; at the next step boundary every rank agrees on it with an all-reduce (MAX), so all ranks save the same
checkpoint and exit with ``RESUME_EXIT_CODE``, which ``launch/slurm_distill.sh`` reads as "requeue me".

Signal handlers only set a flag (nothing else is async-signal-safe); the decision happens at step boundaries.

Hang protection is the process group's timeout (``deepspeed.timeout_minutes``, set in ``runtime.init_runtime``): a
peer that died or stopped responding makes the collective a rank waits in raise within it (gloo raises; NCCL with
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` aborts the process from its watchdog, naming the rank and the collective).
``install_failure_report`` then names this rank and the last completed step in the log before the process exits
non-zero, and the launchers (``torchrun``/``deepspeed``, ``srun --kill-on-bad-exit``) take the other ranks down.
The rank that caused the hang is often not the one that raises (it is blocked elsewhere: another collective, a data
loader), so ``StepWatchdog`` makes every rank still inside one step after 0.8 x the timeout dump all its threads'
Python stacks to stderr first: the log then shows where each rank was.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from kd_pipeline.engine.collectives import MAX, all_reduce_floats

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
RESUME_EXIT_CODE = 75
COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|timed out|timeout|connection|peer|pair closure", re.IGNORECASE)


_early_signal: str | None = None
# Which signal names a stop when a rank gets both: TERM (preemption, scancel: the job ends after a grace time) over
# USR1 (the time-limit warning). On preemption every process gets TERM and the batch shell also forwards a USR1;
# when both are pending at once (a rank blocked in a collective) Python runs the handlers in signal-number order,
# USR1 first, so arrival order cannot be what decides.
_PRECEDENCE = {"SIGUSR1": 1, "SIGTERM": 2}


def _stop_cause(current: str | None, signum: int) -> str:
    name = signal.Signals(signum).name
    if current is None or _PRECEDENCE.get(name, 0) > _PRECEDENCE.get(current, 0):
        return name
    return current


def catch_stop_signals() -> None:
    """Install the flag-setting handlers at start-up, before models load: a USR1/TERM that arrives while a 13B
    teacher is still loading must become a stop request, not kill the rank (which would fail the job unrequeued).
    ``StopController`` takes the flag over once the loop starts."""
    def remember(signum: int, _frame) -> None:
        global _early_signal
        _early_signal = _stop_cause(_early_signal, signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, remember)


class StopController:
    def __init__(self, stop_before_end_minutes: float = 0.0):
        self.requested_by: str | None = _early_signal
        self.deadline = self._job_deadline(stop_before_end_minutes)
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    @staticmethod
    def _job_deadline(minutes: float) -> float | None:
        """Slurm exports the job's end as SLURM_JOB_END_TIME (epoch seconds; the launcher fills it from scontrol)."""
        end = os.environ.get("SLURM_JOB_END_TIME")
        if minutes <= 0 or not end or not end.isdigit():
            return None
        return int(end) - 60.0 * minutes

    def _on_signal(self, signum: int, _frame) -> None:
        self.requested_by = _stop_cause(self.requested_by, signum)

    def should_stop(self) -> bool:
        """Collective: every rank must call this at the same step boundary."""
        if self.requested_by is None and self.deadline is not None and time.time() >= self.deadline:
            self.requested_by = "job end time"
        stop = all_reduce_floats([1.0 if self.requested_by else 0.0], MAX)[0] > 0
        if stop:
            log.warning("stop requested (%s): saving a checkpoint and exiting with code %d (resume me)",
                        self.requested_by or "another rank", RESUME_EXIT_CODE)
        return stop


class StepWatchdog:
    """Dumps every thread's Python stack to stderr when this rank spends longer than ``0.8 x timeout_minutes`` in
    one step (``faulthandler.dump_traceback_later``: a C thread writes the dump, so it works while the main thread
    is blocked in a collective or waiting on a data loader). 0.8: before the peers' collectives reach the process
    group's timeout and the launcher takes the ranks down. The dump does not stop the rank; a step that is merely
    slow continues (and its dump says how far it had got)."""

    def __init__(self, timeout_minutes: float):
        self.seconds = 0.8 * 60.0 * timeout_minutes

    @contextmanager
    def step(self) -> Iterator[None]:
        faulthandler.dump_traceback_later(self.seconds, repeat=False, file=sys.stderr, exit=False)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()


def install_failure_report(rank: int, state) -> None:
    """On an uncaught exception, log which rank failed and after which step (``state.step``: the last step the loop
    completed, read when the failure happens), then let Python print the traceback as usual."""
    previous_hook = sys.excepthook

    def report(kind, error, traceback) -> None:
        # This rank is failing: a TERM or USR1 from now on (srun --kill-on-bad-exit ending the step once a peer
        # died, a forwarded notice) must not replace the crash's exit status. Python restores the default action
        # (terminate) late in its shutdown, so a TERM arriving then would end the rank as "killed by TERM" (143)
        # and the job's status would hide the rank that failed first; an ignored disposition outlives the shutdown.
        # A rank that hangs while exiting still gets the launcher's KILL.
        for number in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        if not issubclass(kind, KeyboardInterrupt):
            # gloo raises plain RuntimeErrors with varying texts ("Connection closed by peer", "Timed out waiting
            # 30000ms for recv", "Application timeout caused pair closure").
            collective = isinstance(error, dist.DistError) or COLLECTIVE_FAILURE.search(str(error)) is not None
            log.critical("rank %d failed after step %d was completed: %s: %s%s", rank, state.step, kind.__name__,
                         str(error).splitlines()[0][:300] if str(error) else "",
                         " (a peer rank died or stopped responding within deepspeed.timeout_minutes)"
                         if collective else "")
        previous_hook(kind, error, traceback)

    sys.excepthook = report
