"""Where a run stands (Progress, saved in every checkpoint), the sums of the unfinished epoch,
summary.json's numbers, and the random-number state a restart restores."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EpochSums:
    """Sums over the steps of the unfinished epoch."""

    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    batches: float = 0.0

    def add(self, losses: list[float], corrects: list[float], images: list[float]) -> None:
        self.loss += sum(losses)
        self.correct += sum(corrects)
        self.seen += sum(images)
        self.batches += len(losses)

    def postfix(self, seen_at_start: float, started: float) -> dict[str, str]:
        """The progress bar's numbers."""
        return {
            "loss": f"{self.loss / self.batches:.3f}",
            "acc": f"{100 * self.correct / self.seen:.1f}",
            "img_s": f"{(self.seen - seen_at_start) / (time.perf_counter() - started):.0f}",
        }


@dataclass
class Progress:
    """Where a run stands; saved in the checkpoint (as plain values, see state())."""

    epoch: int = 0  # next epoch to run
    batch: int = 0  # next batch of that epoch
    step: int = 0  # optimizer steps taken
    test_acc: list[float] = field(default_factory=list)  # one per finished epoch
    train_loss: list[float] = field(default_factory=list)
    partial: EpochSums = field(default_factory=EpochSums)
    # Seconds of training up to the last checkpoint (0 in an older version's checkpoint).
    elapsed: float = 0.0
    val_acc: list[float] = field(default_factory=list)  # per epoch, with dataset.val_size
    val_loss: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.partial, dict):  # from a checkpoint
            self.partial = EpochSums(**self.partial)

    def state(self) -> dict[str, Any]:
        """For the checkpoint: plain values only (it is loaded with weights_only)."""
        return {**self.__dict__, "partial": dict(self.partial.__dict__)}


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
