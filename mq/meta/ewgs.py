"""EWGS: element-wise gradient scaling (Lee et al., CVPR 2021; code cvlab-yonsei/EWGS).

g_x = g_xq (1 + delta sign(g_xq) (x - x_q)): each weight's STE gradient scaled by how far, and
on which side, it sits from its level, x and x_q on [0, 1] as in the authors' EWGS_discretizer
(which follows a clamp to [0, 1]: the clipped STE's indicator here). delta is fixed (their
``--use_hessian False`` runs, README command: 1e-3) or, with ``hessian_every`` N > 0, set per
layer at the start of every N-th epoch from the Hessian of the loss in x_q (their
``update_grad_scales``, CIFAR10/utils.py): delta_l = mean over 3 batches of
tr(H_l) / n_l / (3 std(g_xq,l)), clipped at 0, the trace by Hutchinson's method.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mq.meta.estimator import EstimatorStep, check_number
from mq.meta.step import OptimizerFactory

HESSIAN_BATCHES = 3  # their update_grad_scales: "estimate trace using 3 batches"
HUTCHINSON_ITERATIONS, HUTCHINSON_TOLERANCE = 50, 1e-3  # their trace(): maxIter, tol


class EWGSStep(EstimatorStep):
    name = "ewgs"

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        delta: float = 1e-3,
        hessian_every: int = 0,
    ) -> None:
        check_number("meta.delta", delta, low=0)
        check_number(
            "meta.hessian_every", hessian_every, low=0, integer=True, note=" (0: delta fixed)"
        )
        super().__init__(model, optimizer)
        self.delta: float | Tensor = float(delta)  # a flat tensor (per layer) once measured
        self.hessian_every = hessian_every
        self.epoch = 0

    def set_progress(self, epoch: int, epochs: int) -> None:
        self.epoch = epoch

    def scale(self, grad_hat: Tensor, x: Tensor, x_q: Tensor) -> Tensor:
        # sign(g_xq) = sign(g_W^): W^ is x_q times a positive factor
        return 1 + self.delta * torch.sign(grad_hat) * (x - x_q)

    def start_epoch(self, batches: Iterator[tuple[Tensor, Tensor]]) -> None:
        every = self.hessian_every
        if every and self.epoch and self.epoch % every == 0:  # theirs: ep % N == 0, ep != 0
            self.delta = self.hessian_delta(itertools.islice(batches, HESSIAN_BATCHES))

    def hessian_delta(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Tensor:
        """delta per layer (broadcast over its weights) from the model as it stands."""
        layout = self.model.layout(self.weights)
        with torch.no_grad():
            w_tilde = self.quantizer.transform(layout.flatten(self.weights), layout)
            w_hat = self.quantizer.quantize(w_tilde, layout)
            levels = self.quantizer.unit_levels(w_tilde, layout)
            assert levels is not None
            # dW^/dx_q: W^ is linear in the level and 0 at x_q = 1/2 (symmetric levels, of
            # which none sits at 1/2), so H and g in x_q are H and g in W^ scaled by it
            middle = levels[1] - 0.5
            a = torch.where(middle == 0, 0.0, w_hat / middle)  # BWN's sign(0) = 0: no level
        # the Rademacher vectors: a function of the epoch, so a resumed run draws the same
        generator = torch.Generator(w_hat.device).manual_seed(self.epoch)
        total = torch.zeros(len(layout.sizes), dtype=torch.float64, device=w_hat.device)
        used = 0
        for x, y in batches:
            leaf = w_hat.detach().requires_grad_()
            logits = self.model(x, self.model.named(layout.unflatten(leaf)))
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y), leaf, create_graph=True)
            parts = zip(itertools.accumulate(layout.sizes, initial=0), layout.sizes, strict=False)
            for i, (start, size) in enumerate(parts):
                segment = slice(start, start + size)
                trace = self._trace(g, leaf, segment, a, generator)
                g_xq = (a[segment] * g[segment]).detach()
                total[i] += trace / size / (g_xq.std().item() * 3.0)
            used += 1
        if self.all_reduce is not None:  # every rank measured its own batches: their mean
            self.all_reduce(total, [])
        per_layer = (total / max(used, 1)).clamp(min=0).to(w_hat.dtype)
        return layout.broadcast(per_layer)

    def _trace(
        self, g: Tensor, leaf: Tensor, segment: slice, a: Tensor, generator: torch.Generator
    ) -> float:
        """Hutchinson's estimate of tr(H) of the layer at ``segment`` in x_q, stopped as their
        trace() stops: when the running mean moves by less than tol relative to the last one
        (a negative running mean therefore stops it at the second vector)."""
        values: list[float] = []
        trace = 0.0
        size = segment.stop - segment.start
        for _ in range(HUTCHINSON_ITERATIONS):
            # drawn in memory order, the flat layout's, as randint_like draws for the weight
            v = torch.randint(0, 2, (size,), generator=generator, device=leaf.device)
            v = torch.where(v == 0, -1.0, 1.0).to(leaf.dtype) * a[segment]  # x_q's, in W^
            direction = torch.zeros_like(leaf)
            direction[segment] = v
            (hv,) = torch.autograd.grad(g, leaf, grad_outputs=direction, retain_graph=True)
            values.append((hv[segment] * v).sum().item())
            mean = float(np.mean(values))
            if abs(mean - trace) / (trace + 1e-6) < HUTCHINSON_TOLERANCE:
                break
            trace = mean
        return float(np.mean(values))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["delta"] = self.delta  # measured: a resumed run keeps it until the next update
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.delta = state.get("delta", self.delta)
