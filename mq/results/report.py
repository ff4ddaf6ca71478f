"""Sweep report: the paper-style accuracy table, convergence plots and a list of what is missing.

python -m mq.report SWEEP_DIR [--out DIR] [--last N] [--wandb [--wandb-mode offline]]

Reads only the files each job writes (config.yaml, summary.json, metrics.jsonl), so it works
on a half-finished sweep, on a copy from a cluster, and without wandb. A cell of the table is
``mean (std) n=K`` over K distinct seeds of each run's final test accuracy (the number
``python -m mq.runs`` lists), or with ``--last N`` of its mean test accuracy over its last N
epochs (the paper's protocol is ``--last 10``; all epochs when a run has fewer, and the report
says so). Runs
are grouped by their whole config but the seed: keys that differ (1, 1.0 and "1" are one
value) become part of the row (or, for ``meta.*`` keys, the column), so different configs are
never averaged together; in a tuned sweep, trials and final runs are separate rows. Cells of
limited runs (limit_test_batches, limit_train_batches) are marked, with a footnote saying what
they were measured on.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from mq.results.fair_report import fair_markdown, mark_tuning_runs, missing_finals
from mq.results.paper_report import paper_markdown
from mq.results.plots import plot_row
from mq.results.runs import collect_runs
from mq.results.table import RowKey, Table, make_table

__all__ = ["NoRunsError", "make_table", "write_report"]
FINAL = 1  # the default --last: each run's final test accuracy, as python -m mq.runs shows


class NoRunsError(Exception):
    """The sweep directory holds no run directories."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def render_markdown(
    table: Table,
    sweep_dir: Path,
    plots: list[tuple[RowKey, Path]],
    top5: Table | None = None,
    tuned: bool = False,
) -> str:
    lines = [
        f"# Report: {sweep_dir}",
        "",
        f"{'Top-1 test' if top5 else 'Test'} accuracy (%): mean (std) over seeds of "
        f"{table.averaged_label()}; n = distinct seeds with a completed run. Runs found: "
        f"{len(table.runs)}.",
        "",
        table.to_markdown(),
        "",
    ]
    if top5 is not None:
        lines += ["## Top-5", "", "Top-5 test accuracy (%), averaged the same way.", ""]
        lines += [top5.to_markdown(), ""]
    notes = table.footnotes()
    if notes:
        lines += [*notes, ""]
    paper = paper_markdown(table)  # Table 1's settings: the paper's numbers beside ours
    if paper:
        lines += [paper]
    # A tuned sweep is no grid: only the runs it defined (final runs listed in tune.json) can
    # be missing, not every combination of its trials' values.
    missing = table.missing(sweep_dir, grid=not tuned)
    missing += missing_finals(sweep_dir) if tuned else []
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
    last: int = FINAL,
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
    tuned = mark_tuning_runs(sweep_dir, runs)
    table = make_table(runs, last, sweep_dir)
    # Top-5 where runs logged it (more than 10 classes: ImageNet, CIFAR-100), as a second table.
    top5 = (
        make_table(runs, last, sweep_dir, "test_acc5") if any(r.test_acc5 for r in runs) else None
    )
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name, tab in (("table.csv", table), ("table_top5.csv", top5)):
        if tab is None:
            continue
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=tab.columns(), lineterminator="\n")
            writer.writeheader()
            writer.writerows(tab.csv_rows())
    images = []
    if plots:
        for i, row in enumerate(table.rows):
            images.append((row, plot_row(table, row, out / f"{i:02d}_{_slug(row.label)}.png")))
    path = out / "table.md"
    # A tuned comparison (tune.json): tuned vs tuned next to defaults vs defaults first.
    fair = fair_markdown(sweep_dir, out, plots, last)
    body = render_markdown(table, sweep_dir, images, top5, tuned)
    path.write_text((fair + "\n" if fair else "") + body)
    if wandb_project:
        log_wandb(table, sweep_dir, out, wandb_project, wandb_mode, [p for _, p in images])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mq.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="folder holding run directories")
    parser.add_argument("--out", type=Path, help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument(
        "--last",
        type=int,
        default=FINAL,
        help="epochs averaged per run (1: its final test accuracy, as mq.runs lists; the "
        "paper's protocol: 10)",
    )
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
