"""Imported first by the forkserver that starts this rank's DataLoader workers (``loaders.worker_context``).

Slurm signals every process of a step, this server included: ignoring USR1 and TERM keeps it alive through a
preemption notice, so the rank can still validate and save before it stops. The server needs no signal to end: it
exits when the rank that started it closes its end of their pipe (the rank's exit, or its death). Workers inherit
the ignored dispositions; ``loaders.outlive_stop_signals`` restores them after blocking both signals.
"""

import signal

signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
