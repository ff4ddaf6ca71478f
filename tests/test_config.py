"""Every config composes and instantiates (compose API), like lightning-hydra-template's tests."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import compose_config
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from mq.cli.conf import options
from mq.core.errors import ConfigError, find_config_error
from mq.job.checks import check, validate
from mq.meta import STEStep
from mq.quant import QuantizedModel, quantize_model


def test_defaults_follow_the_paper():
    cfg = compose_config([])
    assert cfg.model.name == "resnet20" and cfg.dataset.name == "cifar10"
    assert cfg.quant._target_.endswith("DorefaWeight") and cfg.bits == 1
    assert cfg.meta.net._target_ == "mq.meta.MultiFC" and cfg.meta.net.num_layers == 3
    assert cfg.meta.net.hidden_size == 100 and cfg.meta["update"] == "paper"
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 1e-3
    assert cfg.meta.lr == 1e-3 and cfg.epochs == 100 and cfg.lr_step == 30
    assert cfg.batch_size == 128 and cfg.logger.mode == "offline"
    assert cfg.run_name == "resnet20-dorefa-w1-multifc-sgd-s0"


@pytest.mark.parametrize("model", options("model"))
def test_every_model_instantiates(model):
    cfg = compose_config([f"model={model}"])
    net = instantiate(cfg.model)
    size = (
        32
        if cfg.model.name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
        else 64
    )
    # ImageNet nets at 32x32 end in 1x1 maps, and IR-Net's ResNet normalises the pooled
    # features (BatchNorm1d): one image per batch would trip BatchNorm's check
    assert net(torch.zeros(2, 3, size, size)).shape[1] == 10


def _quant_meta_optimizer() -> list:
    """Every quant x meta with sgd, and adam and sgdm with dorefa and MultiFC, the paper's
    setting (every option composes and trains fast); the other adam and sgdm pairs, the same
    steps under another optimizer, in the slow suite."""
    cases = []
    for optimizer in options("optimizer"):
        for meta in options("meta"):
            for quant in options("quant"):
                fast = optimizer == "sgd" or (quant, meta) == ("dorefa", "multifc")
                marks = () if fast else pytest.mark.slow
                cases.append(
                    pytest.param(
                        quant, meta, optimizer, marks=marks, id=f"{optimizer}-{meta}-{quant}"
                    )
                )
    return cases


@pytest.mark.parametrize(("quant", "meta", "optimizer"), _quant_meta_optimizer())
def test_every_quant_meta_optimizer_instantiates(quant, meta, optimizer):
    cfg = compose_config(
        [f"quant={quant}", f"meta={meta}", f"optimizer={optimizer}", "model=resnet20"]
    )
    validate(cfg)
    quantizer = instantiate(cfg.quant) if cfg.quant.get("_target_") else None
    model = quantize_model(instantiate(cfg.model), quantizer)
    opt = instantiate(cfg.optimizer)
    assert isinstance(opt, functools.partial)
    if quantizer is None and meta != "ste":
        with pytest.raises(Exception) as err:
            instantiate(cfg.meta, model=model, optimizer=opt)
        assert "quant=none" in str(find_config_error(err.value))
        return
    step = instantiate(cfg.meta, model=model, optimizer=opt)
    assert type(step) is get_class(cfg.meta._target_) and isinstance(step, STEStep)
    assert isinstance(model, QuantizedModel) == (quant != "none")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, _ = step.train_step(x, y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_config_instantiates_or_says_what_is_missing(dataset, tmp_path):
    cfg = compose_config(
        [f"dataset={dataset}", f"dataset.root={tmp_path}"]
        if dataset != "fake"
        else ["dataset=fake"]
    )
    if dataset == "fake":
        data = instantiate(cfg.dataset, batch_size=16, device="cpu", seed=0)
        assert data.num_classes == cfg.dataset.num_classes
        x, y = next(iter(data.train.epoch(0)))
        assert x.shape == (16, 3, 32, 32) and y.dtype == torch.long
    else:
        with pytest.raises(Exception) as err:
            instantiate(cfg.dataset, batch_size=16, device="cpu", seed=0)
        message = str(find_config_error(err.value))
        assert str(tmp_path) in message and "\n" not in message


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes(task):
    cfg = compose_config([f"task={task}"] + (["model.pretrained=x.pth"] if task == "eval" else []))
    validate(cfg)
    assert cfg.task.name == task
    if task == "pretrain":
        assert cfg.quant.get("_target_") is None and cfg.optimizer.lr == 0.1
        assert cfg.run_name == "resnet20-fp-sgdm-s0"


def test_pretrain_task_still_takes_command_line_choices():
    cfg = compose_config(["task=pretrain", "optimizer=adam", "optimizer.lr=0.01", "epochs=3"])
    assert (
        cfg.optimizer._target_ == "torch.optim.Adam"
        and cfg.optimizer.lr == 0.01
        and cfg.epochs == 3
    )


def test_wandb_logger_config_instantiates_disabled(tmp_path):
    cfg = compose_config(["logger.mode=disabled"])
    logger = instantiate(cfg.logger, name="x", run_dir=tmp_path, run_config={"a": 1})
    logger.log([{"kind": "step", "step": 0, "loss": 1.0}])
    logger.finish()
    assert cfg.logger.job_type == "multifc" and "w1" in cfg.logger.tags


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
        ("meta.lr=-1", "meta.lr=-1"),
        ("epochs=0", "epochs=0"),
        ("device=tpu", "device=tpu"),
    ],
)
def test_validate_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(compose_config([override]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["bits=9"], "bits=9 is not allowed for dorefa; allowed: 1..8"),
        (["bits=0"], "bits=0 is not allowed for dorefa; allowed: 1..8"),
        (["quant=bwn_f", "bits=2"], "bits=2 is not allowed for bwn_f; allowed: 1"),
        # no quantizer to ask: bits only names the run (w<bits>)
        (["quant=none", "bits=9"], "bits=9 is not allowed; allowed: an integer in 1..8"),
        (["quant=none", "bits=0"], "bits=0 is not allowed; allowed: an integer in 1..8"),
    ],
)
def test_check_rejects_bits_the_quantizer_does_not_take(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(Exception) as info:
        check(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert str(find_config_error(info.value)) == message


@pytest.mark.parametrize("meta", ["multifc", "lstmfc"])
def test_a_run_from_before_meta_net_targets_resumes(tmp_path, meta):
    """mq <= 0.6.0 wrote meta.net: NAME next to meta.hidden_size ...; such a run folder is the
    same run as today's meta.net: {_target_: ..., hidden_size: ...} (the resume check agrees)."""
    from mq.job.identity import check_run_dir, result_config

    cfg = compose_config([f"meta={meta}", "meta.net.hidden_size=7"])
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    old = result_config(task)
    net = old["meta"].pop("net")
    old["meta"].update({k: v for k, v in net.items() if k != "_target_"}, net=meta)
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert check_run_dir(task, tmp_path) == {}
    old["meta"]["hidden_size"] = 8  # another run: still refused, naming the key
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"meta.net.hidden_size: 8 -> 7"):
        check_run_dir(task, tmp_path)


@pytest.mark.parametrize("quant", options("quant"))
@pytest.mark.parametrize("act", options("act"))
def test_every_act_option_instantiates_with_every_quantizer_or_refuses_quant_none(act, quant):
    from mq.job.tasks import build_quantized

    cfg = compose_config([f"act={act}", f"quant={quant}", "meta=ste"])
    validate(cfg)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    if quant == "none" and act != "none":
        with pytest.raises(Exception) as err:
            check(task)
        assert str(find_config_error(err.value)) == (
            f"act={act} needs quantized weights but quant=none; allowed with quant=none: act=none"
        )
        return
    check(task)
    model = build_quantized(cfg, instantiate(cfg.model))
    assert isinstance(model, QuantizedModel) == (quant != "none")
    assert hasattr(model, "act") == (act != "none")
    step = instantiate(cfg.meta, model=model, optimizer=instantiate(cfg.optimizer))
    loss, _ = step.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss)
