"""Training steps: the STE baseline and MetaQuant (paper Algorithm 1).

A step object owns everything that changes while training (optimizers, meta net, the previous
step's gradients) and exposes ``train_step``, ``set_lr``, ``state_dict``/``load_state_dict``.
The model's quantized weights are updated by one optimizer and every other parameter (BatchNorm,
fc bias) by a second one, so the quantized weights can wait for their meta gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.meta.nets import MetaNet
from mq.quant.flat import FlatLayout
from mq.quant.layers import QuantizedModel, quantized_weights

OptimizerFactory = Callable[..., torch.optim.Optimizer]
UPDATES = ("paper", "original")


class NetworkInput(NamedTuple):
    """What a step's network reads in place of the model's own parameters."""

    flat: Tensor | None  # W^ of every quantized layer, flat (FlatLayout); None: full precision
    extra: dict[str, Tensor]  # by parameter name: the released look-ahead biases, or nothing


class _Pending(NamedTuple):
    first: bool
    weights: Tensor  # W (W_meta after the first step), flat, W^'s graph starts here
    w_hat: Tensor
    w_tilde: Tensor
    leaf: Tensor  # W^ as the network's leaf: its gradient is g_W^


def network_tensors(model: nn.Module, given: NetworkInput) -> tuple[dict[str, Tensor], ...]:
    """``model(x, *network_tensors(model, given))`` runs the network on ``given``: () for a
    full-precision model's own parameters, else the per-layer tensors QuantizedModel takes."""
    if given.flat is None:
        return ()
    assert isinstance(model, QuantizedModel)
    layout = model.layout()
    return ({**model.named(layout.unflatten(given.flat)), **given.extra},)


def _split(model: nn.Module) -> tuple[list[str], list[nn.Parameter], list[nn.Parameter]]:
    quantized = quantized_weights(model)
    ids = {id(p) for p in quantized.values()}
    others = [p for p in model.parameters() if id(p) not in ids]
    return list(quantized), list(quantized.values()), others


def _set_lr(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr


def needs_quantized(model: nn.Module, option: str) -> QuantizedModel:
    """``model`` if its weights are quantized; meta=``option`` cannot serve quant=none."""
    if not isinstance(model, QuantizedModel):
        raise ConfigError(
            f"meta={option} needs quantized weights but quant=none; allowed with quant=none: ste"
        )
    return model


class STEStep:
    """Baseline: autograd through A(W) and the clipped STE, then ordinary optimizer steps."""

    # Data parallelism (mq.core.distributed.average_gradients): averages a flat tensor and the
    # parameters' gradients over ranks right after the backward; None with one process.
    all_reduce: Callable[[Tensor | None, list[nn.Parameter]], None] | None = None

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory) -> None:
        self.model = model
        _, self.weights, others = _split(model)
        self.weight_optimizer = optimizer(self.weights) if self.weights else None
        self.other_optimizer = optimizer(others)

    def set_lr(self, lr: float, meta_lr_factor: float = 1.0) -> None:
        _set_lr(self.weight_optimizer, lr)
        _set_lr(self.other_optimizer, lr)

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Called with the lr at the start of each epoch (``epoch`` of ``epochs``, from 0), for
        an estimator that anneals over training (mq.meta.ede); the STE does not."""

    def start_epoch(self, batches: Iterator[tuple[Tensor, Tensor]]) -> None:
        """Called after ``set_progress`` at the start of an epoch that starts at its first batch
        (not on resuming one part-way), with that epoch's training batches, for an estimator
        that measures the model before the epoch's steps (EWGS's Hessian delta); the STE
        does not. Batches it does not take are not drawn."""

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One step on a batch; returns (loss, logits), both still on the device."""
        logits = self.model(x, *network_tensors(self.model, self.prepare()))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.finish()
        return loss.detach(), logits.detach()

    def prepare(self) -> NetworkInput:
        """A step's first part: zero the gradients and return what the network reads in place
        of its own weights. The network's forward and backward come next, here or fused with
        other runs' (mq.meta.pack); ``finish`` then reads the gradients they left."""
        for opt in (self.weight_optimizer, self.other_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        if not isinstance(self.model, QuantizedModel):
            return NetworkInput(None, {})
        layout = self.model.layout(self.weights)
        return NetworkInput(self.model.weight_quant(layout.flatten(self.weights), layout), {})

    def finish(self) -> None:
        """A step's last part, after the network's backward: the optimizer steps."""
        if self.all_reduce is not None:
            self.all_reduce(None, _params(self.weight_optimizer, self.other_optimizer))
        for opt in (self.weight_optimizer, self.other_optimizer):
            if opt is not None:
                opt.step()

    def state_dict(self) -> dict:
        return {
            "weight_optimizer": self.weight_optimizer.state_dict()
            if self.weight_optimizer
            else None,
            "other_optimizer": self.other_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.weight_optimizer is not None:
            self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.other_optimizer.load_state_dict(state["other_optimizer"])


def released_adam_eps(optimizer: torch.optim.Optimizer) -> None:
    """Make torch's Adam take its next step as the released ``meta_utils/adam.py`` does.

    That Adam adds eps to sqrt(v) before the bias correction: its step is
    lr * m_hat / (sqrt(v_hat) + eps / sqrt(1 - beta2^t)), i.e. torch's with eps scaled by
    1 / sqrt(1 - beta2^t) at step t. Setting that eps before each step gives the same numbers
    and keeps torch's optimizer (and its state) doing the work. Other optimizers: no change."""
    if type(optimizer) is not torch.optim.Adam:
        return
    for group in optimizer.param_groups:
        base = group.setdefault("released_eps", group["eps"])  # saved with the state dict
        state = next((optimizer.state[p] for p in group["params"] if p in optimizer.state), {})
        t = int(state.get("step", 0)) + 1
        group["eps"] = base / math.sqrt(1 - group["betas"][1] ** t)


class MetaQuantStep(STEStep):
    """MetaQuant: the quantized weights' gradient comes from a meta net M.

    Step t = 0 records g_W^ and W~ and updates only the unquantized parameters. For t > 0:
    m = M(g_W^(t-1), W~(t-1)); g_W = m * calibration; u = pi(g_W) (the optimizer's refinement);
    the forward sees W_meta = W - lr * (g_W + (u - g_W).detach()), whose derivative carries the
    loss back to M's parameters; then M steps and W <- W - lr * u.

    The late update is done first here, by the weight optimizer itself with g_W as gradient:
    afterwards W already equals W - lr * u, so W_meta's value is W and only its derivative term
    -lr * (g_W - g_W.detach()) is added. Same numbers, and the optimizer keeps its own state.

    ``update="original"`` reproduces the released code (csyhhu/MetaQuant) step for step:
    W_meta's value uses the previous step's refined update (the STE gradient at t = 1), scaled
    to the current lr, its derivative the current meta output; step 0 updates nothing; the
    quantized layers' biases enter the forward with the same look-ahead b - lr * u_b(t-1);
    Adam adds eps before its bias correction (``released_adam_eps``); the quantizer quantizes
    W_meta as the released code does (``quantize_original``: BWN-F takes each conv filter's
    alpha from the weights before the meta update).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        net: MetaNet,
        lr: float = 1e-3,
        update: str = "paper",
        lr_decay: bool = True,
    ) -> None:
        super().__init__(model, optimizer)
        if update not in UPDATES:
            raise ConfigError(f"meta.update={update} is not known; allowed: {', '.join(UPDATES)}")
        self.model: QuantizedModel = needs_quantized(model, type(net).__name__.lower())
        self.quantizer = model.weight_quant
        self.update = update
        self.base_meta_lr = lr
        self.lr_decay = lr_decay
        self.biases = model.quantized_biases()
        device = self.weights[0].device
        self.meta_net = net.to(device)  # built by Hydra from conf/meta/<name>.yaml's net node
        params = list(self.meta_net.parameters())
        self.meta_optimizer = torch.optim.Adam(params, lr=lr) if params else None
        self.meta_state = self.meta_net.initial_state(model.layout().numel, device)
        # Flat over all quantized layers, in the model's FlatLayout order:
        self.grad_hat: Tensor | None = None  # g_W^ of the previous step
        self.w_tilde: Tensor | None = None  # W~ of the previous step
        self.previous_update: Tensor | None = None  # lr * u of the previous step (original)
        # original: lr * u_b of the previous step for each quantized layer's bias
        self.previous_bias_update: list[Tensor] | None = None
        self._pending: _Pending | None = None  # from prepare to finish, within one step

    def set_lr(self, lr: float, meta_lr_factor: float = 1.0) -> None:
        old = self.weight_optimizer.param_groups[0]["lr"] if self.weight_optimizer else lr
        if self.update == "original" and old != lr and old > 0:
            # the released look-ahead is the *current* lr times the previous refined gradient
            if self.previous_update is not None:
                self.previous_update = self.previous_update * (lr / old)
            if self.previous_bias_update is not None:
                self.previous_bias_update = [u * (lr / old) for u in self.previous_bias_update]
        super().set_lr(lr)
        _set_lr(self.meta_optimizer, self.base_meta_lr * (meta_lr_factor if self.lr_decay else 1))

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.update == "original":
            released_adam_eps(optimizer)
        optimizer.step()

    def _meta_weights(self, layout: FlatLayout) -> tuple[Tensor, Tensor]:
        """Run M, take the late update, and return (W_meta, W before the update), flat."""
        assert self.grad_hat is not None and self.w_tilde is not None
        assert self.weight_optimizer is not None
        lr = self.weight_optimizer.param_groups[0]["lr"]
        g_tilde, state = self.meta_net(self.grad_hat, self.w_tilde, self.meta_state)
        self.meta_state = None if state is None else (state[0].detach(), state[1].detach())
        with torch.no_grad():
            before = layout.flatten(self.weights)
        calibration = self.quantizer.calibration(before, layout)
        grad = g_tilde if calibration is None else g_tilde * calibration
        for w, g in zip(self.weights, layout.unflatten(grad.detach()), strict=True):
            w.grad = g
        self._optimizer_step(self.weight_optimizer)
        derivative = -lr * (grad - grad.detach())  # zero in value, d/dphi in gradient
        with torch.no_grad():
            after = layout.flatten(self.weights)
        if self.update == "paper":
            return after + derivative, before
        assert self.previous_update is not None
        w_meta = before - self.previous_update + derivative
        self.previous_update = before - after
        return w_meta, before

    def _quantize(
        self, weights: Tensor, before: Tensor | None, layout: FlatLayout
    ) -> tuple[Tensor, Tensor]:
        """(W^, W~) of the flat ``weights``; ``before``: W before the meta update, if any."""
        w_tilde = self.quantizer.transform(weights, layout)
        if self.update == "original" and before is not None:
            return self.quantizer.quantize_original(w_tilde, before, layout), w_tilde
        return self.quantizer.quantize(w_tilde, layout), w_tilde

    def prepare(self) -> NetworkInput:
        layout = self.model.layout(self.weights)
        first = self.grad_hat is None
        if first:
            weights, before = layout.flatten(self.weights), None
        else:
            weights, before = self._meta_weights(layout)
        w_hat, w_tilde = self._quantize(weights, before, layout)
        # Cut the graph at W^: the network's backward stops there and yields g_W^ on this leaf;
        # a second, small backward in finish carries g_W^ on through Q, A and M.
        leaf = w_hat.detach().requires_grad_()
        for opt in (self.other_optimizer, self.meta_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        look_ahead = {}
        if self.previous_bias_update is not None:
            for (name, b), u in zip(self.biases.items(), self.previous_bias_update, strict=True):
                look_ahead[name] = b - u  # the released look-ahead; b takes the gradient
        self._pending = _Pending(first, weights, w_hat, w_tilde, leaf)
        return NetworkInput(leaf, look_ahead)

    def finish(self) -> None:
        first, weights, w_hat, w_tilde, leaf = self._pending
        self._pending = None
        grad_hat = leaf.grad
        assert grad_hat is not None
        if self.all_reduce is not None:  # g_W^ and the other parameters' gradients: one call
            self.all_reduce(grad_hat, _params(self.other_optimizer))
        original = self.update == "original"
        if first:
            if original:
                # The released code's second step moves by the STE gradient of step 0.
                (grad,) = torch.autograd.grad(w_hat, weights, grad_hat)
                assert self.weight_optimizer is not None
                lr = self.weight_optimizer.param_groups[0]["lr"]
                self.previous_update = lr * grad
                self.previous_bias_update = [lr * b.grad for b in self.biases.values()]
        elif self.meta_optimizer is not None:
            torch.autograd.backward(w_hat, grad_hat)
            self.meta_optimizer.step()
        if not (first and original):  # the released step 0 updates nothing at all
            biases = [b.detach().clone() for b in self.biases.values()] if original else []
            self._optimizer_step(self.other_optimizer)
            if original:
                pairs = zip(biases, self.biases.values(), strict=True)
                self.previous_bias_update = [old - b.detach() for old, b in pairs]
        self.grad_hat = grad_hat
        self.w_tilde = w_tilde.detach()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            meta_net=self.meta_net.state_dict(),
            meta_optimizer=self.meta_optimizer.state_dict() if self.meta_optimizer else None,
            meta_state=self.meta_state,
            grad_hat=self.grad_hat,
            w_tilde=self.w_tilde,
            previous_update=self.previous_update,
            previous_bias_update=self.previous_bias_update,
            flat_orders=self.model.layout().orders,  # how the flat tensors above are laid out
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.meta_net.load_state_dict(state["meta_net"])
        if self.meta_optimizer is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        meta_state, grad_hat = state["meta_state"], state["grad_hat"]
        w_tilde, previous_update = state["w_tilde"], state["previous_update"]
        layout = self.model.layout()
        if isinstance(previous_update, list):  # saved per layer before the flat layout
            previous_update = torch.cat([u.reshape(-1) for u in previous_update])
        orders = state.get("flat_orders")  # None: saved before the flat layout, row-major
        if orders != layout.orders:
            grad_hat, w_tilde, previous_update = (
                None if t is None else layout.reorder(t, orders)
                for t in (grad_hat, w_tilde, previous_update)
            )
            if meta_state is not None:
                meta_state = tuple(layout.reorder(t, orders) for t in meta_state)
        self.meta_state, self.grad_hat, self.w_tilde = meta_state, grad_hat, w_tilde
        self.previous_update = previous_update
        self.previous_bias_update = state.get("previous_bias_update")


def _params(*optimizers: torch.optim.Optimizer | None) -> list[nn.Parameter]:
    return [p for o in optimizers if o is not None for g in o.param_groups for p in g["params"]]
