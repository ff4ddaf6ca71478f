"""Activation quantization (the act group, mq.quant.activations): each quantizer's forward and
gradients against a hand computation of its paper's formulas (float64), the pre-hooks reach the
input of every conv but the first under every meta step, act=none leaves the model as it was
(no hook, no parameter, the same numbers and run name), the learned alpha and s are trained and
carried through a checkpoint and a resume, a folder from before the act group resumes, and bad
input ends in one line with nothing written."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from conftest import SMOKE, compose_config, kill_when, launch, rows_in_epoch, task_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from mq.cli.conf import option_file, options, upgrade
from mq.core.errors import ConfigError
from mq.job.identity import check_run_dir, result_config
from mq.job.tasks import build_act_quantizer, build_quantized
from mq.meta import STEStep
from mq.models import build_model
from mq.quant import DorefaWeight, QuantizedModel, quantize_model
from mq.quant.activations import LSQActivation, PACTActivation, SignActivation

ACTS = [a for a in options("act") if option_file("act", a).get("_target_")]
SGD = functools.partial(torch.optim.SGD, lr=0.05)


def act_quantizer(option: str, act_bits: int):
    cfg = compose_config([f"act={option}", f"act_bits={act_bits}"])
    return build_act_quantizer(cfg)


def test_the_act_options_are_found_in_conf_act():
    assert options("act") == ["lsq", "none", "pact", "sign"]
    assert compose_config([]).act.get("_target_") is None  # act=none is the default


def test_sign_forward_is_sign_and_backward_the_clipped_ste():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5], dtype=torch.float64)
    x.requires_grad_()
    g = torch.arange(1.0, 8.0, dtype=torch.float64)
    y = SignActivation(1)(x)
    y.backward(g)
    assert y.tolist() == [-1, -1, -1, 0, 1, 1, 1]
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 0]  # g where |x| <= 1


def test_pact_forward_and_the_gradients_of_x_and_alpha_are_the_papers():
    """y = clip(x, 0, alpha), y_q = round(y (2^k-1)/alpha) alpha/(2^k-1); dy_q/dx =
    1{0 <= x <= alpha}, dy_q/dalpha = 1{x >= alpha}; the L2 term adds 2 decay alpha."""
    act = PACTActivation(2, alpha_init=1.5, alpha_decay=0.01).double()
    x = torch.tensor([-1.0, 0.0, 0.2, 0.3, 0.8, 1.4, 1.5, 2.0], dtype=torch.float64)
    x.requires_grad_()
    g = torch.arange(1.0, 9.0, dtype=torch.float64)
    y = act(x)
    y.backward(g)
    # levels 0, 0.5, 1, 1.5: 0.2 -> 0, 0.3 -> 0.5 (0.6 rounds up), 0.8 -> 1 (1.6), 1.4 -> 1.5
    assert y.tolist() == [0, 0, 0, 0.5, 1.0, 1.5, 1.5, 1.5]
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 7, 0]
    assert act.alpha.grad.item() == pytest.approx(7 + 8 + 2 * 0.01 * 1.5, abs=1e-12)


def test_lsq_forward_and_the_gradients_of_x_and_s_are_the_papers():
    """v^ = round(clip(v/s, 0, Q_P)) s; dv^/dv = 1 inside (0, Q_P), 0 beyond; dv^/ds =
    round(v/s) - v/s inside, Q_P above, 0 below, times g = 1/sqrt(N Q_P)."""
    act = LSQActivation(2).double()  # Q_P = 3
    with torch.no_grad():
        act.step.fill_(0.5)
        act.initialized.fill_(True)
    act._ready = None  # as after load_state_dict
    v = torch.tensor([0.1, 0.3, 0.6, 1.2, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    y = act(v)
    y.backward(g)
    assert y.tolist() == [0, 0.5, 0.5, 1.0, 1.5]  # v/s = 0.2, 0.6, 1.2, 2.4, 4 (clipped to 3)
    assert v.grad.tolist() == [1, 2, 3, 4, 0]
    ratio = [0.2, 0.6, 1.2, 2.4]
    ds = [round(r) - r for r in ratio] + [3.0]
    expected = sum(gi * di for gi, di in zip(g.tolist(), ds, strict=True)) / math.sqrt(5 * 3)
    assert act.step.grad.item() == pytest.approx(expected, abs=1e-12)
    assert act.step.item() == 0.5  # not initialised again


def test_lsq_initialises_s_from_the_first_batch_as_the_paper():
    act = LSQActivation(3).double()
    x = torch.rand(4, 8, 5, 5, dtype=torch.float64) * 3
    act(x)
    assert act.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-12)
    assert bool(act.initialized)
    act(x * 10)  # the second batch changes nothing
    assert act.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-12)


def _conv_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every conv's input as the conv sees it, recorded by a pre-hook set after the model's."""
    seen: dict[str, torch.Tensor] = {}
    for name, m in model.net.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda _m, args, n=name: seen.__setitem__(n, args[0]))
    return seen


@pytest.mark.parametrize("act", ACTS)
def test_the_hook_quantizes_every_conv_input_but_the_first(act):
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20", 10), DorefaWeight(1), act_quantizer(act, 1))
    seen = _conv_inputs(model)
    x = torch.randn(4, 3, 32, 32)
    model(x)  # the functional_call forward every meta step uses
    names = list(seen)
    assert len(names) == 21 and model.act_inputs == names[1:] and len(model.act) == 20
    torch.testing.assert_close(seen[names[0]], x.contiguous(memory_format=torch.channels_last))
    for name in names[1:]:  # 1 bit: sign {-1, 0, 1}; pact, lsq {0, alpha or s}
        assert len(seen[name].unique()) <= 3, (act, name)
    assert len(seen[names[1]].unique()) < len(seen[names[0]].unique())


@pytest.mark.parametrize("act", ["pact", "lsq"])
@pytest.mark.parametrize("meta", ["ste", "multifc", "ewgs", "ede"])
def test_every_meta_step_trains_the_learned_clip_or_step(act, meta):
    torch.manual_seed(0)
    cfg = compose_config([f"act={act}", "act_bits=2", f"meta={meta}", "optimizer.lr=0.05"])
    model = build_quantized(cfg, build_model("resnet20", 10))
    step = instantiate(cfg.meta, model=model, optimizer=instantiate(cfg.optimizer))
    params = list(model.act.parameters())
    assert {id(p) for p in params} <= {
        id(p) for g in step.other_optimizer.param_groups for p in g["params"]
    }
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    step.train_step(x, y)  # lsq: initialises s
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        loss, _ = step.train_step(x, y)
        assert torch.isfinite(loss)
    moved = [not torch.equal(p, q) for p, q in zip(params, before, strict=True)]
    assert sum(moved) >= len(params) // 2, moved


def test_act_none_leaves_the_model_as_it_was():
    """No hook, no parameter, the same state dict and bit-identical steps as a model built
    without an activation quantizer (mq before the act group); the run name is unchanged."""
    torch.manual_seed(0)
    net = build_model("resnet20", 10)
    cfg = compose_config(["act=none"])
    assert build_act_quantizer(cfg) is None and cfg.run_name == "resnet20-dorefa-w1-multifc-sgd-s0"
    models = [
        build_quantized(cfg, copy.deepcopy(net)),
        QuantizedModel(copy.deepcopy(net), DorefaWeight(1)),
    ]
    for model in models:
        assert not any(m._forward_pre_hooks for m in model.modules())
        assert not hasattr(model, "act") and model.act_inputs == []
    assert list(models[0].state_dict()) == list(models[1].state_dict())
    steps = [STEStep(m, SGD) for m in models]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        a, b = (s.train_step(x, y)[0] for s in steps)
        assert torch.equal(a, b)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["act=lsq", "act_bits=2"], "resnet20-dorefa-w1-a2-lsq-multifc-sgd-s0"),
        (["act=pact", "act_bits=4", "meta=ste"], "resnet20-dorefa-w1-a4-pact-ste-sgd-s0"),
        (["act=sign", "quant=bwn"], "resnet20-bwn-w1-a1-sign-multifc-sgd-s0"),
        (["act=none", "act_bits=3"], "resnet20-dorefa-w1-multifc-sgd-s0"),
    ],
)
def test_run_name_says_act_and_act_bits_unless_none(overrides, name):
    assert compose_config(overrides).run_name == name


def test_a_folder_from_before_the_act_group_is_the_act_none_run(tmp_path):
    task = task_config(["meta=ste"])
    old = result_config(task)
    assert "act_bits" not in old and old.pop("act") == {"_target_": None}
    assert upgrade(copy.deepcopy(old)) == result_config(task)
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert check_run_dir(task, tmp_path) == {}
    assert check_run_dir(task_config(["meta=ste", "act_bits=4"]), tmp_path) == {}
    with pytest.raises(ConfigError, match=r"act._target_: None -> mq.quant.activations.LSQ"):
        check_run_dir(task_config(["meta=ste", "act=lsq"]), tmp_path)


def test_act_state_goes_with_the_model_state_and_is_refused_elsewhere():
    from mq.quant.layers import act_state_dict, load_act_state

    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20", 10), DorefaWeight(1), PACTActivation(2))
    with torch.no_grad():
        model.act[3].alpha.fill_(2.5)
    state = act_state_dict(model)
    fresh = quantize_model(build_model("resnet20", 10), DorefaWeight(1), PACTActivation(2))
    load_act_state(fresh, state, "x")
    assert fresh.act[3].alpha.item() == 2.5
    lsq = quantize_model(build_model("resnet20", 10), DorefaWeight(1), LSQActivation(2))
    with pytest.raises(ConfigError, match="another act choice"):
        load_act_state(lsq, state, "x")
    with pytest.raises(ConfigError, match="holds no activation quantizer state"):
        load_act_state(lsq, None, "x")


def test_launch_trains_with_every_act_option(tmp_path):
    result = launch(
        "-m", "act=glob(*)", "meta=ste", *SMOKE, "limit_train_batches=2", "limit_test_batches=1",
        "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for act in options("act"):
        (run_dir,) = (tmp_path / "sweep").glob(f"act={act}*")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", act
        state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        if act in ("pact", "lsq"):
            assert state["act"] is not None and len(state["act"]) >= 20, act
        if act == "pact":  # trained: no longer the initial 10
            assert any(v.item() != 10.0 for k, v in state["act"].items() if k.endswith("alpha"))
        if act == "none":
            assert state["act"] is None


def _kill_in_second_epoch(args: list[str], cwd, run_dir) -> None:
    kill_when(args, cwd, lambda: rows_in_epoch(run_dir, 2) >= 1)


ARGS = ["dataset=fake", "logger=none", "progress=false", "batch_size=32", "epochs=2"]
ARGS += ["limit_test_batches=1", "log_every=1", "meta=ste", "keep_training_state=true"]


@pytest.mark.slow  # a training run killed and relaunched: 20-30 s
def test_a_resumed_lsq_run_continues_as_an_uninterrupted_one(tmp_path):
    """s and its initialised flag are saved in checkpoint.pt: the run killed in its second
    epoch ends with the same step sizes and accuracies as the one never stopped."""
    args = [*ARGS, "act=lsq", "act_bits=2"]
    killed = tmp_path / "outputs/quantize/fake/killed"
    _kill_in_second_epoch([*args, "run_name=killed"], tmp_path, killed)
    again = launch(*args, "run_name=killed", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at epoch 2" in again.stdout + again.stderr
    whole = launch(*args, "run_name=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    runs = [tmp_path / "outputs/quantize/fake" / n for n in ("killed", "whole")]
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True)["act"] for r in runs)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    accs = [json.loads((r / "summary.json").read_text())["test_acc"] for r in runs]
    assert accs[0] == accs[1]


def test_a_run_folder_from_before_the_act_group_resumes(tmp_path):
    """A run killed in its second epoch, its config.yaml rewritten as mq wrote it before the
    act group (no act node): the relaunch resumes it from its checkpoint."""
    args = [a for a in ARGS if a != "keep_training_state=true"] + ["run_name=old"]
    run_dir = tmp_path / "outputs/quantize/fake/old"
    _kill_in_second_epoch(args, tmp_path, run_dir)
    saved = run_dir / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(saved))
    assert config.pop("act") == {"_target_": None} and "act_bits" not in config
    OmegaConf.save(OmegaConf.create(config), saved)
    again = launch(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at epoch 2" in again.stdout + again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["test_acc"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["act=lsq", "act_bits=9"], "act_bits=9 is not allowed for lsq; allowed: 1..8"),
        pytest.param(
            ["act=pact", "act_bits=0"],
            "act_bits=0 is not allowed for pact; allowed: 1..8",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["act=sign", "act_bits=2"],
            "act_bits=2 is not allowed for sign; allowed: 1",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["act=none", "act_bits=9"],
            "act_bits=9 is not allowed; allowed: an integer in 1..8",
            marks=pytest.mark.slow,
        ),
        (
            ["act=lsq", "quant=none"],
            "act=lsq needs quantized weights but quant=none; allowed with quant=none: act=none",
        ),
        pytest.param(
            ["act=pact", "act.alpha_init=0"],
            "act.alpha_init=0.0 is not allowed",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_act_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message):
    result = launch(*args, *SMOKE, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"error: {message}" or lines[-1].startswith(f"error: {message}")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # a training run killed and relaunched: 20-30 s
def test_eval_of_an_act_run_tests_its_trained_alpha_and_s(tmp_path):
    """task=eval loads the run's activation quantizers with its weights: the same test accuracy
    as the run's last epoch; a checkpoint without them is refused in one line."""
    args = ["act=lsq", "act_bits=2", "meta=ste", *SMOKE, "limit_train_batches=2", "run_name=r"]
    trained = launch(*args, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "outputs/quantize/fake/r"
    final = json.loads((run_dir / "summary.json").read_text())["final_test_acc"]
    common = ["task=eval", "dataset=fake", "logger=none", "progress=false", "limit_test_batches=2"]
    evaluated = launch(
        *common, "act=lsq", "act_bits=2", f"model.pretrained={run_dir}", cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (eval_dir,) = (tmp_path / "outputs/eval/fake").iterdir()
    assert eval_dir.name.startswith("resnet20-dorefa-w1-a2-lsq-s0-r-")
    assert json.loads((eval_dir / "summary.json").read_text())["final_test_acc"] == final
    fp = launch(*args[:-1], "act=none", "run_name=fp", cwd=tmp_path)
    assert fp.returncode == 0, fp.stderr[-3000:]
    refused = launch(
        *common, "act=lsq", f"model.pretrained={tmp_path}/outputs/quantize/fake/fp", cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = [line for line in refused.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: task=eval act=lsq needs model.pretrained from a run trained")
