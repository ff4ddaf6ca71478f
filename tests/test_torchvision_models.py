"""Any torchvision classification model, quantized: every Conv2d and Linear weight reaches the
forward quantized, for every quantizer in conf/quant and STE and a meta net; strict loading of
torchvision-layout weights; unknown names and wrong key layouts are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF, compose_config, kill_when, launch, rows_in_epoch
from hydra.utils import instantiate
from test_launch import rows
from torch import nn

from mq.core.errors import ConfigError
from mq.models import TORCHVISION, build_model
from mq.quant import quantize_model

QUANTS = sorted(p.stem for p in (CONF / "quant").glob("*.yaml"))  # discovered, not listed
# Three families with different layers: depthwise convs + Linear head, grouped convs + channel
# shuffle, and a conv-only classifier (no Linear at all). resnet18 and vgg11_bn (a 120M-weight
# classifier; STE only) are in the slow suite.
FAST_ARCHS = ["mobilenet_v2", "shufflenet_v2_x0_5", "squeezenet1_1"]
SLOW_ARCHS = ["resnet18", "vgg11_bn"]


def matrix() -> list:
    """Every arch x quant x meta; the fast suite keeps mobilenet_v2 x every quantizer and the
    other two fast archs with dorefa (the rest, ~20 s, in the slow suite)."""
    out = []
    for arch in FAST_ARCHS + SLOW_ARCHS:
        for quant in QUANTS:
            for meta in ("ste", "multifc"):
                fast = arch == "mobilenet_v2" or (arch in FAST_ARCHS and quant == "dorefa")
                marks = () if fast else (pytest.mark.slow,)
                out.append(
                    pytest.param(arch, quant, meta, marks=marks, id=f"{meta}-{quant}-{arch}")
                )
    return out


def quantized_layers_seen(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight each Conv2d/Linear of the network really used in a forward of ``x``."""
    seen: dict[str, torch.Tensor] = {}
    net = model.net if hasattr(model, "net") else model
    hooks = [
        m.register_forward_pre_hook(lambda m, _, n=n: seen.__setitem__(n, m.weight.detach()))
        for n, m in net.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize(("arch", "quant", "meta"), matrix())
def test_every_layer_is_quantized_and_trains(arch, quant, meta):
    torch.manual_seed(0)
    cfg = compose_config(
        [
            "model=torchvision",
            f"model.name={arch}",
            f"quant={quant}",
            f"meta={meta}",
            "optimizer=adam",
            *(["meta.net.hidden_size=4"] if meta != "ste" else []),
        ]
    )
    quantizer = instantiate(cfg.quant) if cfg.quant.get("_target_") else None
    if arch == "vgg11_bn" and meta != "ste":
        pytest.skip("vgg11_bn's 120M classifier weights x a meta net's width: GBs on a CPU")
    if quantizer is None and meta != "ste":
        pytest.skip("quant=none trains with STE only (a meta net needs a quantizer)")
    net = instantiate(cfg.model, num_classes=5)
    model = quantize_model(net, quantizer)
    step = instantiate(cfg.meta, model=model, optimizer=instantiate(cfg.optimizer))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    layers = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    seen = quantized_layers_seen(model, x)
    assert set(seen) == layers and len(layers) > 10
    if quantizer is not None:
        for name, w in seen.items():
            # 1-bit dorefa and bwn: each output filter holds one magnitude (+-1, +-alpha); bwn
            # maps a weight that is exactly 0 (sign 0) to 0: vgg11_bn's 120M get a few of those
            rows = w.abs().flatten(1)
            top = rows.max(1, keepdim=True).values.expand_as(rows)
            assert torch.allclose(rows[rows != 0], top[rows != 0]), name
            assert (rows == 0).float().mean() < 1e-6, name
            assert not torch.equal(w, net.get_submodule(name).weight.detach()), name
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for _ in range(2):  # MetaQuant's first step only records; the second updates
        loss, _ = step.train_step(x, y)
        assert torch.isfinite(loss)
    moved = [k for k, v in net.state_dict().items() if k.endswith("weight") and k in before]
    assert any(not torch.equal(before[k], net.state_dict()[k]) for k in moved)


def test_unknown_name_lists_the_torchvision_models():
    with pytest.raises(ConfigError) as err:
        build_model("mobilenet_v9", 10)
    text = str(err.value)
    assert "\n" not in text and text.startswith("model.name=mobilenet_v9 is not known; allowed:")
    assert "mobilenet_v2" in text and "resnet20" in text and "vgg11_bn" in text
    assert "fasterrcnn_resnet50_fpn" not in TORCHVISION  # detection models are not classifiers


def test_torchvision_layout_loads_strictly_and_a_wrong_layout_names_keys(tmp_path):
    source = build_model("mobilenet_v2", 7)
    good = tmp_path / "mobilenet_v2.pth"
    torch.save(source.state_dict(), good)  # torchvision's layout: a plain state dict
    loaded = build_model("mobilenet_v2", 7, pretrained=str(good))
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    wrong = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", 7).state_dict(), wrong)
    with pytest.raises(ConfigError) as err:
        build_model("mobilenet_v2", 7, pretrained=str(wrong))
    text = str(err.value)
    assert "\n" not in text and str(wrong) in text
    assert "missing keys: classifier.1.bias" in text and "unexpected keys: bn1.bias" in text


@pytest.mark.slow  # ~15 s: two launches
def test_wrong_layout_and_unknown_name_through_launch_write_nothing(tmp_path):
    wrong = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", 10).state_dict(), wrong)
    base = ["dataset=fake", "logger=none", "model=torchvision", "model.name=mobilenet_v2"]
    for extra, expect in (
        ([f"model.pretrained={wrong}"], "does not match the model (missing keys: "),
        (["model.name=mobilenet_v9"], "model.name=mobilenet_v9 is not known; allowed: "),
    ):
        result = launch(*base, *extra, cwd=tmp_path)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 2 and lines[-1].startswith("error: "), result.stderr[-2000:]
        assert expect in lines[-1] and "Traceback" not in result.stderr
        assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # two launches and a kill: ~40 s on 2 cores
def test_mobilenet_v2_run_is_killed_resumes_and_matches_an_uninterrupted_one(tmp_path):
    args = ["model=torchvision", "model.name=mobilenet_v2", "dataset=fake", "logger=none"]
    args += ["epochs=2", "batch_size=32", "limit_test_batches=1", "log_every=1"]
    args += ["progress=false", "meta.net.hidden_size=4", "optimizer=adam"]
    reference = launch(*args, "run_name=reference", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "outputs/quantize/fake/killed"
    kill_when([*args, "run_name=killed"], tmp_path, lambda: rows_in_epoch(run_dir, 2) >= 3)
    resumed = launch(*args, "run_name=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch 2, batch 0" in resumed.stderr + resumed.stdout
    got, want = rows(run_dir), rows(tmp_path / "outputs/quantize/fake/reference")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "test_acc"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
