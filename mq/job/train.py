"""The training loop: epochs of steps, evaluation, metrics, checkpoints, resume.

Per-step loss and accuracy stay on the device and are read back every ``log_every`` steps,
so the hot path has no host synchronisation. A checkpoint (end of every epoch, and every
``checkpoint_every_min`` minutes inside one) holds everything a restart needs; the data order
of an epoch is a function of (seed, epoch), so a restart replays the same batches.

``Training.run`` reads top to bottom: per epoch set the lr, then per step take it, log and
checkpoint; then evaluate. Under data parallelism (mq.core.distributed) every rank runs the same
loop on its shard; its bookkeeping collectives sit at the read-backs (no extra host sync).
Evaluation is mq.job.evaluation; the run's progress and summary numbers are mq.job.progress.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mq.core import distributed
from mq.core.checkpoint import save_checkpoint
from mq.core.distributed import SINGLE, Ranks
from mq.core.errors import ConfigError
from mq.data.base import BatchSource
from mq.job.evaluation import evaluate, tested_on
from mq.job.loggers import MetricsFile
from mq.job.preempt import CHECKPOINT, STOP
from mq.job.progress import EpochSums, Progress, rng_state, set_rng_state, summarize
from mq.quant.layers import act_state_dict, load_act_state, plain_state_dict, unwrap

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Training stopped on request (a preemption signal) right after saving a checkpoint."""


class Step(Protocol):
    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]: ...
    def set_lr(self, lr: float, meta_lr_factor: float = 1.0) -> None: ...
    def set_progress(self, epoch: int, epochs: int) -> None: ...
    def start_epoch(self, batches: Iterator[tuple[Tensor, Tensor]]) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def lr_at(base_lr: float, epoch: int, lr_step: int) -> float:
    """Step schedule: divided by 10 every ``lr_step`` epochs."""
    return base_lr * 0.1 ** (epoch // lr_step)


@dataclass
class Settings:
    """How a run trains: the config keys the loop reads."""

    epochs: int
    lr: float
    lr_step: int
    limit_train_batches: int | None = None
    limit_test_batches: int | None = None
    log_every: int = 20
    checkpoint_every_min: float = 10.0
    progress_bar: bool = True

    @classmethod
    def of(cls, cfg: Any) -> Settings:
        """The run config's keys the loop reads."""
        return cls(
            epochs=cfg.epochs,
            lr=cfg.optimizer.lr,
            lr_step=cfg.lr_step,
            limit_train_batches=cfg.limit_train_batches,
            limit_test_batches=cfg.limit_test_batches,
            log_every=cfg.log_every,
            checkpoint_every_min=cfg.checkpoint_every_min,
            progress_bar=cfg.progress,
        )


class StepRecord(NamedTuple):
    """One step's numbers, kept on the device until the next read-back."""

    epoch: int
    step: int
    loss: Tensor
    correct: Tensor
    images: int


class Training:
    """One run's loop: for each epoch set the lr, take the steps (logging and checkpointing
    between them), evaluate. Every rank of a data-parallel job runs it; only rank 0 writes.

    ``interrupt`` is polled after every step (mq.job.preempt.GracefulStop.poll): "checkpoint"
    saves one now, "stop" saves one and raises Interrupted; None goes on. ``progress`` is public, so
    that a caller can report the epochs done when training fails."""

    def __init__(
        self,
        model: nn.Module,
        step: Step,
        train_data: BatchSource,
        test_data: BatchSource,
        run_dir: Path,
        settings: Settings,
        *,
        val_data: BatchSource | None = None,
        resume: dict[str, Any] | None = None,
        logger: Any = None,
        interrupt: Callable[[], str | None] | None = None,
        ranks: Ranks = SINGLE,
    ) -> None:
        self.model, self.step, self.train_data, self.val_data = model, step, train_data, val_data
        self.run_dir, self.s, self.logger, self.ranks = run_dir, settings, logger, ranks
        self.interrupt = interrupt or (lambda: None)
        self.progress = self._resume(resume) if resume else Progress()
        offset = resume["metrics_offset"] if resume else None
        steps = self.progress.step if resume else None
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", offset, steps) if ranks.main else None
        self.segment_start, self.elapsed_before = time.monotonic(), self.progress.elapsed
        self.last_checkpoint = time.monotonic()
        self._asked = 0  # the strongest stop request since the ranks last agreed (ACTIONS)
        self.test_data, self.measured = measure(settings, train_data, test_data, val_data)
        self.batches = self.measured["train_batches"]
        limit = settings.limit_test_batches
        self.limited = tested_on(self.test_data.num_samples, test_data.num_samples, limit)
        if self.limited:
            log.info("every epoch is tested on the same %s", self.limited)

    # ------------------------------------------------------------------------------ loop ----
    def run(self) -> dict[str, Any]:
        """Train up to ``settings.epochs``; returns the summary (the caller writes it)."""
        session = self.session()
        try:
            batch = next(session)
            while True:
                batch = session.send(self.step.train_step(*batch))
        except StopIteration as done:
            return done.value

    def session(self) -> Generator[tuple[Tensor, Tensor], tuple[Tensor, Tensor], dict[str, Any]]:
        """The loop, with each step's batch handed out: it yields (x, y), takes (loss, logits)
        of the step on it, and returns the summary. ``run`` takes the steps itself; a pack
        (mq.job.pack) takes many runs' steps at once."""
        status = "completed"
        self.model.train()
        while self.progress.epoch < self.s.epochs:
            lr = self.set_lr()
            started, seen_at_start = time.perf_counter(), self.progress.partial.seen
            if (yield from self.train_epoch(lr, started, seen_at_start)):
                log.warning(
                    "loss is not finite at step %d: run ends as diverged", self.progress.step
                )
                status = "diverged"
                break
            epoch_time = time.perf_counter() - started
            test_loss = self.end_epoch(lr, epoch_time, seen_at_start)
            if not math.isfinite(test_loss):
                status = "diverged"
                break
            self.check_replicas()
            self.save_checkpoint()
        self.progress.elapsed = self.elapsed()
        if self.metrics is not None:
            self.metrics.close()
        return summarize(self.progress, status, measured=self.measured)

    def set_lr(self) -> float:
        epoch, lr_step = self.progress.epoch, self.s.lr_step
        lr = lr_at(self.s.lr, epoch, lr_step)
        self.step.set_lr(lr, meta_lr_factor=0.1 ** (epoch // lr_step))
        self.step.set_progress(epoch, self.s.epochs)
        if self.progress.batch == 0:  # part-way, the step's state has what the start measured
            self.step.start_epoch(self.train_data.epoch(epoch))
        return lr

    def train_epoch(
        self, lr: float, started: float, seen_at_start: float
    ) -> Generator[tuple[Tensor, Tensor], tuple[Tensor, Tensor], bool]:
        """The steps of one epoch from ``progress.batch`` on (as ``session``); True when the
        loss diverged."""
        p, epoch = self.progress, self.progress.epoch
        bar = self._bar(f"epoch {epoch + 1}/{self.s.epochs}", self.batches, p.batch)
        pending: list[StepRecord] = []
        with bar:
            for x, y in self.train_data.epoch(epoch, start_batch=p.batch):
                if p.batch >= self.batches:
                    break
                loss, logits = yield x, y
                correct = (logits.argmax(1) == y).sum()
                pending.append(StepRecord(epoch, p.step, loss, correct, y.numel()))
                p.step, p.batch = p.step + 1, p.batch + 1
                bar.update(1)
                report = len(pending) >= self.s.log_every or p.batch == self.batches
                action = self.stop_request(report)
                if (report or action is not None) and not self.flush(pending, lr):
                    return True
                if report:
                    bar.set_postfix(**p.partial.postfix(seen_at_start, started))
                self.maybe_checkpoint(action, report)
                if action == STOP:
                    self.stop()
        return False

    def end_epoch(self, lr: float, epoch_time: float, seen_at_start: float) -> float:
        """Evaluate, log the epoch's row, move progress on; returns the test loss."""
        p, epoch, sums = self.progress, self.progress.epoch, self.progress.partial
        test_loss, test_acc, test_acc5 = self.evaluate(f"epoch {epoch + 1}/{self.s.epochs} test")
        val: dict[str, float] = {}
        if self.val_data is not None:  # held-out training images, the test set's code path
            val_loss, val_acc, _ = self.evaluate(f"epoch {epoch + 1} val", self.val_data)
            val = {"val_loss": val_loss, "val_acc": val_acc}
            p.val_loss.append(val_loss)
            p.val_acc.append(val_acc)
        row = {
            "kind": "epoch",
            "epoch": epoch + 1,  # epochs completed, as in the logs and plots
            "step": max(p.step - 1, 0),
            "train_loss": sums.loss / max(sums.batches, 1),
            "train_acc": 100.0 * sums.correct / max(sums.seen, 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
            **({"test_acc5": test_acc5} if test_acc5 is not None else {}),
            **val,
            "epoch_time": epoch_time,
            "images_per_s": (sums.seen - seen_at_start) / max(epoch_time, 1e-9),
            "lr": lr,
            "time": time.time(),
            "elapsed": self.elapsed(),
        }
        self.write_rows([row])
        log.info(
            "epoch %d/%d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%%%s | %.1f s",
            epoch + 1,
            self.s.epochs,
            row["train_loss"],
            row["train_acc"],
            test_loss,
            test_acc,
            f" (on {self.test_data.num_samples} images: limited)" if self.limited else "",
            epoch_time,
        )
        p.test_acc.append(test_acc)
        p.train_loss.append(row["train_loss"])
        p.epoch, p.batch, p.partial = epoch + 1, 0, EpochSums()
        return test_loss

    # ----------------------------------------------------------------------- bookkeeping ----
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.segment_start

    def evaluate(
        self, desc: str, data: BatchSource | None = None
    ) -> tuple[float, float, float | None]:
        """(loss, acc %, top-5 % or None) on ``data`` (the test set by default): rank 0
        evaluates, every rank gets its numbers."""
        loss, acc, acc5 = math.nan, math.nan, math.nan
        if self.ranks.main:
            source = self.test_data if data is None else data
            result = evaluate(self.model, source, progress=self.s.progress_bar, desc=desc)
            loss, acc = result.loss, result.acc
            acc5 = math.nan if result.acc5 is None else result.acc5  # None: 10 classes or fewer
        loss, acc, acc5 = distributed.broadcast_floats([loss, acc, acc5])
        return loss, acc, None if math.isnan(acc5) else acc5

    def stop_request(self, report: bool) -> str | None:
        """What a signal asks for at this step boundary. One process: every step. Several: the
        request is kept until the next report (where the ranks read back anyway) and agreed on
        there, so that all ranks stop at the same step."""
        action = self.interrupt()
        if not self.ranks.parallel:
            return action
        self._asked = max(self._asked, ACTIONS.index(action))
        if not report:
            return None
        code, self._asked = distributed.agree(self._asked), 0
        return ACTIONS[code]

    def flush(self, pending: list[StepRecord], lr: float) -> bool:
        """Write buffered per-step rows (the global batch's loss and accuracy); returns False
        when the loss is no longer finite."""
        if not pending:
            return True
        losses_t = distributed.average_(torch.stack([r.loss for r in pending]).double())
        counts = torch.stack([r.correct.to(torch.float64) for r in pending])
        counts = torch.cat([counts, counts.new_tensor([float(r.images) for r in pending])])
        counts = distributed.sum_(counts)
        losses, counts_list = losses_t.tolist(), counts.tolist()
        corrects, images = counts_list[: len(pending)], counts_list[len(pending) :]
        # After the read-back above, so the time is when these steps had finished.
        now, ran = time.time(), self.elapsed()
        rows = [
            {
                "kind": "step",
                "epoch": r.epoch + 1,  # 1-based, as in the logs: the epoch this step belongs to
                "step": r.step,
                "loss": loss,
                "acc": 100.0 * c / n,
                "lr": lr,
                "time": now,
                "elapsed": ran,
            }
            for r, loss, c, n in zip(pending, losses, corrects, images, strict=True)
        ]
        self.write_rows(rows)
        self.progress.partial.add(losses, corrects, images)
        pending.clear()
        return all(math.isfinite(v) for v in losses)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if self.metrics is not None:
            self.metrics.write(rows)
        if self.logger is not None and self.ranks.main:
            self.logger.log(rows)

    def maybe_checkpoint(self, action: str | None, report: bool) -> None:
        """A signal saves the state of this step boundary; otherwise one every few minutes
        (decided by rank 0's clock, at a report, and agreed on: the ranks' clocks differ)."""
        due = report and time.monotonic() - self.last_checkpoint > 60 * self.s.checkpoint_every_min
        if self.ranks.parallel and report:
            due = bool(distributed.broadcast_floats([float(due)])[0])
        if action is not None or due:
            self.save_checkpoint()

    def check_replicas(self) -> None:
        """Once an epoch: every rank still holds the same weights and meta net (they take
        identical steps on identical averaged gradients; a difference is a bug, not noise)."""
        if not self.ranks.parallel:
            return
        meta = getattr(self.step, "meta_net", None)
        params = list(self.model.parameters()) + ([] if meta is None else list(meta.parameters()))
        if not distributed.replicas_equal(params):
            raise RuntimeError(f"the ranks' parameters differ at step {self.progress.step}")

    def save_checkpoint(self) -> None:
        """Rank 0 writes checkpoint.pt (atomically); the others wait for it."""
        self.progress.elapsed = self.elapsed()
        if self.ranks.main:
            assert self.metrics is not None
            state = {
                "version": 1,
                "model": plain_state_dict(self.model),
                "act": act_state_dict(self.model),  # PACT's alpha, LSQ's s: None without act
                "step_state": self.step.state_dict(),
                "progress": self.progress.state(),
                "rng": rng_state(),
                "metrics_offset": self.metrics.offset(),
                "world_size": self.ranks.world_size,
            }
            save_checkpoint(state, self.run_dir / "checkpoint.pt")
        distributed.barrier()
        self.last_checkpoint = time.monotonic()

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        raise Interrupted(f"stopped at step {self.progress.step} after a checkpoint")

    def _resume(self, resume: dict[str, Any]) -> Progress:
        saved = resume.get("world_size", 1)
        if saved != self.ranks.world_size:
            raise ConfigError(
                f"the checkpoint in {self.run_dir} was written by {saved} ranks; resume it with "
                f"{saved} (this job has {self.ranks.world_size}): the per-rank BatchNorm "
                "statistics and the data shards depend on it"
            )
        unwrap(self.model).load_state_dict(resume["model"])
        load_act_state(self.model, resume.get("act"), f"the checkpoint in {self.run_dir}")
        self.step.load_state_dict(resume["step_state"])
        progress = Progress(**resume["progress"])
        set_rng_state(resume["rng"])
        log.info(
            "resumed at epoch %d, batch %d (step %d; %d epochs completed)",
            progress.epoch + 1,  # 1-based like every epoch number shown
            progress.batch,
            progress.step,
            progress.epoch,
        )
        return progress

    def _bar(self, desc: str, total: int, initial: int = 0) -> tqdm:
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not (self.s.progress_bar and self.ranks.main),
            file=sys.stderr,
            leave=False,
            mininterval=1.0,
        )


def measure(
    settings: Settings,
    train_data: BatchSource,
    test_data: BatchSource,
    val_data: BatchSource | None = None,
) -> tuple[BatchSource, dict[str, Any]]:
    """The images every epoch tests (all, or a fixed class-stratified sample of
    ``limit_test_batches`` batches' worth), and what a run's numbers are measured on."""
    limit = settings.limit_train_batches
    batches = len(train_data) if limit is None else min(len(train_data), limit)
    limit = settings.limit_test_batches
    tested = test_data if limit is None else test_data.sample(limit)
    return tested, {
        "limit_train_batches": settings.limit_train_batches,
        "limit_test_batches": limit,
        "train_batches": batches,  # per epoch
        "train_batches_total": len(train_data),
        "test_images": tested.num_samples,
        "test_images_total": test_data.num_samples,
        **({"val_images": val_data.num_samples} if val_data is not None else {}),
    }


ACTIONS = (None, CHECKPOINT, STOP)  # by severity: ranks agree on the largest request


def train(
    model: nn.Module,
    step: Step,
    train_data: BatchSource,
    test_data: BatchSource,
    *,
    run_dir: Path,
    **settings: Any,
) -> dict[str, Any]:
    """Training(...).run() for a caller without signals or ranks (tests, scripts); returns the
    summary (mq.job.record writes summary.json). ``resume``: a checkpoint dict."""
    resume, logger = settings.pop("resume", None), settings.pop("logger", None)
    val_data = settings.pop("val_data", None)
    loop = Training(
        model,
        step,
        train_data,
        test_data,
        run_dir,
        Settings(**settings),
        val_data=val_data,
        resume=resume,
        logger=logger,
    )
    return loop.run()
