"""Run directories read back from the files each job writes (config.yaml, summary.json,
metrics.jsonl): what the sweep report and anything else that compares runs start from.

python -m mq.runs [DIR ...]   lists the runs under DIR (default outputs/): status (stopped: it
says running, but no process holds its run.lock), epochs, final and best test accuracy, whether
the run was limited, when it last wrote, its folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mq.cli.conf import upgrade
from mq.core.folders import lock_held
from mq.core.keys import VOLATILE, VOLATILE_DATASET, flatten
from mq.results.rows import MEASURED, clean_summary, read_epochs

RUN_MARKERS = ("summary.json", "metrics.jsonl")
# What a job writes as it goes: the newest of these is when a stopped run last wrote.
STOPPED_FILES = ("metrics.jsonl", "checkpoint.pt", "summary.json")


@dataclass
class Run:
    """One job's directory, read back."""

    path: Path
    # completed | running | stopped (said running, but no process holds its lock) | failed |
    # diverged | preempted | unfinished (no summary.json)
    status: str
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
    task: str = "quantize"  # quantize | pretrain | eval
    measured: dict[str, Any] = field(default_factory=dict)  # MEASURED keys known for this run
    updated: float | None = None  # unix time of the run's last write
    test_acc5: list[float] = field(default_factory=list)  # top-5 per epoch (over 10 classes)

    def last_mean(self, last: int, metric: str = "test_acc") -> float | None:
        """Mean of ``metric`` (test_acc, test_acc5) over the last ``last`` epochs (fewer if the
        run has fewer)."""
        tail = getattr(self, metric)[-last:]
        return statistics.fmean(tail) if tail else None

    def _limits(self, brief: bool) -> str | None:
        m = self.measured
        parts = [
            _limit(m, "test_images", "test_images_total", "limit_test_batches", brief, "test"),
            _limit(
                m, "train_batches", "train_batches_total", "limit_train_batches", brief, "train"
            ),
        ]
        return "; ".join(p for p in parts if p) or None

    @property
    def limited(self) -> str | None:
        """What a limited run left out, in words; None when it used all the data."""
        return self._limits(brief=False)

    @property
    def limited_brief(self) -> str | None:
        """The same, short, for a listing column."""
        return self._limits(brief=True)

    def describe(self) -> str:
        names = (self.model, self.dataset, f"{self.quant} w{self.bits}", self.optimizer)
        return f"{' '.join(names)} {self.method} seed {self.seed}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def normalize(value: Any) -> Any:
    """One spelling per value, so that 1, 1.0 and "1" (a Hydra choice, a YAML string) compare
    and group as one: numeric strings become numbers, integral floats ints."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        else:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return tuple(normalize(v) for v in value)
    return value


def _read_config(path: Path) -> dict[str, Any]:
    """The flattened result config: config.yaml, or for a run that has none (task=eval) the
    resolved Hydra record in .hydra/config.yaml minus the keys that do not change results."""
    from omegaconf import OmegaConf  # the writer's own YAML dialect (1e-3 is a float)

    try:
        if (path / "config.yaml").exists():
            return flatten(upgrade(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))))
        if not (path / ".hydra" / "config.yaml").exists():
            return {}
        data = upgrade(OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml")))
        assert isinstance(data, dict)
        for key in VOLATILE:
            data.pop(key, None)
        for key in VOLATILE_DATASET:
            (data.get("dataset") or {}).pop(key, None)
        try:
            return flatten(OmegaConf.to_container(OmegaConf.create(data), resolve=True))
        except Exception:  # an interpolation only Hydra resolves: keep it as written
            return flatten(data)
    except Exception:  # a torn or hand-edited file: fall back on summary.json's choices
        return {}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _target_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1].lower() if target else ""


def read_run(path: Path) -> Run:
    """Read one run directory. Names come from the Hydra choices in summary.json; when that is
    missing (a job killed before its first write) they are rebuilt from config.yaml."""
    config = {key: normalize(value) for key, value in _read_config(path).items()}
    summary = _read_json(path / "summary.json")
    if summary is not None:
        summary = clean_summary(summary, path / "summary.json")
    choices = (summary or {}).get("choices") or {}
    rows, last_time = read_epochs(path / "metrics.jsonl")
    ordered = [rows[e] for e in sorted(rows)]
    test_acc = [float(r["test_acc"]) for r in ordered if r.get("test_acc") is not None]
    train_loss = [float(r["train_loss"]) for r in ordered if r.get("train_loss") is not None]
    # top-5 is in metrics.jsonl only (epochs) and in an eval run's summary
    test_acc5 = [float(r["test_acc5"]) for r in ordered if r.get("test_acc5") is not None]
    if summary and summary.get("final_test_acc5") is not None and not test_acc5:
        test_acc5 = [float(summary["final_test_acc5"])]
    if summary and summary.get("status") == "completed":
        # The summary's list comes from the checkpointed progress: authoritative when present.
        if summary.get("test_acc"):
            test_acc = [float(v) for v in summary["test_acc"]]
        elif summary.get("final_test_acc") is not None and not test_acc:
            test_acc = [float(summary["final_test_acc"])]  # task=eval runs
    quant = choices.get("quant") or _target_name(config.get("quant._target_")).removesuffix(
        "weight"
    )
    # without choices: the meta net's class (mq.meta.MultiFC -> multifc; older configs are
    # upgraded to that layout by _read_config)
    meta = choices.get("meta") or _target_name(config.get("meta.net._target_"))
    if not meta and config:  # a step class: STEStep -> ste, EWGSStep -> ewgs
        meta = _target_name(config.get("meta._target_")).removesuffix("step") or "?"
    # Older summaries lack the measured keys: the limits are also result keys of the config.
    measured = {k: config[k] for k in MEASURED if config.get(k) is not None}
    measured |= {k: (summary or {})[k] for k in MEASURED if k in (summary or {})}
    times = [(summary or {}).get("updated"), last_time]
    times = [float(t) for t in times if isinstance(t, (int, float))] or [
        t for t in map(_mtime, (path / "summary.json", path / "metrics.jsonl")) if t is not None
    ]
    status = (summary or {}).get("status") or "unfinished"
    if status == "running" and lock_held(path) is False:
        # Killed (SIGKILL, OOM killer, lost node) before it could say so: when it last wrote.
        status = "stopped"
        times = [t for t in map(_mtime, (path / n for n in STOPPED_FILES)) if t is not None]
    return Run(
        path=path,
        status=status,
        error=(summary or {}).get("error"),
        model=choices.get("model") or config.get("model.name") or "?",
        dataset=choices.get("dataset")
        or config.get("dataset.name")
        or _target_name(config.get("dataset._target_")).removesuffix("_loaders")
        or "?",
        quant=quant or "none",
        bits=normalize(config.get("bits", choices.get("bits", "?"))),
        optimizer=choices.get("optimizer") or _target_name(config.get("optimizer._target_")) or "?",
        method=meta or "?",
        seed=normalize(config.get("seed", choices.get("seed", "?"))),
        config=config,
        test_acc=test_acc,
        train_loss=train_loss,
        epochs=config.get("epochs"),
        task=config.get("task.name") or choices.get("task") or "?",
        measured=measured,
        updated=max(times, default=None),
        test_acc5=test_acc5,
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


def _age(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    seconds = max(now - then, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def listing(root: Path, now: float | None = None) -> list[list[str]]:
    """One row of text per run under ``root``: the columns of ``python -m mq.runs``."""
    now = time.time() if now is None else now
    rows = []
    for run in collect_runs(root):
        accs = run.test_acc
        if run.task == "eval":
            epochs = "eval"
        else:
            epochs = f"{len(accs)}/{'?' if run.epochs is None else run.epochs}"
        rows.append(
            [
                run.status,
                epochs,
                _acc(accs[-1] if accs else None),
                _acc(max(accs) if accs else None),
                run.limited_brief or "-",
                _age(run.updated, now),
                str(run.path.relative_to(root)) if run.path != root else ".",
            ]
        )
    return rows


HEADER = ["status", "epochs", "final", "best", "limited", "updated", "path"]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [HEADER, *rows]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mq.runs",
        description="List the runs under a folder: status, epochs completed of configured, "
        "final and best test accuracy (%), what a limited run left out, when it last wrote, "
        "and its folder.",
    )
    parser.add_argument(
        "dirs", nargs="*", type=Path, default=[Path("outputs")], help="folders (outputs/)"
    )
    parser.add_argument(
        "--status", help="only runs with this status (e.g. failed, running, stopped)"
    )
    args = parser.parse_args(argv)
    warn_to_stderr()
    for root in args.dirs:
        if not root.is_dir():
            print(f"error: {root} is not a folder; give one holding run folders", file=sys.stderr)
            return 2
    for root in args.dirs:
        rows = [r for r in listing(root) if args.status in (None, r[0])]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row[0]] = counts.get(row[0], 0) + 1
        if len(args.dirs) > 1:
            print(f"{root}:")
        if rows:
            print(_table(rows))
        tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"{len(rows)} runs under {root}" + (f": {tally}" if tally else ""))
    return 0


def warn_to_stderr() -> None:
    """Show the readers' warnings (a skipped row, a field ignored) as ``warning: ...`` lines."""
    logger = logging.getLogger("mq.results")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def quiet_broken_pipe(main: Callable[[], int]) -> int:
    """``main()`` for a command whose output may go to ``head``: when the reader closes the
    pipe, stop quietly (exit status 141, as a Unix tool killed by SIGPIPE) rather than with a
    traceback; stdout goes to /dev/null so that Python's final flush fails no more."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _limit(
    measured: dict[str, Any], done_key: str, total_key: str, limit_key: str, brief: bool, kind: str
) -> str | None:
    """What a limited run measured on one side (test images or train batches per epoch)."""
    done, total, limit = measured.get(done_key), measured.get(total_key), measured.get(limit_key)
    unit = "images" if kind == "test" else "batches"
    if done is not None and total is not None:
        if done >= total:
            return None
        if brief:
            return f"{kind} {done:,}/{total:,}" + ("" if kind == "test" else " batches")
        if kind == "test":
            return f"tested on {done:,} of {total:,} images"
        return f"trained on {done:,} of {total:,} {unit} per epoch"
    if limit is None:
        return None
    # Without the counts, a test limit took the first batches: one or two classes.
    if kind == "test":
        return (
            f"test first {limit} batches" if brief else f"tested on the first {limit} batches only"
        )
    return f"train <={limit} batches" if brief else f"trained on at most {limit} batches per epoch"


if __name__ == "__main__":
    sys.exit(main())
