"""One job: config -> objects -> task. Called by launch.py inside a Hydra job: :func:`run`
holds the run folder (its lock, and undoing a failed start), :func:`job` builds the model and
the data and hands them to the task that conf/task/ names (mq.job.tasks)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mq.core import distributed
from mq.core.allocator import keep_freed_memory
from mq.core.folders import remove_created, remove_stale_tmp
from mq.job.checks import backend_name, check, resolve_device, sweep_dir
from mq.job.identity import check_run_dir, finished_message
from mq.job.ledger import FINAL
from mq.job.rundir import FolderRefused, check_location
from mq.job.runlock import started, take_lock
from mq.job.tasks import Job, Task, build_quantized

log = logging.getLogger(__name__)

ARTIFACTS = ("checkpoint.pt", "metrics.jsonl", "summary.json")


def run(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str],
    logger_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the job described by ``cfg`` in ``run_dir``; returns its summary. ``logger_args``
    (a sweep's wandb group and run name) fill logger keys that the config leaves null."""
    # A single run was checked and locked by mq.job.guard.Guard before Hydra made its folder; a
    # sweep job is checked here, after Hydra made its folder (the sweep checked it before).
    before = started(run_dir)
    lock = None
    main = distributed.ranks_from_env().main
    try:
        check_location(run_dir, sweep_dir())
        if main:  # one process per run folder; the other ranks of a job write nothing
            lock = take_lock(run_dir)
            for name in remove_stale_tmp(run_dir):  # a save killed mid-write left it
                log.info("removed %s, left by an interrupted save", name)
        checked = before is not None and before.checked
        return job(cfg, run_dir, choices, logger_args or {}, checked)
    except BaseException as exc:
        # Failed before training started: remove what this invocation created, and only that
        # (Guard knows which folders are new; a sweep job's summary.json says it failed).
        started_training = any((run_dir / name).exists() for name in ARTIFACTS)
        created = before is not None and not started_training and main
        if created and not isinstance(exc, FolderRefused):
            remove_created(run_dir, before.created, extra=("config.yaml",))
        raise
    finally:
        distributed.shutdown()
        if lock is not None:
            lock.release()


def job(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str],
    logger_args: dict[str, Any],
    checked: bool = False,
) -> dict[str, Any]:
    """Check (unless Guard already did, for this config), set up the ranks and the device,
    build the model and the data, and run the task on them; returns the summary."""
    task: Task = instantiate(cfg.task) if checked else check(cfg)
    ranks, device = start_ranks(cfg, task)
    if ranks is None:  # a rank with nothing to do (task=eval beyond rank 0)
        return {}
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # fixed shapes: time once, then reuse
    keep_freed_memory()  # a CPU step otherwise page-faults its memory back in every step
    previous = check_run_dir(cfg, run_dir)
    if previous and previous.get("status") in FINAL:
        log.info("%s", finished_message(run_dir, previous))
        return previous
    return task(build_job(cfg, run_dir, choices, logger_args, ranks, device, previous or {}))


def build_job(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str],
    logger_args: dict[str, Any],
    ranks: distributed.Ranks,
    device: torch.device,
    previous: dict[str, Any],
) -> Job:
    """The model (seeded by cfg.seed) and the data a task runs on."""
    torch.manual_seed(cfg.seed)
    model = build_quantized(cfg, instantiate(cfg.model)).to(device)
    if cfg.get("sync_bn", False) and ranks.launched:  # before the optimizers take the params
        model = distributed.sync_batchnorm(model, device)
    shard = {"rank": ranks.rank, "world_size": ranks.world_size} if ranks.parallel else {}
    data = instantiate(
        cfg.dataset,
        batch_size=cfg.batch_size,
        device=device,
        seed=cfg.seed,
        progress=cfg.progress and ranks.main,
        **shard,
    )
    return Job(cfg, run_dir, choices, logger_args, ranks, model, data, previous)


def start_ranks(cfg: DictConfig, task: Task) -> tuple[distributed.Ranks | None, torch.device]:
    """This job's ranks (under torchrun: joined in a process group, one GPU each) and device;
    ranks None for a rank that has nothing to do."""
    ranks = distributed.ranks_from_env()
    device = resolve_device(cfg.device)
    if not ranks.launched:
        return ranks, device
    if not task.trains_in_parallel:  # rank 0 runs it and writes, alone
        return (distributed.SINGLE if ranks.main else None), device
    backend = distributed.choose_backend(backend_name(cfg), cfg.device, ranks)
    timeout = OmegaConf.select(cfg, "distributed.timeout_s", default=600)
    if device.type == "cuda":  # one GPU per rank: cuda:LOCAL_RANK
        device = torch.device("cuda", ranks.local_rank)
    distributed.init(ranks, backend, timeout)
    if not ranks.main:  # rank 0 tells the story once; the others only warn
        logging.getLogger("mq").setLevel(logging.WARNING)
    return ranks, device
