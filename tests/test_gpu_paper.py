"""scripts/gpu-paper.sh: the paper Table 1 pipeline, run as a user would at toy size on the CPU
(--smoke): its out folder, the report beside the paper, the budget stopping runs cleanly, the
equivalence step stopping the sweep, and bad input."""

from __future__ import annotations

import json
import subprocess
import tarfile

import pytest
from conftest import ROOT, launch_env

SMOKE_CONFIGS = ["dorefa-sgd-ste-s0", "dorefa-sgd-multifc-s0", "bwn-adam-ste-s0"]
SMOKE_CONFIGS += ["bwn-adam-fcgrad-s0"]


def gpu_paper(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-paper.sh"), *args],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_smoke_runs_the_pipeline_and_reports_beside_the_paper(tmp_path):
    out = tmp_path / "out"
    proc = gpu_paper("--smoke", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu-paper.log",
        "gpu-paper.tgz",
        "summary.json",
        "table.md",
        "work",
    ]
    assert "equivalence: skipped (no CUDA device" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == SMOKE_CONFIGS  # in order: the SGD rows first
    assert summary["not_completed"] == {}
    for name in SMOKE_CONFIGS:
        run = summary["runs"][name]
        assert run["epochs"] == 2 and len(run["test_acc"]) == 2 and run["img_s"] > 0
        recorded = json.loads((out / "work/runs" / name / "summary.json").read_text())
        assert recorded["status"] == "completed"
        assert recorded["test_acc"] == run["test_acc"]
    assert "== summary: 4 of 4 configurations completed" in proc.stdout
    assert "img/s aggregate; total wall time" in proc.stdout
    table = (out / "table.md").read_text()
    assert "## Beside the paper (Table 1)" in table
    assert "| model | dataset | quant | optimizer | method | ours | paper |" in table
    assert "| resnet20 | cifar10_folder | dorefa w1 | sgd | ste |" in table
    assert "| 80.75 (2.11) |" in table  # the paper's dorefa STE SGD
    # STE with Adam ran without weight decay, as the released baseline did.
    config = (out / "work/runs/bwn-adam-ste-s0/config.yaml").read_text()
    assert "weight_decay: 0" in config
    with tarfile.open(out / "gpu-paper.tgz") as tar:
        names = set(tar.getnames())
    assert {"report/table.md", "report/table.csv", "report.log"} <= names
    assert {f"runs/{n}/epochs.jsonl" for n in SMOKE_CONFIGS} <= names
    assert not any(n.endswith("checkpoint.pt") for n in names)
    # The same command again: every run is completed, none is trained again.
    before = {n: (out / "work/runs" / n / "metrics.jsonl").read_bytes() for n in SMOKE_CONFIGS}
    again = gpu_paper("--smoke", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "== summary: 4 of 4 configurations completed" in again.stdout
    after = {n: (out / "work/runs" / n / "metrics.jsonl").read_bytes() for n in SMOKE_CONFIGS}
    assert after == before


@pytest.mark.slow
def test_the_budget_stops_runs_cleanly_and_says_which_did_not_complete(tmp_path):
    out = tmp_path / "out"
    # 1000 epochs cannot finish: the two first runs are stopped at the budget, the others
    # never start. The budget leaves a loaded machine time to start the runs (else SIGTERM
    # finds them before training, with no checkpoint to write yet).
    proc = gpu_paper("--smoke", str(out), "--epochs", "1000", "--budget", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == []
    states = summary["not_completed"]
    assert list(states) == SMOKE_CONFIGS
    assert states["bwn-adam-ste-s0"] == states["bwn-adam-fcgrad-s0"] == "not started (budget)"
    for name in SMOKE_CONFIGS[:2]:
        epochs = summary["runs"][name]["epochs"]
        assert states[name] == f"stopped (budget) at {epochs}/1000 epochs"
        run = out / "work/runs" / name
        recorded = json.loads((run / "summary.json").read_text())
        assert recorded["status"] == "failed"
        assert recorded["error"].startswith("interrupted by SIGTERM")
        assert (run / "checkpoint.pt").is_file()  # resumable by the same command
    assert summary["wall_s"] < 120
    assert "== summary: 0 of 4 configurations completed" in proc.stdout


def test_failing_equivalence_tests_stop_the_sweep(tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert False\n")
    out = tmp_path / "out"
    proc = gpu_paper("--smoke", str(out), "--tests", str(failing))
    assert proc.returncode == 1
    assert "equivalence tests failed: sweep not started" in proc.stdout
    assert not (out / "work/runs").exists()
    assert not (out / "summary.json").exists()
    with tarfile.open(out / "gpu-paper.tgz") as tar:
        assert "equivalence.log" in tar.getnames()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--jobs", "0"], "error: --jobs=0 is not allowed; allowed: an integer > 0"),
        (["--budget", "-5"], "error: --budget=-5 is not allowed; allowed: a number > 0"),
        (["--seeds", "0,x"], "error: --seeds=0,x is not allowed; allowed: integers"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
        (["--data", "/nonexistent.tgz"], "error: --data=/nonexistent.tgz is not a file"),
        (["--smoke", "--", "bits"], "error: bits is not an override; allowed: key=value"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    proc = gpu_paper(str(out), *args, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_the_full_run_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    any_file = str(ROOT / "README.md")  # exists: the data checks pass, the CUDA check answers
    out = tmp_path / "out"
    proc = gpu_paper(str(out), "--data", any_file, "--checkpoint", any_file, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "error: no CUDA device: the full run needs one; allowed here: --smoke\n"
    assert not out.exists()
