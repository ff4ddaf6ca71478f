"""One process per run folder: :class:`RunLock` (a ``flock`` the kernel drops when the process
ends), and what this process's :class:`mq.job.guard.Guard` did before Hydra made the folder
(:class:`Started`): the job takes over that lock, a failed start undoes it."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mq.core.folders import LOCK_FILE, lock_held, remove_created
from mq.job.rundir import FolderRefused

log = logging.getLogger(__name__)


def _flock_exclusive(fd: int) -> None:
    """``flock(LOCK_EX | LOCK_NB)``, tried a few times over 0.2 s: a reader (python -m mq.runs,
    a sweep's ledger) may hold a shared lock for microseconds while it checks for a live run."""
    for _ in range(4):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            time.sleep(0.05)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class RunLock:
    """An exclusive ``flock`` on ``run_dir/run.lock`` for as long as this process runs the job.
    The kernel drops it when the process ends, however it ends: a lock is never stale. The file
    says who holds it (pid, host), for the message of a second launch."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.file: IO[str] | None = None

    def acquire(self) -> RunLock:
        try:  # never through a planted link; held open for the lock's lifetime
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            what = "a symbolic link" if exc.errno == errno.ELOOP else "not a regular file"
            raise FolderRefused(
                f"run folder {self.run_dir}: {LOCK_FILE} is {what}; mq does not write through "
                "it (move it away, or choose another run_name)"
            ) from None
        file = open(fd, "a+")  # noqa: SIM115
        try:
            _flock_exclusive(file.fileno())
        except OSError as exc:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                # a filesystem without locks must not stop every run on it
                log.warning("%s: no file locks on this filesystem (%s); not locked", self.path, exc)
                return self
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise FolderRefused(
                f"run folder {self.run_dir} is in use by {holder}; wait for it to end "
                "(or stop it), then run the same command again"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None


def wait_for_holder(run_dir: Path) -> bool:
    """Wait while another process holds ``run_dir``'s :class:`RunLock` (a concurrent launch of
    the same sweep running this job); True when one did. Never creates the lock file."""
    seen = started(run_dir)
    if seen is not None and seen.lock is not None:
        return False  # this process holds it: waiting would never end
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # never locked: nobody runs it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                return False  # no locks on this filesystem: nothing to wait for
        log.info("%s is run by another process; waiting for it to end", run_dir)
        fcntl.flock(fd, fcntl.LOCK_SH)  # returns when the holder ends, however it ends
        return True
    finally:
        os.close(fd)  # drops the shared lock at once


@dataclass
class Started:
    """What :class:`mq.job.guard.Guard` did for the run folder before Hydra made it."""

    run_dir: Path
    created: list[Path] = field(default_factory=list)
    lock: RunLock | None = None
    checked: bool = False  # mq.job.checks.check passed on the config the job receives


# run folder (absolute) -> what this process's Guard recorded for it
_started: dict[Path, Started] = {}


def started(run_dir: Path) -> Started | None:
    return _started.get(Path(os.path.abspath(run_dir)))


def record_start(record: Started) -> None:
    """Remember what :class:`mq.job.guard.Guard` did for a run folder: the job takes over its
    lock (:func:`take_lock`), a failed start undoes it (:func:`undo_starts`)."""
    _started[record.run_dir] = record


def take_lock(run_dir: Path) -> RunLock | None:
    """Lock ``run_dir`` for this job; None when this process already holds its lock."""
    seen = started(run_dir)
    if seen is not None and seen.lock is not None:
        return None
    return RunLock(run_dir).acquire()


def wait_for_lock(run_dir: Path, held: bool, timeout: float = 30.0) -> bool:
    """Wait (up to ``timeout`` s) until some process holds run_dir's lock (``held``), or until
    none does; a data-parallel job's other ranks wait so for rank 0 (mq.core.distributed). False
    when the time ran out. (Rank 0 exiting ends the other ranks: torchrun stops them.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        locked = lock_held(run_dir)  # False also once rank 0 removed it, undoing its start
        if locked is None or locked == held:  # None: no locks to wait for here
            return True
        time.sleep(0.05)
    return False


def undo_starts() -> list[Path]:
    """A start that failed before the job ran (Hydra could not write its files): remove what
    this process's Guard created; returns the run folders."""
    undone = []
    for record in list(_started.values()):
        if record.lock is not None:
            record.lock.release()
        remove_created(record.run_dir, record.created)
        _started.pop(record.run_dir, None)
        undone.append(record.run_dir)
    return undone
