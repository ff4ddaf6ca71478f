"""model.pretrained=original: the paper's released full-precision model for the run's model and
dataset, read from checkpoints_dir ($MQ_CHECKPOINTS), in single runs, sweeps and presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, compose_config, launch

from mq.models import original_checkpoint, resolve_original
from mq.models.resnet_cifar import CifarResNet


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A folder holding ResNet20-CIFAR10-pretrain.pth in the released files' key layout (a
    plain state dict of the CIFAR ResNet, as torch.load gives the original)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(1)
    torch.save(CifarResNet(20, 10).state_dict(), folder / "ResNet20-CIFAR10-pretrain.pth")
    return folder


# an eval and a sweep launched; the file's lookup: test_presets_start_from_the_released_models
@pytest.mark.slow
def test_original_in_a_run_and_a_sweep(released, tmp_path, monkeypatch):
    file = released / "ResNet20-CIFAR10-pretrain.pth"
    monkeypatch.setenv("MQ_CHECKPOINTS", str(released))  # launch() passes the environment on
    done = launch("task=eval", "model.pretrained=original", *SMOKE, cwd=tmp_path)
    monkeypatch.delenv("MQ_CHECKPOINTS")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs/eval/fake").iterdir()
    # The folder and the summary name the file actually read, not the word "original".
    assert run_dir.name.startswith("resnet20-dorefa-w1-s0-ResNet20-CIFAR10-pretrain-"), run_dir
    assert json.loads((run_dir / "summary.json").read_text())["pretrained"] == str(file)

    sweep = launch(
        "-m", "meta=ste", "model.pretrained=original", f"checkpoints_dir={released}", *SMOKE,
        cwd=tmp_path,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "outputs/sweeps").iterdir()  # named from what it sweeps
    assert "checkpoints_dir" not in sweep_dir.name
    (job,) = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert "model.pretrained=original" in job.name and "checkpoints_dir" not in job.name
    assert f"pretrained: {file}" in (job / "config.yaml").read_text()
    assert json.loads((job / "summary.json").read_text())["status"] == "completed"


def test_missing_original_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = launch(
        "model.pretrained=original", "model=resnet32", f"checkpoints_dir={empty}", *SMOKE,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.pretrained=original: "), lines
    assert str(empty / "ResNet32-CIFAR10-pretrain.pth") in lines[0]  # where to put it
    assert "csyhhu/MetaQuant" in lines[0] and "Results/" in lines[0]  # where to get it
    assert not (tmp_path / "outputs").exists()

    other = launch("model.pretrained=original", "model=resnet18", *SMOKE, cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip().startswith("error: model.pretrained=original is not known for")
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("preset", ["table1", "bits", "fair_compare"])
def test_presets_start_from_the_released_models(preset, released):
    """Without the override the presets read the pretrain sweep's folder; with it, the file
    for each job's model and dataset (ResNet32's for model=resnet32 in table1)."""
    default = compose_config([f"+sweep={preset}"])
    assert str(default.model.pretrained).startswith("outputs/pretrain/cifar10/resnet20-fp-")
    cfg = compose_config(
        [f"+sweep={preset}", "model.pretrained=original", f"checkpoints_dir={released}"]
    )
    resolve_original(cfg)
    assert cfg.model.pretrained == str(released / "ResNet20-CIFAR10-pretrain.pth")
    file = original_checkpoint("resnet20", 10, str(released))
    assert file == released / "ResNet20-CIFAR10-pretrain.pth"


def test_checkpoints_dir_default_and_environment(monkeypatch):
    monkeypatch.delenv("MQ_CHECKPOINTS", raising=False)
    assert compose_config([]).checkpoints_dir == "../shared/data/original-checkpoints"
    monkeypatch.setenv("MQ_CHECKPOINTS", "/cluster/ckpts")
    assert compose_config([]).checkpoints_dir == "/cluster/ckpts"
