"""What an existing folder is, read without following links: an mq run, an mq sweep, or
someone else's. mq.job.rundir refuses to write into the last kind.

A folder is recognised by what mq (or Hydra, for an mq job) wrote into it, not by file names
alone (``summary.json`` and ``.hydra/`` are common to many tools):

- a run: its ``config.yaml`` is an mq run config (written at the start of training), or its
  Hydra record (``.hydra/config.yaml``) is an mq job config (written before the job runs, so a
  start that died before training is recognised too), or ``run.lock`` holds mq's lock line;
- a sweep: ``sweep.json`` is mq's ledger, or ``multirun.yaml`` is an mq sweep's config.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from mq.core.errors import exception_chain

# Keys every mq run config has had (config.yaml and Hydra's record of the job alike).
RUN_KEYS = ("task", "model", "dataset", "quant", "meta", "seed", "bits")
LOCK_LINE = re.compile(rb"pid [0-9]+ on \S+\n?")
# Temporary files of mq.core.checkpoint's atomic writes (name.PID-8HEX.tmp) in a run folder.
TMP_NAME = re.compile(r"(checkpoint\.pt|summary\.json)\.[0-9]+-[0-9a-f]{8}\.tmp")
LOCK_FILE = "run.lock"
# Written by Hydra into a job's folder before the job runs.
HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "launch.log")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_MAX_READ = 4 << 20  # a config or ledger is a few KB; a larger file is not one of ours


def _read(path: Path) -> bytes | None:
    """The bytes of a regular file (never through a link); None for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = f.read(_MAX_READ + 1)
    return data if len(data) <= _MAX_READ else None


def _yaml(path: Path) -> Any:
    data = _read(path)
    if data is None:
        return None
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError:
        return None


def is_run_config(data: Any) -> bool:
    """An mq run's config (``config.yaml``) or job config (``.hydra/config.yaml``)."""
    if not isinstance(data, dict) or not all(key in data for key in RUN_KEYS):
        return False
    task = data["task"]
    return isinstance(task, dict) and isinstance(task.get("name"), str)


def is_mq_run(folder: Path, hydra_subdir: str | None = ".hydra") -> bool:
    if is_run_config(_yaml(folder / "config.yaml")):
        return True
    for subdir in {".hydra", hydra_subdir or ".hydra"}:
        if not os.path.islink(folder / subdir) and is_run_config(
            _yaml(folder / subdir / "config.yaml")
        ):
            return True
    lock = _read(folder / "run.lock")
    return lock is not None and LOCK_LINE.fullmatch(lock) is not None


def is_mq_sweep(folder: Path) -> bool:
    try:
        ledger = json.loads(_read(folder / "sweep.json") or b"null")
    except ValueError:
        ledger = None
    if isinstance(ledger, dict) and isinstance(ledger.get("group"), str):
        return True
    config = _yaml(folder / "multirun.yaml")
    return (
        isinstance(config, dict)
        and isinstance(config.get("hydra"), dict)
        and "sweep_name" in config
        and is_run_config(config)
    )


def not_plain(folder: Path, files: tuple[str, ...], dirs: tuple[str, ...] = ()) -> str | None:
    """The first of ``files`` (relative to ``folder``) that exists but is a link or not a
    regular file, or of ``dirs`` that is a link or not a folder, described; None when all are
    plain or absent. mq and Hydra open these by name, which would follow a planted link."""
    for name, want, kind in [
        *((n, stat.S_ISREG, "a regular file") for n in files),
        *((n, stat.S_ISDIR, "a folder") for n in dirs),
    ]:
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:
            continue
        except NotADirectoryError:  # e.g. .hydra/config.yaml where .hydra is a file
            continue
        if stat.S_ISLNK(mode):
            return f"{name} is a symbolic link"
        if not want(mode):
            return f"{name} is not {kind}"
    return None


def remove_stale_tmp(folder: Path) -> list[str]:
    """Remove the temporary files a killed save left in ``folder`` (only mq's own names, only
    regular files); returns their names. Called with the run's lock held: no save of this
    run is under way."""
    removed = []
    for entry in os.scandir(folder):
        if TMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``exc`` (no space, quota, file size limit), if any."""
    full = (e for e in exception_chain(exc) if isinstance(e, OSError) and e.errno in DISK_FULL)
    return next(full, None)


def disk_full_message(exc: OSError, folder: Path | str) -> str:
    """One line naming the folder and the reason."""
    reason = exc.strerror or str(exc)
    if exc.filename:
        reason += f": {exc.filename}"
    return f"no space left in {folder} ({reason}); free some space, then run the same command again"


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
        except OSError:  # not there (or a name too long to have been made)
            pass
    for folder in (run_dir / ".hydra", *created):
        try:
            folder.rmdir()  # only an empty folder; never a tree
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return  # holds something: so does every folder above it
            continue  # never made (missing, or a name too long): its parents may be new


def lock_held(run_dir: Path) -> bool | None:
    """Whether a process holds ``run_dir``'s lock now, i.e. still runs the job there: True,
    False (no lock file, or nobody holds it), or None when that cannot be told (a symlink, a
    filesystem without locks). Changes nothing: the file is opened read-only, never created,
    never through a symlink, never blocking (a FIFO named run.lock). The probe takes a shared
    lock for a few microseconds; :meth:`RunLock.acquire` retries briefly for that reason."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(run_dir / LOCK_FILE, flags)
    except FileNotFoundError:
        return False
    except OSError:
        return None  # ELOOP: a symlink, not the lock a run takes
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            return True if exc.errno in (errno.EAGAIN, errno.EACCES) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
