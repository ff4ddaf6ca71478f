"""The report of a tuned comparison (hydra/sweeper=tune, +sweep=fair_compare): tuned vs tuned
next to defaults vs defaults, each method against the best STE, and a plot of each study.

Reads the sweep folder's tune.json (the studies and which runs are final) and each final run's
folder; needs neither Optuna nor the study database. A final run's number is the one
mq.results.report's table gives that run (its final test accuracy, or the mean over its last N
epochs with ``--last N``), and limited runs carry the same footnote.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from mq.core.checkpoint import read_json
from mq.results.runs import Run, read_run
from mq.results.stats import welch
from mq.results.table import Cell, Table

TUNE_FILE = "tune.json"
TUNING = "tuning"  # the pseudo config key that keeps trials and final runs in separate rows


def _label(study: dict[str, Any]) -> str:
    return study["name"].split(":", 1)[-1]


def _meta(study: dict[str, Any]) -> str:
    return next((o.split("=", 1)[1] for o in study["group"] if o.startswith("meta=")), "?")


def _optimizer(study: dict[str, Any]) -> str:
    return next((o.split("=", 1)[1] for o in study["group"] if o.startswith("optimizer=")), "?")


def final_cells(data: dict[str, Any], sweep_dir: Path, last: int) -> Table:
    """The final runs as a Table whose cells are keyed (study name, "tuned" | "default"): each
    completed run's test accuracy averaged over its last ``last`` epochs, one value per seed.
    Runs are found by folder name in ``sweep_dir``, so a copied sweep reports the same."""
    cells: dict[Any, Cell] = {}
    runs: list[Run] = []
    for entry in data.get("final", []):
        folder = sweep_dir / Path(entry["run_dir"]).name
        if not folder.is_dir():
            continue
        run = read_run(folder)
        runs.append(run)
        value = run.last_mean(last)
        cell = cells.setdefault((entry["study"], entry["kind"]), Cell())
        if run.status == "completed" and value is not None:
            cell.runs.append(run)
            cell.run_values.append(value)
            cell.windows.append((min(last, len(run.test_acc)), len(run.test_acc)))
        else:
            cell.others.append(run)
    return Table([], [], cells, runs, last, [], [])


def mark_tuning_runs(sweep_dir: Path, runs: list[Run]) -> bool:
    """In a tuned sweep (tune.json), give each run the pseudo config key ``tuning`` (trial or
    final), so that the report's table never averages a trial with the final runs of the same
    configuration. False (runs unchanged) for any other sweep."""
    data = read_json(sweep_dir / TUNE_FILE)
    if not data:
        return False
    finals = {Path(f["run_dir"]).name for f in data.get("final", [])}
    for run in runs:
        run.config[TUNING] = "final" if run.path.name in finals else "trial"
    return True


def missing_finals(sweep_dir: Path) -> list[str]:
    """One line per final run tune.json lists whose folder is not in ``sweep_dir``."""
    data = read_json(sweep_dir / TUNE_FILE) or {}
    return [
        f"no runs: final run ({f['kind']}) {' '.join(f.get('overrides') or [])}"
        for f in data.get("final", [])
        if not (sweep_dir / Path(f["run_dir"]).name).is_dir()
    ]


def _cell(table: Table, study: str, kind: str) -> str:
    cell = table.cells.get((study, kind), Cell())  # type: ignore[call-overload]
    return cell.text(table.marks(cell))


def _versus(values: list[float] | None, ref: list[float] | None, same: bool) -> str:
    if same:
        return "(reference)"
    result = welch(values or [], ref or [])
    if result is None:
        return "-"
    return f"{result.diff:+.2f} [{result.low:+.2f}, {result.high:+.2f}], p={result.p:.3f}"


def _best_ste(studies: list[dict], accs: dict, kind: str, optimizer: str | None = None) -> Any:
    """The STE study with the highest mean final accuracy (of one optimizer, if given)."""
    candidates = [
        s
        for s in studies
        if _meta(s) == "ste"
        and accs.get((s["name"], kind))
        and (optimizer is None or _optimizer(s) == optimizer)
    ]
    return max(candidates, key=lambda s: statistics.fmean(accs[(s["name"], kind)]), default=None)


def fair_markdown(sweep_dir: Path, out_dir: Path, plots: bool = True, last: int = 1) -> str:
    """The section for table.md ("" when ``sweep_dir`` holds no tune.json)."""
    data = read_json(sweep_dir / TUNE_FILE)
    if not data:
        return ""
    studies = data.get("studies", [])
    table = final_cells(data, sweep_dir, last)
    accs = {key: cell.values for key, cell in table.cells.items() if cell.values}
    best_tuned = _best_ste(studies, accs, "tuned")
    lines = [
        "## Tuned vs tuned, defaults vs defaults",
        "",
        f"Each method tuned on the validation split ({data.get('objective')}, "
        f"{data.get('trials_per_study')} trials per study; the test set is never read by the "
        f"objective), then its best and its default config trained with seeds "
        f"{data.get('final_seeds')}. Test accuracy (%): mean (std) over seeds of "
        f"{table.averaged_label()}. Δ: difference of means with its 95% CI (Welch) and "
        "two-sided p; tuned rows against the best tuned STE"
        + (f" ({_label(best_tuned)})" if best_tuned else "")
        + ", default rows against STE with the same optimizer at its defaults (the paper's "
        "comparison).",
        "",
        "| study | defaults | Δ vs STE (defaults) | tuned | Δ vs best STE (tuned) | tuned config |"
        " best val |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in studies:
        name = s["name"]
        default, tuned = accs.get((name, "default")), accs.get((name, "tuned"))
        ste_default = _best_ste(studies, accs, "default", _optimizer(s))
        ref_d = accs.get((ste_default["name"], "default")) if ste_default else None
        ref_t = accs.get((best_tuned["name"], "tuned")) if best_tuned else None
        best = s.get("best") or {}
        config = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()
        )
        done = [t["value"] for t in s["trials"] if t["state"] == "COMPLETE"]
        best_val = (max if s.get("direction") == "maximize" else min)(done) if done else None
        lines.append(
            f"| {_label(s)} | {_cell(table, name, 'default')} | "
            f"{_versus(default, ref_d, ste_default is not None and ste_default is s)} | "
            f"{_cell(table, name, 'tuned')} | {_versus(tuned, ref_t, best_tuned is s)} | "
            f"{config or '-'} | "
            f"{'-' if best_val is None else f'{best_val:.2f}'} |"
        )
    failed = sum(t["state"] == "FAIL" for s in studies for t in s["trials"])
    notes = table.footnotes()
    lines += ["", *notes] if notes else []
    lines += [
        "",
        f"Trials: {sum(len(s['trials']) for s in studies)}, failed or diverged: "
        f"{failed}. Storage: {data.get('storage')}",
        "",
    ]
    if plots:
        lines += ["### Studies", ""]
        for s in studies:
            path = plot_study(
                s, out_dir / f"study_{re.sub(r'[^A-Za-z0-9.=_-]+', '_', _label(s))}.png"
            )
            lines.append(f"![{_label(s)}]({path.name})")
        lines.append("")
    return "\n".join(lines)


def plot_study(study: dict[str, Any], path: Path) -> Path:
    """Each trial's objective value in trial order (failed trials as x on the axis) and the
    best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trials = sorted(study["trials"], key=lambda t: t["number"])
    done = [(t["number"], t["value"]) for t in trials if t["state"] == "COMPLETE"]
    failed = [t["number"] for t in trials if t["state"] == "FAIL"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if done:
        xs, ys = zip(*done, strict=True)
        ax.plot(xs, ys, "o", label="trial")
        pick = max if study.get("direction") == "maximize" else min
        best = [pick(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, best, where="post", label="best so far")
        if failed:
            ax.plot(failed, [min(ys)] * len(failed), "x", color="red", label="failed/diverged")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (validation)")
    ax.set_title(_label(study), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
