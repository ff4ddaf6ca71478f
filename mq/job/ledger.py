"""The sweep ledger: what each job of a sweep has done, read from the files the jobs write.

SLURM reports a Hydra job that raised as COMPLETED (the error is inside submitit's result
pickle), so the truth is each run directory's summary.json, written by the job itself:
running, completed, failed (with the error), diverged (the loss turned NaN) or preempted
(checkpointed and requeued); a job that says running while no process holds its folder's lock
was killed without a word (SIGKILL, a lost node): stopped. A sweep directory also holds
sweep.json, created by the first launch: its wandb group (name + time of that launch) stays the
same across relaunches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mq.core.checkpoint import read_json, write_json
from mq.core.folders import lock_held

# States a relaunch leaves alone: training again would give the same result.
FINAL = ("completed", "diverged")
SWEEP_FILE = "sweep.json"


def job_status(run_dir: Path) -> str:
    """The job's own status; "new" when it never started (no summary.json); "stopped" when it
    says running but no process holds its folder's lock (killed by SIGKILL, say)."""

    summary = read_json(run_dir / "summary.json")
    status = str(summary.get("status", "unknown")) if summary else "new"
    return "stopped" if status == "running" and lock_held(run_dir) is False else status


def slurm_job(run_dir: Path) -> str | None:
    """The SLURM job id that last ran this job (kept in summary.json; a requeue keeps it)."""
    summary = read_json(run_dir / "summary.json") or {}
    return summary.get("slurm_job_id")


def live_slurm_jobs() -> set[str] | None:
    """Ids of this user's pending or running SLURM jobs; None when squeue cannot tell."""
    if shutil.which("squeue") is None:
        return None
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    cmd = ["squeue", "-h", "-o", "%A", *(["-u", user] if user else [])]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(result.stdout.split())


def count(statuses: list[str]) -> str:
    """``"3 completed, 1 failed"``, in a fixed order."""
    order = [
        "completed",
        "diverged",
        "failed",
        "preempted",
        "running",
        "stopped",
        "in SLURM",
        "new",
    ]
    counts = Counter(statuses)
    keys = sorted(counts, key=lambda s: (order.index(s) if s in order else len(order), s))
    return ", ".join(f"{counts[k]} {k}" for k in keys)


def record_launch(sweep_dir: Path, sweep_name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Create sweep.json on the first launch (fixing the wandb group), append ``entry`` to its
    list of launches on every launch; returns the file's content."""
    path = sweep_dir / SWEEP_FILE
    data = read_json(path) or {}
    if not data.get("group"):
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        data = {"sweep_name": sweep_name, "group": f"{sweep_name}-{stamp}", "created": now}
    data.setdefault("launches", []).append({"time": time.time(), **entry})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(data, path)
    return data


def wandb_group(sweep_dir: Path, fallback: str) -> str:
    """The sweep's wandb group from sweep.json (``fallback`` when a job runs without one)."""
    try:
        data = json.loads((sweep_dir / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return fallback
    return str(data.get("group") or fallback)


def record_failure(run_dir: Path, error: str, extra: dict[str, Any]) -> None:
    """Mark a sweep job failed when it died before its own bookkeeping did (bad data path,
    unreadable checkpoint: errors raised before training starts)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # a data-parallel job: rank 0 alone writes the ledger (mq.core.distributed)
    summary = read_json(run_dir / "summary.json") or {}
    if summary.get("status") in ("failed", "preempted", *FINAL):
        return  # the job wrote its own, more precise, final word
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json({**extra, **summary, "status": "failed", "error": error}, run_dir / "summary.json")
