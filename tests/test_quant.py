"""Quantizer values and straight-through gradients (dorefa at 1, 2, 4 bits; BWN)."""

import pytest
import torch

from mq.errors import ConfigError
from mq.quant import BWNWeight, DorefaWeight
from mq.quant.functions import dorefa_calibration, dorefa_transform


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_values_are_the_2k_levels(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 16, 3, 3)
    q = DorefaWeight(bits)
    w_hat = q(w)
    levels = 2 * torch.arange(2**bits) / (2**bits - 1) - 1
    # every value is one of the 2^k levels in [-1, 1] ...
    assert torch.isin(w_hat, levels).all()
    # ... namely the one DoReFa's formula gives, computed independently here
    t = torch.tanh(w)
    w_tilde = t / (2 * t.abs().max()) + 0.5
    expected = 2 * torch.round(w_tilde * (2**bits - 1)) / (2**bits - 1) - 1
    torch.testing.assert_close(w_hat, expected)
    if bits == 1:
        assert set(w_hat.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_ste_gradient_is_autograd_of_transform(bits):
    torch.manual_seed(1)
    w = torch.randn(8, 4, requires_grad=True)
    upstream = torch.randn(8, 4)
    DorefaWeight(bits)(w).backward(upstream)
    # W~ lies in [0, 1] so the clip never bites: g_W = g_W^ * dA/dW (max held constant)
    t = torch.tanh(w.detach())
    true_derivative = (1 - t**2) / (2 * t.abs().max())
    torch.testing.assert_close(w.grad, upstream * true_derivative)
    # the MetaQuant calibration is twice that, as in the paper and the original code
    torch.testing.assert_close(dorefa_calibration(w), 2 * true_derivative)


def test_dorefa_transform_range():
    w = torch.randn(1000) * 5
    w_tilde = dorefa_transform(w)
    assert w_tilde.min() >= 0 and w_tilde.max() <= 1


@pytest.mark.parametrize("per_filter", [False, True])
def test_bwn_values_and_clipped_ste(per_filter):
    w = torch.tensor([[0.5, -2.0, 0.25, -0.25], [1.5, 0.1, -0.3, 0.2]], requires_grad=True)
    w_hat = BWNWeight(1, per_filter=per_filter)(w)
    if per_filter:
        scale = w.detach().abs().mean(dim=1, keepdim=True)
    else:
        scale = w.detach().abs().mean()
    torch.testing.assert_close(w_hat, scale * torch.sign(w.detach()))
    upstream = torch.arange(1.0, 9.0).view(2, 4)
    w_hat.backward(upstream)
    # clipped STE: zero where |W~| = |W| > 1; the scale takes no gradient
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(w.grad, upstream * mask)
    assert BWNWeight().calibration(w) is None


def test_bad_bit_widths_are_config_errors():
    with pytest.raises(ConfigError, match="bits=9"):
        DorefaWeight(9)
    with pytest.raises(ConfigError, match="bits=0"):
        DorefaWeight(0)
    with pytest.raises(ConfigError, match="bits=2 is not allowed for bwn"):
        BWNWeight(2)
