"""Config keys that do not change a run's result. One definition, read by the resume check
(mq.job.run), the run listing and report (mq.results.runs); a resumed run may differ from the
original in these. Kept free of torch so that listing runs stays quick."""

from __future__ import annotations

from typing import Any

VOLATILE = (
    "logger",
    "device",
    "cudnn_benchmark",
    "progress",
    "log_every",
    "checkpoint_every_min",
    "keep_training_state",
    "run_name",
    "sweep_name",
    "distributed",  # backend and timeouts: how ranks talk, not what they compute
    "checkpoints_dir",  # where model.pretrained=original is read; the file's path is recorded
)
# decode: where JPEGs are decoded (CPU workers or the GPU), like device, not what is trained.
VOLATILE_DATASET = ("root", "download", "cache", "workers", "decode")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}
