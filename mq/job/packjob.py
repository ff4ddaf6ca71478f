"""A pack job: the runs a sweep packed together (``hydra.sweeper.pack``), trained in one process.

The sweeper writes a pack file (``<sweep>/.packs/<name>.json``: each run's resolved config,
folder, choices and wandb names) and submits one job for it; that job's own Hydra folder is
``<sweep>/.packs/<name>/``, out of the runs' tree. Here every run gets what a job of its own
gets (mq.job.run): its folder checked and locked, its summary, logger and checkpoints; a run
that is already completed or diverged is left alone. Their loops then go through
mq.job.pack.train_pack, with one signal handler for all of them.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mq.core.allocator import keep_freed_memory
from mq.core.distributed import SINGLE
from mq.core.folders import missing_dirs, remove_created, remove_stale_tmp
from mq.job.checks import check, resolve_device, sweep_dir
from mq.job.identity import check_run_dir, finished_message
from mq.job.ledger import FINAL
from mq.job.pack import SharedInterrupt, train_pack
from mq.job.preempt import GracefulStop
from mq.job.progress import rng_state, set_rng_state
from mq.job.record import RunRecord
from mq.job.run import build_job
from mq.job.rundir import check_location
from mq.job.runlock import RunLock
from mq.job.tasks import Job, Train

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One run of a pack, as the sweeper wrote it."""

    cfg: DictConfig
    run_dir: Path
    choices: dict[str, str]
    logger_args: dict[str, Any]


def write_pack_file(path: Path, members: list[Member], fuse: bool | None = None) -> None:
    """The pack's runs (and ``fuse``: mq.meta.pack.Pack's) for its job to read."""
    from mq.core.checkpoint import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    data = [
        {
            "cfg": OmegaConf.to_yaml(m.cfg, resolve=True),  # YAML text keeps the key order
            "run_dir": str(m.run_dir),
            "choices": dict(m.choices),
            "logger_args": dict(m.logger_args),
        }
        for m in members
    ]
    write_json({"runs": data, "fuse": fuse}, path)


def read_pack_file(path: Path) -> tuple[list[Member], bool | None]:
    from mq.core.checkpoint import read_json

    data = read_json(path)
    if data is None or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a pack file written by the sweeper")
    members = [
        Member(OmegaConf.create(r["cfg"]), Path(r["run_dir"]), r["choices"], r["logger_args"])
        for r in data["runs"]
    ]
    return members, data.get("fuse")


class _HandOverOnce:
    """A GracefulStop whose ``hand_over`` (requeue and exit, under submitit) waits for the last
    run of the pack: every run's summary is marked first."""

    def __init__(self, stop: GracefulStop, last: bool) -> None:
        self.stop, self.last = stop, last
        self.received = stop.received

    def hand_over(self) -> None:
        if self.last:
            self.stop.hand_over()


def run_pack(path: Path) -> list[dict[str, Any]]:
    """Train the pack in ``path``; returns the runs' summaries (those left alone too)."""
    members, fuse = read_pack_file(path)
    summaries: dict[int, dict[str, Any]] = {}
    with ExitStack() as locks:
        jobs: dict[int, tuple[Job, Train, dict[str, Any]]] = {}
        for k, member in enumerate(members):
            opened = _open(member, locks)
            if isinstance(opened, dict):
                summaries[k] = opened
            else:
                jobs[k] = opened
        summaries.update(_train(jobs, fuse))
    return [summaries[k] for k in range(len(members))]


def _open(member: Member, locks: ExitStack) -> tuple[Job, Train, dict[str, Any]] | dict[str, Any]:
    """Check, lock and build one run (mq.job.run's job, without ranks); its summary instead
    when it is finished."""
    cfg, run_dir = member.cfg, member.run_dir
    check_location(run_dir, sweep_dir())
    created = missing_dirs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(run_dir).acquire()
        locks.callback(lock.release)
        for name in remove_stale_tmp(run_dir):
            log.info("removed %s, left by an interrupted save", name)
        task = check(cfg, run_dir)
        if not isinstance(task, Train):
            raise ValueError(f"task={cfg.task.name} is not packed; only training runs are")
        previous = check_run_dir(cfg, run_dir)
        if previous and previous.get("status") in FINAL:
            log.info("%s", finished_message(run_dir, previous))
            return previous
        device = resolve_device(cfg.device)
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        keep_freed_memory()
        args = (cfg, run_dir, member.choices, member.logger_args, SINGLE, device)
        job = build_job(*args, previous or {})
        # What the RNG holds here, the meta net's initial weights are drawn from (Train.begin)
        return job, task, rng_state()
    except BaseException:
        remove_created(run_dir, [Path(os.path.abspath(d)) for d in created])
        raise


def _train(
    jobs: dict[int, tuple[Job, Train, dict[str, Any]]], fuse: bool | None
) -> dict[int, dict[str, Any]]:
    """Begin every run (Train.begin), train the pack, end every run (Train.end)."""
    summaries: dict[int, dict[str, Any]] = {}
    begun: dict[int, tuple[Job, Train, RunRecord, Any]] = {}
    for k, (job, train, rng) in jobs.items():
        set_rng_state(rng)  # as in a job of its own: the same draws, whatever came before
        started = train.begin(job)
        if isinstance(started, dict):
            summaries[k] = started
        else:
            begun[k] = (job, train, *started)
    if not begun:
        return summaries
    records = [record for _, _, record, _ in begun.values()]

    def mark_all(reason: str) -> None:
        for record in records:
            record.mark(reason)

    with GracefulStop(on_terminate=mark_all) as stop:
        shared = SharedInterrupt(stop.poll)
        loops = []
        try:
            for _, _, record, loop in begun.values():
                record.loop = loop(shared)
                loops.append(record.loop)
            done = train_pack(loops, shared, fuse)
        except BaseException as exc:
            last = len(records) - 1
            instead = None
            for i, record in enumerate(records):
                handed = _HandOverOnce(stop, i == last)
                instead = record.failed(exc, handed, SINGLE) or instead  # type: ignore[arg-type]
            if instead is not None:
                raise instead from None
            raise
    for (k, (job, train, record, _)), summary in zip(begun.items(), done, strict=True):
        summaries[k] = train.end(job, record, summary)
    return summaries
