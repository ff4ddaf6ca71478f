"""A training run's summary.json through its life, written by rank 0 alone: ``running`` from
the start (with the run's name, choices, wandb id, first start and SLURM job), then completed,
failed, preempted or diverged, however training ends; and what a completed run keeps of its
checkpoint. The sweep ledger (mq.job.ledger) and ``python -m mq.runs`` read these files."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mq.core import distributed
from mq.core.checkpoint import json_text, load_checkpoint, save_checkpoint, write_json
from mq.core.errors import first_line
from mq.core.folders import disk_full
from mq.job.identity import result_config
from mq.job.loggers import choice_config, free_name
from mq.job.preempt import GracefulStop
from mq.job.progress import summarize
from mq.job.train import Interrupted, Training

log = logging.getLogger(__name__)


def summary_head(
    cfg: DictConfig, choices: dict[str, str], wandb_id: str | None, started: float
) -> dict[str, Any]:
    """The keys of summary.json that say which run it is, kept across resumes."""
    head = {"name": cfg.run_name, "choices": choices, "wandb_id": wandb_id, "started": started}
    if os.environ.get("SLURM_JOB_ID"):  # a relaunch leaves a job SLURM still runs alone
        head["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return head


def start_logger(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str],
    logger_args: dict[str, Any],
    run_id: str | None,
) -> Any:
    """The metrics logger cfg.logger names (wandb), or None. ``logger_args`` (a sweep's wandb
    group and run name) fill logger keys that the config leaves null."""
    if not cfg.logger.get("_target_"):
        return None
    extra = {k: v for k, v in logger_args.items() if cfg.logger.get(k) is None}
    return instantiate(
        cfg.logger,
        _recursive_=False,  # run_config holds _target_ keys that are data here
        _convert_="all",
        name=extra.pop("name", cfg.run_name),
        **extra,
        run_dir=run_dir,
        run_config={**OmegaConf.to_container(cfg, resolve=True), **choice_config(choices)},
        run_id=run_id,
    )


class RunRecord:
    """summary.json of one training run on rank 0; on the other ranks (``head`` None) it writes
    nothing. ``loop``: the Training whose progress a failed summary keeps."""

    def __init__(self, run_dir: Path, head: dict[str, Any] | None, logger: Any = None) -> None:
        self.path = run_dir / "summary.json"
        self.head, self.logger = head, logger
        self.loop: Training | None = None

    @classmethod
    def start(
        cls,
        cfg: DictConfig,
        run_dir: Path,
        choices: dict[str, str],
        logger_args: dict[str, Any],
        previous: dict[str, Any],
        resume: dict[str, Any] | None,
    ) -> RunRecord:
        """Rank 0's start: config.yaml (a fresh start), the logger, summary.json "running"."""
        if resume is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            set_aside_metrics(run_dir)
            OmegaConf.save(OmegaConf.create(result_config(cfg)), run_dir / "config.yaml")
        # A fresh start is a new wandb run too: the old one holds the steps of the lost attempt.
        run_id = previous.get("wandb_id") if resume is not None else None
        logger = start_logger(cfg, run_dir, choices, logger_args, run_id)
        run_id = (logger.run_id if logger is not None else None) or run_id
        first_launch = previous.get("started") or time.time()  # kept across resumes
        head = summary_head(cfg, choices, run_id, first_launch)
        write_json({**head, "status": "running", "updated": time.time()}, run_dir / "summary.json")
        return cls(run_dir, head, logger)

    def mark(self, error: str, status: str = "failed") -> None:
        """A run that ends without a result: its status, the error and the epochs done."""
        if self.head is None:
            return
        done = {"status": status, "error": error}
        if self.loop is not None:
            done = summarize(self.loop.progress, status, error)
        write_summary({**self.head, **done}, self.path)

    def failed(
        self, exc: BaseException, stop: GracefulStop, ranks: distributed.Ranks
    ) -> BaseException | None:
        """Record how training ended with ``exc``; returns the exception to raise instead of
        it (a signal's Interrupted says how to resume), or None to raise ``exc`` itself."""
        if isinstance(exc, Interrupted):
            signame = stop.received.name if stop.received else "a signal"
            requeue = stop.received is not None and stop.received.name != "SIGTERM"
            error = f"{'preempted' if requeue else 'interrupted'} by {signame}; {exc}"
            self.mark(error, "preempted" if requeue else "failed")
            log.warning("%s; run again to resume", error)
            self._finish_logger(exit_code=1, preempting=requeue)
            stop.hand_over()  # under submitit: requeue this job and exit
            return Interrupted(f"{error}; run the same command again to resume")
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C: no checkpoint (the step may be half done)
            self.mark("interrupted by SIGINT (Ctrl-C); resumes from the last checkpoint")
            log.warning("interrupted; run the same command again to resume")
            self._finish_logger(exit_code=1)
            return None
        text = str(exc).strip()
        error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        if ranks.parallel and distributed.is_collective_error(exc):
            error = f"another rank failed or hung (its log has the cause); {error}"
        self.mark(error)
        if disk_full(exc) is not None:  # the files are safe; the cause is all there is
            log.error("run failed: %s", error)
        else:
            log.exception("run failed")  # the traceback, in launch.log and the job's stderr
        self._finish_logger(exit_code=1)
        return None

    def completed(
        self, summary: dict[str, Any], keep_training_state: bool, device: torch.device
    ) -> dict[str, Any]:
        """The summary of a run that trained all its epochs (or diverged), written once."""
        if self.head is None:
            return summary
        summary = {**self.head, **summary}
        write_json(summary, self.path)  # the one writer of a training run's summary.json
        # After the summary says completed: a kill in between leaves a large checkpoint, never a
        # "running" run whose checkpoint cannot resume.
        if summary.get("status") == "completed" and not keep_training_state:
            drop_training_state(self.path.parent / "checkpoint.pt", device)
        if self.logger is not None:
            self.logger.summary(summary)
            self.logger.finish()
        return summary

    def _finish_logger(self, **kwargs: Any) -> None:
        if self.logger is not None:
            self.logger.finish(**kwargs)


def set_aside_metrics(run_dir: Path) -> None:
    """A start without a checkpoint must not append to the rows of an earlier attempt (killed
    before its first checkpoint, say): move that metrics.jsonl to metrics.jsonl.attempt-N."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    aside = free_name(metrics, "attempt")
    os.replace(metrics, aside)
    log.warning("no checkpoint: starting over; the earlier attempt's rows are in %s", aside.name)


def write_summary(data: dict[str, Any], path: Path) -> None:
    """write_json, and when that fails (a full disk has no room for the temporary file)
    rewrite the small summary in place, so that it never keeps saying "running"."""
    try:
        write_json(data, path)
    except OSError as exc:
        log.warning("could not write %s atomically (%s); writing in place", path, first_line(exc))
        with open(path, "r+" if path.exists() else "w") as f:
            f.write(json_text(data))
            f.truncate()


def drop_training_state(path: Path, device: torch.device) -> None:
    """A completed run's checkpoint keeps the weights (model.pretrained reads them) and its
    progress, not the optimizers, meta net and per-weight LSTM state (LSTMFC: ~220 MB)."""
    if not path.exists():
        return
    state = load_checkpoint(path, device)  # saved back where training kept it
    keys = ("version", "model", "act", "progress", "metrics_offset")  # act: PACT alpha, LSQ s
    kept = {k: state[k] for k in keys if k in state}
    save_checkpoint({**kept, "training_state": "dropped at completion"}, path)
