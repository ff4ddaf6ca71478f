"""Weight quantization math: one autograd Function and the plain functions built on it.

A quantizer is split in two, as in the paper: a differentiable transform A (W -> W~) and a
non-differentiable quantizer Q (W~ -> W^). Q's backward is the clipped straight-through
estimator g_W~ = slope * g_W^ * 1{|W~| <= 1}, where slope is the derivative of Q's forward with
round/sign replaced by the identity and the scale held constant (DoReFa: 2; BWN: mean|W~|), as
autograd gives it in the released code; the meta network replaces exactly this piece.

Each function takes one weight tensor, or (with ``layout``) the flat vector of all quantized
weights of a model (mq.quant.flat), whose per-layer constants are then taken per segment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mq.core.errors import ConfigError
from mq.quant.flat import FlatLayout

STE_SLOPES = ("forward", "unit")
CALIBRATIONS = ("paper", "exact")


def check_calibration(calibration: str) -> None:
    if calibration not in CALIBRATIONS:
        raise ConfigError(
            f"quant.calibration={calibration} is not known; allowed: {', '.join(CALIBRATIONS)}"
        )


def check_bit_width(bit_width: int, allowed: range, name: str, key: str = "bits") -> None:
    """``key`` (bits; act_bits for an activation quantizer), as the quantizer ``name`` (its
    conf/ option) takes it: an integer in ``allowed``."""
    if isinstance(bit_width, bool) or not isinstance(bit_width, int) or bit_width not in allowed:
        span = f"{allowed[0]}..{allowed[-1]}" if len(allowed) > 1 else f"{allowed[0]}"
        raise ConfigError(f"{key}={bit_width} is not allowed for {name}; allowed: {span}")


def check_ste_slope(ste_slope: str) -> None:
    if ste_slope not in STE_SLOPES:
        raise ConfigError(
            f"quant.ste_slope={ste_slope} is not known; allowed: {', '.join(STE_SLOPES)}"
        )


class ClippedSTE(torch.autograd.Function):
    """Forward returns the already-quantized value; backward passes slope * g * 1{|W~| <= 1}
    to W~ (``slope``: a number, a tensor broadcastable to W~, or None for 1)."""

    @staticmethod
    def forward(ctx, w_tilde: Tensor, w_hat: Tensor, slope: Tensor | float | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w_tilde)
        ctx.slope = slope
        # A Function must not return an input unchanged as its output (autograd would alias it).
        return w_hat.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (w_tilde,) = ctx.saved_tensors
        grad = grad_output if ctx.slope is None else grad_output * ctx.slope
        return grad * (w_tilde.abs() <= 1).to(grad_output.dtype), None, None


def clipped_ste(w_tilde: Tensor, w_hat: Tensor, slope: Tensor | float | None = None) -> Tensor:
    """Value of ``w_hat`` with the clipped straight-through gradient to ``w_tilde``, times
    ``slope`` (the forward's slope with round/sign as the identity; None: 1)."""
    return ClippedSTE.apply(w_tilde, w_hat, slope)


def dorefa_transform(weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
    """A(W) = tanh(W) / (2 max|tanh W|) + 1/2, mapping W into [0, 1]; the max is a constant."""
    t = torch.tanh(weight)
    if layout is None:
        return t / (2 * t.abs().max().detach()) + 0.5
    return t / layout.broadcast(2 * layout.amax(t)) + 0.5


def dorefa_levels(w_tilde: Tensor, bit_width: int) -> Tensor:
    """Q(W~) = 2 round((2^k - 1) W~) / (2^k - 1) - 1: 2^k evenly spaced levels in [-1, 1]."""
    n = float(2**bit_width - 1)
    return 2 * torch.round(w_tilde.detach() * n) / n - 1


def dorefa_calibration(
    weight: Tensor, layout: FlatLayout | None = None, exact: bool = False
) -> Tensor:
    """dW~/dW as the paper and the original code use it: (1 - tanh^2 W) / max|tanh W|.

    This is twice the true derivative of ``dorefa_transform`` (which divides by 2 max); the
    factor is kept on purpose so MetaQuant runs match the paper and the released code.
    ``exact``: the true derivative (1 - tanh^2 W) / (2 max|tanh W|), the max held constant as
    in the transform (quant.calibration=exact, the step-size ablation).
    """
    t = torch.tanh(weight.detach())
    peak = t.abs().max() if layout is None else layout.broadcast(layout.amax(t))
    return (1 - t * t) / (2 * peak if exact else peak)


def bwn_scale(w: Tensor, per_filter: bool = False, layout: FlatLayout | None = None) -> Tensor:
    """BWN's alpha = mean|w|, broadcastable to ``w``: one per tensor, or (``per_filter``) one
    per output filter (dim 0) of each conv weight. A linear weight keeps one scale for the
    whole tensor even then, as the released code's BWN-F does."""
    w = w.detach()
    if layout is not None:
        return layout.broadcast(layout.mean_abs(w, per_filter, conv_only=True), per_filter, True)
    if per_filter and w.dim() > 2:
        return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return w.abs().mean()
