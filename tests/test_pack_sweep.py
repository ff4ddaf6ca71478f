"""hydra.sweeper.pack through launch.py: packs share a job, each run keeps its own folder."""

import json
import signal
import time

import pytest
import torch
from conftest import kill_when, launch, metrics_rows, start_launch

ARGS = ["dataset=fake", "logger=none", "progress=false", "batch_size=16", "epochs=2"]
ARGS += ["limit_train_batches=3", "limit_test_batches=1", "keep_training_state=true"]
GRID = ["meta=ste,multifc", "seed=0,1"]


def run_dirs(tmp_path, name):
    sweep = tmp_path / "outputs/sweeps" / name
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def summaries(tmp_path, name):
    return {p.name: json.loads((p / "summary.json").read_text()) for p in run_dirs(tmp_path, name)}


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "step"]


def test_a_packed_sweep_trains_every_run_as_alone_and_relaunch_skips_them(tmp_path):
    fused = ["hydra.sweeper.pack=4", "hydra.sweeper.fuse=true"]  # the GPU's way, on the CPU
    packed = launch("-m", *GRID, *ARGS, *fused, "sweep_name=packed", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr[-3000:]
    log = packed.stdout + packed.stderr
    assert "hydra.sweeper.pack=4: 4 runs in 1 packs (4), 0 runs alone" in log
    assert "training 4 runs as one pack (one fused network)" in log
    alone = launch("-m", *GRID, *ARGS, "sweep_name=alone", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    a, b = summaries(tmp_path, "alone"), summaries(tmp_path, "packed")
    assert a.keys() == b.keys() and len(a) == 4
    for name, summary in b.items():
        assert summary["status"] == "completed" and summary["epochs_completed"] == 2
        assert summary["choices"] == a[name]["choices"]
        folder = tmp_path / "outputs/sweeps/packed" / name
        assert (folder / "config.yaml").read_text() == (
            tmp_path / "outputs/sweeps/alone" / name / "config.yaml"
        ).read_text()
        # float32: the grouped convolution sums in another order, and a randomly initialised
        # 1-bit network amplifies that step by step (float64 equality: tests/test_pack*.py)
        ours, theirs = losses(folder), losses(tmp_path / "outputs/sweeps/alone" / name)
        assert ours[:2] == pytest.approx(theirs[:2], rel=1e-4)  # step 1: the meta net's start
        assert ours == pytest.approx(theirs, rel=0.1)
    again = launch("-m", *GRID, *ARGS, *fused, "sweep_name=packed", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "launching 0, skipping 4" in again.stdout + again.stderr


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("pack", "0", "is not a pack size; allowed: an integer >= 1 (1: every run its own job)"),
        ("pack", "-1", "is not a pack size; allowed: an integer >= 1 (1: every run its own job)"),
        ("pack", "two", "is not a pack size; allowed: an integer >= 1 (1: every run its own job)"),
        ("pack", "1.5", "is not a pack size; allowed: an integer >= 1 (1: every run its own job)"),
        ("fuse", "gpu", "is not known; allowed: null (fused on a GPU, one network after another"),
    ],
)
def test_a_bad_pack_setting_is_one_line_and_writes_nothing(tmp_path, key, value, allowed):
    result = launch("-m", *GRID, *ARGS, f"hydra.sweeper.{key}={value}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: hydra.sweeper.{key}={value} {allowed}"), lines[-1]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # 6 runs on 2 cores
def test_points_that_cannot_share_a_pack_are_packed_apart_and_said_so(tmp_path):
    args = ["-m", "model=resnet20,resnet32", "seed=0,1", "act=none", *ARGS[:-1]]
    result = launch(*args, "hydra.sweeper.pack=4", "epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "hydra.sweeper.pack=4: 4 runs in 2 packs (2, 2), 0 runs alone" in log
    result = launch(
        "-m",
        "act=none,sign",
        "seed=0,1",
        *ARGS[:-1],
        "hydra.sweeper.pack=4",
        "epochs=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "2 runs in 1 packs (2), 2 runs alone" in log
    assert "2 runs packed alone: act=sign is not packed (activation quantizers)" in log


@pytest.mark.slow  # a pack killed and relaunched, and one never stopped: about a minute
def test_a_pack_killed_mid_epoch_and_relaunched_equals_one_never_stopped(tmp_path):
    args = ["-m", *GRID, *ARGS, "hydra.sweeper.pack=4", "hydra.sweeper.fuse=true", "log_every=1"]
    sweep = tmp_path / "outputs/sweeps/killed"

    def every_run_in_epoch_2() -> bool:
        rows = [r for p in sweep.glob("*/metrics.jsonl") for r in metrics_rows(p.parent)]
        return sum(r.get("epoch") == 2 and r["kind"] == "step" for r in rows) >= 4

    kill_when([*args, "sweep_name=killed"], tmp_path, every_run_in_epoch_2)
    again = launch(*args, "sweep_name=killed", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at epoch 2" in again.stdout + again.stderr
    whole = launch(*args, "sweep_name=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    for run in run_dirs(tmp_path, "whole"):
        killed = sweep / run.name
        assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
        a = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(killed / "checkpoint.pt", weights_only=True)["model"]
        for key, t in a.items():
            assert torch.equal(t, b[key]), f"{run.name} {key}"


@pytest.mark.slow  # a pack stopped by SIGTERM, then relaunched: about 40 s
def test_sigterm_checkpoints_and_marks_every_run_of_the_pack(tmp_path):
    args = ["-m", *GRID, *ARGS, "hydra.sweeper.pack=4", "log_every=1", "sweep_name=term"]
    args += ["epochs=4"]
    proc = start_launch(*args, cwd=tmp_path)
    sweep = tmp_path / "outputs/sweeps/term"
    deadline = time.monotonic() + 240
    try:
        while not any('"epoch": 2' in p.read_text() for p in sweep.glob("*/metrics.jsonl")):
            assert proc.poll() is None, f"ended early:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    for run in run_dirs(tmp_path, "term"):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "failed" and "SIGTERM" in summary["error"], summary
        saved = torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["step"]
        assert saved == summary["steps"]  # checkpointed where it stopped
    steps = {
        torch.load(r / "checkpoint.pt", weights_only=True)["progress"]["step"]
        for r in run_dirs(tmp_path, "term")
    }
    assert len(steps) == 1  # at the same step boundary
    again = launch(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(
        json.loads((r / "summary.json").read_text())["status"] == "completed"
        for r in run_dirs(tmp_path, "term")
    )
