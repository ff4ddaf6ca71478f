"""Activation quantizers: x -> x_q at the input of every conv but the first (the first sees the
image), applied by forward pre-hooks that mq.quant.layers.QuantizedModel sets on the convs.

An activation quantizer is an ``ActQuantizer``: a module whose ``forward`` quantizes one conv's
input, differentiably where its method says so. QuantizedModel gives each conv its own copy,
so a learnable clip (PACT's alpha) or step (LSQ's s) is one parameter per conv input; they are
ordinary parameters of the model outside the network's own state dict, updated by the step's
optimizer for the non-weight parameters and saved in checkpoint.pt under ``act``. A new one is
its class and conf/act/<name>.yaml (``_target_`` and ``bit_width: ${act_bits}``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.quant.functions import check_bit_width, clipped_ste


class ActQuantizer(nn.Module):
    """One conv input's quantizer. ``bit_widths``: the act_bits its constructor takes (it
    refuses others in one line); ``name``: its conf/act/ option, for error lines."""

    name: ClassVar[str]
    bit_widths: ClassVar[range]

    def __init__(self, bit_width: int) -> None:
        super().__init__()
        check_bit_width(bit_width, self.bit_widths, self.name, key="act_bits")
        self.bit_width = bit_width

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """A forward pre-hook for the conv ``module``: its input quantized. A bound method, so a
        deep copy of the model hooks the copied quantizer."""
        return (self(args[0]), *args[1:])

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}"


class SignActivation(ActQuantizer):
    """Binary activations: x_q = sign(x), backward g * 1{|x| <= 1} (the clipped STE of the
    binary papers: BNN's hardtanh derivative)."""

    name = "sign"
    bit_widths = range(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return clipped_ste(x, torch.sign(x.detach()))


class _PACT(torch.autograd.Function):
    """PACT (Choi et al. 2018): y = clip(x, 0, alpha), y_q = round(y (2^k-1)/alpha) alpha/(2^k-1).
    Backward (the paper's STE through the rounding): dy_q/dx = 1{0 <= x <= alpha},
    dy_q/dalpha = 1{x >= alpha}; plus 2 decay alpha, the gradient of the L2 term decay alpha^2
    on the loss."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, levels: int, decay: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        ctx.decay = decay
        scale = levels / alpha
        return torch.round(torch.minimum(x.clamp(min=0), alpha) * scale) / scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        inside = (x >= 0) & (x <= alpha)
        grad_alpha = (grad * (x >= alpha).to(grad.dtype)).sum() + 2 * ctx.decay * alpha
        return grad * inside.to(grad.dtype), grad_alpha.reshape(alpha.shape), None, None


class PACTActivation(ActQuantizer):
    """PACT: a learnable clip alpha per conv input (initialised to ``alpha_init``), k-bit uniform
    levels on [0, alpha]; ``alpha_decay``: the L2 coefficient on alpha (the loss gets
    alpha_decay * alpha^2), besides the optimizer's own weight decay."""

    name = "pact"
    bit_widths = range(1, 9)

    def __init__(self, bit_width: int, alpha_init: float = 10.0, alpha_decay: float = 2e-4) -> None:
        super().__init__(bit_width)
        if not (isinstance(alpha_init, (int, float)) and 0 < alpha_init < math.inf):
            raise ConfigError(f"act.alpha_init={alpha_init} is not allowed; allowed: a number > 0")
        if not (isinstance(alpha_decay, (int, float)) and 0 <= alpha_decay < math.inf):
            raise ConfigError(
                f"act.alpha_decay={alpha_decay} is not allowed; allowed: a number >= 0"
            )
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.alpha_decay = float(alpha_decay)

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha.to(x.dtype)
        return _PACT.apply(x, alpha, 2**self.bit_width - 1, self.alpha_decay)

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, alpha_decay={self.alpha_decay}"


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """The value of ``x``, its gradient times ``scale`` (LSQ's g)."""
    return (x - x * scale).detach() + x * scale


def round_pass(x: Tensor) -> Tensor:
    """round(x), its gradient the identity."""
    return (x.round() - x).detach() + x


class LSQActivation(ActQuantizer):
    """LSQ (Esser et al., ICLR 2020) for unsigned activations: x_q = round(clip(x/s, 0, Q_P)) s,
    Q_P = 2^k - 1, with a learnable step s per conv input whose gradient is scaled by
    g = 1/sqrt(N Q_P), N the elements of the quantized tensor (batch included, as the paper's
    listing and the common implementations write ``v.numel()``). s starts at 2 mean|x| / sqrt(Q_P)
    of the first batch it sees (the paper's initialisation; averaged over ranks under data
    parallelism, so the replicas agree)."""

    name = "lsq"
    bit_widths = range(1, 9)

    def __init__(self, bit_width: int) -> None:
        super().__init__(bit_width)
        self.q_p = 2**bit_width - 1
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready: bool | None = None  # the buffer's value, read once (a device sync)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None

    def _initialize(self, x: Tensor) -> None:
        with torch.no_grad():
            mean = x.detach().abs().mean().to(self.step.dtype)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(mean)
                mean /= torch.distributed.get_world_size()
            self.step.copy_(2 * mean / math.sqrt(self.q_p))
            self.initialized.fill_(True)
        self._ready = True

    def forward(self, x: Tensor) -> Tensor:
        if self._ready is None:
            self._ready = bool(self.initialized)
        if not self._ready:
            self._initialize(x)
        s = grad_scale(self.step.to(x.dtype), 1.0 / math.sqrt(x.numel() * self.q_p))
        return round_pass(torch.clamp(x / s, 0, self.q_p)) * s
