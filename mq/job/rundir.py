"""Run folders: which names and places are allowed, one process per folder, and removing only
what this invocation created.

Hydra creates a job's folder (and writes ``.hydra/`` and ``launch.log`` into it) before the task
function runs. A single run (no ``-m``) is therefore checked earlier, by mq.job.guard.Guard, which
records here the folders it created and the lock it took. When the job fails on bad input later
(a data path, say), :func:`remove_created` removes what Hydra and mq wrote into a folder this
invocation created, and the empty folders it created: never a folder that existed before, never
a whole tree (``os.rmdir`` only removes empty folders).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mq.core import folders
from mq.core.errors import ConfigError
from mq.core.folders import LOCK_FILE, lock_held, remove_created

log = logging.getLogger(__name__)

# The code's own folder (the clone): a run folder must never be it or hold it.
CODE_ROOT = Path(__file__).resolve().parents[2]
# The files mq and Hydra write into a run folder by name: none may be a link (or a folder).
RUN_FILES = (
    "config.yaml",
    "summary.json",
    "checkpoint.pt",
    "metrics.jsonl",
    "launch.log",
    LOCK_FILE,
)
HYDRA_RECORD = ("config.yaml", "hydra.yaml", "overrides.yaml")
NAME = re.compile(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]*")
NAME_ALLOWED = "letters, digits and - _ . = , + (not starting with '.'), at most 200 characters"


class FolderRefused(ConfigError):
    """The job must not write into its folder at all (not even a failed summary.json): the
    folder is not a safe place for a run, or another process runs in it."""


def check_name(key: str, value: Any) -> None:
    """``run_name`` and ``sweep_name`` become one folder name: no separators, no ``..``."""
    text = "" if value is None else str(value)
    if not NAME.fullmatch(text) or len(text) > 200:
        raise ConfigError(f"{key}={text!r} is not allowed; allowed: {NAME_ALLOWED}")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _hydra_subdir() -> str | None:
    """Where Hydra writes its record of the job inside the job's folder (``.hydra``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ".hydra"
    subdir = HydraConfig.get().get("output_subdir")
    return None if subdir is None else str(subdir)


def check_output_subdir(value: Any) -> None:
    """``hydra.output_subdir``: Hydra writes config.yaml, hydra.yaml and overrides.yaml into
    run_dir/VALUE, so it must be one plain folder name inside the run folder (or null)."""
    if value is None:
        return
    text = str(value)
    if text in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._=,+-]{1,200}", text):
        raise FolderRefused(
            f"hydra.output_subdir={text!r} is not allowed; allowed: null or one folder name "
            "inside the run folder (letters, digits and - _ . = , +), e.g. .hydra"
        )


def _existing(kind: str, given: Path, folder: Path, keys: str) -> set[str]:
    """The names in ``folder`` (empty when it does not exist); a file is refused."""
    if not os.path.lexists(folder):
        return set()
    if not folder.is_dir():
        raise FolderRefused(f"{kind} {given} is a file, not a folder; choose another {keys}")
    return {p.name for p in folder.iterdir()}


def _check_sweep_folder(sweep_dir: Path, sweep: Path) -> None:
    keys = "sweep_name or hydra.sweep.dir"
    names = _existing("sweep folder", sweep_dir, sweep, keys)
    bad = folders.not_plain(sweep, ("sweep.json", "multirun.yaml"))
    if bad:
        raise FolderRefused(f"sweep folder {sweep_dir}: {bad}; mq does not write through it")
    if names and not folders.is_mq_sweep(sweep):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise FolderRefused(
            f"sweep folder {sweep_dir} holds files that are not an mq sweep ({shown}); "
            f"choose another {keys}"
        )


def check_location(run_dir: Path, sweep_dir: Path | None = None) -> None:
    """Refuse a run folder that is (or holds) the code, the current directory or a git
    checkout, that is the sweep's own folder or outside it, that exists and holds no mq run
    (someone else's files), or whose mq files are links; the same for the sweep folder."""
    where = Path(os.path.abspath(run_dir)).resolve()
    folders_ = [("run folder", run_dir, where, "run_name or hydra.run.dir")]
    if sweep_dir is not None:  # sweep.json and multirun.yaml go there
        sweep = Path(os.path.abspath(sweep_dir)).resolve()
        folders_.append(("sweep folder", sweep_dir, sweep, "sweep_name or hydra.sweep.dir"))
    for kind, given, folder, keys in folders_:
        for label, other in (("the code folder", CODE_ROOT), ("the current directory", Path.cwd())):
            if _is_within(other.resolve(), folder):
                raise FolderRefused(
                    f"{kind} {given} is or contains {label} ({other}); choose another {keys}"
                )
    if sweep_dir is not None:
        if where == sweep:
            raise FolderRefused(
                f"this sweep job's folder would be the sweep folder {sweep_dir} itself (all its "
                "overrides are left out of folder names); sweep over a key that names runs, "
                "or launch without -m"
            )
        if not _is_within(where, sweep):
            raise FolderRefused(
                f"this sweep job's folder {run_dir} is outside its sweep folder {sweep_dir}; "
                "allowed: a hydra.sweep.subdir inside it"
            )
        _check_sweep_folder(sweep_dir, sweep)
    names = _existing("run folder", run_dir, where, "run_name or hydra.run.dir")
    subdir = _hydra_subdir()
    if not names or (names == {"launch.log"} and subdir is None):
        return  # new, or what Hydra writes for a job without its record (output_subdir=null)
    if sweep_dir is None and {"sweep.json", "multirun.yaml"} & names:
        raise FolderRefused(f"run folder {run_dir} is a sweep folder; choose another run_name")
    if ".git" in names:
        raise FolderRefused(f"run folder {run_dir} is a git checkout; choose another run_name")
    record = tuple(f"{d}/{f}" for d in {".hydra", subdir or ".hydra"} for f in HYDRA_RECORD)
    bad = folders.not_plain(where, (*RUN_FILES, *record), tuple({".hydra", subdir or ".hydra"}))
    if bad:
        raise FolderRefused(
            f"run folder {run_dir}: {bad}; mq does not write through it (move it away, or "
            "choose another run_name)"
        )
    if not folders.is_mq_run(where, subdir):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise FolderRefused(
            f"run folder {run_dir} holds files that are not an mq run ({shown}); "
            "choose another run_name or hydra.run.dir"
        )


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
