"""mq.results.report on synthetic sweeps with known numbers (fast), and on a real small sweep
(slow)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, launch
from matplotlib.image import imread
from omegaconf import OmegaConf

from mq.results.report import make_table, write_report
from mq.results.runs import collect_runs

META = {
    "ste": {"_target_": "mq.meta.STEStep"},
    **{
        net: {"_target_": "mq.meta.MetaQuantStep", "net": net, "hidden_size": 100, "lr": 0.001}
        for net in ("multifc", "fcgrad", "lstmfc")
    },
    "ewgs": {"_target_": "mq.meta.ewgs.EWGSStep", "delta": 0.001},
}


def make_run(
    sweep: Path,
    method: str,
    seed: int,
    test_acc: list[float],
    *,
    status: str = "completed",
    error: str | None = None,
    epochs: int | None = None,
    lr: float = 0.001,
    hidden_size: int = 100,
    optimizer: str = "sgd",
    summary: bool = True,
) -> Path:
    """A run directory as mq.job.run/mq.job.train write it: config.yaml, summary.json,
    metrics.jsonl. Training loss per epoch is 100 - test accuracy, so plots have something to
    draw."""
    run_dir = sweep / f"lr={lr},meta={method},seed={seed},hs={hidden_size}"
    run_dir.mkdir(parents=True)
    meta = dict(META[method])
    if "hidden_size" in meta:
        meta["hidden_size"] = hidden_size
    target = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam"}[optimizer]
    config = {
        "bits": 1,
        "epochs": epochs or len(test_acc),
        "seed": seed,
        "model": {"_target_": "mq.models.build_model", "name": "resnet20", "num_classes": 10},
        "dataset": {"_target_": "mq.data.cifar_loaders", "name": "cifar10", "num_classes": 10},
        "quant": {"_target_": "mq.quant.DorefaWeight", "bit_width": 1},
        "meta": meta,
        "optimizer": {"_target_": target, "_partial_": True, "lr": lr},
        "task": {"name": "quantize"},
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    rows = []
    for epoch, acc in enumerate(test_acc):
        rows.append({"kind": "step", "epoch": epoch, "step": epoch, "loss": 1.0, "acc": 1.0})
        rows.append(
            {"kind": "epoch", "epoch": epoch, "step": epoch, "train_loss": 100.0 - acc}
            | {"train_acc": acc, "test_loss": 1.0, "test_acc": acc, "lr": lr}
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = {
        "model": "resnet20",
        "dataset": "cifar10",
        "quant": "dorefa",
        "meta": method,
        "optimizer": optimizer,
        "logger": "none",
        "task": "quantize",
        "bits": "1",
        "seed": str(seed),
    }
    data: dict[str, Any] = {"name": run_dir.name, "choices": choices, "status": status}
    data |= {"error": error, "wandb_id": None}
    if status in ("completed", "diverged"):
        data |= {"test_acc": test_acc, "epochs_completed": len(test_acc)}
        data |= {"final_test_acc": test_acc[-1] if test_acc else None}
    if summary:
        (run_dir / "summary.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    return run_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


ACC = {  # method -> seed -> per-epoch test accuracy
    "ste": {0: [10.0, 50.0, 60.0, 70.0], 1: [20.0, 52.0, 61.0, 72.0], 2: [5.0, 40.0, 65.0, 66.0]},
    "multifc": {0: [30.0, 70.0, 80.0, 81.0], 1: [31.0, 69.0, 82.0, 83.0], 2: [1.0, 2.0, 3.0, 4.0]},
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for method, seeds in ACC.items():
        for seed, acc in seeds.items():
            make_run(root / "nested", method, seed, acc)
    return root


def test_table_numbers_equal_hand_computed_values(sweep, tmp_path):
    path = write_report(sweep, tmp_path / "out", last=2)
    assert path == tmp_path / "out" / "table.md"
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "table.csv")}
    assert list(rows) == ["ste", "multifc"]
    for method, seeds in ACC.items():
        per_run = [statistics.fmean(acc[-2:]) for acc in seeds.values()]
        row = rows[method]
        assert (row["model"], row["dataset"], row["quant"]) == ("resnet20", "cifar10", "dorefa")
        assert (row["bits"], row["optimizer"], row["seeds"]) == ("1", "sgd", "0;1;2")
        assert int(row["n"]) == 3
        assert float(row["mean"]) == pytest.approx(statistics.fmean(per_run))
        assert float(row["std"]) == pytest.approx(statistics.stdev(per_run))
    # ste: per-run last-2 means 65, 66.5, 65.5 -> mean 65.67, sample std 0.76
    assert "| resnet20 | cifar10 | dorefa w1 | sgd | 65.67 (0.76) n=3 |" in path.read_text()


def test_last_n_uses_the_last_epochs_only(sweep):
    runs = collect_runs(sweep)
    assert len(runs) == 6
    for last, expected in ((1, [70.0, 72.0, 66.0]), (3, [60.0, 185 / 3, 57.0]), (10, None)):
        table = make_table(runs, last=last)
        (row,) = table.rows
        ste = next(c for c in table.cols if c.method == "ste")
        cell = table.cell(row, ste)
        # More epochs asked for than a run has: the mean over all of them, as summary.json does.
        expected = expected or [statistics.fmean(a) for a in ACC["ste"].values()]
        assert cell.values == pytest.approx(expected)


def test_methods_are_in_paper_order(tmp_path):
    for method in ("lstmfc", "multifc", "fcgrad", "ste"):
        make_run(tmp_path / "s", method, 0, [50.0])
    table = make_table(collect_runs(tmp_path / "s"))
    assert [c.label for c in table.cols] == ["ste", "multifc", "fcgrad", "lstmfc"]
    header = table.to_markdown().splitlines()[0]
    assert header.endswith("| ste | multifc | fcgrad | lstmfc |")


def test_a_differing_key_splits_rows_or_columns(tmp_path):
    sweep = tmp_path / "s"
    for seed in (0, 1):
        make_run(sweep, "ste", seed, [10.0], lr=0.001)
        make_run(sweep, "ste", seed, [90.0], lr=0.01)
        make_run(sweep, "multifc", seed, [20.0], lr=0.001, hidden_size=100)
        make_run(sweep, "multifc", seed, [30.0], lr=0.001, hidden_size=50)
    write_report(sweep, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "table.csv")
    got = {(r["optimizer.lr"], r["method"], r["meta.net.hidden_size"]): r for r in rows}
    assert set(got) == {
        ("0.001", "ste", "-"),
        ("0.01", "ste", "-"),
        ("0.001", "multifc", "100"),
        ("0.001", "multifc", "50"),
    }
    assert float(got["0.01", "ste", "-"]["mean"]) == 90.0  # not averaged with lr=0.001
    assert float(got["0.001", "multifc", "50"]["mean"]) == 30.0
    assert all(r["n"] == "2" for r in rows)
    md = (tmp_path / "out" / "table.md").read_text()
    assert (
        "| optimizer.lr | ste | multifc (meta.net.hidden_size=100) "
        "| multifc (meta.net.hidden_size=50) |" in md
    )
    assert (
        "no runs: resnet20 cifar10 dorefa w1 sgd, optimizer.lr=0.01 "
        "| multifc (meta.net.hidden_size=50)" in md
    )


def test_unfinished_runs_are_excluded_and_listed(sweep, tmp_path, capsys):
    error = "RuntimeError: CUDA out of memory"
    make_run(sweep, "ste", 3, [99.0], status="failed", error=error, epochs=4)
    make_run(sweep, "multifc", 3, [], status="running", epochs=4)
    make_run(sweep, "multifc", 4, [99.0, float("nan")], status="diverged", epochs=4)
    make_run(sweep, "ste", 4, [99.0, 99.0], epochs=4, summary=False)  # killed before summary
    table = make_table(collect_runs(sweep), last=2)
    (row,) = table.rows
    assert [table.cell(row, c).n for c in table.cols] == [3, 3]
    path = write_report(sweep, tmp_path / "out", last=2)
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "table.csv")}
    assert rows["ste"]["not_completed"] == "2" and rows["multifc"]["not_completed"] == "2"
    assert float(rows["ste"]["mean"]) == pytest.approx(statistics.fmean([65, 66.5, 65.5]))
    missing = path.read_text().split("## Missing or incomplete")[1]
    assert "failed: resnet20 cifar10 dorefa w1 sgd ste seed 3" in missing
    assert "RuntimeError: CUDA out of memory" in missing
    # says running, but no process holds its lock: stopped, as python -m mq.runs lists it
    assert "stopped: resnet20 cifar10 dorefa w1 sgd multifc seed 3 (0/4 epochs)" in missing
    assert "diverged: resnet20 cifar10 dorefa w1 sgd multifc seed 4" in missing
    assert "unfinished: resnet20 cifar10 dorefa w1 sgd ste seed 4 (2/4 epochs)" in missing


def test_cells_with_fewer_seeds_are_listed(tmp_path):
    sweep = tmp_path / "s"
    for seed in (0, 1, 2):
        make_run(sweep, "ste", seed, [50.0])
    make_run(sweep, "multifc", 0, [60.0])
    make_run(sweep, "multifc", 2, [60.0], status="failed", error="ValueError: x")
    path = write_report(sweep, tmp_path / "out", plots=False)
    text = path.read_text()
    assert "| 50.00 (0.00) n=3 | 60.00 (-) n=1 |" in text
    assert "fewer seeds: resnet20 cifar10 dorefa w1 sgd | multifc: n=1 of 3" in text
    assert "(no completed seed 1, 2)" in text
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "table.csv")}
    assert rows["multifc"]["std"] == "" and rows["multifc"]["n"] == "1"


def test_plots_are_valid_pngs(sweep, tmp_path):
    make_run(sweep, "ste", 0, [40.0, 41.0], optimizer="adam")  # a second row
    path = write_report(sweep, tmp_path / "out")
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert f"]({png.name})" in path.read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mq.report", *args],
        cwd=ROOT,
        env={**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_table(sweep):
    result = run_cli(str(sweep), "--last", "2")
    assert result.returncode == 0, result.stderr
    assert "| model | dataset | quant | optimizer | ste | multifc |" in result.stdout
    assert "65.67 (0.76) n=3" in result.stdout
    assert (sweep / "report" / "table.md").read_text() == result.stdout
    assert (sweep / "report" / "table.csv").exists()
    # A second report sees the same runs: its own output folder is not mistaken for one.
    again = run_cli(str(sweep), "--last", "2", "--no-plots", "--wandb")
    assert again.returncode == 0 and "Runs found: 6." in again.stdout, again.stderr
    (logged,) = (sweep / "report" / "wandb").glob("offline-run-*/files/media/table/*.table.json")
    table = json.loads(logged.read_text())
    assert table["columns"][:6] == ["model", "dataset", "quant", "bits", "optimizer", "method"]
    assert [r[5:7] for r in table["data"]] == [["ste", 3], ["multifc", 3]]


def test_cli_without_runs_fails_with_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = run_cli(str(tmp_path / "empty"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: no runs under {tmp_path / 'empty'} (looked for summary.json files)"
    ]
    assert not (tmp_path / "empty" / "report").exists()


@pytest.mark.slow
def test_report_on_a_real_sweep(tmp_path):
    result = launch(
        "-m",
        "dataset=fake",
        "logger=none",
        "progress=false",
        "epochs=3",
        "batch_size=32",
        "limit_train_batches=4",
        "limit_test_batches=2",
        "meta=ste,multifc",
        "seed=0,1",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cli = run_cli(str(tmp_path / "sweep"), "--wandb")
    assert cli.returncode == 0, cli.stderr
    assert "| resnet20 | fake | dorefa w1 | sgd |" in cli.stdout
    rows = read_csv(tmp_path / "sweep" / "report" / "table.csv")
    assert [(r["method"], r["n"], r["seeds"]) for r in rows] == [
        ("ste", "2", "0;1"),
        ("multifc", "2", "0;1"),
    ]
    assert "Nothing: every cell is complete." in cli.stdout
    assert list((tmp_path / "sweep" / "report" / "wandb").glob("offline-run-*/files/media/table"))


def edit_config(run_dir: Path, **changes: Any) -> None:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")


def test_differently_configured_seed_zero_runs_are_not_one_cell(tmp_path):
    sweep = tmp_path / "s"
    a = make_run(sweep / "a", "ste", 0, [50.0])
    b = make_run(sweep / "b", "ste", 0, [50.0])
    c = make_run(sweep / "c", "ste", 0, [50.0])
    edit_config(b, limit_train_batches=100)
    edit_config(c, **{"model.pretrained": "/ckpt/x.pth"})
    table = make_table(collect_runs(sweep))
    assert len(table.rows) == 3 and {table.cell(r, table.cols[0]).n for r in table.rows} == {1}
    assert set(table.row_keys) == {"limit_train_batches", "model.pretrained"}
    # The same config three times over (other folders) is one seed, not n=3 with std 0.
    for d in (a, b, c):
        edit_config(d, limit_train_batches=None, **{"model.pretrained": None})
    table = make_table(collect_runs(sweep))
    (row,) = table.rows
    cell = table.cell(row, table.cols[0])
    assert (cell.n, cell.std, len(cell.runs)) == (1, None, 3)
    assert "repeated seed: resnet20 cifar10 dorefa w1 sgd | ste: seed 0 has 3 completed runs" in (
        "\n".join(table.missing())
    )


def test_runs_without_a_config_are_averaged_with_nothing(tmp_path):
    sweep = tmp_path / "s"
    for name, acc in (("x", 40.0), ("y", 60.0)):
        run = make_run(sweep / name, "ste", 0, [acc])
        (run / "config.yaml").unlink()
    table = make_table(collect_runs(sweep), root=sweep)
    assert len(table.rows) == 2 and table.row_keys == ["config"]
    assert all(v.startswith("unknown: ") for r in table.rows for k, v in r.extra)


def test_eval_runs_are_grouped_by_their_hydra_config(tmp_path):
    """task=eval writes no config.yaml: its .hydra/config.yaml says which checkpoint it tested."""
    sweep = tmp_path / "s"
    for name, pretrained, acc in (("p", "/a.pth", 80.0), ("q", "/b.pth", 30.0)):
        run = make_run(sweep / name, "ste", 0, [acc])
        (run / ".hydra").mkdir()
        (run / "config.yaml").rename(run / ".hydra" / "config.yaml")
        edit_config(run / ".hydra", run_name="${hydra:runtime.choices.model}", device="cpu")
        edit_config(run / ".hydra", **{"model.pretrained": pretrained, "task.name": "eval"})
    table = make_table(collect_runs(sweep))
    assert table.row_keys == ["model.pretrained"]  # not run_name or device: they change nothing
    assert sorted(table.cell(r, table.cols[0]).mean for r in table.rows) == [30.0, 80.0]
    assert table.averaged_label() == "each run's test accuracy (task=eval)"


def test_int_and_str_spellings_of_a_value_are_one_group(tmp_path):
    sweep = tmp_path / "s"
    make_run(sweep, "ste", 0, [50.0])
    other = make_run(sweep, "ste", 1, [52.0], lr=0.0010001)
    edit_config(other, bits="1", **{"optimizer.lr": "1e-3", "epochs": 1.0})
    summary = json.loads((other / "summary.json").read_text())
    summary["choices"]["seed"] = 1
    (other / "summary.json").write_text(json.dumps(summary))
    table = make_table(collect_runs(sweep))
    (row,) = table.rows
    assert table.row_keys == [] and table.cell(row, table.cols[0]).n == 2


def test_the_label_says_what_was_averaged(sweep, tmp_path):
    text = write_report(sweep, tmp_path / "out", last=10, plots=False).read_text()
    assert "over its last 4 of 4 epochs (fewer than --last 10)" in text
    assert "last 10 epochs" not in text
    make_run(sweep, "ste", 9, [1.0] * 12, lr=0.5)  # a 12-epoch run: 10 of them averaged
    text = write_report(sweep, tmp_path / "out", last=10, plots=False).read_text()
    assert "its last 10 epochs, or all it has when fewer (4 to 10 here; †: cells" in text
    rows = read_csv(tmp_path / "out" / "table.csv")
    assert sorted(r["epochs_averaged"] for r in rows) == ["10", "4", "4"]
    assert "n=3 † |" in text and "1.00 (-) n=1 |" in text


def test_limited_runs_are_marked_with_what_they_measured(sweep, tmp_path):
    for run_dir in sorted((sweep / "nested").glob("*meta=multifc*")):
        path = run_dir / "summary.json"
        measured = {"test_images": 1000, "test_images_total": 10000, "limit_test_batches": 2}
        path.write_text(json.dumps(json.loads(path.read_text()) | measured))
    text = write_report(sweep, tmp_path / "out", last=2, plots=False).read_text()
    assert "| 65.67 (0.76) n=3 | " in text and " n=3 * |" in text
    assert "* limited run: tested on 1,000 of 10,000 images; not comparable" in text
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "table.csv")}
    assert rows["multifc"]["limited"] == "tested on 1,000 of 10,000 images"
    assert rows["ste"]["limited"] == ""


def test_plot_curves_have_distinct_markers(tmp_path):
    from mq.results.plots import draw_row

    for method in ("ste", "multifc", "fcgrad", "lstmfc"):
        make_run(tmp_path / "s", method, 0, [50.0, 60.0, 70.0])  # four identical curves
    table = make_table(collect_runs(tmp_path / "s"))
    fig = draw_row(table, table.rows[0])
    for ax in fig.axes:
        styles = {(line.get_marker(), line.get_linestyle()) for line in ax.get_lines()}
        assert len(styles) == 4 and all(m not in (None, "None", "", ".") for m, _ in styles)
        handles = ax.get_legend().legend_handles
        assert len({h.get_marker() for h in handles}) == 4  # the legend shows them too


def test_top5_table_from_metrics_when_runs_logged_it(tmp_path):
    """ImageNet runs log test_acc5 per epoch: the report adds a top-5 table (and CSV) averaged
    like top-1; a sweep without it (CIFAR-10) gets neither."""
    sweep = tmp_path / "s"
    for seed, top5 in ((0, [80.0, 84.0]), (1, [82.0, 86.0])):
        run = make_run(sweep, "ste", seed, [50.0, 60.0])
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        for row, acc5 in zip(epochs, top5, strict=True):
            row["test_acc5"] = acc5
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(sweep, plots=False, last=1).read_text()
    assert "## Top-5" in text and "Top-1 test accuracy (%)" in text
    (row,) = read_csv(sweep / "report" / "table_top5.csv")
    assert row["method"] == "ste" and float(row["mean"]) == pytest.approx(85.0)  # 84 and 86
    assert int(row["n"]) == 2
    (row,) = read_csv(sweep / "report" / "table.csv")
    assert float(row["mean"]) == pytest.approx(60.0)
    plain = tmp_path / "p"
    make_run(plain, "ste", 0, [50.0, 60.0])
    assert "Top-5" not in write_report(plain, plots=False).read_text()
    assert not (plain / "report" / "table_top5.csv").exists()
