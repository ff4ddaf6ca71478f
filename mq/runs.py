"""Run directories read back from the files each job writes (config.yaml, summary.json,
metrics.jsonl): what the sweep report and anything else that compares runs start from."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_MARKERS = ("summary.json", "metrics.jsonl")


@dataclass
class Run:
    """One job's directory, read back."""

    path: Path
    status: str  # completed | running | failed | diverged | unfinished (no summary.json)
    error: str | None
    model: str
    dataset: str
    quant: str
    bits: int | str
    optimizer: str
    method: str
    seed: int | str
    config: dict[str, Any]  # flattened config.yaml ({} when absent)
    test_acc: list[float]  # per finished epoch
    train_loss: list[float]  # per finished epoch (from metrics.jsonl; may be empty)
    epochs: int | None  # configured epochs

    def last_mean(self, last: int) -> float | None:
        """Mean test accuracy over the last ``last`` epochs (fewer if the run has fewer)."""
        tail = self.test_acc[-last:]
        return statistics.fmean(tail) if tail else None

    def describe(self) -> str:
        names = (self.model, self.dataset, f"{self.quant} w{self.bits}", self.optimizer)
        return f"{' '.join(names)} {self.method} seed {self.seed}"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_epochs(path: Path) -> dict[int, dict[str, Any]]:
    """Epoch rows by epoch number. A killed job can leave a torn last line (skipped), and the
    later of two rows for one epoch is the one that counts (a replay after a restart)."""
    epochs: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return epochs
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("kind") == "epoch" and "epoch" in row:
            epochs[int(row["epoch"])] = row
    return epochs


def _target_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1].lower() if target else ""


def read_run(path: Path) -> Run:
    """Read one run directory. Names come from the Hydra choices in summary.json; when that is
    missing (a job killed before its first write) they are rebuilt from config.yaml."""
    config: dict[str, Any] = {}
    if (path / "config.yaml").exists():
        from omegaconf import OmegaConf  # the writer's own YAML dialect (1e-3 is a float)

        try:
            config = _flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")))
        except Exception:  # a torn or hand-edited file: fall back on summary.json's choices
            config = {}
    summary = _read_json(path / "summary.json")
    choices = (summary or {}).get("choices") or {}
    rows = _read_epochs(path / "metrics.jsonl")
    ordered = [rows[e] for e in sorted(rows)]
    test_acc = [float(r["test_acc"]) for r in ordered if r.get("test_acc") is not None]
    train_loss = [float(r["train_loss"]) for r in ordered if r.get("train_loss") is not None]
    if summary and summary.get("status") == "completed":
        # The summary's list comes from the checkpointed progress: authoritative when present.
        if summary.get("test_acc"):
            test_acc = [float(v) for v in summary["test_acc"]]
        elif summary.get("final_test_acc") is not None and not test_acc:
            test_acc = [float(summary["final_test_acc"])]  # task=eval runs
    quant = choices.get("quant") or _target_name(config.get("quant._target_")).removesuffix(
        "weight"
    )
    meta = choices.get("meta") or config.get("meta.net")
    if not meta and config:
        meta = "ste" if _target_name(config.get("meta._target_")) == "stestep" else "?"
    return Run(
        path=path,
        status=(summary or {}).get("status") or "unfinished",
        error=(summary or {}).get("error"),
        model=choices.get("model") or config.get("model.name") or "?",
        dataset=choices.get("dataset")
        or config.get("dataset.name")
        or _target_name(config.get("dataset._target_")).removesuffix("_loaders")
        or "?",
        quant=quant or "none",
        bits=config.get("bits", choices.get("bits", "?")),
        optimizer=choices.get("optimizer") or _target_name(config.get("optimizer._target_")) or "?",
        method=meta or "?",
        seed=config.get("seed", choices.get("seed", "?")),
        config=config,
        test_acc=test_acc,
        train_loss=train_loss,
        epochs=config.get("epochs"),
    )


def collect_runs(sweep_dir: str | Path) -> list[Run]:
    """Every run directory under ``sweep_dir`` (a folder holding summary.json or metrics.jsonl),
    at any depth, in path order."""
    runs = []
    for root, dirs, files in os.walk(sweep_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "wandb")
        if any(name in files for name in RUN_MARKERS):
            runs.append(read_run(Path(root)))
            dirs[:] = []  # a run's own subfolders hold no other runs
    return runs
