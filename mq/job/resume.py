"""What a run folder's checkpoint.pt allows before training starts: resuming (it holds the
training state), a completed run's summary.json rebuilt (it holds all epochs but only the
weights, as a completed run keeps it, and summary.json was lost), or neither (one line saying
what to do; nothing in the folder is changed)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mq.core.checkpoint import load_checkpoint, write_json
from mq.core.errors import ConfigError
from mq.job.progress import Progress, summarize
from mq.job.record import summary_head
from mq.job.train import Settings, measure

log = logging.getLogger(__name__)

# What Training needs from a checkpoint to resume (mq.job.train.Training.save_checkpoint).
TRAINING_STATE = ("model", "step_state", "progress", "rng", "metrics_offset")
START_OVER = "move it away to start the run over"


def completed_progress(state: dict[str, Any], path: Path, epochs: int) -> Progress | None:
    """The progress of a completed run's weights-only checkpoint (all ``epochs`` done), whose
    summary.json the caller rebuilds; None when ``state`` can resume training. A checkpoint
    that can do neither is a ConfigError naming the file and what it lacks."""
    try:
        progress = Progress(**state["progress"])
        done = int(progress.epoch)
    except (TypeError, ValueError) as exc:
        error = f"{path} has an unreadable progress record ({exc}); {START_OVER}"
        raise ConfigError(error) from exc
    if "step_state" not in state and "model" in state and done >= epochs:
        return progress
    missing = [key for key in TRAINING_STATE if key not in state]
    if not missing:
        return None
    if "model" in state and "step_state" not in state:
        raise ConfigError(
            f"{path} holds weights only ({done} of {epochs} epochs, no training state): "
            f"it cannot resume this run; {START_OVER}"
        )
    raise ConfigError(f"{path} lacks {', '.join(missing)}: it cannot resume; {START_OVER}")


def check_resumable(run_dir: Path, epochs: int) -> None:
    """The run folder's checkpoint.pt, if any, can resume or is a completed run's weights; a
    ConfigError otherwise. Called before Hydra writes into an existing folder, so that a
    refused relaunch leaves the folder exactly as it was."""
    path = run_dir / "checkpoint.pt"
    if os.path.lexists(path):
        completed_progress(load_checkpoint(path, "cpu"), path, epochs)


def _first_time(metrics: Path) -> float | None:
    """When the run started, from metrics.jsonl's first row (its time less its elapsed)."""
    try:
        with open(metrics) as f:
            row = json.loads(f.readline())
        return float(row["time"]) - float(row.get("elapsed", 0.0))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def rebuild_summary(
    cfg: DictConfig,
    run_dir: Path,
    progress: Progress,
    data: Any,
    previous: dict[str, Any],
    choices: dict[str, str],
) -> dict[str, Any]:
    """Write summary.json of a completed run from its checkpoint's progress (the epochs'
    accuracies and losses), metrics.jsonl (when it started) and ``data`` (what the numbers were
    measured on); returns it."""
    settings = Settings.of(cfg)
    _, measured = measure(settings, data.train, data.test, data.val)
    started = previous.get("started") or _first_time(run_dir / "metrics.jsonl") or time.time()
    head = summary_head(cfg, choices, previous.get("wandb_id"), started)
    summary = {**head, **summarize(progress, "completed", measured=measured)}
    write_json(summary, run_dir / "summary.json")
    said = f"said {previous['status']}" if previous.get("status") else "was missing or unreadable"
    log.warning(
        "%s %s, but checkpoint.pt holds the completed run (%d epochs): rebuilt it from "
        "checkpoint.pt and metrics.jsonl (completed, test acc %s)",
        run_dir / "summary.json",
        said,
        progress.epoch,
        summary["final_test_acc"],
    )
    return summary
