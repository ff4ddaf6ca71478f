"""The report's "beside the paper" table (mq.results.paper, mq.results.paper_report) on
synthetic run folders with known numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from test_report import make_run

from mq.results.paper import TABLE1, TABLE1_FP, table1_result
from mq.results.report import write_report


def section(md: str) -> list[str]:
    """The table lines of the "Beside the paper" section."""
    assert "## Beside the paper (Table 1)" in md
    part = md.split("## Beside the paper (Table 1)", 1)[1].split("\n## ", 1)[0]
    return [line for line in part.splitlines() if line.startswith("| resnet")]


def test_table1_holds_the_papers_resnet20_numbers():
    assert len(TABLE1) == 3 * 14  # ResNet-20/32/44; the paper has no BWN MultiFC row
    assert table1_result("resnet20", "cifar10", "dorefa", 1, "sgd", "ste").mean == 80.745
    assert table1_result("resnet20", "cifar10_folder", "bwn", "1", "sgd", "lstmfc").mean == 89.289
    # The paper's labels, not the released README's (which swaps these two Adam rows).
    assert table1_result("resnet20", "cifar10", "dorefa", 1, "adam", "lstmfc").mean == 89.979
    assert table1_result("resnet20", "cifar10", "dorefa", 1, "adam", "fcgrad").mean == 89.962
    assert table1_result("resnet20", "cifar10", "bwn", 1, "sgd", "multifc") is None
    assert table1_result("resnet20", "cifar10", "dorefa", 2, "sgd", "ste") is None
    assert table1_result("resnet20", "fake", "dorefa", 1, "sgd", "ste") is None
    assert TABLE1_FP["resnet20"] == 91.5


def test_the_report_sets_each_cell_beside_the_papers(tmp_path):
    acc = {"ste": {0: [60.0, 70.0], 1: [62.0, 71.0]}, "multifc": {0: [75.0, 80.0], 1: [76.0, 83.0]}}
    for method, seeds in acc.items():
        for seed, values in seeds.items():
            make_run(tmp_path / "s", method, seed, values)
    md = write_report(tmp_path / "s", tmp_path / "out").read_text()
    rows = {line.split(" | ")[4]: line for line in section(md)}
    ste = statistics.fmean([70.0, 71.0])
    multifc = statistics.fmean([80.0, 83.0])
    assert rows["ste"].startswith("| resnet20 | cifar10 | dorefa w1 | sgd | ste | 70.50 (0.71) n=2")
    assert "| 80.75 (2.11) |" in rows["ste"]
    assert (
        f"| {multifc:.2f} (2.12) n=2 | 88.94 (0.47) | +{multifc - ste:.2f} | +8.20 |"
        in (rows["multifc"])
    )
    # Table 1's other methods are listed with the paper's number, ours missing.
    assert "| fcgrad | - | 88.84 (0.29) | - | +8.09 |" in rows["fcgrad"]
    assert "| lstmfc | - | 88.31 (0.81) | - | +7.56 |" in rows["lstmfc"]


def test_no_section_outside_table1s_settings(tmp_path):
    for seed in (0, 1):
        run = make_run(tmp_path / "s", "ste", seed, [50.0])
        summary = json.loads((run / "summary.json").read_text())
        summary["choices"]["dataset"] = "fake"
        (run / "summary.json").write_text(json.dumps(summary))
    md = write_report(tmp_path / "s", tmp_path / "out").read_text()
    assert "| resnet20 | fake | dorefa w1 | sgd | 50.00 (0.00) n=2 |" in md
    assert "Beside the paper" not in md


def test_ste_in_a_row_of_its_own_is_still_the_reference(tmp_path):
    # STE+Adam runs without weight decay (the released baseline), the meta nets with 5e-4: two
    # rows of one setting; the gain over STE is still taken against that STE.
    sweep = tmp_path / "s"
    make_run(sweep, "ste", 0, [85.0], optimizer="adam", lr=0.002)
    make_run(sweep, "fcgrad", 0, [88.0], optimizer="adam", lr=0.001)
    md = write_report(sweep, tmp_path / "out").read_text()
    rows = section(md)
    fcgrad = [r for r in rows if "| fcgrad |" in r]
    assert len(fcgrad) == 1  # listed once, in the row with its runs
    assert "| 88.00 (-) n=1 | 89.96 (0.07) | +3.00 | +0.18 |" in fcgrad[0]
    ste = [r for r in rows if "| ste |" in r]
    assert len(ste) == 1 and "| 85.00 (-) n=1 | 89.78 (0.17) |" in ste[0]


@pytest.mark.parametrize("quant", ["bwn"])
def test_a_setting_the_paper_did_not_run_shows_no_number(tmp_path, quant):
    run = make_run(tmp_path / "s", "multifc", 0, [80.0])
    summary = json.loads((run / "summary.json").read_text())
    summary["choices"]["quant"] = quant
    (run / "summary.json").write_text(json.dumps(summary))
    rows = section(write_report(tmp_path / "s", tmp_path / "out").read_text())
    multifc = [r for r in rows if "| multifc |" in r]
    assert multifc and "| 80.00 (-) n=1 | - |" in multifc[0]
    assert any("| lstmfc | - | 89.29 (0.21) |" in r for r in rows)


def test_limited_cells_keep_their_mark(tmp_path):
    run = make_run(tmp_path / "s", "ste", 0, [40.0])
    summary = json.loads((run / "summary.json").read_text())
    summary |= {"limit_test_batches": 1, "test_images": 500, "test_images_total": 10000}
    (run / "summary.json").write_text(json.dumps(summary))
    rows = section(write_report(tmp_path / "s", Path(tmp_path / "out")).read_text())
    assert any("| ste | 40.00 (-) n=1 *" in r for r in rows)


def test_rows_follow_table1s_order(tmp_path):
    for method, optimizer in (("ste", "adam"), ("ste", "sgd")):
        make_run(tmp_path / "s" / optimizer, method, 0, [50.0], optimizer=optimizer)
    rows = section(write_report(tmp_path / "s", tmp_path / "out", plots=False).read_text())
    optimizers = [r.split(" | ")[3] for r in rows]
    assert optimizers.index("sgd") < optimizers.index("adam")  # SGD first, as in the paper
