"""A folder used by one process at a time (a run folder, the demo's output folder).

`folder_lock(folder)` holds an OS file lock (`fcntl.flock`) on `folder/.lock` for the duration
of a block, and writes the holder's PID into the file. The OS releases the lock when the
process ends, however it ends, so a killed run never blocks the next one; a second process on
the same folder stops at once with one line naming the holder. Locks are per process: in a
many-process job only one process (rank 0) takes it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class FolderInUseError(ValueError):
    """Another process holds the folder; the message is one line naming it and its PID."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold `folder` (created if missing) for the block; `what` names the user of the folder in
    the error (e.g. "training run", "demo")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise FolderInUseError(f"{folder} is in use by another {what} (process {holder}): wait for it to end, "
                               "or use another folder") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock
