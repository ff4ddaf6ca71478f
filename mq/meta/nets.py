"""Meta quantizers M: one small network shared by all layers, applied coordinate-wise.

Every net maps the previous step's gradient w.r.t. the quantized weights (g_W^) and the
previous transformed weights (W~), both flattened over all layers to shape (N,), to an
estimate of g_W~ of the same shape. Stateful nets (LSTMFC) also take and return a state.

A new meta net is a MetaNet subclass and a conf/meta/<name>.yaml whose ``net`` node names it
in ``_target_`` with its constructor's arguments (see conf/meta/multifc.yaml); Hydra builds it
and hands it to MetaQuantStep. Nothing else lists the meta nets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.meta.fused_lstm import BufferCache, FusedLSTMFC, compiled_cell, eager_cell, pick_linear

NONLINEARITIES = ("none", "relu", "tanh")
State = tuple[Tensor, Tensor] | None


def _activation(nonlinearity: str) -> nn.Module:
    if nonlinearity not in NONLINEARITIES:
        raise ConfigError(
            f"meta.net.nonlinearity={nonlinearity} is not known; "
            f"allowed: {', '.join(NONLINEARITIES)}"
        )
    return {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}[nonlinearity]()


# Every weight of the model goes through the meta net, so each hidden unit costs 4 bytes per
# weight and layer: at 4096 units ResNet-20's 0.27 M weights take 4.4 GB per layer already.
MAX_HIDDEN = 4096


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(hidden_size: int, num_layers: int | None = None) -> None:
    """The meta net's ``hidden_size`` and (FC nets) ``num_layers``: one-line ConfigErrors."""
    if not _is_int(hidden_size) or not 1 <= hidden_size <= MAX_HIDDEN:
        cost = ""
        if _is_int(hidden_size) and hidden_size > MAX_HIDDEN:
            cost = (
                f" (each weight goes through the meta net: {hidden_size * 4e6 / 1e9:,.1f} GB "
                "of activations per million weights and layer)"
            )
        raise ConfigError(
            f"meta.net.hidden_size={hidden_size} is not allowed; allowed: an integer in "
            f"1..{MAX_HIDDEN}{cost}"
        )
    if num_layers is not None and (not _is_int(num_layers) or num_layers < 2):
        raise ConfigError(
            f"meta.net.num_layers={num_layers} is not allowed; allowed: an integer >= 2"
        )


class MetaNet(nn.Module):
    """Base class; subclasses implement ``forward(grad_hat, w_tilde, state)``."""

    def initial_state(self, size: int, device: torch.device) -> State:
        return None

    def forward(self, grad_hat: Tensor, w_tilde: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError


class IdentitySTE(MetaNet):
    """g_W~ = g_W^ * 1{|W~| <= 1}: the STE written as a meta net (no parameters).

    With it, paper-mode MetaQuant reproduces plain STE training exactly; the tests use that.
    """

    def forward(self, grad_hat: Tensor, w_tilde: Tensor, state: State) -> tuple[Tensor, State]:
        return grad_hat * (w_tilde.abs() <= 1).to(grad_hat.dtype), state


class _FCChain(nn.Module):
    """Bias-free Linear 1 -> h -> ... -> 1 with ``nonlinearity`` between the layers."""

    def __init__(self, hidden_size: int, num_layers: int, nonlinearity: str) -> None:
        super().__init__()
        _check_sizes(hidden_size, num_layers)
        sizes = [1] + [hidden_size] * (num_layers - 1) + [1]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
            if i < num_layers - 1:
                layers.append(_activation(nonlinearity))
        self.layers = nn.Sequential(*layers)
        self.linear = nonlinearity == "none"

    def forward(self, x: Tensor) -> Tensor:
        if self.linear:
            # A bias-free, activation-free chain is one scalar: multiply the (1 x 1) product of
            # its matrices into x instead of pushing N coordinates through h-wide layers.
            # Same function and same gradients, at O(h^2) instead of O(N h) cost.
            scale = self.layers[0].weight
            for layer in self.layers[1:]:
                if isinstance(layer, nn.Linear):
                    scale = layer.weight @ scale
            return x * scale.reshape(())
        return self.layers(x.unsqueeze(1)).squeeze(1)


class FCGrad(MetaNet):
    """g_W~ = FC(g_W^)."""

    def __init__(self, hidden_size: int = 100, num_layers: int = 2, nonlinearity: str = "none"):
        super().__init__()
        self.fc = _FCChain(hidden_size, num_layers, nonlinearity)

    def forward(self, grad_hat: Tensor, w_tilde: Tensor, state: State) -> tuple[Tensor, State]:
        return self.fc(grad_hat), state


class MultiFC(MetaNet):
    """g_W~ = g_W^ * FC(W~)."""

    def __init__(self, hidden_size: int = 100, num_layers: int = 3, nonlinearity: str = "none"):
        super().__init__()
        self.fc = _FCChain(hidden_size, num_layers, nonlinearity)

    def forward(self, grad_hat: Tensor, w_tilde: Tensor, state: State) -> tuple[Tensor, State]:
        return grad_hat * self.fc(w_tilde), state


class LSTMFC(MetaNet):
    """g_W~ = g_W^ * Linear(h, 1)(LSTM(1, h)(W~)): one LSTM step per iteration, with hidden and
    cell state kept per coordinate across iterations (the caller detaches them).

    The head is a fully-connected layer with a bias: the paper calls it "a fully-connected
    layer" (MultiFC and FCGrad are the ones it and the released code make bias-free), and the
    released MetaLSTMFC's ``nn.Linear(h, 1)`` has one. Both update modes use it.

    ``fused`` (default) computes the same function with ``FusedLSTMFC``; ``fused=False`` is the
    plain ``nn.LSTMCell`` formulation, kept as the reference the equivalence tests compare to.
    ``block``: rows per block of the fused path (None: 2048 on CPU, all rows on a GPU).
    ``compile``: fuse the block's elementwise work with torch.compile (fused path only).
    """

    def __init__(
        self,
        hidden_size: int = 100,
        nonlinearity: str = "none",
        state_dtype: str = "float32",
        fused: bool = True,
        block: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(hidden_size)
        self.cell = nn.LSTMCell(1, hidden_size)
        self.nonlinearity = nonlinearity
        self.act = _activation(nonlinearity)
        self.out = nn.Linear(hidden_size, 1)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if state_dtype not in dtypes:
            raise ConfigError(
                f"meta.net.state_dtype={state_dtype} is not known; allowed: {', '.join(dtypes)}"
            )
        self.state_dtype = dtypes[state_dtype]
        self.fused = fused
        self.block = block
        self.cell_fn = compiled_cell() if compile else eager_cell
        self._cache = BufferCache()
        self._linear: dict[tuple[torch.device, torch.dtype], Callable[..., Tensor]] = {}

    def initial_state(self, size: int, device: torch.device) -> State:
        h = torch.zeros(size, self.cell.hidden_size, device=device, dtype=self.state_dtype)
        return h, torch.zeros_like(h)

    def forward(self, grad_hat: Tensor, w_tilde: Tensor, state: State) -> tuple[Tensor, State]:
        assert state is not None
        if self.fused:
            block = self.block or (2048 if w_tilde.device.type == "cpu" else w_tilde.numel())
            cell = self.cell
            key = (w_tilde.device, cell.weight_hh.dtype)
            if key not in self._linear:
                self._linear[key] = pick_linear(*key)
            scale, h, c = FusedLSTMFC.apply(
                w_tilde.to(cell.weight_hh.dtype),
                *state,
                cell.weight_ih,
                cell.weight_hh,
                cell.bias_ih,
                cell.bias_hh,
                self.out.weight,
                self.nonlinearity,
                max(block, 1),
                self.cell_fn,
                self._linear[key],
                self._cache,
            )
            return grad_hat * (scale + self.out.bias), (h, c)
        dtype = self.cell.weight_ih.dtype
        h, c = self.cell(w_tilde.unsqueeze(1), (state[0].to(dtype), state[1].to(dtype)))
        scale = self.out(self.act(h)).squeeze(1)
        return grad_hat * scale, (h.to(self.state_dtype), c.to(self.state_dtype))
