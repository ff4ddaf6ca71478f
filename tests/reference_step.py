"""MetaQuant (paper Algorithm 1) written layer by layer, the straightforward way.

The step in mq.meta.step runs the quantizer and the update over all layers' weights at once
(mq.quant.flat); this one loops over the layers with the per-tensor quantizer API and keeps its
flat tensors in plain row-major order per layer, with ``previous_update`` as a list, as mq's
checkpoints did before the flat layout. Tests compare the two and resume one from the other.

``update="original"`` follows the released code layer by layer as its MetaQuantConv/Linear do:
nothing moves at step 0, each layer's bias enters the forward as b - lr * (its previous
gradient), and a BWN-F conv takes alpha from its weight before the meta update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mq.meta import MetaQuantStep


class PerLayerMetaQuantStep(MetaQuantStep):
    def _flat(self, tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _per_layer_meta_weights(self) -> list[Tensor]:
        lr = self.weight_optimizer.param_groups[0]["lr"]
        g_tilde, state = self.meta_net(self.grad_hat, self.w_tilde, self.meta_state)
        self.meta_state = None if state is None else (state[0].detach(), state[1].detach())
        sizes = [w.numel() for w in self.weights]
        grads = []
        for w, g in zip(self.weights, g_tilde.split(sizes), strict=True):
            calibration = self.quantizer.calibration(w)
            g = g.view_as(w)
            grads.append(g if calibration is None else g * calibration)
        before = [w.detach().clone() for w in self.weights]
        self.before = before
        for w, g in zip(self.weights, grads, strict=True):
            w.grad = g.detach()
        self._optimizer_step(self.weight_optimizer)
        w_meta = []
        for i, (w, g) in enumerate(zip(self.weights, grads, strict=True)):
            derivative = -lr * (g - g.detach())
            if self.update == "paper":
                w_meta.append(w.detach() + derivative)
            else:
                w_meta.append(before[i] - self.previous_update[i] + derivative)
        if self.update == "original":
            self.previous_update = [
                b - w.detach() for b, w in zip(before, self.weights, strict=True)
            ]
        return w_meta

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        first = self.grad_hat is None
        original = self.update == "original"
        weights = list(self.weights) if first else self._per_layer_meta_weights()
        w_tilde = [self.quantizer.transform(w) for w in weights]
        if original and not first:
            w_hat = [
                self.quantizer.quantize_original(t, b)
                for t, b in zip(w_tilde, self.before, strict=True)
            ]
        else:
            w_hat = [self.quantizer.quantize(t) for t in w_tilde]
        leaves = [w.detach().requires_grad_() for w in w_hat]
        for opt in (self.other_optimizer, self.meta_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        tensors = self.model.named(leaves)
        if original and not first:
            lr = self.weight_optimizer.param_groups[0]["lr"]
            for name, b in self.biases.items():
                tensors[name] = b - lr * self.bias_grads[name]
        logits = self.model(x, tensors)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grad_hat = [leaf.grad for leaf in leaves]
        if first:
            if original:
                grads = torch.autograd.grad(w_hat, self.weights, grad_hat)
                lr = self.weight_optimizer.param_groups[0]["lr"]
                self.previous_update = [lr * g for g in grads]
        elif self.meta_optimizer is not None:
            torch.autograd.backward(w_hat, grad_hat)
            self.meta_optimizer.step()
        if original:
            if first:
                self.bias_grads = {n: b.grad.clone() for n, b in self.biases.items()}
            else:  # the refined gradient, as the released optimizer leaves it in b.grad
                old = {n: b.detach().clone() for n, b in self.biases.items()}
                self._optimizer_step(self.other_optimizer)
                lr = self.weight_optimizer.param_groups[0]["lr"]
                self.bias_grads = {n: (old[n] - b.detach()) / lr for n, b in self.biases.items()}
        else:
            self.other_optimizer.step()
        self.grad_hat = self._flat(grad_hat)
        self.w_tilde = self._flat([t.detach() for t in w_tilde])
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict:
        state = super().state_dict()
        del state["flat_orders"]  # the layout of checkpoints written before the flat layout
        if self.update == "original" and self.grad_hat is not None:
            lr = self.weight_optimizer.param_groups[0]["lr"]
            state["previous_bias_update"] = [lr * g for g in self.bias_grads.values()]
        return state
