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

import pytest
import torch
from conftest import SMOKE, allowed_bits, build_quantizer, compose_config, launch

from mq.cli.conf import options
from mq.core.errors import ConfigError
from mq.models import build_model
from mq.quant import quantize_model

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
