"""The report's "beside the paper" table: each cell of a Table 1 setting (CIFAR-10, 1 bit,
ResNet-20/32/44) next to the paper's number, and each method's gain over STE in its row, ours
and the paper's (the paper's claim is that gain under SGD)."""

from __future__ import annotations

from mq.results.paper import TABLE1_FP, TABLE1_SOURCE, covers, table1_result
from mq.results.table import METHODS, ColKey, RowKey, Table

FOLDER_NOTE = (
    "cifar10_folder rows were measured on an image-folder copy of CIFAR-10 (the JPEG copy in "
    "../shared/data: the released full-precision ResNet-20 scores 81.80 there, 91.5 in the "
    "paper), so compare the gains over STE, not the accuracies."
)


def _base(row: RowKey) -> tuple[str, str, str, str, str]:
    return (row.model, row.dataset, row.quant, str(row.bits), row.optimizer)


def _paper_order(row: RowKey) -> tuple:
    """Table 1's order: dorefa before BWN, SGD before Adam."""
    quant = {"dorefa": 0, "bwn": 1}.get(row.quant, 2)
    optimizer = {"sgd": 0, "adam": 1}.get(row.optimizer, 2)
    return (row.model, row.dataset, quant, row.quant, optimizer, row.optimizer, str(row.extra))


def _ste_mean(table: Table, row: RowKey) -> float | None:
    """Our STE mean for the row's setting: its own STE cell, else the one STE cell of a row that
    differs only in extra keys (STE with Adam runs without weight decay, as the released
    baseline did, so it may sit in a row of its own)."""
    own = table.cell(row, ColKey("ste")).mean
    if own is not None:
        return own
    means = [
        table.cell(r, ColKey("ste")).mean
        for r in table.rows
        if _base(r) == _base(row) and table.cell(r, ColKey("ste")).mean is not None
    ]
    return means[0] if len(means) == 1 else None


def _elsewhere(table: Table, row: RowKey, col: ColKey) -> bool:
    """Whether another row of the same setting has runs of this method (then an empty cell here
    is no missing result: rows split by extra keys, e.g. STE's weight decay with Adam)."""
    for other in table.rows:
        cell = table.cell(other, col)
        if other != row and _base(other) == _base(row) and (cell.runs or cell.others):
            return True
    return False


def _delta(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.2f}"


def paper_markdown(table: Table) -> str:
    """The section (empty when no row of ``table`` is a Table 1 setting)."""
    rows = sorted((r for r in table.rows if covers(r.model, r.dataset, r.bits)), key=_paper_order)
    if not rows:
        return ""
    cols = list(table.cols)
    cols += [ColKey(m) for m in METHODS if ColKey(m) not in cols]
    head = ["model", "dataset", "quant", "optimizer", *table.row_keys, "method"]
    head += ["ours", "paper", "ours - STE", "paper - STE"]
    lines = [
        "## Beside the paper (Table 1)",
        "",
        f"Paper: {TABLE1_SOURCE}; full precision "
        + ", ".join(f"{m} {v}" for m, v in TABLE1_FP.items())
        + ". Ours: the cells above. `- STE`: the method's mean minus STE's in the same setting.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        paper_ste = table1_result(row.model, row.dataset, row.quant, row.bits, row.optimizer, "ste")
        ours_ste = _ste_mean(table, row)
        for col in cols:
            cell = table.cell(row, col)
            paper = table1_result(
                row.model, row.dataset, row.quant, row.bits, row.optimizer, col.method
            )
            if not cell.runs and not cell.others and (paper is None or _elsewhere(table, row, col)):
                continue
            values = [row.model, row.dataset, f"{row.quant} w{row.bits}", row.optimizer]
            values += [v for _, v in row.extra]
            values += [
                col.label,
                cell.text(table.marks(cell)),
                "-" if paper is None else f"{paper.mean:.2f} ({paper.spread:.2f})",
                _delta(cell.mean, ours_ste) if col.method != "ste" else "",
                _delta(paper and paper.mean, paper_ste and paper_ste.mean)
                if col.method != "ste"
                else "",
            ]
            lines.append("| " + " | ".join(values) + " |")
    if any(r.dataset == "cifar10_folder" for r in rows):
        lines += ["", FOLDER_NOTE]
    return "\n".join(lines) + "\n"
