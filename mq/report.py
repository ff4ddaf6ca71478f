"""Sweep report: the paper-style accuracy table, convergence plots and a list of what is missing.

python -m mq.report SWEEP_DIR [--out DIR] [--last N] [--wandb [--wandb-mode offline]]

Reads only the files each job writes (config.yaml, summary.json, metrics.jsonl), so it works
on a half-finished sweep, on a copy from a cluster, and without wandb. A cell of the table is
``mean (std) n=K`` over seeds of each run's mean test accuracy over its last N epochs (the
paper's protocol). Config keys that differ between runs of one cell (other than the seed) are
made part of the row (or, for ``meta.*`` keys, the column), so different configs are never
averaged together.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mq.runs import Run, collect_runs

METHODS = ("ste", "multifc", "fcgrad", "lstmfc")  # the paper's column order
ROW_FIELDS = ("model", "dataset", "quant", "bits", "optimizer")
NUMBER_FIELDS = ("n", "mean", "std", "seeds", "not_completed", "last")  # CSV columns per cell


class NoRunsError(Exception):
    """The sweep directory holds no run directories."""


def _method_rank(method: str) -> tuple[int, str]:
    return (METHODS.index(method), "") if method in METHODS else (len(METHODS), method)


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class RowKey:
    model: str
    dataset: str
    quant: str
    bits: Any
    optimizer: str
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.extra)
        return f"{self.model} {self.dataset} {self.quant} w{self.bits} {self.optimizer}{extra}"


@dataclass(frozen=True)
class ColKey:
    method: str
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        # A key another method lacks (ste has no hidden_size) is left out of that label.
        extra = ", ".join(f"{k.removeprefix('meta.')}={v}" for k, v in self.extra if v != "-")
        return f"{self.method} ({extra})" if extra else self.method


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)  # completed runs: the ones averaged
    others: list[Run] = field(default_factory=list)  # running / failed / diverged / unfinished
    values: list[float] = field(default_factory=list)  # per completed run: last-N mean

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        # Sample std over seeds; undefined for one seed (shown as "-", left empty in the CSV).
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def seeds(self) -> list[Any]:
        return sorted((r.seed for r in self.runs), key=str)

    def text(self) -> str:
        if not self.values:
            return "-"
        std = "-" if self.std is None else f"{self.std:.2f}"
        return f"{self.mean:.2f} ({std}) n={self.n}"


@dataclass
class Table:
    rows: list[RowKey]
    cols: list[ColKey]
    cells: dict[tuple[RowKey, ColKey], Cell]
    runs: list[Run]
    last: int
    row_keys: list[str]  # config keys added to the row identity
    col_keys: list[str]  # config keys added to the column identity

    def cell(self, row: RowKey, col: ColKey) -> Cell:
        return self.cells.get((row, col), Cell())

    def missing(self, root: Path | None = None) -> list[str]:
        """One line per run left out of the means and per cell short of seeds; run paths are
        shown relative to ``root`` when given."""
        lines = []
        for run in self.runs:
            if run.status == "completed" and run.test_acc:
                continue
            done = f"{len(run.test_acc)}/{_fmt(run.epochs)} epochs"
            error = f": {run.error}" if run.error else ""
            where = run.path.relative_to(root) if root else run.path
            lines.append(f"{run.status}: {run.describe()} ({done}) at {where}{error}")
        most = max((c.n for c in self.cells.values()), default=0)
        seeds = sorted({r.seed for r in self.runs}, key=str)
        for row in self.rows:
            for col in self.cols:
                cell = self.cell(row, col)
                if not cell.runs and not cell.others:
                    lines.append(f"no runs: {row.label} | {col.label}")
                elif cell.n < most:
                    lacking = [s for s in seeds if s not in cell.seeds]
                    lines.append(
                        f"fewer seeds: {row.label} | {col.label}: n={cell.n} of {most} "
                        f"(no completed seed {', '.join(map(str, lacking))})"
                    )
        return lines

    def to_markdown(self) -> str:
        head = ["model", "dataset", "quant", "optimizer", *self.row_keys]
        head += [c.label for c in self.cols]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            values = [row.model, row.dataset, f"{row.quant} w{row.bits}", row.optimizer]
            values += [v for _, v in row.extra] + [self.cell(row, c).text() for c in self.cols]
            lines.append("| " + " | ".join(values) + " |")
        return "\n".join(lines)

    def csv_rows(self) -> list[dict[str, Any]]:
        """One dict per non-empty cell, the numbers as separate columns."""
        out = []
        for row in self.rows:
            for col in self.cols:
                cell = self.cell(row, col)
                if not cell.runs and not cell.others:
                    continue
                out.append(
                    {
                        **{f: getattr(row, f) for f in ROW_FIELDS},
                        "method": col.method,
                        **dict(row.extra),
                        **dict(col.extra),
                        "n": cell.n,
                        "mean": "" if cell.mean is None else cell.mean,
                        "std": "" if cell.std is None else cell.std,
                        "seeds": ";".join(map(str, cell.seeds)),
                        "not_completed": len(cell.others),
                        "last": self.last,
                    }
                )
        return out

    def columns(self) -> list[str]:
        return [*ROW_FIELDS, "method", *self.row_keys, *self.col_keys, *NUMBER_FIELDS]


def _varying_keys(runs: list[Run], base: dict[int, tuple]) -> list[str]:
    """Config keys (other than the seed) that differ between runs of one base cell."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if run.config:
            groups[base[id(run)]].append(run.config)
    keys = set()
    for configs in groups.values():
        for key in set().union(*configs) - {"seed"}:
            if len({repr(c.get(key)) for c in configs}) > 1:
                keys.add(key)
    return sorted(keys)


def make_table(runs: list[Run], last: int = 10) -> Table:
    """Group runs into cells and average each cell's completed runs over seeds."""
    base = {id(r): (r.model, r.dataset, r.quant, str(r.bits), r.optimizer, r.method) for r in runs}
    varying = _varying_keys(runs, base)
    # A method's own hyperparameters split its column; anything else splits the row, so the
    # STE baseline stays in the same row as every MetaQuant variant it is compared with.
    col_keys = [k for k in varying if k.startswith("meta.")]
    row_keys = [k for k in varying if not k.startswith("meta.")]
    cells: dict[tuple[RowKey, ColKey], Cell] = defaultdict(Cell)
    for run in runs:
        row = RowKey(
            run.model,
            run.dataset,
            run.quant,
            run.bits,
            run.optimizer,
            tuple((k, _fmt(run.config.get(k))) for k in row_keys),
        )
        col = ColKey(run.method, tuple((k, _fmt(run.config.get(k))) for k in col_keys))
        cell = cells[(row, col)]
        value = run.last_mean(last)
        if run.status == "completed" and value is not None:
            cell.runs.append(run)
            cell.values.append(value)
        else:
            cell.others.append(run)
    rows = sorted({r for r, _ in cells}, key=lambda r: tuple(map(str, vars(r).values())))
    cols = sorted({c for _, c in cells}, key=lambda c: (_method_rank(c.method), str(c.extra)))
    return Table(rows, cols, dict(cells), runs, last, row_keys, col_keys)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def plot_row(table: Table, row: RowKey, path: Path) -> Path:
    """Training loss and test accuracy per epoch for one table row: one line per method (mean
    over completed seeds) with a min-max band over seeds."""
    # Figure + Agg canvas, not pyplot: no global backend switch in a process that may have one.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for i, col in enumerate(table.cols):
        runs = table.cell(row, col).runs
        color = f"C{i % 10}"  # by column, so a method has one colour in every row's figure
        for ax, attr in zip(axes, ("train_loss", "test_acc"), strict=True):
            series = [getattr(r, attr) for r in runs if getattr(r, attr)]
            if not series:
                continue
            length = max(map(len, series))
            epochs, mean, low, high = [], [], [], []
            for e in range(length):
                values = [s[e] for s in series if len(s) > e and math.isfinite(s[e])]
                if values:
                    epochs.append(e + 1)
                    mean.append(statistics.fmean(values))
                    low.append(min(values))
                    high.append(max(values))
            ax.plot(epochs, mean, color=color, marker="." if length < 30 else None)
            ax.plot([], [], color=color, label=f"{col.label} (n={len(series)})")
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
    for ax, name in zip(axes, ("training loss", "test accuracy (%)"), strict=True):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    losses = [v for line in axes[0].lines for v in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 100:
        axes[0].set_yscale("log")  # early quantized losses can be orders of magnitude larger
    fig.suptitle(f"{row.label}  (mean over seeds, band: min-max)")
    fig.savefig(path, dpi=100)
    return path


def render_markdown(table: Table, sweep_dir: Path, plots: list[tuple[RowKey, Path]]) -> str:
    lines = [
        f"# Report: {sweep_dir}",
        "",
        f"Test accuracy (%): mean (std) over seeds of each run's mean over its last "
        f"{table.last} epochs; n = completed seeds. Runs found: {len(table.runs)}.",
        "",
        table.to_markdown(),
        "",
    ]
    missing = table.missing(sweep_dir)
    lines += ["## Missing or incomplete", ""]
    lines += [f"- {m}" for m in missing] if missing else ["Nothing: every cell is complete."]
    if plots:
        lines += ["", "## Convergence", ""]
        lines += [f"![{row.label}]({path.name})" for row, path in plots]
    return "\n".join(lines) + "\n"


def log_wandb(
    table: Table, sweep_dir: Path, out_dir: Path, project: str, mode: str, plots: list[Path]
) -> None:
    """Log the table (and the convergence PNGs) as one wandb run of job type "report"."""
    import wandb

    columns = table.columns()
    data = [[row.get(c, "") for c in columns] for row in table.csv_rows()]
    run = wandb.init(
        project=project,
        job_type="report",
        mode=mode,
        dir=str(out_dir),
        config={"sweep_dir": str(sweep_dir), "last": table.last},
    )
    run.log(
        {
            # Numbers stay numbers (sortable in the UI); a missing std is None, not "".
            "table": wandb.Table(
                columns=columns, data=[[None if v == "" else v for v in r] for r in data]
            ),
            **{f"convergence/{p.stem}": wandb.Image(str(p)) for p in plots},
        }
    )
    run.finish()


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    last: int = 10,
    *,
    plots: bool = True,
    wandb_project: str | None = None,
    wandb_mode: str = "offline",
) -> Path:
    """Write table.md, table.csv and one convergence PNG per row into ``out_dir`` (default
    ``sweep_dir/report``); returns the path of table.md. Raises NoRunsError when
    ``sweep_dir`` holds no runs."""
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    if not runs:
        raise NoRunsError(f"no runs under {sweep_dir} (looked for summary.json files)")
    table = make_table(runs, last)
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=table.columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table.csv_rows())
    images = []
    if plots:
        for i, row in enumerate(table.rows):
            images.append((row, plot_row(table, row, out / f"{i:02d}_{_slug(row.label)}.png")))
    path = out / "table.md"
    path.write_text(render_markdown(table, sweep_dir, images))
    if wandb_project:
        log_wandb(table, sweep_dir, out, wandb_project, wandb_mode, [p for _, p in images])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mq.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="folder holding run directories")
    parser.add_argument("--out", type=Path, help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument("--last", type=int, default=10, help="epochs averaged per run (10)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--wandb", action="store_true", help="also log the table to wandb")
    parser.add_argument("--wandb-project", default="mq")
    parser.add_argument(
        "--wandb-mode", default="offline", choices=["offline", "online", "disabled"]
    )
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be >= 1")
    try:
        path = write_report(
            args.sweep_dir,
            args.out,
            args.last,
            plots=not args.no_plots,
            wandb_project=args.wandb_project if args.wandb else None,
            wandb_mode=args.wandb_mode,
        )
    except NoRunsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path.read_text(), end="")
    print(f"wrote {path.parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
