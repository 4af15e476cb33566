"""The one way this project replaces a file atomically: readers see the old bytes or the new ones, never a mix.

Used by checkpoints (``latest``, ``best``, ``COMPLETE.json``), loader states, ``data_prep``'s manifests and
rejects, and ``eval run``'s merged answer files. Order: write a temporary file in the same folder (a rename is only
atomic within one filesystem), flush and fsync it, rename it over the target, then fsync the folder so the rename
itself survives a crash (POSIX leaves a directory entry in the page cache until then). The temporary name carries
the process id, so two ranks writing the same target never share one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The temporary file of a write in flight: ".NAME.tmp<pid>" beside NAME (group 1 is NAME). Cleanups that sweep a
# folder shared with other processes (data_prep's array tasks) must recognise it as someone else's work in progress.
TEMPORARY_NAME = re.compile(r"\.(.+)\.tmp\d+")


def write_atomic(path: str | Path, payload: bytes | str) -> None:
    """Replace ``path`` with ``payload`` (str is written as UTF-8) atomically and durably."""
    path = Path(path)
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")  # matches TEMPORARY_NAME
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # Some filesystems (and all of Windows) cannot open a directory for fsync; the file itself is already durable.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
