"""Run folders: which names and places are allowed, one process per folder, and removing only
what this invocation created.

Hydra creates a job's folder (and writes ``.hydra/`` and ``launch.log`` into it) before the task
function runs. A single run (no ``-m``) is therefore checked earlier, by :class:`Guard`, a Hydra
callback that runs between composing the config and creating the folder: bad values are refused
with nothing written, a completed run is reported without touching its folder, the folders that
do not exist yet are recorded, and the folder's lock is taken. When the job fails on bad input
later (a data path, say), :func:`remove_created` removes what Hydra and mq wrote into a folder
this invocation created, and the empty folders it created: never a folder that existed before,
never a whole tree (``os.rmdir`` only removes empty folders).
"""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from mq.errors import ConfigError, find_config_error

log = logging.getLogger(__name__)

# The code's own folder (the clone): a run folder must never be it or hold it.
CODE_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = "run.lock"
# Written by Hydra into a job's folder before the job runs.
HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "launch.log")
# What an mq run folder may hold: an existing folder with none of these is someone else's.
RUN_FILES = (
    "config.yaml",
    "summary.json",
    "checkpoint.pt",
    "metrics.jsonl",
    "launch.log",
    ".hydra",
    LOCK_FILE,
)
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


def check_location(run_dir: Path, sweep_dir: Path | None = None) -> None:
    """Refuse a run folder that is (or holds) the code, the current directory or a git
    checkout, that is the sweep's own folder, or that exists and holds someone else's files."""
    where = Path(os.path.abspath(run_dir)).resolve()
    folders = [("run folder", run_dir, where, "run_name or hydra.run.dir")]
    if sweep_dir is not None:  # sweep.json and multirun.yaml go there
        sweep = Path(os.path.abspath(sweep_dir)).resolve()
        folders.append(("sweep folder", sweep_dir, sweep, "sweep_name or hydra.sweep.dir"))
    for kind, given, folder, keys in folders:
        for label, other in (("the code folder", CODE_ROOT), ("the current directory", Path.cwd())):
            if _is_within(other.resolve(), folder):
                raise FolderRefused(
                    f"{kind} {given} is or contains {label} ({other}); choose another {keys}"
                )
    if sweep_dir is not None and where == Path(os.path.abspath(sweep_dir)).resolve():
        raise FolderRefused(
            f"this sweep job's folder would be the sweep folder {sweep_dir} itself (all its "
            "overrides are left out of folder names); sweep over a key that names runs, "
            "or launch without -m"
        )
    if not where.is_dir():
        return
    names = {p.name for p in where.iterdir()}
    if sweep_dir is None and {"sweep.json", "multirun.yaml"} & names:
        raise FolderRefused(f"run folder {run_dir} is a sweep folder; choose another run_name")
    if ".git" in names:
        raise FolderRefused(f"run folder {run_dir} is a git checkout; choose another run_name")
    if names and not names & set(RUN_FILES):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise FolderRefused(
            f"run folder {run_dir} holds files that are not an mq run ({shown}); "
            "choose another run_name or hydra.run.dir"
        )


def missing_dirs(path: Path) -> list[Path]:
    """The folders of ``path`` that do not exist yet, deepest first (what a
    ``mkdir(parents=True)`` would create)."""
    out = []
    current = Path(os.path.abspath(path))
    while not os.path.lexists(current) and current != current.parent:
        out.append(current)
        current = current.parent
    return out


def remove_created(run_dir: Path, created: list[Path], extra: tuple[str, ...] = ()) -> None:
    """Undo a failed start in a folder this invocation created: unlink the named files Hydra
    and mq wrote there (``HYDRA_FILES``, the lock, ``extra``), then ``rmdir`` the created
    folders deepest first, stopping at the first one that is not empty. Does nothing unless
    ``run_dir`` itself is in ``created``: in a folder that existed before, every file may be
    someone else's."""
    run_dir = Path(os.path.abspath(run_dir))
    if run_dir not in created:
        return
    for name in (*HYDRA_FILES, LOCK_FILE, *extra):
        try:
            (run_dir / name).unlink()
        except FileNotFoundError:
            pass
    for folder in (run_dir / ".hydra", *created):
        try:
            folder.rmdir()  # only an empty folder; never a tree
        except FileNotFoundError:
            continue
        except OSError:
            return


class RunLock:
    """An exclusive ``flock`` on ``run_dir/run.lock`` for as long as this process runs the job.
    The kernel drops it when the process ends, however it ends: a lock is never stale. The file
    says who holds it (pid, host), for the message of a second launch."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.file: IO[str] | None = None

    def acquire(self) -> RunLock:
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
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


@dataclass
class Started:
    """What :class:`Guard` did for the run folder before Hydra made it."""

    run_dir: Path
    created: list[Path] = field(default_factory=list)
    lock: RunLock | None = None


# run folder (absolute) -> what this process's Guard recorded for it
_started: dict[Path, Started] = {}


def started(run_dir: Path) -> Started | None:
    return _started.get(Path(os.path.abspath(run_dir)))


def take_lock(run_dir: Path) -> RunLock | None:
    """Lock ``run_dir`` for this job; None when this process already holds its lock."""
    seen = started(run_dir)
    if seen is not None and seen.lock is not None:
        return None
    return RunLock(run_dir).acquire()


def checkpoint_tag(path: Any) -> str:
    """A short, stable, path-safe name for ``model.pretrained``: the run folder's name (or the
    file's stem) and 8 hex digits of the resolved path's sha256, e.g. ``resnet20-fp-sgdm-s0-
    1a2b3c4d``. An eval's folder carries it, so evaluations of different checkpoints never
    share (and overwrite) one folder."""
    if path is None or str(path) in ("", "None"):
        return "none"
    file = Path(str(path)).expanduser()
    if file.is_dir():
        file = file / "checkpoint.pt"
    resolved = file.resolve()
    stem = resolved.parent.name if resolved.stem == "checkpoint" else resolved.stem
    stem = re.sub(r"[^A-Za-z0-9_=+-]+", "_", stem).strip("_")[:60] or "ckpt"
    return f"{stem}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def _task_config(config: DictConfig) -> DictConfig:
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


class Guard(Callback):
    """Hydra callback (conf/config.yaml ``hydra.callbacks``): the checks of a single run that
    must come before Hydra creates its folder. Sweeps are checked by mq.sweep.sweeper instead."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from mq.schema import check_config

        HydraConfig.instance().set_config(config)  # ${hydra:...} in the run folder's name
        try:
            # keys added (+) or removed (~), interpolations that fail (the folder's name too)
            check_config(config)
            run_dir = Path(str(config.hydra.run.dir))
            self._check(config, run_dir)
        except Exception as exc:
            error = find_config_error(exc)
            if error is None:
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    @staticmethod
    def _check(config: DictConfig, run_dir: Path) -> None:
        task_cfg = _task_config(config)
        check_name("run_name", task_cfg.get("run_name"))  # before the folder it names
        check_location(run_dir)
        from mq.run import check, check_run_dir, finished_message  # imports torch
        from mq.sweep.ledger import FINAL

        try:
            check(task_cfg)  # plain values (run_name included), constructors, model.pretrained
        except Exception as exc:
            if find_config_error(exc) is not None:
                raise
            # Not bad input as such: the job meets it again and reports it as before; the
            # folder is still recorded and locked below, so that a failed start is undone.
        previous = check_run_dir(task_cfg, run_dir)
        if previous and previous.get("status") in FINAL:
            # Before Hydra rewrites .hydra/ and appends to launch.log: a repeat of a finished
            # run leaves its folder exactly as it was.
            print(finished_message(run_dir, previous))
            sys.exit(0)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # a data-parallel job's other ranks: rank 0 makes and locks the folder
        created = missing_dirs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = Started(Path(os.path.abspath(run_dir)), created)
        try:
            record.lock = RunLock(run_dir).acquire()
        except FolderRefused:
            raise  # the other process may have made the same folders: remove nothing
        except Exception:
            remove_created(run_dir, created)
            raise
        _started[record.run_dir] = record
