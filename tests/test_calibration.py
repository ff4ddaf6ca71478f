"""quant.calibration (the step-size ablation): ``exact`` is the true derivative of the
transform A, ``paper`` twice it for DoReFa (the factor the paper's code uses); both checked
against autograd through A, per tensor and on the flat vector of several layers."""

import pytest
import torch

from mq.core.errors import ConfigError
from mq.quant import BWNWeight, DorefaWeight
from mq.quant.flat import FlatLayout


def _autograd_dA(quantizer, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise dA/dW by autograd (A is elementwise once its max is held constant, as the
    transform holds it, so the gradient of sum(A) is the diagonal)."""
    ws = [w.detach().clone().requires_grad_() for w in weights]
    total = sum(quantizer.transform(w).sum() for w in ws)
    return list(torch.autograd.grad(total, ws))


@pytest.mark.parametrize("calibration,factor", [("exact", 1.0), ("paper", 2.0)])
def test_dorefa_calibration_against_autograd(calibration, factor):
    torch.manual_seed(0)
    weights = [0.7 * torch.randn(8, 4, 3, 3), 1.5 * torch.randn(10, 16)]
    q = DorefaWeight(1, calibration=calibration)
    expected = _autograd_dA(q, weights)
    for w, grad in zip(weights, expected, strict=True):
        torch.testing.assert_close(q.calibration(w), factor * grad)
    # the flat path (all layers as one vector, per-layer max) gives the same per layer
    layout = FlatLayout(weights)
    flat = q.calibration(layout.flatten(weights), layout)
    for part, grad in zip(layout.unflatten(flat), expected, strict=True):
        torch.testing.assert_close(part, factor * grad)


@pytest.mark.parametrize("calibration", ["exact", "paper"])
def test_bwn_calibration_is_the_identitys_derivative(calibration):
    w = torch.randn(6, 5)
    q = BWNWeight(calibration=calibration)
    (grad,) = _autograd_dA(q, [w])
    assert torch.equal(grad, torch.ones_like(w))
    assert q.calibration(w) is None  # None means 1: the exact derivative, for both settings


def test_paper_is_twice_exact_and_default():
    w = torch.randn(20)
    paper, exact = DorefaWeight(2).calibration(w), DorefaWeight(2, calibration="exact")
    torch.testing.assert_close(paper, 2 * exact.calibration(w))


def test_bad_calibration_is_a_config_error():
    with pytest.raises(ConfigError, match="quant.calibration=twice is not known; allowed: paper"):
        DorefaWeight(1, calibration="twice")
    with pytest.raises(ConfigError, match="quant.calibration"):
        BWNWeight(calibration="x")


def _first_moves(ste_quant, meta_quant, lr=0.05):
    """How far one SGD step moves the quantized weights: STE's first step, and MetaQuant's
    first update (the identity meta net; its step 1 moves by step 0's gradient), both from the
    same weights on the same batch."""
    import copy

    from mq.meta import IdentitySTE, MetaQuantStep, STEStep
    from mq.models import build_model
    from mq.quant import quantize_model

    torch.manual_seed(0)
    base = build_model("resnet20", 10)
    models = [quantize_model(copy.deepcopy(base), q) for q in (ste_quant, meta_quant)]
    sgd = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    ste = STEStep(models[0], sgd)
    meta = MetaQuantStep(models[1], sgd, net=IdentitySTE())
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    other = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    flat = [m.layout().flatten(list(m.quantized_weights().values())).detach() for m in models]
    ste.train_step(*batch)
    meta.train_step(*batch)
    meta.train_step(*other)
    moved = [
        m.layout().flatten(list(m.quantized_weights().values())).detach() - f
        for m, f in zip(models, flat, strict=True)
    ]
    assert moved[0].abs().sum() > 0
    return moved


def test_exact_calibration_halves_metaquants_step():
    """DoReFa under SGD: MetaQuant with the paper's calibration and the identity meta net
    steps exactly as far as STE at the same lr; with quant.calibration=exact half as far. So
    STE at 2x lr takes MetaQuant-paper's step (the step_size preset)."""
    ste, paper = _first_moves(DorefaWeight(1), DorefaWeight(1))
    torch.testing.assert_close(paper, ste)
    ste, exact = _first_moves(DorefaWeight(1), DorefaWeight(1, calibration="exact"))
    torch.testing.assert_close(exact, ste / 2)


def test_unit_slope_bwn_ste_is_metaquants_step():
    """BWN under SGD: STE with quant.ste_slope=unit (each layer's step scaled by 1/alpha)
    steps exactly as far as MetaQuant with the identity meta net (the step_size_bwn preset);
    the paper's STE (slope alpha) does not."""
    unit, meta = _first_moves(BWNWeight(ste_slope="unit"), BWNWeight())
    torch.testing.assert_close(unit, meta)
    forward, meta = _first_moves(BWNWeight(), BWNWeight())
    assert not torch.allclose(forward, meta)
