"""quant.calibration (issue 10's step-size ablation): ``exact`` is the true derivative of the
transform A, ``paper`` twice it for DoReFa (the factor the paper's code uses); both checked
against autograd through A, per tensor and on the flat vector of several layers."""

import pytest
import torch

from mq.errors import ConfigError
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
