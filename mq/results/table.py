"""The report's table: runs grouped into cells (row: model, dataset, quantizer, bits,
optimizer and every other differing config key; column: method and its own differing keys),
each cell averaged over its distinct seeds, knowing what it averaged and on what data."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mq.results.runs import Run

# The paper's column order: an order, not the list of meta nets (conf/meta/ is): any other
# method gets a column after these, alphabetically.
METHODS = ("ste", "multifc", "fcgrad", "lstmfc")
ROW_FIELDS = ("model", "dataset", "quant", "bits", "optimizer")
NUMBER_FIELDS = (  # CSV columns per cell
    "n",
    "mean",
    "std",
    "seeds",
    "runs",
    "not_completed",
    "last",
    "epochs_averaged",
    "limited",
)
FEWER = "†"  # a cell whose runs have fewer epochs than --last (when the table is mixed)


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
        # A key another method lacks (ste has no hidden_size) is left out of that label. The
        # whole key is named: a bare "lr" beside an optimizer.lr column reads as the wrong one.
        extra = ", ".join(f"{k}={v}" for k, v in self.extra if v != "-")
        return f"{self.method} ({extra})" if extra else self.method


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)  # completed runs: the ones averaged
    others: list[Run] = field(default_factory=list)  # running / failed / diverged / unfinished
    run_values: list[float] = field(default_factory=list)  # per completed run: last-N mean
    windows: list[tuple[int, int]] = field(default_factory=list)  # per run: (averaged, of)

    def by_seed(self) -> dict[Any, list[float]]:
        out: dict[Any, list[float]] = defaultdict(list)
        for run, value in zip(self.runs, self.run_values, strict=True):
            out[run.seed].append(value)
        return dict(sorted(out.items(), key=lambda kv: str(kv[0])))

    @property
    def values(self) -> list[float]:
        """One value per distinct seed: runs repeating a seed (same config, another folder)
        are one measurement, averaged, not more evidence."""
        return [statistics.fmean(v) for v in self.by_seed().values()]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def limited(self) -> list[str]:
        return sorted({r.limited for r in self.runs if r.limited})

    @property
    def averaged(self) -> str:
        """Epochs averaged per run: "10", or a range "2-10" when runs differ."""
        counts = sorted({k for k, _ in self.windows})
        return "" if not counts else "-".join(map(str, sorted({counts[0], counts[-1]})))

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        # Sample std over seeds; undefined for one seed (shown as "-", left empty in the CSV).
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def seeds(self) -> list[Any]:
        return list(self.by_seed())

    def text(self, marks: str = "") -> str:
        if not self.values:
            return "-"
        std = "-" if self.std is None else f"{self.std:.2f}"
        return f"{self.mean:.2f} ({std}) n={self.n}" + (f" {marks}" if marks else "")


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

    def _filled(self) -> list[Cell]:
        return [c for c in self.cells.values() if c.runs]

    def limit_notes(self) -> dict[str, str]:
        """Footnote mark per distinct description of a limited measurement."""
        notes = sorted({text for c in self._filled() for text in c.limited})
        if len(notes) == 1:
            return {notes[0]: "*"}
        return {text: f"*{i}" for i, text in enumerate(notes, 1)}

    def mixed_windows(self) -> bool:
        return len({k for c in self._filled() for k, _ in c.windows}) > 1

    def marks(self, cell: Cell) -> str:
        notes = self.limit_notes()
        marks = [notes[text] for text in cell.limited]
        if self.mixed_windows() and any(k < self.last for k, _ in cell.windows):
            marks.append(FEWER)
        return " ".join(marks)

    def averaged_label(self) -> str:
        """What each run's value is the mean of, as measured (not as asked for)."""
        windows = {w for c in self._filled() for w in c.windows}
        tasks = {r.task for c in self._filled() for r in c.runs}
        if tasks == {"eval"}:
            return "each run's test accuracy (task=eval)"
        counts = {k for k, _ in windows}
        totals = sorted({total for _, total in windows})
        if not counts:
            return (
                "each run's final test accuracy"
                if self.last == 1
                else (f"each run's mean test accuracy over its last {self.last} epochs")
            )
        if counts == {1}:
            runs = "-".join(map(str, sorted({totals[0], totals[-1]})))
            return f"each run's final test accuracy (its last epoch, of {runs})"
        if len(windows) == 1:
            ((k, total),) = windows
            fewer = f" (fewer than --last {self.last})" if k < self.last else ""
            return f"each run's mean test accuracy over its last {k} of {total} epochs{fewer}"
        return (
            f"each run's mean test accuracy over its last {self.last} epochs, or all it has "
            f"when fewer ({min(counts)} to {max(counts)} here; {FEWER}: cells with fewer)"
        )

    def footnotes(self) -> list[str]:
        return [
            f"{mark} limited run: {text}; not comparable with a full run"
            for text, mark in self.limit_notes().items()
        ]

    def missing(self, root: Path | None = None, grid: bool = True) -> list[str]:
        """One line per run left out of the means and, for a grid (``grid``: every row meant
        to have every column), per cell short of seeds or without runs; run paths are shown
        relative to ``root`` when given."""
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
                for seed, values in cell.by_seed().items():
                    if len(values) > 1:
                        lines.append(
                            f"repeated seed: {row.label} | {col.label}: seed {seed} has "
                            f"{len(values)} completed runs of one config, counted once "
                            "(their mean)"
                        )
                if not grid:
                    continue
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
            values += [v for _, v in row.extra]
            values += [self.cell(row, c).text(self.marks(self.cell(row, c))) for c in self.cols]
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
                        "runs": len(cell.runs),
                        "not_completed": len(cell.others),
                        "last": self.last,
                        "epochs_averaged": cell.averaged,
                        "limited": "; ".join(cell.limited),
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


def make_table(
    runs: list[Run], last: int = 10, root: Path | None = None, metric: str = "test_acc"
) -> Table:
    """Group runs into cells by their whole config but the seed, and average each cell's
    completed runs over its distinct seeds. ``root``: where run paths in labels start;
    ``metric``: test_acc (top-1) or test_acc5 (top-5)."""
    base = {id(r): (r.model, r.dataset, r.quant, str(r.bits), r.optimizer, r.method) for r in runs}
    varying = _varying_keys(runs, base)
    # A method's own hyperparameters split its column; anything else splits the row, so the
    # STE baseline stays in the same row as every MetaQuant variant it is compared with.
    col_keys = [k for k in varying if k.startswith("meta.")]
    row_keys = [k for k in varying if not k.startswith("meta.")]
    if any(not r.config for r in runs):
        # No config to compare (a foreign or torn folder): such a run is averaged with nothing.
        row_keys.append("config")

    def extra(run: Run, keys: list[str]) -> tuple[tuple[str, str], ...]:
        out = []
        for k in keys:
            if k == "config":
                where = run.path.relative_to(root) if root else run.path
                out.append((k, "-" if run.config else f"unknown: {where}"))
            else:
                out.append((k, _fmt(run.config.get(k))))
        return tuple(out)

    cells: dict[tuple[RowKey, ColKey], Cell] = defaultdict(Cell)
    for run in runs:
        row = RowKey(
            run.model, run.dataset, run.quant, run.bits, run.optimizer, extra(run, row_keys)
        )
        col = ColKey(run.method, extra(run, col_keys))
        cell = cells[(row, col)]
        value = run.last_mean(last, metric)
        if run.status == "completed" and value is not None:
            cell.runs.append(run)
            cell.run_values.append(value)
            epochs = len(getattr(run, metric))
            cell.windows.append((min(last, epochs), epochs))
        else:
            cell.others.append(run)
    rows = sorted({r for r, _ in cells}, key=lambda r: tuple(map(str, vars(r).values())))
    cols = sorted({c for _, c in cells}, key=lambda c: (_method_rank(c.method), str(c.extra)))
    return Table(rows, cols, dict(cells), runs, last, row_keys, col_keys)
