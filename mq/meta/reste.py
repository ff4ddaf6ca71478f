"""ReSTE: the rectified straight-through estimator (Wu et al., ICCV 2023; code DravenALG/ReSTE).

sign(u) passes back the derivative of the power function sign(u) |u|^(1/o), capped near 0 and
clipped far from it, as the authors' Binary_ReSTE (model/binary_module/binarized_modules.py):

    d sign(u)/du ~ interval^(1/o) / interval        |u| <= interval   (the band: its secant slope)
                   (1/o) |u|^((1 - o)/o)           interval < |u| <= threshold
                   0                               |u| > threshold

u = 2 x - 1 the sign's input (x: W~ mapped so that the STE's interval is [0, 1],
mq.meta.estimator). o rises from 1 (the STE) to o_end over the epochs on their trainer's
quarter-cosine, o = 1 + (1 - cos(pi/2 * epoch / epochs)) (o_end - 1), set at the start of each
epoch (main.py, ``ReSTE(epoch)``); interval 0.1 and threshold 1.5 are their constants.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mq.meta.estimator import EstimatorStep, check_number
from mq.meta.step import OptimizerFactory


class ReSTEStep(EstimatorStep):
    name = "reste"
    bit_widths = range(1, 2)  # a surrogate of sign: binary weights only
    clip = False  # its own clip, |u| <= threshold, replaces the STE's |W~| <= 1

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        o_end: float = 3.0,
        threshold: float = 1.5,
        interval: float = 0.1,
    ) -> None:
        check_number("meta.o_end", o_end, low=1)
        check_number("meta.threshold", threshold, low=0, low_open=True)
        # the band is written after the power part in their backward: past threshold it would
        # pass gradient where the clip should stop it
        check_number(
            "meta.interval",
            interval,
            low=0,
            low_open=True,
            high=threshold,
            high_open=True,
            high_name="meta.threshold",
        )
        super().__init__(model, optimizer)
        self.o_end, self.threshold, self.interval = float(o_end), float(threshold), float(interval)
        self.set_progress(0, 1)

    def set_progress(self, epoch: int, epochs: int) -> None:
        beta = 1 - math.cos(epoch / epochs * math.pi * 0.5)
        self.o = 1 + beta * (self.o_end - 1)

    def scale(self, grad_hat: Tensor, x: Tensor, x_q: Tensor) -> Tensor:
        # replaces the STE's indicator
        o, band = self.o, self.interval
        a = (2 * x - 1).abs()
        power = (1 / o) * a.clamp(min=band) ** ((1 - o) / o)  # clamp: no 0^(negative) below
        inside = torch.where(a <= self.threshold, power, torch.zeros_like(a))
        return torch.where(a <= band, torch.full_like(a, band ** (1 / o) / band), inside)
