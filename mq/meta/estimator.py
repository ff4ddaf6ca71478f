"""Weight-gradient estimators: the STE step with its elementwise gradient rule replaced.

The quantizer's backward is the clipped STE g_W~ = slope * g_W^ * 1{|W~| <= 1}. An estimator
multiplies it elementwise by a factor of its own, computed from g_W^ and from where each weight
sits between the quantizer's levels: ``WeightQuantizer.unit_levels`` gives W~ and its level
mapped onto [0, 1] (x, x_q), the domain in which EWGS and IR-Net write their rules. A new
estimator is a subclass with ``scale`` (and, if it anneals, ``set_progress``) plus its YAML in
conf/meta/. An estimator with learnable parameters of its own (DSQ's alpha) registers them with
``learn``: they join the optimizer of the unquantized parameters and the checkpoint, and take
their gradient through ``soft_level``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.meta.step import NetworkInput, OptimizerFactory, STEStep, _params, needs_quantized
from mq.quant.flat import FlatLayout
from mq.quant.layers import QuantizedModel


def check_number(
    key: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    high_name: str | None = None,
    integer: bool = False,
    note: str = "",
) -> None:
    """ConfigError naming ``key``, ``value`` and what is allowed unless ``value`` is a finite
    number (an int with ``integer``; never a bool) from ``low`` to ``high``: each bound is
    included unless ``low_open``/``high_open``; ``high_name`` names the key ``high`` came from;
    ``note`` is appended to the allowed part, e.g. what a special value means."""
    kind = (int,) if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    top = f"{high_name}={high}" if high_name else f"{high}"
    if low is not None and high is not None and not (low_open or high_open):
        bounds = [f"in [{low}, {top}]"]
    else:
        bounds = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
        bounds += [f"{'<' if high_open else '<='} {top}"] if high is not None else []
    allowed = " ".join(["an integer" if integer else "a number", " and ".join(bounds)]).strip()
    raise ConfigError(f"{key}={value} is not allowed; allowed: {allowed}{note}")


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
        self.model: QuantizedModel = needs_quantized(model, self.name)
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
        self.learned: list[nn.Parameter] = []  # the estimator's own parameters (learn)
        self._pending: tuple[Tensor, Tensor] | None = None  # (W~, W^ leaf): prepare to finish

    def learn(self, params: list[nn.Parameter]) -> None:
        """Make ``params`` the estimator's own learnable parameters: one more parameter group of
        the unquantized parameters' optimizer (its lr schedule and settings), saved in and
        restored from the step's state; their gradient comes from ``soft_level``."""
        self.learned = list(params)
        self.other_optimizer.add_param_group({"params": self.learned})

    def soft_level(self, x: Tensor, x_q: Tensor) -> Tensor:
        """For an estimator with ``learn``ed parameters: the level on [0, 1] as the estimator's
        smooth model of the quantizer sees it, differentiable in those parameters. Their
        gradient is sum g_xq * d soft_level / d param, g_xq the STE's gradient on x_q."""
        raise NotImplementedError

    def scale(self, grad_hat: Tensor, x: Tensor, x_q: Tensor) -> Tensor:
        """The factor on the quantizer's STE gradient, elementwise; flat tensors of all layers."""
        raise NotImplementedError

    def prepare(self) -> NetworkInput:
        layout = self.model.layout(self.weights)
        w_tilde = self.quantizer.transform(layout.flatten(self.weights), layout)
        leaf = self.quantizer.quantize(w_tilde, layout).detach().requires_grad_()
        for opt in (self.weight_optimizer, self.other_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        self._pending = (w_tilde, leaf)
        return NetworkInput(leaf, {})

    def finish(self) -> None:
        assert self._pending is not None
        (w_tilde, leaf), self._pending = self._pending, None
        layout = self.model.layout(self.weights)
        grad_hat = leaf.grad
        assert grad_hat is not None
        if self.all_reduce is not None:  # g_W^ and the other parameters' gradients: one call
            self.all_reduce(grad_hat, _params(self.other_optimizer))
        with torch.no_grad():
            w = w_tilde.detach()
            levels = self.quantizer.unit_levels(w, layout)
            assert levels is not None
            ste = self.quantizer.slope(w, layout) * grad_hat
            grad = ste * self.scale(grad_hat, *levels)
            if self.clip:  # the quantizer's clipped STE, times the factor
                grad = grad * (w.abs() <= 1).to(grad.dtype)
        if self.learned:
            self._learned_gradients(ste, w, levels, layout)
        torch.autograd.backward(w_tilde, grad)  # on through A to W
        for opt in (self.weight_optimizer, self.other_optimizer):
            if opt is not None:
                opt.step()

    def _learned_gradients(
        self, ste: Tensor, w: Tensor, levels: tuple[Tensor, Tensor], layout: FlatLayout
    ) -> None:
        """Accumulate the ``learn``ed parameters' gradients: g_xq = g_W~ (the STE's, slope
        g_W^) / (dx/dW~), the STE's gradient on the level in x's units (x is elementwise in
        W~; its derivative, by autograd through ``unit_levels``), zero outside the clip."""
        with torch.enable_grad():
            w_leaf = w.detach().requires_grad_()
            levels_of_leaf = self.quantizer.unit_levels(w_leaf, layout)
            assert levels_of_leaf is not None
            (dx,) = torch.autograd.grad(levels_of_leaf[0].sum(), w_leaf)
            g_levels = ste / dx
            if self.clip:
                g_levels = g_levels * (w.abs() <= 1).to(g_levels.dtype)
            torch.autograd.backward(self.soft_level(*levels), g_levels)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.learned:
            state["learned"] = [p.detach().clone() for p in self.learned]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.learned:
            with torch.no_grad():
                for p, saved in zip(self.learned, state["learned"], strict=True):
                    p.copy_(saved)
