"""Quantizer values and straight-through gradients (dorefa at 1, 2, 4 bits; BWN)."""

import pytest
import torch

from mq.core.errors import ConfigError
from mq.quant import BWNWeight, DorefaWeight
from mq.quant.functions import dorefa_calibration, dorefa_transform


def make(quant: str, **kwargs):
    if quant.startswith("dorefa"):
        return DorefaWeight(int(quant[6:]), **kwargs)
    return BWNWeight(per_filter=quant == "bwn_f", **kwargs)


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


def _surrogate(quant: str, w: torch.Tensor) -> torch.Tensor:
    """The quantizer's forward with round/sign replaced by the identity and its scale held
    constant: the function whose autograd gradient the straight-through estimator is."""
    if quant.startswith("dorefa"):
        t = torch.tanh(w)
        return 2 * (t / (2 * t.abs().max().detach()) + 0.5) - 1
    if quant == "bwn_f" and w.dim() > 2:
        return w.detach().abs().mean(dim=(1, 2, 3), keepdim=True) * w
    return w.detach().abs().mean() * w


@pytest.mark.parametrize("quant", ["dorefa1", "dorefa2", "dorefa4", "bwn", "bwn_f"])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 64)])
def test_ste_gradient_carries_the_forward_slope(quant, shape):
    torch.manual_seed(1)
    w = (0.8 * torch.randn(*shape)).requires_grad_()
    quantizer = make(quant)
    upstream = torch.randn(*shape)
    quantizer(w).backward(upstream)
    (expected,) = torch.autograd.grad(_surrogate(quant, w), w, upstream)
    # the clip gate: W~ = W for BWN (some |W| > 1 here), W~ in [0, 1] for DoReFa (never bites)
    gate = (quantizer.transform(w.detach()).abs() <= 1).float()
    assert quant.startswith("dorefa") or gate.min() == 0
    torch.testing.assert_close(w.grad, expected * gate)
    # ste_slope=unit drops the slope: g_W~ = g_W^ * gate, whatever the scale
    w.grad = None
    make(quant, ste_slope="unit")(w).backward(upstream)
    w_tilde = quantizer.transform(w)
    (unit,) = torch.autograd.grad(w_tilde, w, upstream * gate)
    torch.testing.assert_close(w.grad, unit)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_ste_gradient_is_the_calibration(bits):
    """DoReFa's STE chain, slope 2 times dA/dW, is exactly MetaQuant's calibration (which the
    paper writes as (1 - tanh^2 W) / max|tanh W|): an identity meta net reproduces STE."""
    torch.manual_seed(1)
    w = torch.randn(8, 4, requires_grad=True)
    upstream = torch.randn(8, 4)
    DorefaWeight(bits)(w).backward(upstream)
    t = torch.tanh(w.detach())
    torch.testing.assert_close(w.grad, upstream * (1 - t**2) / t.abs().max())
    torch.testing.assert_close(dorefa_calibration(w), (1 - t**2) / t.abs().max())


def test_dorefa_transform_range():
    w = torch.randn(1000) * 5
    w_tilde = dorefa_transform(w)
    assert w_tilde.min() >= 0 and w_tilde.max() <= 1


@pytest.mark.parametrize("per_filter", [False, True])
def test_bwn_values_and_clipped_ste(per_filter):
    w = torch.tensor([[0.5, -2.0, 0.25, -0.25], [1.5, 0.1, -0.3, 0.2]]).view(2, 4, 1, 1)
    w.requires_grad_()
    w_hat = BWNWeight(1, per_filter=per_filter)(w)
    if per_filter:
        scale = torch.tensor([3.0 / 4, 2.1 / 4]).view(2, 1, 1, 1)
    else:
        scale = torch.tensor(5.1 / 8)
    torch.testing.assert_close(w_hat, scale * torch.sign(w.detach()))
    upstream = torch.arange(1.0, 9.0).view(2, 4, 1, 1)
    w_hat.backward(upstream)
    # clipped STE times the slope alpha: zero where |W~| = |W| > 1; alpha takes no gradient
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]).view(2, 4, 1, 1)
    torch.testing.assert_close(w.grad, scale * upstream * mask)
    assert BWNWeight().calibration(w) is None


def test_bwn_f_keeps_one_scale_for_a_linear_weight():
    """The released code's BWN-F scales each conv filter but the fc layer as a whole."""
    w = torch.tensor([[0.5, -2.0], [1.5, 0.1]])
    for per_filter in (False, True):
        torch.testing.assert_close(
            BWNWeight(per_filter=per_filter)(w), torch.tensor(4.1 / 4) * torch.sign(w)
        )


def test_bad_ste_slope_is_a_config_error():
    with pytest.raises(ConfigError, match="quant.ste_slope=one is not known; allowed: forward"):
        DorefaWeight(1, ste_slope="one")
    with pytest.raises(ConfigError, match="quant.ste_slope=2"):
        BWNWeight(ste_slope=2)


def test_bad_bit_widths_are_config_errors():
    with pytest.raises(ConfigError, match="bits=9"):
        DorefaWeight(9)
    with pytest.raises(ConfigError, match="bits=0"):
        DorefaWeight(0)
    with pytest.raises(ConfigError, match="bits=2 is not allowed for bwn"):
        BWNWeight(2)


@pytest.mark.parametrize("quant", ["dorefa", "bwn", "bwn_f"])
def test_a_run_from_before_the_slope_change_is_not_resumed(quant, tmp_path):
    """Runs saved before 0.6.0 (no quant.ste_slope in their config.yaml) trained with slope 1:
    resuming them with today's default would mix two baselines, so the run is refused, with
    a one-line error naming the key."""
    from conftest import compose_config
    from omegaconf import OmegaConf, open_dict

    from mq.job.identity import check_run_dir, result_config

    cfg = compose_config([f"quant={quant}", "meta=ste", "logger=none"])
    with open_dict(cfg):
        del cfg["hydra"]  # a job's config, as mq.job.run sees it
    assert cfg.quant.ste_slope == "forward"
    old = result_config(cfg)
    del old["quant"]["ste_slope"]
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="quant.ste_slope: None -> forward") as info:
        check_run_dir(cfg, tmp_path)
    assert "\n" not in str(info.value)
    # the same run with the key resumes (check_run_dir returns the summary, here empty)
    OmegaConf.save(OmegaConf.create(result_config(cfg)), tmp_path / "config.yaml")
    assert check_run_dir(cfg, tmp_path) == {}
