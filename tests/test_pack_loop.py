"""Packed runs through the training loop (mq.job.pack): each run of a pack writes the metrics,
checkpoint and summary it writes alone; a stopped pack resumes (behind runs catch up); a
diverging run ends alone."""

import json

import pytest
import torch
from test_pack import make_runs, small_network

from mq.core.checkpoint import load_checkpoint
from mq.data import fake_loaders
from mq.job.pack import SharedInterrupt, train_pack
from mq.job.preempt import STOP
from mq.job.train import Interrupted, Settings, Training

RUNS = [
    ("ste", "sgd", 0.05, None),
    ("multifc", "adam", 0.05, "original"),
    ("fcgrad", "sgdm", 0.02, "paper"),
]


class Float64:
    """A batch source with its images in float64 (pack and alone compared to 1e-10)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getattr__(self, name):
        return getattr(self.source, name)

    def epoch(self, epoch, start_batch=0):
        for x, y in self.source.epoch(epoch, start_batch=start_batch):
            yield x.double(), y


def data_of(k):
    data = fake_loaders(8, "cpu", seed=k, num_train=32, num_test=16, image_size=8)
    return Float64(data.train), Float64(data.test)


SETTINGS = dict(epochs=2, lr=0.05, lr_step=1, log_every=2, progress_bar=False)


def loops_for(runs, folders, resume=None, interrupt=None, network=None):
    """One Training per run in ``folders``, each its own data (seed k) and lr."""
    pairs = make_runs(network or small_network(), "dorefa", runs)
    loops = []
    for k, ((model, step), run) in enumerate(zip(pairs, runs, strict=True)):
        train, test = data_of(k)
        folders[k].mkdir(parents=True, exist_ok=True)
        settings = Settings(**{**SETTINGS, "lr": run[2]})
        loops.append(
            Training(
                model,
                step,
                train,
                test,
                folders[k],
                settings,
                resume=None if resume is None else resume[k],
                interrupt=interrupt,
            )
        )
    return loops


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_rows(a, b):
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for r, s in zip(a, b, strict=True):
        for key in ("loss", "train_loss", "test_loss", "test_acc", "acc"):
            if key in r:
                assert r[key] == pytest.approx(s[key], rel=1e-10, abs=1e-12), key


def assert_same_checkpoint(a, b):
    a, b = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert a["progress"]["step"] == b["progress"]["step"]
    for name, t in a["model"].items():
        assert torch.allclose(t.double(), b["model"][name].double(), rtol=1e-10, atol=1e-12), name


def folders_in(root, n):
    return [root / f"run{k}" for k in range(n)]


def test_a_pack_writes_what_each_run_writes_alone(tmp_path):
    alone = folders_in(tmp_path / "alone", 3)
    packed = folders_in(tmp_path / "packed", 3)
    summaries = [loop.run() for loop in loops_for(RUNS, alone)]
    packed_summaries = train_pack(loops_for(RUNS, packed), fuse=True)
    for a, b, sa, sb in zip(alone, packed, summaries, packed_summaries, strict=True):
        assert sb["status"] == sa["status"] == "completed"
        assert sb["test_acc"] == pytest.approx(sa["test_acc"], rel=1e-10)
        assert_same_rows(rows(a), rows(b))
        assert_same_checkpoint(a, b)


def stop_at(step):
    """A poll that asks for STOP once, at the ``step``-th pack step."""
    calls = iter(range(10**6))
    return lambda: STOP if next(calls) == step else None


def test_a_stopped_pack_resumes_where_it_stopped_even_when_its_runs_are_apart(tmp_path):
    whole = folders_in(tmp_path / "whole", 3)
    train_pack(loops_for(RUNS, whole), fuse=True)
    parts = folders_in(tmp_path / "parts", 3)
    # Stop mid-epoch 1 (step 2 of 4), keep run 1's checkpoint from there; stop again at step 5.
    shared = SharedInterrupt(stop_at(2))
    with pytest.raises(Interrupted):
        train_pack(loops_for(RUNS, parts, interrupt=shared), shared, fuse=True)
    early = (parts[1] / "checkpoint.pt").read_bytes()
    early_rows = (parts[1] / "metrics.jsonl").read_bytes()
    resume = [load_checkpoint(f / "checkpoint.pt") for f in parts]
    shared = SharedInterrupt(stop_at(2))
    with pytest.raises(Interrupted):
        train_pack(loops_for(RUNS, parts, resume=resume, interrupt=shared), shared, True)
    assert load_checkpoint(parts[0] / "checkpoint.pt")["progress"]["step"] == 6
    # As if killed between two runs' saves: run 1 is 3 steps behind the others.
    (parts[1] / "checkpoint.pt").write_bytes(early)
    (parts[1] / "metrics.jsonl").write_bytes(early_rows)
    resume = [load_checkpoint(f / "checkpoint.pt") for f in parts]
    assert [r["progress"]["step"] for r in resume] == [6, 3, 6]
    summaries = train_pack(loops_for(RUNS, parts, resume=resume), fuse=True)
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for a, b in zip(whole, parts, strict=True):
        assert_same_rows(
            [r for r in rows(a) if r["kind"] == "epoch"],
            [r for r in rows(b) if r["kind"] == "epoch"],
        )
        assert_same_checkpoint(a, b)


def test_a_diverging_run_ends_and_the_pack_goes_on(tmp_path):
    runs = [RUNS[0], ("ste", "sgd", float("nan"), None), RUNS[2]]  # NaN weights, NaN loss
    alone = folders_in(tmp_path / "alone", 3)
    packed = folders_in(tmp_path / "packed", 3)
    summaries = train_pack(loops_for(runs, packed), fuse=True)
    assert [s["status"] for s in summaries] == ["completed", "diverged", "completed"]
    expected = [loop.run() for k, loop in enumerate(loops_for(runs, alone)) if k != 1]
    for k, summary in zip((0, 2), expected, strict=True):
        assert summaries[k]["test_acc"] == pytest.approx(summary["test_acc"], rel=1e-10)
        assert_same_checkpoint(alone[k], packed[k])
