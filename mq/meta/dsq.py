"""DSQ: differentiable soft quantization (Gong et al., "Differentiable Soft Quantization: Bridging
Full-Precision and Low-Bit Neural Networks", ICCV 2019). No official code was released; this
follows the paper.

On the level domain [0, 1] of mq.meta.estimator (n = 2^k - 1 intervals of width Delta = 1 / n,
interval i = [i Delta, (i + 1) Delta], midpoint m_i) the soft quantizer is

    Q_S(x) = Delta (i + (phi(x) + 1) / 2),  phi(x) = s tanh(k (x - m_i)),
    k = log(2 / alpha - 1) / Delta,  s = 1 / tanh(k Delta / 2) = 1 / (1 - alpha).

The forward keeps the hard level (sign of phi: the quantizer's own W^); the backward is
dQ_S/dx = s k Delta / 2 (1 - tanh^2(k (x - m_i))) in place of the STE's 1, clipped outside
[0, 1] as Q_S is constant there. The characteristic variable alpha, one per quantized layer, is
learned: d L / d alpha = sum g_xq dQ_S/d alpha, stepped by the optimizer of the unquantized
parameters, then clamped into (0, 0.5] (ALPHA_MIN, ALPHA_MAX).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.meta.estimator import EstimatorStep, check_number
from mq.meta.step import OptimizerFactory

# alpha's clamp after each step: the paper keeps it in (0, 0.5); 0 itself would make k infinite
ALPHA_MIN, ALPHA_MAX = 1e-4, 0.5


class DSQStep(EstimatorStep):
    name = "dsq"

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        alpha: float = 0.2,
        learn_alpha: bool = True,
    ) -> None:
        check_number("meta.alpha", alpha, low=ALPHA_MIN, high=ALPHA_MAX)
        if not isinstance(learn_alpha, bool):
            raise ConfigError(f"meta.learn_alpha={learn_alpha} is not allowed; allowed: a boolean")
        super().__init__(model, optimizer)
        self.intervals = 2**self.quantizer.bit_width - 1
        w = self.weights[0]
        layers = len(self.model.layout(self.weights).sizes)
        # alpha of each quantized layer, in forward order (the paper: one per layer)
        self.alpha = nn.Parameter(
            torch.full((layers,), float(alpha), dtype=w.dtype, device=w.device)
        )
        if learn_alpha:
            self.learn([self.alpha])

    def _interval(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(i, u, k Delta, s): x's interval, its offset from the midpoint in units of Delta
        (-1/2..1/2), and the tanh's slope and scale per element (alpha broadcast per layer)."""
        a = self.model.layout(self.weights).broadcast(alpha)
        i = torch.floor(x.detach() * self.intervals).clamp(0, self.intervals - 1)
        u = x.detach() * self.intervals - i - 0.5
        return i, u, torch.log(2 / a - 1), 1 / (1 - a)

    def scale(self, grad_hat: Tensor, x: Tensor, x_q: Tensor) -> Tensor:
        _, u, k_delta, s = self._interval(x, self.alpha.detach())
        return 0.5 * s * k_delta * (1 - torch.tanh(k_delta * u) ** 2)

    def soft_level(self, x: Tensor, x_q: Tensor) -> Tensor:
        i, u, k_delta, s = self._interval(x, self.alpha)
        return (i + (s * torch.tanh(k_delta * u) + 1) / 2) / self.intervals

    def finish(self) -> None:
        super().finish()
        if self.learned:
            with torch.no_grad():
                self.alpha.clamp_(ALPHA_MIN, ALPHA_MAX)
