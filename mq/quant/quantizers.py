"""Weight quantizer modules: a transform A, a quantizer Q with the clipped STE, a calibration."""

from __future__ import annotations

from torch import Tensor, nn

from mq.errors import ConfigError
from mq.quant.flat import FlatLayout
from mq.quant.functions import (
    bwn_levels,
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
    """

    bit_width: int

    def transform(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        raise NotImplementedError

    def quantize(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor:
        raise NotImplementedError

    def calibration(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor | None:
        """dW~/dW used by MetaQuant, or None where it is 1."""
        return None

    def forward(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return self.quantize(self.transform(weight, layout), layout)


class DorefaWeight(WeightQuantizer):
    """DoReFa-Net weight quantization with ``bit_width`` bits (1..8)."""

    def __init__(self, bit_width: int = 1) -> None:
        super().__init__()
        if not isinstance(bit_width, int) or not 1 <= bit_width <= 8:
            raise ConfigError(f"bits={bit_width} is not allowed for dorefa; allowed: 1..8")
        self.bit_width = bit_width

    def transform(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return dorefa_transform(weight, layout)

    def quantize(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return clipped_ste(w_tilde, dorefa_levels(w_tilde, self.bit_width))

    def calibration(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return dorefa_calibration(weight, layout)

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}"


class BWNWeight(WeightQuantizer):
    """Binary weight networks: W^ = mean|W| sign(W), per tensor or per output filter."""

    def __init__(self, bit_width: int = 1, per_filter: bool = False) -> None:
        super().__init__()
        if bit_width != 1:
            name = "bwn_f" if per_filter else "bwn"
            raise ConfigError(f"bits={bit_width} is not allowed for {name}; allowed: 1")
        self.bit_width = 1
        self.per_filter = per_filter

    def transform(self, weight: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return weight

    def quantize(self, w_tilde: Tensor, layout: FlatLayout | None = None) -> Tensor:
        return clipped_ste(w_tilde, bwn_levels(w_tilde, self.per_filter, layout))

    def extra_repr(self) -> str:
        return f"per_filter={self.per_filter}"
