"""launch.py end to end, as a subprocess: every method, resume after a kill, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, kill_when, launch, lowest_bits, rows_in_epoch
from wandb_records import history_keys, read_records

from mq.cli.conf import options

METAS = options("meta")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# Every meta net of conf/meta/ (Hydra's glob) under dorefa, and the full-precision run, in the
# fast suite; the other quantizers of conf/quant/ with every meta net in the slow one.
OTHER_QUANTS = [q for q in options("quant") if q not in ("dorefa", "none")]


@pytest.mark.parametrize(
    "quants", [["dorefa"], pytest.param(OTHER_QUANTS, marks=pytest.mark.slow)], ids=str
)
def test_every_meta_and_quant_pair_trains(tmp_path, quants):
    by_bits: dict[int, list[str]] = {}  # one sweep per lowest bit width (1 for most)
    for quant in quants:
        by_bits.setdefault(lowest_bits(quant), []).append(quant)
    for bits, group in by_bits.items():
        result = launch(
            "-m", "meta=glob(*)", f"quant={','.join(group)}", f"bits={bits}", *SMOKE,
            "hydra.sweep.dir=sweep", cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    fp = launch(*SMOKE, "quant=none", "meta=ste", "run_name=fp", cwd=tmp_path)
    assert fp.returncode == 0, fp.stderr[-3000:]
    dirs = sorted((tmp_path / "sweep").iterdir())
    dirs = [d for d in dirs if d.is_dir()] + [tmp_path / "outputs/quantize/fake/fp"]
    assert len(dirs) == len(METAS) * len(quants) + 1
    for run_dir in dirs:
        s = summary(run_dir)
        assert s["status"] == "completed", run_dir
        assert 0 <= s["final_test_acc"] <= 100
        steps = [r for r in rows(run_dir) if r["kind"] == "step"]
        assert [r["step"] for r in steps] == [0, 1, 2]
        assert all(math.isfinite(r["loss"]) for r in steps)
        (epoch,) = [r for r in rows(run_dir) if r["kind"] == "epoch"]
        assert math.isfinite(epoch["test_loss"]) and epoch["epoch_time"] > 0
        assert (run_dir / "checkpoint.pt").exists() and (run_dir / "config.yaml").exists()


@pytest.mark.slow  # launches runs: in the slow suite, which CI runs too
def test_wandb_offline_run_has_the_choices_name_and_metric_names(tmp_path):
    args = [a for a in SMOKE if a != "logger=none"] + ["logger.mode=offline"]
    result = launch(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs/quantize/fake/resnet20-dorefa-w1-multifc-sgd-s0"
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0
    assert summary(run_dir)["wandb_id"] in run_file.name
    records = read_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "resnet20-dorefa-w1-multifc-sgd-s0" and run.job_type == "multifc"
    assert list(run.tags) == ["resnet20", "fake", "dorefa", "w1", "multifc", "sgd"]
    assert {"model", "quant", "meta", "optimizer", "bits", "seed"} <= {
        i.key for i in run.config.update
    }
    jsonl_keys = {k for row in rows(run_dir) for k in row} - {"kind", "step"}
    assert jsonl_keys <= history_keys(records)


@pytest.mark.slow  # two launches; the helper serves the slow suite's resume tests
def test_kill_when_fails_clearly_if_the_run_exits_or_the_time_passes_first(tmp_path):
    """The tests' kill-and-relaunch helper: a run that ends before the condition holds (bad
    input, exit 2) is an AssertionError with its exit code and last output; so is a condition
    that does not hold in time."""
    with pytest.raises(AssertionError, match=r"exited \(2\)[\s\S]*error: bits=0"):
        kill_when([*SMOKE, "bits=0"], tmp_path, lambda: False)
    with pytest.raises(AssertionError, match="did not hold within 1 s"):
        kill_when([*SMOKE, "epochs=50"], tmp_path, lambda: False, timeout=1)


# In the slow suite (three launches): a step's exact continuation is test_meta's
# test_step_state_round_trip_gives_identical_continuation, the kill and the relaunch test_act's
# test_a_run_folder_from_before_the_act_group_resumes. LSTMFC costs 3x MultiFC here.
@pytest.mark.slow
@pytest.mark.parametrize("meta", ["multifc", pytest.param("lstmfc", marks=pytest.mark.slow)])
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, meta):
    args = [
        "dataset=fake",
        "logger=none",
        "progress=false",
        "batch_size=32",
        "epochs=3",
        "limit_test_batches=2",
        "log_every=1",
        f"meta={meta}",
        "meta.net.hidden_size=8",
        "optimizer=adam",
    ]
    reference = launch(*args, "run_name=reference", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "outputs/quantize/fake/killed"
    # a checkpoint at the end of epoch 1, then 3 steps into epoch 2
    kill_when([*args, "run_name=killed"], tmp_path, lambda: rows_in_epoch(run_dir, 2) >= 3)
    assert summary(run_dir)["status"] == "running"
    resumed = launch(*args, "run_name=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch 2, batch 0" in resumed.stderr + resumed.stdout
    got, want = rows(run_dir), rows(tmp_path / "outputs/quantize/fake/reference")
    assert [r["step"] for r in got] == [r["step"] for r in want]  # no duplicated rows
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "acc", "test_acc", "test_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert summary(run_dir)["status"] == "completed"
    assert summary(run_dir)["test_acc"] == pytest.approx(
        summary(tmp_path / "outputs/quantize/fake/reference")["test_acc"]
    )


def test_completed_run_is_not_overwritten_and_other_config_is_refused(tmp_path):
    first = launch(*SMOKE, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "outputs/quantize/fake/resnet20-dorefa-w1-multifc-sgd-s0"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
    # keep_training_state=false (default): the weights stay, the training state goes
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert "model" in state and "step_state" not in state and "rng" not in state
    again = launch(*SMOKE, cwd=tmp_path)
    assert again.returncode == 0
    assert "already completed" in again.stderr + again.stdout
    # a key that does not change results (cuDNN's algorithm search) finds the same run
    volatile = launch(*SMOKE, "cudnn_benchmark=false", "keep_training_state=true", cwd=tmp_path)
    assert volatile.returncode == 0 and "already completed" in volatile.stderr + volatile.stdout
    changed = launch(*SMOKE, "optimizer.lr=0.5", cwd=tmp_path)
    assert changed.returncode != 0
    assert "optimizer.lr: 0.001 -> 0.5" in changed.stderr and "Traceback" not in changed.stderr
    after = {
        p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file() and p.name in before
    }
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json", "config.yaml"):
        assert after[name] == before[name], name


def test_pretrain_then_quantize_then_eval(tmp_path):
    pre = launch(*SMOKE, "task=pretrain", cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr[-3000:]
    pre_dir = tmp_path / "outputs/pretrain/fake/resnet20-fp-sgdm-s0"
    assert summary(pre_dir)["status"] == "completed"
    state = torch.load(pre_dir / "checkpoint.pt", weights_only=False)["model"]
    assert "conv1.weight" in state  # the original checkpoints' key layout
    quant = launch(*SMOKE, f"model.pretrained={pre_dir / 'checkpoint.pt'}", cwd=tmp_path)
    assert quant.returncode == 0, quant.stderr[-3000:]
    assert "randomly initialised" not in quant.stderr
    ev = launch(*SMOKE, "task=eval", f"model.pretrained={pre_dir}", "quant=none", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    # the eval's folder names the checkpoint: its run folder's name and a hash of its path
    (eval_dir,) = (tmp_path / "outputs/eval/fake").glob("resnet20-none-w1-s0-resnet20-fp-sgdm-s0-*")
    s = summary(eval_dir)
    assert s["status"] == "completed" and 0 <= s["final_test_acc"] <= 100


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "garbage.pth").write_bytes(b"not a checkpoint at all")
    from mq.models import build_model

    torch.save(build_model("resnet20", 10).state_dict(), folder / "resnet20.pth")
    return folder


# A launch per case (4-13 s each): the cases that validate() or the checkpoint loader also see
# in-process (test_config, test_cli_errors) run in the slow suite; one of each path stays here.
@pytest.mark.parametrize(
    "args, message",
    [
        (["quant=foo"], f"quant=foo is not known; allowed: {', '.join(options('quant'))}"),
        (["-m", "meta=ste,bogus"], "meta=bogus is not known"),
        pytest.param(["bits=9"], "bits=9 is not allowed", marks=pytest.mark.slow),
        pytest.param(
            ["cudnn_benchmark=maybe"],
            "cudnn_benchmark=maybe is not allowed; allowed: true, false",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["quant=bwn", "bits=2"],
            "bits=2 is not allowed for bwn; allowed: 1",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is not allowed", marks=pytest.mark.slow
        ),
        (["dataset=cifar10", "dataset.root=nowhere"], "dataset.root=nowhere"),
        (["model.pretrained=CKPT/garbage.pth"], "garbage.pth is not a readable checkpoint"),
        pytest.param(
            ["model=resnet32", "model.pretrained=CKPT/resnet20.pth"],
            "missing keys: layer1.3",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["model.pretrained=CKPT/none.pth"], "none.pth does not exist", marks=pytest.mark.slow
        ),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, bad_checkpoints, args, message):
    args = [a.replace("CKPT", str(bad_checkpoints)) for a in args]
    smoke = [
        a
        for a in SMOKE
        if not (a.startswith("dataset=") and any(x.startswith("dataset=") for x in args))
    ]
    result = launch(*args, *smoke, cwd=tmp_path)  # -m first
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    outputs = tmp_path / "outputs"
    assert not [p for p in outputs.rglob("*") if p.is_file()] if outputs.exists() else True


@pytest.mark.slow  # the default (dropped) is checked by the completed-run test above
def test_a_completed_run_keeps_its_weights_and_drops_the_training_state(tmp_path):
    for keep in ("false", "true"):
        args = [*SMOKE, "meta=multifc", f"keep_training_state={keep}", f"run_name=keep-{keep}"]
        result = launch(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "outputs/quantize/fake"
    dropped = torch.load(run / "keep-false/checkpoint.pt", weights_only=False)
    kept = torch.load(run / "keep-true/checkpoint.pt", weights_only=False)
    assert "step_state" in kept and "step_state" not in dropped and "rng" not in dropped
    assert dropped["model"].keys() == kept["model"].keys()
    assert all(torch.equal(dropped["model"][k], kept["model"][k]) for k in kept["model"])
    assert summary(run / "keep-false")["status"] == "completed"
    again = launch(*SMOKE, "meta=multifc", "run_name=keep-false", cwd=tmp_path)  # default: false
    assert again.returncode == 0 and "already completed" in again.stderr + again.stdout
