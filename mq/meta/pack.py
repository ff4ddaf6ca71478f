"""Packed runs: K runs whose networks share one architecture, trained as one fused network.

Each run keeps its own model, step (quantizer, meta net, optimizers and their state) and batches;
only the network's forward and backward are fused. The K networks' parameters and buffers move
into stacked tensors (K, ...), each run's own parameters and buffers becoming views of its slice,
and ``torch.func.vmap`` runs the network once over the K runs' weights and batches (each
convolution becomes one grouped convolution). A pack step is every run's ``prepare`` (its
quantizer and meta net), the fused forward and backward, then every run's ``finish`` (its
optimizer steps). Each run's loss reads its own slice only, so the runs' gradients never mix:
a pack of K equals the K runs trained alone, up to float rounding, and a run whose loss is NaN
leaves the others untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mq.core.errors import ConfigError
from mq.meta.step import NetworkInput, STEStep
from mq.quant.layers import QuantizedModel, unwrap


def _signature(model: nn.Module) -> tuple:
    """What two models must share to be packed: network class, parameters and buffers."""
    net = unwrap(model)
    tensors = [*net.named_parameters(), *net.named_buffers()]
    quantized = isinstance(model, QuantizedModel)
    return (
        type(net).__name__,
        tuple((name, tuple(t.shape), t.dtype, str(t.device)) for name, t in tensors),
        tuple(model.weight_names) if quantized else None,
    )


def why_not_packable(model: nn.Module, step: object) -> str | None:
    """Why this run cannot join a pack; None when it can."""
    if isinstance(model, QuantizedModel) and model.act_inputs:
        return "activation quantizers (act) are not packed"
    if not isinstance(step, STEStep):
        return f"the step {type(step).__name__} has no prepare/finish"
    if step.all_reduce is not None:
        return "a data-parallel run is not packed"
    return None


def _stacked_like(tensors: Sequence[Tensor]) -> Tensor:
    """(K, ...) holding ``tensors``, each slice with its tensor's own strides (a channels-last
    weight stays channels-last, so the run's flat layout and saved step state still fit)."""
    first = tensors[0]
    stack = torch.empty_strided(
        (len(tensors), *first.shape),
        (first.numel(), *first.stride()),
        dtype=first.dtype,
        device=first.device,
    )
    with torch.no_grad():
        for k, t in enumerate(tensors):
            stack[k].copy_(t)
    return stack


class Pack:
    """``models[k]`` trained by ``steps[k]``, the networks fused. The models' parameters and
    buffers become views of stacked tensors here: build the steps first (their optimizers hold
    the parameter objects, which stay the same), pack, then train; ``models[k]`` still works
    alone (evaluation, a checkpoint, a step of its own)."""

    def __init__(
        self, models: Sequence[nn.Module], steps: Sequence[STEStep], fuse: bool | None = None
    ) -> None:
        if not models or len(models) != len(steps):
            raise ValueError("a pack needs one step per model, and at least one model")
        for k, (model, step) in enumerate(zip(models, steps, strict=True)):
            reason = why_not_packable(model, step)
            if reason is not None:
                raise ConfigError(f"run {k} of the pack cannot be packed: {reason}")
        first = _signature(models[0])
        for k, model in enumerate(models[1:], 1):
            if _signature(model) != first:
                raise ConfigError(
                    f"run {k} of the pack has another network than run 0 "
                    "(class, parameter shapes, dtype or device): a pack needs one architecture"
                )
        self.models, self.steps = list(models), list(steps)
        device = next(unwrap(self.models[0]).parameters()).device
        # None: fused on a GPU (one kernel for K runs' work beats K launches); on a CPU one run's
        # convolution already fills the cores, and the grouped convolution's backward is slower
        # there than K plain ones (python -m mq.bench --pack): the networks run one by one.
        self.fused = device.type == "cuda" if fuse is None else fuse
        self.net = unwrap(self.models[0])  # its modules run the fused forward under vmap
        nets = [unwrap(m) for m in self.models]
        self.params = self._alias(nets, "parameter")
        self.buffers = self._alias(nets, "buffer")
        # per run, name -> its own parameter (a view of self.params[name][k])
        self.own = [dict(net.named_parameters()) for net in nets]

    @staticmethod
    def _alias(nets: list[nn.Module], kind: str) -> dict[str, Tensor]:
        """Stack every net's parameters (or buffers) and make each net's own a view of its slice."""
        named = [
            dict(net.named_parameters() if kind == "parameter" else net.named_buffers())
            for net in nets
        ]
        stacked = {name: _stacked_like([n[name].detach() for n in named]) for name in named[0]}
        for k, net in enumerate(nets):
            for name, stack in stacked.items():
                if kind == "parameter":
                    named[k][name].data = stack[k]
                else:
                    owner, _, attr = name.rpartition(".")
                    net.get_submodule(owner)._buffers[attr] = stack[k]
        return stacked

    def __len__(self) -> int:
        return len(self.models)

    def _forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.net, (params, buffers), (x,), tie_weights=False)

    def inputs(self, given: list[NetworkInput]) -> dict[str, Tensor]:
        """The fused network's parameters (K, ...): the runs' W^, their extra tensors, and
        leaves sharing the stacked parameters' storage for everything else."""
        inputs: dict[str, Tensor] = {}
        if given[0].flat is not None:
            model = self.models[0]
            assert isinstance(model, QuantizedModel)
            flat = torch.stack([g.flat for g in given])  # type: ignore[misc]
            inputs.update(model.named(model.layout().unflatten_stacked(flat)))
        for name in {name for g in given for name in g.extra}:
            # a run without this extra (another meta.update) reads its own parameter
            own = (g.extra.get(name, self.own[k][name]) for k, g in enumerate(given))
            inputs[name] = torch.stack(list(own))
        for name, stack in self.params.items():
            if name not in inputs:
                inputs[name] = stack.detach().requires_grad_()
        return inputs

    def train_step(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """One step of every run on its own batch (``xs[k]``, ``ys[k]``, all of one shape);
        returns each run's (loss, logits), still on the device."""
        if not self.fused:
            return [step.train_step(x, y) for step, x, y in zip(self.steps, xs, ys, strict=True)]
        given = [step.prepare() for step in self.steps]
        inputs = self.inputs(given)
        x, y = torch.stack(list(xs)), torch.stack(list(ys))
        logits = vmap(self._forward)(inputs, self.buffers, x)
        per_image = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        losses = per_image.view(y.shape).mean(1)
        losses.sum().backward()
        for k, step in enumerate(self.steps):
            for name, param in self.own[k].items():
                leaf = inputs[name]
                if leaf.is_leaf and leaf.grad is not None:  # else autograd gave param its own
                    param.grad = leaf.grad[k]
            step.finish()
        return [(losses[k].detach(), logits[k].detach()) for k in range(len(self.steps))]
