"""The training loop: epochs of steps, evaluation, metrics, checkpoints, resume.

Per-step loss and accuracy stay on the device and are read back every ``log_every`` steps,
so the hot path has no host synchronisation. A checkpoint (end of every epoch, and every
``checkpoint_every_min`` minutes inside one) holds everything a restart needs; the data order
of an epoch is a function of (seed, epoch), so a restart replays the same batches.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mq.checkpoint import save_checkpoint, write_json
from mq.loggers import MetricsFile
from mq.quant.layers import QuantizedModel, plain_state_dict, unwrap

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Training stopped on request (a preemption signal) right after saving a checkpoint."""


class BatchSource(Protocol):
    num_samples: int

    def __len__(self) -> int: ...
    def epoch(self, epoch: int, start_batch: int = 0): ...
    def sample(self, batches: int) -> BatchSource: ...


class Step(Protocol):
    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]: ...
    def set_lr(self, lr: float, meta_lr_factor: float = 1.0) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """Where a run stands; saved in the checkpoint."""

    epoch: int = 0  # next epoch to run
    batch: int = 0  # next batch of that epoch
    step: int = 0  # optimizer steps taken
    test_acc: list[float] = field(default_factory=list)  # one per finished epoch
    train_loss: list[float] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=dict)  # sums over the unfinished epoch
    # Seconds of training up to the last checkpoint (0 in an older version's checkpoint).
    elapsed: float = 0.0
    val_acc: list[float] = field(default_factory=list)  # per epoch, with dataset.val_size
    val_loss: list[float] = field(default_factory=list)


def lr_at(base_lr: float, epoch: int, lr_step: int) -> float:
    """Step schedule: divided by 10 every ``lr_step`` epochs."""
    return base_lr * 0.1 ** (epoch // lr_step)


class Evaluation(NamedTuple):
    loss: float
    acc: float  # %
    images: int  # test images it was measured on


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: BatchSource,
    *,
    progress: bool = False,
    desc: str = "test",
) -> Evaluation:
    """Test loss and accuracy (%) with the current (quantized) weights on every image of
    ``loader`` (a limited evaluation passes ``test.sample(limit)``: a fixed class-stratified
    sample, since the first batches of a test set stored class by class hold one class).
    ``progress``: a bar on stderr."""
    model.eval()
    weights = None
    if isinstance(model, QuantizedModel):  # quantize once, not once per batch
        weights = model.quantize_weights()
    loss_sum = torch.zeros((), device=_device(model))
    correct = torch.zeros((), device=_device(model), dtype=torch.long)
    count = 0
    bar = tqdm(
        total=len(loader),
        desc=desc,
        unit="batch",
        disable=not progress,
        file=sys.stderr,
        leave=False,
        mininterval=1.0,
    )
    with bar:
        for x, y in loader.epoch(0):
            logits = model(x, weights) if weights is not None else model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            count += y.numel()
            bar.update(1)
    model.train()
    return Evaluation(
        loss_sum.item() / max(count, 1), 100.0 * correct.item() / max(count, 1), count
    )


def tested_on(images: int, total: int, limit: int | None) -> str:
    """How much of the test set a measurement saw, for logs: "" when all of it."""
    if images >= total:
        return ""
    return f"{images} of {total} test images (limit_test_batches={limit}, class-stratified)"


def evaluate_only(
    model: nn.Module, test_data: BatchSource, limit: int | None, progress: bool
) -> dict[str, Any]:
    """task=eval: one evaluation, logged before (it can take a minute) and after; returns the
    summary, which says what it was measured on."""
    start = time.time()
    part = test_data if limit is None else test_data.sample(limit)
    where = tested_on(part.num_samples, test_data.num_samples, limit)
    log.info("testing on %s", where or f"all {test_data.num_samples} test images")
    loss, acc, images = evaluate(model, part, progress=progress)
    log.info("test loss %.4f, test accuracy %.2f%%%s", loss, acc, f" on {where}" if where else "")
    return {
        "status": "completed",
        "test_loss": loss,
        "final_test_acc": acc,
        "limit_test_batches": limit,
        "test_images": images,
        "test_images_total": test_data.num_samples,
        "started": start,
        "updated": time.time(),
        "elapsed": time.time() - start,
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def summarize(
    progress: Progress,
    status: str,
    error: str | None = None,
    measured: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json's numbers; ``measured``: what the numbers were measured on (limits, test
    images), so a limited run says so wherever it is shown."""
    accs = progress.test_acc
    last = accs[-10:]
    return {
        "status": status,
        "error": error,
        "epochs_completed": len(accs),
        "steps": progress.step,
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": max(accs) if accs else None,
        "last10_mean_test_acc": statistics.fmean(last) if last else None,
        "last10_std_test_acc": statistics.pstdev(last) if last else None,
        "last10_epochs": len(last),  # the "last 10" of a shorter run are all it has
        "test_acc": accs,
        **_val_summary(progress),
        "updated": time.time(),
        "elapsed": progress.elapsed,
        **(measured or {}),
    }


def _val_summary(progress: Progress) -> dict[str, Any]:
    """The validation metrics (model selection reads these, never the test set's)."""
    accs, losses = progress.val_acc, progress.val_loss
    if not accs:
        return {}
    return {
        "final_val_acc": accs[-1],
        "best_val_acc": max(accs),
        "last10_mean_val_acc": statistics.fmean(accs[-10:]),
        "final_val_loss": losses[-1],
        "best_val_loss": min(losses),
        "last10_mean_val_loss": statistics.fmean(losses[-10:]),
        "val_acc": accs,
    }


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    # The checkpoint is loaded onto the training device; RNG states must be CPU byte tensors.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def train(
    model: nn.Module,
    step: Step,
    train_data: BatchSource,
    test_data: BatchSource,
    *,
    val_data: BatchSource | None = None,
    run_dir: Path,
    epochs: int,
    lr: float,
    lr_step: int,
    limit_train_batches: int | None = None,
    limit_test_batches: int | None = None,
    log_every: int = 20,
    checkpoint_every_min: float = 10.0,
    progress_bar: bool = True,
    resume: dict[str, Any] | None = None,
    logger: Any = None,
    extra_state: dict[str, Any] | None = None,
    interrupt: Callable[[], str | None] | None = None,
    track: list[Progress] | None = None,
) -> dict[str, Any]:
    """Train for ``epochs`` epochs (resuming from ``resume``, a checkpoint dict); returns the
    summary that is also written to ``run_dir/summary.json``.

    ``interrupt`` is polled after every step (mq.preempt.GracefulStop.poll): "checkpoint" saves
    one now, "stop" saves one and raises Interrupted; None goes on. ``track`` receives the run's
    Progress, so that a caller can report the epochs done when training fails."""
    metrics = MetricsFile(run_dir / "metrics.jsonl", resume["metrics_offset"] if resume else None)
    progress = Progress()
    if resume:
        unwrap(model).load_state_dict(resume["model"])
        step.load_state_dict(resume["step_state"])
        progress = Progress(**resume["progress"])
        set_rng_state(resume["rng"])
        log.info(
            "resumed at epoch %d, batch %d (step %d; %d epochs completed)",
            progress.epoch + 1,  # 1-based like every epoch number shown
            progress.batch,
            progress.step,
            progress.epoch,
        )
    segment_start, elapsed_before = time.monotonic(), progress.elapsed

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - segment_start

    if track is not None:
        track.append(progress)
    batches = (
        len(train_data)
        if limit_train_batches is None
        else min(len(train_data), limit_train_batches)
    )
    # Every epoch tests the same images: all of them, or a fixed class-stratified sample.
    test_source = test_data if limit_test_batches is None else test_data.sample(limit_test_batches)
    measured = {
        "limit_train_batches": limit_train_batches,
        "limit_test_batches": limit_test_batches,
        "train_batches": batches,  # per epoch
        "train_batches_total": len(train_data),
        "test_images": test_source.num_samples,
        "test_images_total": test_data.num_samples,
        **({"val_images": val_data.num_samples} if val_data is not None else {}),
    }
    limited = tested_on(test_source.num_samples, test_data.num_samples, limit_test_batches)
    if limited:
        log.info("every epoch is tested on the same %s", limited)

    def checkpoint() -> None:
        progress.elapsed = elapsed()
        state = {
            "version": 1,
            "model": plain_state_dict(model),
            "step_state": step.state_dict(),
            "progress": progress.__dict__,
            "rng": rng_state(),
            "metrics_offset": metrics.offset(),
            **(extra_state or {}),
        }
        save_checkpoint(state, run_dir / "checkpoint.pt")

    def flush(pending: list[tuple[int, int, Tensor, Tensor, int]], current_lr: float) -> bool:
        """Write buffered per-step rows; returns False when the loss is no longer finite."""
        if not pending:
            return True
        losses = torch.stack([p[2] for p in pending]).tolist()
        corrects = torch.stack([p[3] for p in pending]).tolist()
        # After the read-back above, so the time is when these steps had finished.
        now, ran = time.time(), elapsed()
        rows = [
            {
                "kind": "step",
                "epoch": e + 1,  # 1-based, as in the logs: the epoch this step belongs to
                "step": s,
                "loss": loss,
                "acc": 100.0 * c / n,
                "lr": current_lr,
                "time": now,
                "elapsed": ran,
            }
            for (e, s, _, _, n), loss, c in zip(pending, losses, corrects, strict=True)
        ]
        metrics.write(rows)
        if logger is not None:
            logger.log(rows)
        progress.partial["loss"] = progress.partial.get("loss", 0.0) + sum(losses)
        progress.partial["correct"] = progress.partial.get("correct", 0.0) + sum(corrects)
        progress.partial["seen"] = progress.partial.get("seen", 0.0) + sum(p[4] for p in pending)
        progress.partial["batches"] = progress.partial.get("batches", 0.0) + len(pending)
        pending.clear()
        return all(math.isfinite(v) for v in losses)

    model.train()
    status = "completed"
    last_checkpoint = time.monotonic()
    while progress.epoch < epochs:
        epoch = progress.epoch
        current_lr = lr_at(lr, epoch, lr_step)
        step.set_lr(current_lr, meta_lr_factor=0.1 ** (epoch // lr_step))
        bar = tqdm(
            total=batches,
            initial=progress.batch,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress_bar,
            file=sys.stderr,
            leave=False,
            mininterval=1.0,
        )
        pending: list[tuple[int, int, Tensor, Tensor, int]] = []
        started = time.perf_counter()
        seen_at_start = progress.partial.get("seen", 0.0)
        for x, y in train_data.epoch(epoch, start_batch=progress.batch):
            if progress.batch >= batches:
                break
            loss, logits = step.train_step(x, y)
            pending.append((epoch, progress.step, loss, (logits.argmax(1) == y).sum(), y.numel()))
            progress.step += 1
            progress.batch += 1
            bar.update(1)
            action = interrupt() if interrupt is not None else None  # a signal arrived
            report = len(pending) >= log_every or progress.batch == batches
            if (report or action is not None) and not flush(pending, current_lr):
                status = "diverged"
                break
            if report:
                seen = progress.partial["seen"] - seen_at_start
                bar.set_postfix(
                    loss=f"{progress.partial['loss'] / progress.partial['batches']:.3f}",
                    acc=f"{100 * progress.partial['correct'] / progress.partial['seen']:.1f}",
                    img_s=f"{seen / (time.perf_counter() - started):.0f}",
                )
            # a signal saves the state of this step boundary; otherwise one every few minutes
            if action is not None or (
                report and time.monotonic() - last_checkpoint > 60 * checkpoint_every_min
            ):
                checkpoint()
                last_checkpoint = time.monotonic()
            if action == "stop":
                bar.close()
                metrics.close()
                raise Interrupted(f"stopped at step {progress.step} after a checkpoint")
        bar.close()
        if status == "diverged":
            log.warning("loss is not finite at step %d: run ends as diverged", progress.step)
            break
        epoch_time = time.perf_counter() - started
        test_loss, test_acc, _ = evaluate(
            model, test_source, progress=progress_bar, desc=f"epoch {epoch + 1}/{epochs} test"
        )
        val: dict[str, float] = {}
        if val_data is not None:  # held-out training images, the same code path as the test
            val_loss, val_acc, _ = evaluate(model, val_data, desc=f"epoch {epoch + 1} val")
            val = {"val_loss": val_loss, "val_acc": val_acc}
            progress.val_loss.append(val_loss)
            progress.val_acc.append(val_acc)
        part = progress.partial
        row = {
            "kind": "epoch",
            "epoch": epoch + 1,  # epochs completed, as in the logs and plots
            "step": max(progress.step - 1, 0),
            "train_loss": part.get("loss", 0.0) / max(part.get("batches", 0.0), 1),
            "train_acc": 100.0 * part.get("correct", 0.0) / max(part.get("seen", 0.0), 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
            **val,
            "epoch_time": epoch_time,
            "images_per_s": (part.get("seen", 0.0) - seen_at_start) / max(epoch_time, 1e-9),
            "lr": current_lr,
            "time": time.time(),
            "elapsed": elapsed(),
        }
        metrics.write([row])
        if logger is not None:
            logger.log([row])
        log.info(
            "epoch %d/%d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%%%s | %.1f s",
            epoch + 1,
            epochs,
            row["train_loss"],
            row["train_acc"],
            test_loss,
            test_acc,
            f" (on {test_source.num_samples} images: limited)" if limited else "",
            epoch_time,
        )
        progress.test_acc.append(test_acc)
        progress.train_loss.append(row["train_loss"])
        progress.epoch, progress.batch, progress.partial = epoch + 1, 0, {}
        if not math.isfinite(test_loss):
            status = "diverged"
            break
        checkpoint()
        last_checkpoint = time.monotonic()
    progress.elapsed = elapsed()
    summary = summarize(progress, status, measured=measured)
    write_json(summary, run_dir / "summary.json")
    metrics.close()
    return summary
