"""The run folder's lock: one live training job per run name.

A lock in the run folder (``flock``, held by the job and inherited by the child) refuses a second
live job on the same name from any process; a lock file left by a process that died holds no lock
and is taken over.
"""
from __future__ import annotations

import contextlib
import os

from .job_request import JobInputError

LOCK_FILE = ".longalign-job.lock"


def lock_holder(run_dir: str) -> str | None:
    """Who holds the run folder's lock (its recorded process), or None when no live job does."""
    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, shared=True):
            _unlock(fd)
            return None
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "process unknown"
    except OSError:
        return "process unknown"
    finally:
        os.close(fd)


def _try_lock(fd: int, shared: bool = False) -> bool:
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


class RunLock:
    """The run folder's lock: held while the job (and its child, which inherits it) lives. The file
    records the holder for the refusal message; it is never removed (a file with nobody holding its
    lock is free)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            os.close(fd)
            raise JobInputError("name", f"a training job is already running on {os.path.dirname(self.path)} "
                                        f"({lock_holder(os.path.dirname(self.path)) or 'process unknown'}); wait for "
                                        "it or cancel it")
        self.fd = fd
        self.record(f"job pid {os.getpid()}")
        return self

    def record(self, holder: str) -> None:
        """Write who holds the lock (read by the refusal message of a second job)."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, holder.encode("utf-8"))

    def release(self) -> None:
        if self.fd is not None:
            _unlock(self.fd)
            os.close(self.fd)
            self.fd = None
