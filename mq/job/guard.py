"""The checks of a single run before Hydra creates its folder (:class:`Guard`, a Hydra callback
named in conf/config.yaml): bad values are refused with nothing written, a completed run is
reported without touching its folder, the folders that do not exist yet are recorded, and the
folder's lock is taken (mq.job.runlock)."""

from __future__ import annotations

import copy
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from mq.core import folders
from mq.core.errors import find_config_error
from mq.core.folders import missing_dirs, remove_created
from mq.job.rundir import FolderRefused, check_location, check_name, check_output_subdir
from mq.job.runlock import RunLock, Started, record_start, wait_for_lock


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

        from mq.cli.schema import check_config

        HydraConfig.instance().set_config(config)  # ${hydra:...} in the run folder's name
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            _quiet_rank(config)
        try:
            # keys added (+) or removed (~), interpolations that fail (the folder's name too)
            check_config(config)
            from mq.models import resolve_original  # imports torch

            # In the config Hydra then runs: the eval folder's name and the job see the file.
            resolve_original(config)
            run_dir = Path(str(config.hydra.run.dir))
            check_output_subdir(config.hydra.output_subdir)
            self._check(config, run_dir)
        except Exception as exc:
            error = find_config_error(exc)
            if error is None and isinstance(exc, OSError):  # a name too long, say
                error = f"run folder {config.hydra.run.dir} cannot be used: {exc.strerror}"
            if error is None:
                # Hydra would only warn about a callback's exception and run the job without
                # these checks and without the lock: stop instead, before anything is written.
                traceback.print_exc()
                sys.exit(1)
            if rank == 0:  # every rank refuses the same input; one says so
                print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    @staticmethod
    def _check(config: DictConfig, run_dir: Path) -> None:
        task_cfg = _task_config(config)
        check_name("run_name", task_cfg.get("run_name"))  # before the folder it names
        check_location(run_dir)
        from mq.job.checks import check  # imports torch
        from mq.job.identity import check_run_dir, finished_message
        from mq.job.ledger import FINAL

        try:
            # plain values (run_name included), the task, constructors, model.pretrained
            task = check(task_cfg)
        except Exception as exc:
            if find_config_error(exc) is not None:
                raise
            # Not bad input as such: the job checks again and reports it as before; the
            # folder is still recorded and locked below, so that a failed start is undone.
            task = None
        previous = check_run_dir(task_cfg, run_dir)
        if previous and previous.get("status") in FINAL:
            # Before Hydra rewrites .hydra/ and appends to launch.log: a repeat of a finished
            # run leaves its folder exactly as it was.
            print(finished_message(run_dir, previous))
            sys.exit(0)
        if task is not None:
            task.check_folder(task_cfg, run_dir)  # a refused relaunch writes nothing
        if int(os.environ.get("RANK", "0")) != 0:
            # A data-parallel job's other ranks: rank 0 makes and locks the folder. Hydra makes
            # it here too, so wait for rank 0 first: it must see which folders are new.
            if not wait_for_lock(run_dir, held=True, timeout=120):  # rank 0 alive, but stuck
                rank = os.environ.get("RANK")
                error = f"error: rank {rank}: rank 0 did not lock {run_dir} in 120 s"
                print(error, file=sys.stderr)
                sys.exit(2)
            return
        created = missing_dirs(run_dir)
        check_free_space(run_dir, created)
        # The job receives this config: it builds on this verdict instead of checking again.
        record = Started(Path(os.path.abspath(run_dir)), created, checked=task is not None)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            record.lock = RunLock(run_dir).acquire()
        except FolderRefused:
            raise  # the other process may have made the same folders: remove nothing
        except Exception as exc:
            remove_created(run_dir, created)
            full = folders.disk_full(exc)
            if full is not None:
                raise FolderRefused(folders.disk_full_message(full, run_dir)) from exc
            raise
        record_start(record)


# Hydra's record and log of a job take a few KB, a checkpoint from ~1 MB up: below this much
# free space a start is refused before anything is written (not left with empty files).
MIN_FREE = 1 << 20


def check_free_space(run_dir: Path, created: list[Path]) -> None:
    existing = created[-1].parent if created else Path(os.path.abspath(run_dir))
    try:
        info = os.statvfs(existing)
    except OSError:
        return  # cannot tell: the writes themselves report a full disk
    free = info.f_bavail * info.f_frsize
    if free < MIN_FREE:
        raise FolderRefused(
            f"no space left in {run_dir} ({free // 1024} KB free; a run needs at least "
            f"{MIN_FREE >> 20} MB); free some space, then run the same command again"
        )


def _quiet_rank(config: DictConfig) -> None:
    """A data-parallel job's other ranks (torchrun): Hydra writes no record or log file for
    them into rank 0's run folder (rank 0 writes both; their lines go to their stderr)."""
    hydra = config.hydra
    with read_write(hydra), open_dict(hydra):  # Hydra's node is read-only by its own flag
        hydra.output_subdir = None
        root = hydra.job_logging.get("root") if hydra.get("job_logging") else None
        if root is not None and "handlers" in root:
            root.handlers = [h for h in root.handlers if h != "file"]
