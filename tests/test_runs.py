"""mq.results.runs: the run listing (python -m mq.runs), reading metrics of old and new versions,
and what mq.job.train writes into metrics rows and summary.json (epochs from 1, times, limits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_report import make_run

from mq.core.checkpoint import load_checkpoint
from mq.data.loaders import fake_loaders
from mq.job.runlock import RunLock
from mq.job.train import train
from mq.results.runs import collect_runs, listing, normalize, read_run


def runs_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mq.runs", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def limit(run_dir: Path, **measured) -> None:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | measured))


def test_listing_shows_status_epochs_accuracy_limits_and_path(tmp_path):
    out = tmp_path / "outputs"
    done = make_run(out / "sweeps" / "a", "ste", 0, [50.0, 70.0, 60.0])
    limit(done, test_images=1000, test_images_total=10000, train_batches=3)
    limit(done, train_batches_total=390, updated=time.time() - 300)
    live = make_run(out / "sweeps" / "a", "multifc", 1, [40.0], status="running", epochs=4)
    make_run(out / "sweeps" / "a", "ste", 2, [], status="failed", error="ValueError: x")
    lock = RunLock(live).acquire()  # as the live job holds it (without: "stopped")
    try:
        result = runs_cli(cwd=tmp_path)  # outputs/ by default
    finally:
        lock.release()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["status", "epochs", "final", "best", "limited", "updated", "path"]
    assert lines[-1] == "3 runs under outputs: 1 completed, 1 failed, 1 running"
    row = next(line for line in lines if "meta=ste,seed=0" in line)
    for text in ("completed", "3/3", "60.00", "70.00", "5 min ago"):
        assert text in row, row
    assert "test 1,000/10,000; train 3/390 batches" in row
    assert row.endswith("sweeps/a/lr=0.001,meta=ste,seed=0,hs=100")
    running = next(line for line in lines if line.startswith("running"))
    assert "1/4" in running and "40.00" in running
    only = runs_cli(str(out), "--status", "failed", cwd=tmp_path)
    assert only.stdout.splitlines()[-1] == f"1 runs under {out}: 1 failed"


def test_cli_help_and_a_missing_folder(tmp_path):
    assert runs_cli("--help").returncode == 0
    result = runs_cli(str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a folder; give one holding run folders"
    ]


def test_old_zero_based_and_new_one_based_metrics_read_alike(tmp_path):
    # Written by an older version (epochs from 0, no time), then resumed by this one.
    run_dir = make_run(tmp_path, "ste", 0, [10.0, 20.0])
    with open(run_dir / "metrics.jsonl", "a") as f:
        for epoch, acc in ((3, 30.0), (4, 40.0)):
            row = {"kind": "epoch", "epoch": epoch, "test_acc": acc, "train_loss": 1.0}
            f.write(json.dumps(row | {"time": 1.8e9 + epoch, "elapsed": 1.0}) + "\n")
    (run_dir / "summary.json").unlink()
    run = read_run(run_dir)
    assert run.test_acc == [10.0, 20.0, 30.0, 40.0]
    assert run.updated == 1.8e9 + 4


@pytest.mark.parametrize("method", ["ste", "multifc", "ewgs"])
def test_method_is_named_from_the_config_when_the_summary_is_missing(tmp_path, method):
    """A job killed before its first summary: the method comes from its step's or net's class."""
    run_dir = make_run(tmp_path, method, 0, [10.0], summary=False)
    assert read_run(run_dir).method == method


def test_values_are_normalized():
    assert normalize("1") == normalize(1) == normalize(1.0) == 1
    assert normalize("1e-3") == normalize(0.001)
    assert normalize("true") is True and normalize("resnet20") == "resnet20"


def test_limited_runs_before_this_version_say_how(tmp_path):
    run_dir = make_run(tmp_path, "ste", 0, [10.0])
    config = run_dir / "config.yaml"
    config.write_text(config.read_text() + "limit_test_batches: 2\nlimit_train_batches: 5\n")
    (run,) = collect_runs(tmp_path)
    assert run.limited == (
        "tested on the first 2 batches only; trained on at most 5 batches per epoch"
    )
    rows = listing(tmp_path)
    assert rows[0][4] == "test first 2 batches; train <=5 batches"


class PlainStep:
    """Plain SGD: what train() needs of a step, with nothing quantized."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.progress: list[tuple[int, int]] = []  # set_progress calls (an annealing estimator)
        self.started: list[torch.Tensor] = []  # start_epoch calls (EWGS's Hessian delta)

    def train_step(self, x, y):
        logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach(), logits.detach()

    def set_lr(self, lr, meta_lr_factor=1.0):
        for group in self.opt.param_groups:
            group["lr"] = lr

    def set_progress(self, epoch, epochs):
        self.progress.append((epoch, epochs))

    def start_epoch(self, batches):
        self.started.append(next(batches)[1])  # the labels of the epoch's first batch

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)


def test_metrics_rows_count_epochs_from_one_and_carry_times(tmp_path):
    data = fake_loaders(16, "cpu", num_train=64, num_test=40, image_size=8, test_batch_size=10)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    common = dict(run_dir=tmp_path, lr=0.01, lr_step=10, progress_bar=False, log_every=1)
    before = time.time()
    limits = dict(limit_train_batches=3, limit_test_batches=2)
    step = PlainStep(model)
    first = train(model, step, data.train, data.test, epochs=2, **common, **limits)
    assert step.progress == [(0, 2), (1, 2)]  # at each epoch's start, from 0
    firsts = [next(data.train.epoch(e))[1] for e in (0, 1)]  # and the epoch's own batches
    assert len(step.started) == 2 and all(map(torch.equal, step.started, firsts))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]  # epochs completed, as the logs say
    assert [r["epoch"] for r in rows if r["kind"] == "step"] == [1, 1, 1, 2, 2, 2]
    times = [r["time"] for r in rows]
    assert before <= times[0] and times == sorted(times) and times[-1] <= time.time()
    assert [r["elapsed"] for r in rows] == sorted(r["elapsed"] for r in rows)
    assert first["updated"] >= times[-1] and first["elapsed"] >= rows[-1]["elapsed"]
    assert first["limit_test_batches"] == 2 and first["limit_train_batches"] == 3
    assert (first["test_images"], first["test_images_total"]) == (20, 40)
    assert (first["train_batches"], first["train_batches_total"]) == (3, 4)
    # Resumed: epoch numbers and elapsed time go on from where they were.
    first_rows = len(rows)
    resume = load_checkpoint(tmp_path / "checkpoint.pt")
    step = PlainStep(model)
    second = train(model, step, data.train, data.test, epochs=3, resume=resume, **common)
    assert step.progress == [(2, 3)]  # a resumed run tells the step where it stands
    assert len(step.started) == 1 and torch.equal(step.started[0], next(data.train.epoch(2))[1])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3]
    # (the checkpoint's elapsed, not the summary's: the first run's summary also counts the
    # time after its last checkpoint, which a tiny resumed epoch need not exceed)
    saved = resume["progress"]["elapsed"]
    assert saved > 0 and rows[-1]["elapsed"] > saved
    assert all(r["elapsed"] >= saved for r in rows[first_rows:])
    assert second["test_acc"] == pytest.approx(
        [r["test_acc"] for r in rows if r["kind"] == "epoch"]
    )


def test_volatile_keys_are_config_keys():
    """A misspelt entry in mq.core.keys would leave a result-changing key in the resume check."""
    from conftest import CONF, compose_config

    from mq.core.keys import VOLATILE, VOLATILE_DATASET

    cfg = compose_config([])
    assert [key for key in VOLATILE if key not in cfg] == []
    dataset_keys = set()
    for path in (CONF / "dataset").glob("*.yaml"):
        dataset_keys |= set(compose_config([f"dataset={path.stem}"]).dataset)
    assert [key for key in VOLATILE_DATASET if key not in dataset_keys] == []
