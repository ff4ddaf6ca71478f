"""Quantized models: a full-precision network plus the quantizer for its conv and fc weights.

The quantized weights are computed outside the layers and handed to the network through
``torch.func.functional_call``. That keeps the layers stateless and lets a training step supply
its own W^ (MetaQuant builds W^ from W_meta and needs the gradient w.r.t. W^ itself), while
``model(x)`` quantizes the current weights on the fly for evaluation and the STE baseline.
The quantizer runs once over all layers' weights laid end to end (mq.quant.flat), not per layer.
An activation quantizer (mq.quant.activations), if any, is applied to the input of every conv
but the first by forward pre-hooks set here, so it works with any forward, functional_call's
included; its parameters live in ``act`` beside the network, not in its state dict.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import Tensor, nn
from torch.func import functional_call

from mq.core.errors import ConfigError
from mq.quant.activations import ActQuantizer
from mq.quant.flat import FlatLayout
from mq.quant.quantizers import WeightQuantizer


class QuantizedModel(nn.Module):
    """``net`` with the weight of every conv and fc layer (first and last included) quantized,
    and with ``act_quant`` (a copy per conv) on the input of every conv but the first."""

    def __init__(
        self, net: nn.Module, weight_quant: WeightQuantizer, act_quant: ActQuantizer | None = None
    ) -> None:
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
        self.act_inputs: list[str] = []  # the convs whose input act quantizes, in order
        if act_quant is not None:
            # The first conv in module order is the stem: it sees the image, kept full precision.
            convs = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
            self.act_inputs = [name for name, _ in convs[1:]]
            self.act = nn.ModuleList(copy.deepcopy(act_quant) for _ in convs[1:])
            for (_, conv), quantizer in zip(convs[1:], self.act, strict=True):
                conv.register_forward_pre_hook(quantizer.pre_hook)

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


def quantize_model(
    net: nn.Module, weight_quant: WeightQuantizer | None, act_quant: ActQuantizer | None = None
) -> nn.Module:
    """``net`` wrapped for quantization, or ``net`` itself when ``weight_quant`` is None (full
    precision, where an activation quantizer is refused: mq quantizes activations of quantized
    models only)."""
    if weight_quant is None:
        if act_quant is not None:
            raise ConfigError(
                f"act={act_quant.name} needs quantized weights but quant=none; "
                "allowed with quant=none: act=none"
            )
        return net
    return QuantizedModel(net, weight_quant, act_quant)


def act_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The activation quantizers' parameters and buffers (PACT's alpha, LSQ's s), saved in
    checkpoint.pt beside the network's state dict; None without activation quantization."""
    act = getattr(model, "act", None)
    return act.state_dict() if isinstance(model, QuantizedModel) and act is not None else None


def load_act_state(model: nn.Module, state: dict[str, Tensor] | None, source: str) -> None:
    """Load ``act_state_dict``'s output strictly; ``source`` names where it came from in the
    one-line error when it does not fit this model's activation quantizers."""
    act = getattr(model, "act", None) if isinstance(model, QuantizedModel) else None
    if act is None and state is None:
        return
    if act is None or state is None:
        have = "holds" if state is not None else "holds no"
        raise ConfigError(
            f"{source} {have} activation quantizer state, this run's act "
            f"{'does not' if act is None else 'does'} quantize activations"
        )
    own = act.state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise ConfigError(f"{source} holds activation quantizer state of another act choice")
    act.load_state_dict(state)


def quantized_weights(model: nn.Module) -> OrderedDict[str, nn.Parameter]:
    """The quantized layers' full-precision weights; empty for a full-precision model."""
    return model.quantized_weights() if isinstance(model, QuantizedModel) else OrderedDict()


def unwrap(model: nn.Module) -> nn.Module:
    """The full-precision network: its state dict has the original checkpoints' key layout."""
    return model.net if isinstance(model, QuantizedModel) else model


def plain_state_dict(model: nn.Module) -> OrderedDict[str, Tensor]:
    return unwrap(model).state_dict()
