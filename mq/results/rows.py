"""Reading a run's metrics.jsonl and summary.json defensively: a row or field of the wrong type
(a hand edit, a copy gone wrong, another tool's output) is skipped with one warning naming the
file and line, so that one damaged run never hides the others in a listing or a report."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("mq.results")

# Epoch-row fields the readers turn into numbers.
ROW_NUMBERS = ("test_acc", "train_loss", "test_acc5", "time")
# summary.json fields and what each must be (None is always allowed).
SUMMARY_NUMBERS = ("final_test_acc", "final_test_acc5", "updated")
# summary.json keys that say what a run's numbers were measured on: whole numbers.
MEASURED = (
    "limit_train_batches",
    "limit_test_batches",
    "train_batches",
    "train_batches_total",
    "test_images",
    "test_images_total",
)
SUMMARY_INTEGERS = MEASURED
SUMMARY_TEXT = ("status", "error")


def is_number(value: Any) -> bool:
    """A JSON number (NaN included: a diverged run's loss), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_epoch(value: Any) -> int | None:
    """An epoch number as an int (1, 1.0); None for anything else."""
    if is_number(value) and math.isfinite(value) and float(value).is_integer() and value >= 0:
        return int(value)
    return None


def _row_problem(row: Any) -> str | None:
    """Why ``row`` cannot be read as a metrics row; None when it can."""
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    if row.get("kind") == "epoch" and as_epoch(row.get("epoch")) is None:
        return f"epoch {row.get('epoch')!r} is not a whole number"
    for key in ROW_NUMBERS:
        if row.get(key) is not None and not is_number(row[key]):
            return f"{key} {row[key]!r} is not a number"
    return None


def _warn_skipped(path: Path, problems: list[tuple[int, str]], what: str) -> None:
    if problems:
        line, why = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        log.warning("%s line %d: %s; %s skipped%s", path, line, why, what, more)


def read_epochs(path: Path) -> tuple[dict[int, dict[str, Any]], float | None]:
    """Epoch rows by epoch number (1-based: epochs completed), and the time of the last row.
    A killed job can leave a torn last line (skipped quietly); any other line that is not a
    valid row is skipped with a warning. The later of two rows for one epoch is the one that
    counts (a replay after a restart). Rows without a time count epochs from 0, and
    a run resumed by code that writes times has both kinds."""
    epochs: dict[int, dict[str, Any]] = {}
    last_time = None
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return epochs, last_time
    lines = text.split("\n")
    torn = len(lines) - 1 if lines[-1] else None  # a last line without its newline
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number - 1 != torn:
                problems.append((number, "not JSON"))
            continue
        problem = _row_problem(row)
        if problem is not None:
            problems.append((number, problem))
            continue
        if row.get("time") is not None:
            last_time = float(row["time"])
        if row.get("kind") == "epoch":
            epoch = as_epoch(row["epoch"]) + (0 if "time" in row else 1)
            epochs[epoch] = {**row, "epoch": epoch}
    _warn_skipped(path, problems, "row")
    return epochs, last_time


def clean_summary(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """``data`` (summary.json) without the fields the readers cannot use, with a warning."""
    bad: list[str] = []
    out = dict(data)
    for key in SUMMARY_NUMBERS:
        if out.get(key) is not None and not is_number(out[key]):
            bad.append(f"{key} {out.pop(key)!r} is not a number")
    for key in SUMMARY_INTEGERS:
        if out.get(key) is not None and (not is_number(out[key]) or as_epoch(out[key]) is None):
            bad.append(f"{key} {out.pop(key)!r} is not a whole number")
    for key in SUMMARY_TEXT:
        if out.get(key) is not None and not isinstance(out[key], str):
            bad.append(f"{key} {out.pop(key)!r} is not text")
    accs = out.get("test_acc")
    if accs is not None and not (isinstance(accs, list) and all(map(is_number, accs))):
        bad.append(f"test_acc {str(out.pop('test_acc'))[:40]} is not a list of numbers")
    choices = out.get("choices")
    if choices is not None and not isinstance(choices, dict):
        bad.append(f"choices {str(out.pop('choices'))[:40]} is not a mapping")
    elif choices:
        out["choices"] = {k: str(v) for k, v in choices.items() if isinstance(v, (str, int))}
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        log.warning("%s: %s; field ignored%s", path, bad[0], more)
    return out
