"""Convergence plots for mq.results.report: one figure per table row, training loss and test
accuracy per epoch, one line per column (method) with a min-max band over seeds."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mq.results.table import RowKey, Table

# Curves of different methods often coincide (early epochs, a meta net that learned the
# identity); a marker and dash pattern per column keeps each one visible under the others.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", "-.", ":")


def draw_row(table: Table, row: RowKey) -> Figure:
    """The figure for one table row (not saved)."""
    # Figure + Agg canvas, not pyplot: no global backend switch in a process that may have one.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    limited = set()
    for i, col in enumerate(table.cols):
        cell = table.cell(row, col)
        runs = cell.runs
        limited |= set(cell.limited)
        # By column, so a method has one colour, marker and dash in every row's figure.
        style = {
            "color": f"C{i % 10}",
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": DASHES[i % len(DASHES)],
            "markerfacecolor": "none",  # open markers: one on top of another stays visible
        }
        for ax, attr in zip(axes, ("train_loss", "test_acc"), strict=True):
            series = [getattr(r, attr) for r in runs if getattr(r, attr)]
            if not series:
                continue
            length = max(map(len, series))
            epochs, mean, low, high = [], [], [], []
            for e in range(length):
                values = [s[e] for s in series if len(s) > e and math.isfinite(s[e])]
                if values:
                    epochs.append(e + 1)  # epochs completed, as in metrics.jsonl and the logs
                    mean.append(statistics.fmean(values))
                    low.append(min(values))
                    high.append(max(values))
            # About 12 markers per curve, offset per column so coinciding curves alternate.
            every = max(1, length // 12)
            ax.plot(
                epochs,
                mean,
                **style,
                markevery=(i % every, every),
                label=f"{col.label} (n={len(series)}){' *' if cell.limited else ''}",
            )
            ax.fill_between(epochs, low, high, color=style["color"], alpha=0.2, linewidth=0)
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
    title = f"{row.label}  (mean over seeds, band: min-max)"
    if limited:
        title += "\n* limited: " + " | ".join(sorted(limited))
    fig.suptitle(title)
    return fig


def plot_row(table: Table, row: RowKey, path: Path) -> Path:
    """draw_row, saved as a PNG at ``path``."""
    draw_row(table, row).savefig(path, dpi=100)
    return path
