"""Models by ``_target_``: each conf/model option names its constructor (mq.models.cifar_resnet,
mq.models.torchvision_model), which checks its own keys; check_model runs those checks before
a sweep without building anything; run folders written when every option named
mq.models.build_model are still the same runs and resume."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from conftest import SMOKE, compose_config, kill_when, launch, rows_in_epoch, task_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from mq.cli.conf import option_file, options, upgrade
from mq.core.errors import ConfigError, find_config_error
from mq.job.checks import check
from mq.job.identity import check_run_dir, result_config
from mq.models import check_model, cifar_resnet, constructor


def old_layout(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as mq wrote it when every model was ``_target_: mq.models.build_model``,
    chosen by model.name (no other model keys)."""
    model = config["model"]
    config["model"] = {
        "_target_": "mq.models.build_model",
        **{k: model[k] for k in ("name", "num_classes", "pretrained")},
    }
    return config


def test_every_option_names_its_own_constructor():
    for name in options("model"):
        target = option_file("model", name)["_target_"]
        # a constructor of mq.models with its own checks, not the old by-name build_model
        assert target.startswith("mq.models.") and target != "mq.models.build_model", name
        assert callable(getattr(constructor({"_target_": target}), "check", None)), name
    assert compose_config(["model=resnet56"]).model.depth == 56


def test_a_new_cifar_depth_is_keys_only():
    cfg = task_config(["model.name=resnet8", "model.depth=8", "meta=ste"])
    check(cfg)
    net = instantiate(cfg.model)
    assert len(net.layer1) == len(net.layer2) == len(net.layer3) == 1  # 6n+2 = 8: n = 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.depth=32"], "model.name=resnet20 does not name a CIFAR ResNet of model.depth=32"),
        (
            ["model.name=resnet32"],
            "model.name=resnet32 does not name a CIFAR ResNet of model.depth",
        ),
        (["model.depth=21"], "model.depth=21 is not allowed; allowed: 6n+2 in 8..1202"),
        (["model.depth=2"], "model.depth=2 is not allowed"),
        (["model=resnet56", "model.num_classes=0"], "model.num_classes=0 is not allowed"),
        (["model=torchvision", "model.name=mobilenet_v9"], "model.name=mobilenet_v9 is not known"),
        (
            ["model=torchvision", "model.name=resnet20"],
            "model.name=resnet20 is not known; allowed: alexnet",
        ),
        (["model._target_=mq.models.no_such_net"], "model._target_=mq.models.no_such_net cannot"),
    ],
)
def test_the_constructors_checks_run_before_anything_is_built(overrides, message):
    with pytest.raises(Exception) as info:
        check(task_config(overrides))
    error = str(find_config_error(info.value))
    assert error.startswith(message) and "\n" not in error, error


def test_torchvision_points_to_the_cifar_option():
    with pytest.raises(ConfigError, match=r"\(the CIFAR ResNet is model=resnet20\)$"):
        check_model(task_config(["model=torchvision", "model.name=resnet20"]).model)


BUILT: list[str] = []


def check_width(width: int) -> None:
    if width < 1:
        raise ConfigError(f"model.width={width} is not allowed; allowed: an integer >= 1")


def tiny_net(name: str, width: int, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """A model from outside mq.models: its constructor and its own check, nothing else."""
    BUILT.append(name)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.Linear(width, num_classes))


tiny_net.check = check_width  # type: ignore[attr-defined]


def test_check_model_runs_a_constructors_own_check_without_building():
    node = {"_target_": f"{__name__}.tiny_net", "name": "tiny", "num_classes": 10}
    BUILT.clear()
    check_model({**node, "width": 4})
    with pytest.raises(ConfigError, match="model.width=0 is not allowed"):
        check_model({**node, "width": 0})
    assert BUILT == []
    with pytest.raises(ConfigError, match="model.num_classes=0 is not allowed"):
        check_model({**node, "width": 4, "num_classes": 0})
    assert instantiate({**node, "width": 4})[2].out_features == 10 and BUILT == ["tiny"]


def test_cifar_resnet_loads_strictly_and_keeps_channels_last(tmp_path):
    source = cifar_resnet("resnet20", 20, 10, channels_last=False)
    file = tmp_path / "resnet20.pth"
    torch.save(source.state_dict(), file)
    loaded = cifar_resnet("resnet20", 20, 10, pretrained=str(file))
    assert loaded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ConfigError, match="does not match the model .missing keys: layer1.3"):
        cifar_resnet("resnet32", 32, 10, pretrained=str(file))


@pytest.mark.parametrize(
    "overrides",
    [["model=resnet20"], ["model=resnet110"], ["model=resnet18"], ["model=torchvision"]]
    + [["model=torchvision", "model.name=mobilenet_v2"]],
)
def test_a_run_from_before_model_targets_is_the_same_run(tmp_path, overrides):
    task = task_config([*overrides, "meta=ste"])
    old = old_layout(result_config(task))
    assert upgrade(old) == result_config(task)
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert check_run_dir(task, tmp_path) == {}


def test_a_run_from_before_model_targets_with_another_model_is_refused(tmp_path):
    task = task_config(["model=resnet20", "meta=ste"])
    old = old_layout(result_config(task_config(["model=resnet32", "meta=ste"])))
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"model.depth: 32 -> 20; model.name: resnet32 -> resn"):
        check_run_dir(task, tmp_path)


TINY_NET = """
from pathlib import Path

from torch import nn

from mq.core.errors import ConfigError
from mq.models.weights import finish_model


def check_width(width):
    if not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.width={width} is not allowed; allowed: an integer >= 1")


def tiny_net(name, width, num_classes, pretrained=None):
    Path("built").touch()  # in the launch's working directory
    layers = [nn.Conv2d(3, width, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers, nn.Linear(width, num_classes))
    return finish_model(net, pretrained, channels_last=True)


tiny_net.check = check_width
"""
TINY_YAML = """# A two-layer net from outside the repository.
_target_: tiny_model.tiny_net
name: tiny # name in run names
width: 4 # channels
num_classes: ${dataset.num_classes} # output classes, from the dataset
pretrained: null # full-precision checkpoint to start from
"""


@pytest.mark.slow  # two launches; test_tasks' new task keeps hydra.searchpath fast
def test_a_new_model_is_its_constructor_and_its_yaml(tmp_path, monkeypatch):
    """Outside the repository (hydra.searchpath): its constructor's check refuses bad keys in
    one line before anything is built or written; with good ones it trains."""
    (tmp_path / "tiny_model.py").write_text(TINY_NET)
    (tmp_path / "more_conf" / "model").mkdir(parents=True)
    (tmp_path / "more_conf" / "model" / "tiny.yaml").write_text(TINY_YAML)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # launch() puts the checkout before it
    args = ["model=tiny", f"hydra.searchpath=[file://{tmp_path / 'more_conf'}]", "meta=ste"]
    refused = launch(*args, "model.width=0", *SMOKE, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: model.width=0 is not allowed; allowed: an integer >= 1"
    ]
    assert not (tmp_path / "built").exists() and not (tmp_path / "outputs").exists()
    done = launch(*args, *SMOKE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(
        (tmp_path / "outputs/quantize/fake/tiny-dorefa-w1-ste-sgd-s0/summary.json").read_text()
    )
    assert summary["status"] == "completed" and (tmp_path / "built").exists()


def _rows(run_dir) -> list[dict[str, Any]]:
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow  # killed and relaunched; test_act's old-folder resume is the fast one
def test_a_run_folder_from_before_model_targets_resumes(tmp_path):
    """A run killed in its second epoch, its config.yaml rewritten as mq wrote it when every
    model was mq.models.build_model: the relaunch resumes it from its checkpoint."""
    args = ["dataset=fake", "logger=none", "progress=false", "batch_size=32", "epochs=2"]
    args += ["limit_test_batches=1", "log_every=1", "meta=ste", "run_name=old"]
    run_dir = tmp_path / "outputs/quantize/fake/old"
    kill_when(args, tmp_path, lambda: rows_in_epoch(run_dir, 2) >= 1)
    saved = run_dir / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(saved))
    assert config["model"]["_target_"] == "mq.models.cifar_resnet"
    OmegaConf.save(OmegaConf.create(old_layout(config)), saved)

    again = launch(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at epoch 2" in again.stdout + again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["test_acc"]) == 2


def test_irnet_resnet20_is_the_authors_architecture():
    net = instantiate(task_config(["model=resnet20_irnet"]).model)
    # 269,850: IR-Net's resnet20_1w1a for 10 classes (htqin/IR-Net f63a590,
    # CIFAR-10/ResNet20/1w1a/resnet.py), counted by building their class outside the repository;
    # mq's He et al. ResNet-20 (option B projections) has more
    assert sum(p.numel() for p in net.parameters()) == 269_850
    assert sum(p.numel() for p in cifar_resnet("resnet20", 20, 10).parameters()) != 269_850
    # A shortcut around every conv: with every block's convs zero (eval; BatchNorm of 0 is 0),
    # each block hands its input on, downsampled by option A (every other pixel, zero channels
    # on both sides); with a shortcut per two convs, zero convs would cut the signal instead.
    net.eval()
    with torch.no_grad():
        for stage in (net.layer1, net.layer2, net.layer3):
            for block in stage:
                block.conv1.weight.zero_()
                block.conv2.weight.zero_()
        x = torch.randn(2, 3, 32, 32)
        stem = torch.nn.functional.hardtanh(net.bn1(net.conv1(x)))
        out = net.layer3(net.layer2(net.layer1(stem)))
        pad = torch.nn.functional.pad
        expected = pad(
            pad(stem[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))[:, :, ::2, ::2], (0,) * 4 + (16, 16)
        )
    assert out.shape == (2, 64, 8, 8) and stem.abs().max() > 0.1
    torch.testing.assert_close(out, expected)


@pytest.mark.slow  # two launches; the architecture test above is in-process
def test_irnet_resnet20_trains_and_refuses_the_released_metaquant_checkpoints(tmp_path):
    args = ["model=resnet20_irnet", "dataset=fake", "logger=none", "progress=false", "epochs=1"]
    args += ["limit_train_batches=2", "limit_test_batches=1", "batch_size=32", "log_every=1"]
    refused = launch(*args, "model.pretrained=original", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: model.pretrained=original is not known for model.name=resnet20_irnet with 10 "
        "classes; allowed: a CIFAR ResNet (resnet20, resnet32, resnet44, resnet56, resnet110) "
        "on CIFAR-10 or CIFAR-100, or a checkpoint path"
    ], refused.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()
    done = launch(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "outputs/quantize/fake/resnet20_irnet-dorefa-w1-multifc-sgd-s0"
    steps = [r for r in _rows(run_dir) if r["kind"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
