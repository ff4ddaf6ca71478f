"""The contract every quantizer of conf/quant/ keeps, found in conf/ (not listed here): a new
quantizer (its class and its YAML) is tested without editing this file.

MetaQuant and the STE quantize all layers at once, as one flat vector (mq.quant.flat), so a
quantizer that takes a max or a mean without its ``layout`` silently computes one constant for
the whole model. The contract: on a real model, the flat result equals the layer-by-layer one
for the values, the STE gradients and the calibration, at the lowest and the highest bit width
the quantizer declares (``bit_widths``, which its constructor checks); bit widths outside them
are refused with a one-line ``bits=`` error; a ``launch.py`` smoke run trains with each
quantizer. Constructor keys come from the YAML as written (``quant.KEY=...`` options added there
are covered too)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import SMOKE, allowed_bits, build_quantizer, compose_config, launch
from hydra.utils import get_class

from mq.cli.conf import options
from mq.core.errors import ConfigError
from mq.models import build_model
from mq.quant import quantize_model
from mq.quant.activations import ActQuantizer
from mq.quant.layers import act_state_dict, load_act_state

QUANTS = [q for q in options("quant") if compose_config([f"quant={q}"]).quant.get("_target_")]


@pytest.mark.parametrize("quant", QUANTS)
def test_bits_outside_the_quantizers_range_are_refused_in_one_line(quant):
    allowed = allowed_bits(quant)  # the quantizer's own bit_widths: its constructor checks them
    assert len(allowed) and allowed.step == 1, f"quant={quant}: bit_widths={allowed}"
    assert allowed[0] >= 1, f"quant={quant}: bit_widths={allowed}"  # 0 bits hold no weight
    for bits in allowed:
        build_quantizer(quant, bits)
    for bits in (allowed[0] - 1, allowed[-1] + 1, -1):
        with pytest.raises(ConfigError) as info:
            build_quantizer(quant, bits)
        message = str(info.value)
        assert message.startswith(f"bits={bits} is not allowed") and "allowed: " in message
        assert "\n" not in message


def _contract_cases() -> list:
    return [
        pytest.param(q, b, id=f"{q}-w{b}")
        for q in QUANTS
        for b in sorted({allowed_bits(q)[0], allowed_bits(q)[-1]})
    ]


@pytest.mark.parametrize(("quant", "bits"), _contract_cases())
def test_flat_equals_layer_by_layer_values_gradients_and_calibration(quant, bits):
    torch.manual_seed(0)
    # ResNet20: 22 layers of different scales, channels-last convs and an fc layer
    model = quantize_model(build_model("resnet20", 10), build_quantizer(quant, bits))
    quantizer, layout = model.weight_quant, model.layout()
    params = model.quantized_weights()
    flat = model.quantize_weights()  # every layer at once, as training does
    upstream = {n: torch.randn_like(w) for n, w in flat.items()}
    sum((flat[n] * upstream[n]).sum() for n in flat).backward()
    flat_grads = {n: p.grad.clone() for n, p in params.items()}
    with torch.no_grad():
        calibration = quantizer.calibration(layout.flatten(list(params.values())), layout)
    calibrations = model.named(layout.unflatten(calibration)) if calibration is not None else {}
    model.zero_grad()
    for name, w in params.items():
        w_hat = quantizer(w)  # one layer on its own
        torch.testing.assert_close(flat[name], w_hat, msg=f"{quant} values, {name}")
        (w_hat * upstream[name]).sum().backward()
        torch.testing.assert_close(flat_grads[name], w.grad, msg=f"{quant} STE grads, {name}")
        with torch.no_grad():
            alone = quantizer.calibration(w)
        assert (alone is None) == (calibration is None), f"{quant} calibration, {name}"
        if alone is not None:
            torch.testing.assert_close(calibrations[name], alone, msg=f"{quant} calib, {name}")


@pytest.mark.slow  # 10-20 s on 2 shared cores; test_launch's fast test launches dorefa and none
def test_launch_trains_with_every_quantizer(tmp_path):
    # One sweep (one process) per lowest allowed bit width, usually one: a job per quantizer,
    # full precision (none) included.
    by_bits: dict[int, list[str]] = {}
    for quant in QUANTS:
        by_bits.setdefault(allowed_bits(quant)[0], []).append(quant)
    by_bits.setdefault(1, []).append("none")
    for bits, quants in by_bits.items():
        result = launch(
            "-m", f"quant={','.join(quants)}", f"bits={bits}", "meta=ste", *SMOKE,
            "limit_train_batches=1", "limit_test_batches=1", "batch_size=8",
            "hydra.sweep.dir=sweep", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(d.name for d in (tmp_path / "sweep").iterdir() if d.is_dir())
    assert len(names) == len(options("quant")), names
    for quant in options("quant"):
        (run_dir,) = [tmp_path / "sweep" / n for n in names if f"quant={quant}," in f"{n},"]
        assert '"status": "completed"' in (run_dir / "summary.json").read_text(), quant


@pytest.mark.parametrize(("quant", "bits"), _contract_cases())
def test_unit_levels_are_the_levels_on_0_1_flat_as_layer_by_layer(quant, bits):
    """The estimators' domain (mq.meta.estimator): x_q on the 2^k levels j / (2^k - 1), x on
    [0, 1] wherever the STE passes gradient, W^ on the same side of 0 as 2 x_q - 1; the STE is
    ``slope`` times its clip."""
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20", 10), build_quantizer(quant, bits))
    quantizer, layout = model.weight_quant, model.layout()
    params = list(model.quantized_weights().values())
    with torch.no_grad():
        w_tilde = quantizer.transform(layout.flatten(params), layout)
        levels = quantizer.unit_levels(w_tilde, layout)
    if levels is None:
        pytest.skip(f"quant={quant} has no unit levels: the estimators refuse it")
    x, x_q = levels
    n = 2**bits - 1
    torch.testing.assert_close(x_q * n, (x_q * n).round(), rtol=0, atol=1e-4)  # float32 levels
    assert 0 <= x_q.min() and x_q.max() <= 1
    w_tilde.requires_grad_()
    w_hat = quantizer.quantize(w_tilde, layout)
    (ste,) = torch.autograd.grad(w_hat, w_tilde, torch.ones_like(w_hat))
    slope = quantizer.slope(w_tilde.detach(), layout)  # what an estimator multiplies
    clipped = slope * torch.ones_like(w_hat) * (w_tilde.detach().abs() <= 1)
    torch.testing.assert_close(ste, clipped, msg=f"{quant}: slope * 1{{|W~| <= 1}} is the STE")
    passing = ste != 0
    assert passing.any() and 0 <= x[passing].min() and x[passing].max() <= 1
    nonzero = w_hat.detach() != 0
    assert (w_hat.detach() * (2 * x_q - 1))[nonzero].min() > 0
    for w, xs, qs in zip(params, layout.unflatten(x), layout.unflatten(x_q), strict=True):
        with torch.no_grad():
            alone = quantizer.unit_levels(quantizer.transform(w))
        assert alone is not None
        torch.testing.assert_close(xs, alone[0])
        torch.testing.assert_close(qs, alone[1])


# Activation quantizers (conf/act/, mq.quant.activations), found in conf/ like the weight ones.
ACTS = [a for a in options("act") if compose_config([f"act={a}"]).act.get("_target_")]


def _act(act: str, act_bits: int):
    from hydra.utils import instantiate

    from mq.core.errors import find_config_error

    cfg = copy.deepcopy(_act_config(act))
    cfg.act_bits = act_bits
    try:
        return instantiate(cfg.act)
    except Exception as exc:
        error = find_config_error(exc)
        if error is None:
            raise
        raise error from exc


@functools.cache
def _act_config(act: str):
    return compose_config([f"act={act}"])


@pytest.mark.parametrize("act", ACTS)
def test_act_bits_outside_the_act_quantizers_range_are_refused_in_one_line(act):
    allowed = get_class(_act_config(act).act._target_).bit_widths
    assert len(allowed) and allowed.step == 1 and allowed[0] >= 1, f"act={act}: {allowed}"
    for bits in allowed:
        assert isinstance(_act(act, bits), ActQuantizer)
    for bits in (allowed[0] - 1, allowed[-1] + 1, -1):
        with pytest.raises(ConfigError) as info:
            _act(act, bits)
        message = str(info.value)
        assert message.startswith(f"act_bits={bits} is not allowed for {act}; allowed: ")
        assert "\n" not in message


@pytest.mark.parametrize("act", ACTS)
def test_an_act_quantizer_hooks_every_conv_but_the_first_and_its_state_travels(act):
    """Each conv input but the first goes through its own copy (a different output from the
    full-precision model's there); act_state_dict into a fresh model gives the same outputs."""
    bits = get_class(_act_config(act).act._target_).bit_widths[-1]
    torch.manual_seed(0)
    net = build_model("resnet20", 10)
    build = functools.partial(quantize_model, weight_quant=build_quantizer("dorefa", 1))
    model = build(copy.deepcopy(net), act_quant=_act(act, bits))
    plain = build(copy.deepcopy(net))
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert model.act_inputs == convs[1:] and len(model.act) == len(convs) - 1
    assert len({id(q) for q in model.act}) == len(model.act)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == plain(x).shape and not torch.equal(out, plain(x))
    out.sum().backward()
    for p in model.act.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    fresh = build(copy.deepcopy(net), act_quant=_act(act, bits))
    load_act_state(fresh, act_state_dict(model), "test")
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
