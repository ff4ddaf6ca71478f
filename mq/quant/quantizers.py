"""Weight quantizer modules: a transform A, a quantizer Q with the clipped STE, a calibration."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mq.quant.flat import FlatLayout
from mq.quant.functions import (
    bwn_scale,
    check_bit_width,
    check_calibration,
    check_ste_slope,
    clipped_ste,
    dorefa_calibration,
    dorefa_levels,
    dorefa_transform,
)


class WeightQuantizer(nn.Module):
    """W -> W^ = Q(A(W)). Used as a parametrization on conv/linear weights (see layers.py).

    MetaQuant needs the three pieces separately: ``transform`` (A, differentiated by autograd),
    ``quantize`` (Q, whose backward is the clipped STE) and ``calibration`` (the dW~/dW factor
    that turns the meta network's g_W~ into g_W). Each takes one weight tensor, or the flat
    vector of all of a model's quantized weights with its ``layout`` (mq.quant.flat).

    ``ste_slope``: "forward" (default) multiplies the STE by the slope of Q's forward (DoReFa 2,
    BWN alpha), as the paper's code and the standard STE do; "unit" drops it, for the ablation of
    the slope (sweeps/step_size*.yaml).

    ``bit_widths``: the ``bits`` the constructor accepts; it refuses any other in one line
    (``check_bit_width``), and nothing else in mq narrows them.
    """

    bit_widths: ClassVar[range]
    bit_width: int
    ste_slope: str = "forward"

    def transform(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        raise NotImplementedError

    def quantize(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor:
        raise NotImplementedError

    def calibration(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor | None:
        """dW~/dW used by MetaQuant, or None where it is 1."""
        return None

    def unit_levels(
        self, w_tilde: Tensor, layout: FlatLayout | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """(x, x_q): W~ and its quantized level mapped onto [0, 1], the interval in which the
        clipped STE passes gradient, levels at j / (2^k - 1); the domain of the estimators'
        rules (mq.meta.estimator); x elementwise and differentiable in W~ (an estimator with
        parameters of its own takes dx/dW~ from it). None: this quantizer has no such levels."""
        return None

    def slope(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor | float:
        """The STE's slope without its clip: Q's backward is slope * g_W^ * 1{|W~| <= 1}
        (``ste_slope``: forward, Q's slope; unit, 1). For an estimator that drops the clip."""
        raise NotImplementedError

    def quantize_original(
        self, w_tilde: Tensor, before: Tensor, layout: FlatLayout | None = None
    ) -> Tensor:
        """Q as the released MetaQuant applies it to the meta-updated weights' ``w_tilde``
        (``meta.update=original``); ``before``: the weights before the meta update, for a
        quantizer whose released code takes a constant from them. Default: ``quantize``."""
        return self.quantize(w_tilde, layout)

    def forward(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return self.quantize(self.transform(weight, layout), layout)


class DorefaWeight(WeightQuantizer):
    """DoReFa-Net weight quantization with ``bit_width`` bits (1..8)."""

    bit_widths = range(1, 9)

    def __init__(
        self, bit_width: int = 1, ste_slope: str = "forward", calibration: str = "paper"
    ) -> None:
        super().__init__()
        check_bit_width(bit_width, self.bit_widths, "dorefa")
        check_ste_slope(ste_slope)
        check_calibration(calibration)
        self.bit_width = bit_width
        self.ste_slope = ste_slope
        # paper: twice dA/dW (the paper's and released code's factor); exact: dA/dW itself
        self.calibration_kind = calibration

    def transform(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return dorefa_transform(weight, layout)

    def quantize(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor:
        # W^ = 2 Q'(W~) - 1: slope 2 (Q' = round((2^k-1) W~)/(2^k-1) passes g unchanged)
        slope = 2.0 if self.ste_slope == "forward" else None
        return clipped_ste(w_tilde, dorefa_levels(w_tilde, self.bit_width), slope)

    def unit_levels(
        self, w_tilde: Tensor, layout: FlatLayout | None = None
    ) -> tuple[Tensor, Tensor]:
        # W~ is already in [0, 1]; W^ = 2 x_q - 1
        return w_tilde, (dorefa_levels(w_tilde, self.bit_width) + 1) / 2

    def slope(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> float:
        return 2.0 if self.ste_slope == "forward" else 1.0

    def calibration(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return dorefa_calibration(weight, layout, exact=self.calibration_kind == "exact")

    def extra_repr(self) -> str:
        return (
            f"bit_width={self.bit_width}, ste_slope={self.ste_slope}, "
            f"calibration={self.calibration_kind}"
        )


class BWNWeight(WeightQuantizer):
    """Binary weight networks: W^ = alpha sign(W), alpha = mean|W| per tensor, or per output
    filter of each conv weight (``per_filter``; a linear weight keeps one, as in the released
    code)."""

    bit_widths = range(1, 2)

    def __init__(
        self,
        bit_width: int = 1,
        per_filter: bool = False,
        ste_slope: str = "forward",
        calibration: str = "paper",
    ) -> None:
        super().__init__()
        check_bit_width(bit_width, self.bit_widths, "bwn_f" if per_filter else "bwn")
        check_ste_slope(ste_slope)
        # A = identity: the paper's calibration 1 is already the exact derivative.
        check_calibration(calibration)
        self.calibration_kind = calibration
        self.bit_width = 1
        self.per_filter = per_filter
        self.ste_slope = ste_slope

    def transform(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return weight

    def quantize(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return self._quantize(w_tilde, w_tilde, layout)

    def quantize_original(
        self, w_tilde: Tensor, before: Tensor, layout: FlatLayout | None = None
    ) -> Tensor:
        """The released BWN-F takes each conv filter's alpha from the weights before the meta
        update, a linear weight's from the meta-updated ones (W~ = W: A is the identity)."""
        if not self.per_filter:
            return self.quantize(w_tilde, layout)
        if layout is None:
            return self._quantize(w_tilde, before if w_tilde.dim() > 2 else w_tilde, None)
        conv = layout.broadcast(
            torch.tensor([float(len(s) > 2) for s in layout.shapes], device=before.device)
        )
        return self._quantize(w_tilde, torch.where(conv > 0, before, w_tilde.detach()), layout)

    def unit_levels(
        self, w_tilde: Tensor, layout: FlatLayout | None = None
    ) -> tuple[Tensor, Tensor]:
        # sign's input W~ = W, clipped to [-1, 1] by the STE, mapped onto [0, 1]; levels 0, 1
        return (w_tilde + 1) / 2, (torch.sign(w_tilde.detach()) + 1) / 2

    def slope(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor | float:
        return bwn_scale(w_tilde, self.per_filter, layout) if self.ste_slope == "forward" else 1.0

    def _quantize(self, w_tilde: Tensor, scale_of: Tensor, layout: FlatLayout | None) -> Tensor:
        """W^ = alpha sign(W~), alpha taken from ``scale_of``."""
        alpha = bwn_scale(scale_of, self.per_filter, layout)
        w_hat = alpha * torch.sign(w_tilde.detach())
        # alpha a constant: slope alpha
        return clipped_ste(w_tilde, w_hat, alpha if self.ste_slope == "forward" else None)

    def extra_repr(self) -> str:
        return f"per_filter={self.per_filter}, ste_slope={self.ste_slope}"
