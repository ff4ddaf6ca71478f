"""Weight quantization math: one autograd Function and the plain functions built on it.

A quantizer is split in two, as in the paper: a differentiable transform A (W -> W~) and a
non-differentiable quantizer Q (W~ -> W^). Q's backward is the clipped straight-through
estimator g_W~ = g_W^ * 1{|W~| <= 1}; the meta network replaces exactly this piece.

Each function takes one weight tensor, or (with ``layout``) the flat vector of all quantized
weights of a model (mq.quant.flat), whose per-layer constants are then taken per segment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mq.quant.flat import FlatLayout


class ClippedSTE(torch.autograd.Function):
    """Forward returns the already-quantized value; backward passes g * 1{|W~| <= 1} to W~."""

    @staticmethod
    def forward(ctx, w_tilde: Tensor, w_hat: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w_tilde)
        # A Function must not return an input unchanged as its output (autograd would alias it).
        return w_hat.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (w_tilde,) = ctx.saved_tensors
        return grad_output * (w_tilde.abs() <= 1).to(grad_output.dtype), None


def clipped_ste(w_tilde: Tensor, w_hat: Tensor) -> Tensor:
    """Value of ``w_hat`` with the clipped straight-through gradient to ``w_tilde``."""
    return ClippedSTE.apply(w_tilde, w_hat)


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


def dorefa_calibration(weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
    """dW~/dW as the paper and the original code use it: (1 - tanh^2 W) / max|tanh W|.

    This is twice the true derivative of ``dorefa_transform`` (which divides by 2 max); the
    factor is kept on purpose so MetaQuant runs match the paper and the released code.
    """
    t = torch.tanh(weight.detach())
    return (1 - t * t) / (t.abs().max() if layout is None else layout.broadcast(layout.amax(t)))


def bwn_levels(
    w_tilde: Tensor, per_filter: bool = False, layout: FlatLayout | None = None
) -> Tensor:
    """W^ = mean|W~| * sign(W~); one scale per tensor, or per output filter (dim 0)."""
    w = w_tilde.detach()
    if layout is not None:
        scale = layout.broadcast(layout.mean_abs(w, per_filter), per_filter)
    elif per_filter and w.dim() > 1:
        scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        scale = w.abs().mean()
    return scale * torch.sign(w)
