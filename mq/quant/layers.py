"""Quantized models: a full-precision network plus the quantizer for its conv and fc weights.

The quantized weights are computed outside the layers and handed to the network through
``torch.func.functional_call``. That keeps the layers stateless and lets a training step supply
its own W^ (MetaQuant builds W^ from W_meta and needs the gradient w.r.t. W^ itself), while
``model(x)`` quantizes the current weights on the fly for evaluation and the STE baseline.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torch.func import functional_call

from mq.quant.quantizers import WeightQuantizer


class QuantizedModel(nn.Module):
    """``net`` with the weight of every conv and fc layer (first and last included) quantized."""

    def __init__(self, net: nn.Module, weight_quant: WeightQuantizer) -> None:
        super().__init__()
        self.net = net
        self.weight_quant = weight_quant
        self.weight_names = [
            f"{name}.weight"
            for name, module in net.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        ]

    def quantized_weights(self) -> OrderedDict[str, nn.Parameter]:
        """``{"<layer>.weight": full-precision parameter}`` in forward order."""
        return OrderedDict((name, self.net.get_parameter(name)) for name in self.weight_names)

    def forward(self, x: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Run the network on quantized weights: ``weights`` if given (W^ per layer), else
        Q(A(W)) of the current weights, differentiable through the clipped STE."""
        if weights is None:
            weights = {name: self.weight_quant(w) for name, w in self.quantized_weights().items()}
        return functional_call(self.net, weights, (x,))


def quantize_model(net: nn.Module, weight_quant: WeightQuantizer | None) -> nn.Module:
    """``net`` wrapped for quantization, or ``net`` itself when ``weight_quant`` is None."""
    return net if weight_quant is None else QuantizedModel(net, weight_quant)


def quantized_weights(model: nn.Module) -> OrderedDict[str, nn.Parameter]:
    """The quantized layers' full-precision weights; empty for a full-precision model."""
    return model.quantized_weights() if isinstance(model, QuantizedModel) else OrderedDict()


def weight_quantizer(model: nn.Module) -> WeightQuantizer | None:
    return model.weight_quant if isinstance(model, QuantizedModel) else None


def unwrap(model: nn.Module) -> nn.Module:
    """The full-precision network: its state dict has the original checkpoints' key layout."""
    return model.net if isinstance(model, QuantizedModel) else model


def plain_state_dict(model: nn.Module) -> OrderedDict[str, Tensor]:
    return unwrap(model).state_dict()
