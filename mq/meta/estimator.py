"""Weight-gradient estimators: the STE step with its elementwise gradient rule replaced.

The quantizer's backward is the clipped STE g_W~ = slope * g_W^ * 1{|W~| <= 1}. An estimator
multiplies it elementwise by a factor of its own, computed from g_W^ and from where each weight
sits between the quantizer's levels: ``WeightQuantizer.unit_levels`` gives W~ and its level
mapped onto [0, 1] (x, x_q), the domain in which EWGS and IR-Net write their rules. A new
estimator is a subclass with ``scale`` (and, if it anneals, ``set_progress``) plus its YAML in
conf/meta/.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.meta.step import OptimizerFactory, STEStep, _params
from mq.quant.layers import QuantizedModel


class EstimatorStep(STEStep):
    """STE with g_W~ = slope * g_W^ * 1{|W~| <= 1} * ``scale(g_W^, x, x_q)`` (without the
    indicator where ``clip`` is False), then ordinary optimizer steps.

    The forward stops at W^ (a leaf, as in MetaQuantStep), so the rule sees g_W^ itself;
    autograd through A carries g_W~ on to W. ``slope`` is the quantizer's (WeightQuantizer.slope);
    the quantizer contract test checks that slope times the indicator is its own backward.
    """

    name: ClassVar[str]  # its option in conf/meta/, for error lines
    # False: the factor replaces the STE's clip 1{|W~| <= 1} too (a surrogate defined everywhere)
    clip: ClassVar[bool] = True
    bit_widths: ClassVar[range | None] = None  # the bits it can serve; None: any

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory) -> None:
        super().__init__(model, optimizer)
        if not isinstance(model, QuantizedModel):
            raise ConfigError(
                f"meta={self.name} needs quantized weights but quant=none; "
                "allowed with quant=none: ste"
            )
        self.model: QuantizedModel = model
        self.quantizer = model.weight_quant
        bits = self.quantizer.bit_width
        if self.bit_widths is not None and bits not in self.bit_widths:
            allowed = ", ".join(str(b) for b in self.bit_widths)
            raise ConfigError(f"meta={self.name} cannot serve bits={bits}; allowed: {allowed}")
        if self.quantizer.unit_levels(torch.zeros(1)) is None:
            raise ConfigError(
                f"meta={self.name} cannot serve the quantizer {type(self.quantizer).__name__}: "
                "it has no levels on [0, 1] (WeightQuantizer.unit_levels)"
            )

    def scale(self, grad_hat: Tensor, x: Tensor, x_q: Tensor) -> Tensor:
        """The factor on the quantizer's STE gradient, elementwise; flat tensors of all layers."""
        raise NotImplementedError

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        layout = self.model.layout(self.weights)
        w_tilde = self.quantizer.transform(layout.flatten(self.weights), layout)
        w_hat = self.quantizer.quantize(w_tilde, layout)
        leaf = w_hat.detach().requires_grad_()
        for opt in (self.weight_optimizer, self.other_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        logits = self.model(x, self.model.named(layout.unflatten(leaf)))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grad_hat = leaf.grad
        assert grad_hat is not None
        if self.all_reduce is not None:  # g_W^ and the other parameters' gradients: one call
            self.all_reduce(grad_hat, _params(self.other_optimizer))
        with torch.no_grad():
            w = w_tilde.detach()
            levels = self.quantizer.unit_levels(w, layout)
            assert levels is not None
            grad = self.quantizer.slope(w, layout) * grad_hat * self.scale(grad_hat, *levels)
            if self.clip:  # the quantizer's clipped STE, times the factor
                grad = grad * (w.abs() <= 1).to(grad.dtype)
        torch.autograd.backward(w_tilde, grad)  # on through A to W
        for opt in (self.weight_optimizer, self.other_optimizer):
            if opt is not None:
                opt.step()
        return loss.detach(), logits.detach()
