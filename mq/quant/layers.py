"""Quantized models: a full-precision network plus the quantizer for its conv and fc weights.

The quantized weights are computed outside the layers and handed to the network through
``torch.func.functional_call``. That keeps the layers stateless and lets a training step supply
its own W^ (MetaQuant builds W^ from W_meta and needs the gradient w.r.t. W^ itself), while
``model(x)`` quantizes the current weights on the fly for evaluation and the STE baseline.
The quantizer runs once over all layers' weights laid end to end (mq.quant.flat), not per layer.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torch.func import functional_call

from mq.quant.flat import FlatLayout
from mq.quant.quantizers import WeightQuantizer


class QuantizedModel(nn.Module):
    """``net`` with the weight of every conv and fc layer (first and last included) quantized."""

    def __init__(self, net: nn.Module, weight_quant: WeightQuantizer) -> None:
        super().__init__()
        self.net = net
        self.weight_quant = weight_quant
        layers = [
            (name, module)
            for name, module in net.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        ]
        self.weight_names = [f"{name}.weight" for name, _ in layers]
        self._layers = [module for _, module in layers]  # a plain list: not registered twice
        self._layout: FlatLayout | None = None

    def quantized_weights(self) -> OrderedDict[str, nn.Parameter]:
        """``{"<layer>.weight": full-precision parameter}`` in forward order."""
        return OrderedDict(zip(self.weight_names, self._weights(), strict=True))

    def quantized_biases(self) -> OrderedDict[str, nn.Parameter]:
        """``{"<layer>.bias": parameter}`` of the quantized layers that have one (not quantized;
        the released MetaQuant gives them a look-ahead in the forward)."""
        return OrderedDict(
            (f"{name[: -len('.weight')]}.bias", module.bias)
            for name, module in zip(self.weight_names, self._layers, strict=True)
            if module.bias is not None
        )

    def _weights(self) -> list[nn.Parameter]:
        return [module.weight for module in self._layers]

    def layout(self, weights: list[nn.Parameter] | None = None) -> FlatLayout:
        """The flat layout of the quantized weights (rebuilt if their shapes or strides change,
        e.g. after a change of memory format); ``weights``: the parameters, if already at hand."""
        weights = self._weights() if weights is None else weights
        if self._layout is None or self._layout.key != FlatLayout.key_of(weights):
            self._layout = FlatLayout(weights)
        return self._layout

    def named(self, tensors: list[Tensor]) -> dict[str, Tensor]:
        """``{"<layer>.weight": tensor}`` for per-layer tensors in forward order."""
        return dict(zip(self.weight_names, tensors, strict=True))

    def quantize_weights(self) -> dict[str, Tensor]:
        """W^ = Q(A(W)) of the current weights per layer, differentiable through the STE."""
        weights = self._weights()
        layout = self.layout(weights)
        flat = layout.flatten(weights)
        return self.named(layout.unflatten(self.weight_quant(flat, layout)))

    def forward(self, x: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """Run the network on quantized weights: ``weights`` if given (W^ per layer), else
        Q(A(W)) of the current weights, differentiable through the clipped STE."""
        if weights is None:
            weights = self.quantize_weights()
        # tie_weights=False: no weights are tied here, and the check walks every module per call
        return functional_call(self.net, weights, (x,), tie_weights=False)


def quantize_model(net: nn.Module, weight_quant: WeightQuantizer | None) -> nn.Module:
    """``net`` wrapped for quantization, or ``net`` itself when ``weight_quant`` is None."""
    return net if weight_quant is None else QuantizedModel(net, weight_quant)


def quantized_weights(model: nn.Module) -> OrderedDict[str, nn.Parameter]:
    """The quantized layers' full-precision weights; empty for a full-precision model."""
    return model.quantized_weights() if isinstance(model, QuantizedModel) else OrderedDict()


def unwrap(model: nn.Module) -> nn.Module:
    """The full-precision network: its state dict has the original checkpoints' key layout."""
    return model.net if isinstance(model, QuantizedModel) else model


def plain_state_dict(model: nn.Module) -> OrderedDict[str, Tensor]:
    return unwrap(model).state_dict()
