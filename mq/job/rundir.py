"""Run folders: which names and places a run or sweep may write to. A run folder must be new or
hold an mq run (never someone else's files, the code, the current directory or a git checkout),
and none of the files mq writes there by name may be a link. Checked before Hydra creates a single
run's folder (mq.job.guard.Guard) and again inside every job (mq.job.run). One process per folder:
mq.job.runlock."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mq.core import folders
from mq.core.errors import ConfigError
from mq.core.folders import LOCK_FILE

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
