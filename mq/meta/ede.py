"""EDE: IR-Net's error decay estimator (Qin et al., CVPR 2020; code htqin/IR-Net).

sign(u) passes back k t (1 - tanh^2(t u)) instead of 1{|u| <= 1}, with u = 2 x - 1 the sign's
input (x: W~ mapped so that the STE's interval is [0, 1], mq.meta.estimator), unclipped as in
the authors' BinaryQuantize. t rises from t_min to t_max on a log
scale over the epochs, t = t_min 10^(epoch / epochs * log10(t_max / t_min)), set at the start of
each epoch, and k = max(1 / t, 1), as the authors' trainer.py (Log_UP) does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mq.meta.estimator import EstimatorStep, check_number
from mq.meta.step import OptimizerFactory


class EDEStep(EstimatorStep):
    name = "ede"
    bit_widths = range(1, 2)  # a surrogate of sign: binary weights only
    clip = False  # IR-Net's surrogate has no clip: it passes gradient for any |u|

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        t_min: float = 0.1,
        t_max: float = 10.0,
    ) -> None:
        check_number("meta.t_min", t_min, low=0, low_open=True)
        check_number("meta.t_max", t_max, low=0, low_open=True)
        super().__init__(model, optimizer)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.set_progress(0, 1)

    def set_progress(self, epoch: int, epochs: int) -> None:
        low, high = math.log10(self.t_min), math.log10(self.t_max)
        self.t = math.pow(10, low + (high - low) / epochs * epoch)
        self.k = 1 / self.t if self.t < 1 else 1.0

    def scale(self, grad_hat: Tensor, x: Tensor, x_q: Tensor) -> Tensor:
        # replaces the STE's indicator
        return self.k * self.t * (1 - torch.tanh(self.t * (2 * x - 1)) ** 2)
