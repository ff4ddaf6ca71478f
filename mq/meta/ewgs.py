"""EWGS: element-wise gradient scaling (Lee et al., CVPR 2021; code cvlab-yonsei/EWGS).

g_x = g_xq (1 + delta sign(g_xq) (x - x_q)): each weight's STE gradient scaled by how far, and
on which side, it sits from its level, x and x_q on [0, 1] as in the authors' EWGS_discretizer
(which follows a clamp to [0, 1]: the clipped STE's indicator here). delta is fixed here (the
authors' ``--use_hessian False`` runs, their README command: 1e-3); their Hessian-trace update
of delta is not implemented.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.meta.estimator import EstimatorStep
from mq.meta.step import OptimizerFactory


class EWGSStep(EstimatorStep):
    name = "ewgs"

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, delta: float = 1e-3) -> None:
        number = isinstance(delta, (int, float)) and not isinstance(delta, bool)
        if not (number and math.isfinite(delta) and delta >= 0):
            raise ConfigError(f"meta.delta={delta} is not allowed; allowed: a number >= 0")
        super().__init__(model, optimizer)
        self.delta = float(delta)

    def scale(self, grad_hat: Tensor, x: Tensor, x_q: Tensor) -> Tensor:
        # sign(g_xq) = sign(g_W^): W^ is x_q times a positive factor
        return 1 + self.delta * torch.sign(grad_hat) * (x - x_q)
