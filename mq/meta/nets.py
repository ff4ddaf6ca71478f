"""Meta quantizers M: one small network shared by all layers, applied coordinate-wise.

Every net maps the previous step's gradient w.r.t. the quantized weights (g_W^) and the
previous transformed weights (W~), both flattened over all layers to shape (N,), to an
estimate of g_W~ of the same shape. Stateful nets (LSTMFC) also take and return a state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mq.errors import ConfigError

log = logging.getLogger(__name__)
NONLINEARITIES = ("none", "relu", "tanh")
State = tuple[Tensor, Tensor] | None


def _activation(nonlinearity: str) -> nn.Module:
    if nonlinearity not in NONLINEARITIES:
        raise ConfigError(
            f"meta.nonlinearity={nonlinearity} is not known; allowed: {', '.join(NONLINEARITIES)}"
        )
    return {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}[nonlinearity]()


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
        if num_layers < 2:
            raise ConfigError(f"meta.num_layers={num_layers} is too small; allowed: 2 or more")
        if hidden_size < 1:
            raise ConfigError(f"meta.hidden_size={hidden_size} is too small; allowed: 1 or more")
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


class _BufferCache:
    """Large output buffers of ``_FusedLSTMFC`` kept across calls. Fresh (N, 4h) memory costs a
    page fault per 4 KiB on first write (glibc returns big blocks to the OS on free), about a
    fifth of the fused forward at N = 270k; a buffer is handed out again only when nothing else
    still holds a view of it (the previous state, a saved tensor, a caller's copy). Two slots per
    name, so that the state returned last time, still held by the caller, does not block reuse."""

    def __init__(self) -> None:
        self.slots: dict[tuple[str, int], tuple[Tensor, int]] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        numel = 1
        for size in shape:
            numel *= size
        for slot in (0, 1):
            entry = self.slots.get((key, slot))
            if entry is None:
                break
            base, free = entry
            if (
                base.dtype == dtype
                and base.device == torch.device(device)
                and base.numel() >= numel
                and _storage_uses(base) <= free
            ):
                return base[:numel].view(shape)
        else:
            slot = 0 if self.slots.get((key, 1), (None, 0))[0] is not None else 1
        base = torch.empty(numel, dtype=dtype, device=device)
        self.slots[(key, slot)] = (base, _storage_uses(base))
        return base[:numel].view(shape)


def _storage_uses(t: Tensor) -> int:
    """How many tensors share ``t``'s storage (views included); large where unknown."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return 1 << 30


class _FusedLSTMFC(torch.autograd.Function):
    """One LSTMCell step and the bias-free Linear(h, 1) head, for N independent coordinates.

    Autograd through ``nn.LSTMCell`` keeps about ten (N, h) tensors alive and makes a dozen
    passes over them; at N = 270k, h = 100 that is memory traffic, not arithmetic. Here the
    forward runs in row blocks that stay in cache and also computes, per row, d(scale)/d(gates)
    (the head's gradient is rank one: dh = dscale * w_out, so the whole backward is known up to
    the factor dscale). The backward is then one matrix product per block. The meta net's inputs
    and the carried state get no gradient (the step detaches them), so none is computed.
    Each block's results are written straight into their rows of the outputs (out= and in-place
    ops into preallocated views, block-sized scratch reused across blocks): no copies, no cat.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor,
        b_hh: Tensor,
        w_out: Tensor,
        nonlinearity: str,
        block: int,
        cell: Callable[..., None],
        linear: Callable[..., Tensor],
        cache: _BufferCache | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, hidden = h.shape
        dtype = w_hh.dtype
        dev = h.device

        def empty(key: str, *shape: int, dtype: torch.dtype = dtype) -> Tensor:
            if cache is None:
                return torch.empty(*shape, dtype=dtype, device=dev)
            return cache.get(key, shape, dtype, dev)

        h_new, c_new = empty("h", n, hidden, dtype=h.dtype), empty("c", n, hidden, dtype=c.dtype)
        # The head's backward needs act(h_new) in full precision; h_new itself is that when
        # there is no activation and the state is kept in the compute dtype.
        same = nonlinearity == "none" and h.dtype == dtype
        state_same = h.dtype == dtype
        act = h_new if same else empty("act", n, hidden)
        d_gates = empty("d_gates", n, 4 * hidden)
        scale = torch.empty(n, dtype=dtype, device=dev)
        # _cell wants the g gate's pre-activations doubled: scale its rows of the weights
        gate_scale = torch.ones(4 * hidden, 1, dtype=dtype, device=dev)
        gate_scale[2 * hidden : 3 * hidden] = 2
        w_hh = w_hh * gate_scale
        bias, w_x = ((b_ih + b_hh) * gate_scale[:, 0]), w_ih[:, 0] * gate_scale[:, 0]
        w_out_row, one = w_out[0], torch.ones((), dtype=dtype, device=dev)
        # The cell leaves per-column constant factors of d(scale)/d(gates) out (_cell says
        # which); they are applied once to the weight gradients instead of to every row.
        col_scale = gate_scale[:, 0] ** 2  # 1 per gate, 4 for g
        if nonlinearity == "none":
            col_scale = col_scale * w_out_row.repeat(4)
        rows = min(block, n)
        scratch = torch.empty(2, rows, hidden, dtype=dtype, device=dev)
        # h' and c' in the compute dtype when the state is kept in another one
        hc_buf = None if state_same else torch.empty(2, rows, hidden, dtype=dtype, device=dev)
        for s in range(0, n, block):
            e = min(s + block, n)
            m = e - s
            gates = linear(h[s:e].to(dtype), w_hh, bias)
            if state_same:
                h_out, c_out = h_new[s:e], c_new[s:e]
            else:
                h_out, c_out = hc_buf[0, :m], hc_buf[1, :m]  # type: ignore[index]
            a_out = h_out if nonlinearity == "none" else act[s:e]
            # a compiled cell is specialised to one block size: a ragged last block runs eager
            (cell if m == block else _cell)(
                gates,
                x[s:e],
                w_x,
                c[s:e].to(dtype),
                w_out_row,
                nonlinearity,
                h_out,
                c_out,
                a_out,
                d_gates[s:e],
                scale[s:e],
                scratch[0, :m],
                scratch[1, :m],
                one,
            )
            if not state_same:
                h_new[s:e], c_new[s:e] = h_out, c_out
                if nonlinearity == "none":
                    act[s:e] = h_out
        ctx.save_for_backward(x, h, act, d_gates, col_scale)
        ctx.block, ctx.linear = block, linear
        ctx.mark_non_differentiable(h_new, c_new)
        ctx.set_materialize_grads(False)  # the state gets no gradient: no (N, h) zeros for it
        return scale, h_new, c_new

    @staticmethod
    def backward(ctx, d_scale: Tensor, _h: Tensor, _c: Tensor):  # type: ignore[override]
        x, h, act, d_gates, col_scale = ctx.saved_tensors
        n, hidden = h.shape
        dtype = d_gates.dtype
        # d(loss)/d(gates) = d_scale * d_gates row by row, so each weight gradient is d_gates^T
        # applied to the d_scale-weighted input of that weight: [h, x, 1] for W_hh, W_ih, bias.
        # Summed transposed, inputs^T @ d_gates: oneDNN's fastest orientation for this shape
        # (it copies inputs^T to contiguous, ~10% of the product; writing the inputs transposed
        # in the first place costs more than that copy).
        grad_t = torch.zeros(hidden + 2, 4 * hidden, dtype=dtype, device=h.device)
        inputs_buf = torch.empty(min(ctx.block, n), hidden + 2, dtype=dtype, device=h.device)
        for s in range(0, n, ctx.block):
            e = min(s + ctx.block, n)
            ds = d_scale[s:e, None]
            inputs = inputs_buf[: e - s]
            torch.mul(h[s:e], ds, out=inputs[:, :hidden])
            torch.mul(x[s:e, None], ds, out=inputs[:, hidden : hidden + 1])
            inputs[:, hidden + 1 :].copy_(ds)
            grad_t += ctx.linear(inputs.t(), d_gates[s:e].t())
        grad = grad_t.mul_(col_scale).t()
        grad_hh, grad_ih, grad_b = grad[:, :hidden], grad[:, hidden : hidden + 1], grad[:, -1]
        grad_out = (d_scale @ act).unsqueeze(0)
        return (None,) * 3 + (grad_ih, grad_hh, grad_b, grad_b, grad_out) + (None,) * 5


def _cell(
    gates: Tensor,
    x: Tensor,
    w_x: Tensor,
    c: Tensor,
    w_out: Tensor,
    nonlinearity: str,
    h_out: Tensor,
    c_out: Tensor,
    a_out: Tensor,
    d_out: Tensor,
    scale_out: Tensor,
    t1: Tensor,
    t2: Tensor,
    one: Tensor,
) -> None:
    """The rest of one block after the product h W_hh^T + b (``gates``, modified in place): adds
    the input term x w_x, and from the gates and the cell state writes h', c', act(h'),
    d(scale)/d(gates) and scale = act(h') w_out into ``h_out``, ``c_out``, ``a_out`` (may be
    ``h_out``: no activation), ``d_out`` and ``scale_out``; ``t1``, ``t2`` are scratch of
    h_out's shape, ``one`` a 0-dim 1 on the block's device. The g gate's pre-activations come
    doubled (the caller scales its weights by 2, exact in floating point), so that one sigmoid
    over all four gates also gives tanh(z_g) = 2 sigmoid(2 z_g) - 1: a few wide passes instead
    of many narrow ones. ``d_out`` leaves out two factors that are constant per column, which
    the caller applies to the weight gradients: 4 for g (tanh' = 4 s (1 - s) at doubled
    inputs), and w_out when there is no activation (d(scale)/dh' is then w_out itself)."""
    s = gates.addcmul_(x[:, None], w_x).sigmoid_()
    i, f, g, o = s.chunk(4, 1)
    # s (1 - s) for every gate: sigmoid's derivative; for g, a quarter of tanh's (1 - tanh^2)
    torch.addcmul(s, s, s, value=-1, out=d_out)
    g.mul_(2).sub_(1)
    torch.mul(f, c, out=c_out).addcmul_(i, g)
    tanh_c = torch.mul(c_out, 2, out=t1).sigmoid_().mul_(2).sub_(1)
    torch.mul(o, tanh_c, out=h_out)
    v = _head(h_out, w_out, nonlinearity, a_out, t2)  # act(h') (into a_out) and d(scale)/dh'
    # The rest of the LSTM cell's chain rule, gate by gate, onto those derivatives.
    d_i, d_f, d_g, d_o = d_out.chunk(4, 1)
    d_o.mul_(tanh_c)  # the last use of tanh_c: t1 takes d_c next
    d_c = torch.addcmul(one, tanh_c, tanh_c, value=-1, out=t1).mul_(o)
    if v is not None:
        d_o.mul_(v), d_c.mul_(v)
    d_i.mul_(g), d_f.mul_(c), d_g.mul_(i)
    hidden = c.shape[1]
    d_out[:, : 3 * hidden].view(-1, 3, hidden).mul_(d_c.unsqueeze(1))  # d_i, d_f, d_g at once
    torch.mv(a_out, w_out, out=scale_out)


def _cell_pure(
    gates: Tensor,
    x: Tensor,
    w_x: Tensor,
    c: Tensor,
    w_out: Tensor,
    nonlinearity: str,
    h_out: Tensor,
    c_out: Tensor,
    a_out: Tensor,
    d_out: Tensor,
    scale_out: Tensor,
    t1: Tensor,
    t2: Tensor,
    one: Tensor,
) -> None:
    """``_cell`` (same outputs, same factors left out) written without in-place steps, for
    torch.compile: Inductor fuses it into one loop over the block that only writes the outputs
    (given in-place code, it keeps every step a separate write and ends up slower than eager).
    Leaves ``gates``, ``t1``, ``t2`` alone."""
    s = torch.sigmoid(gates + x[:, None] * w_x)
    i, f, s_g, o = s.chunk(4, 1)
    d_s = s * (1 - s)
    g = 2 * s_g - 1
    c_new = f * c + i * g
    tanh_c = 2 * torch.sigmoid(2 * c_new) - 1
    h = o * tanh_c
    if nonlinearity == "relu":
        a, v = h.clamp_min(0), (h > 0) * w_out
    elif nonlinearity == "tanh":
        a = torch.tanh(h)
        v = (1 - a * a) * w_out
    else:
        a, v = h, 1  # w_out is applied per column by the caller, as with _cell
    d_c = (1 - tanh_c * tanh_c) * o * v
    d_i, d_f, d_g, d_o = d_s.chunk(4, 1)
    d = torch.cat([d_i * g * d_c, d_f * c * d_c, d_g * i * d_c, d_o * tanh_c * v], 1)
    h_out.copy_(h), c_out.copy_(c_new), d_out.copy_(d), scale_out.copy_((a * w_out).sum(1))
    if a_out is not h_out:
        a_out.copy_(a)


def _compiled_cell() -> Callable[..., None]:
    """``_cell_pure`` through torch.compile: one fused loop instead of ~25 passes over the
    block. Falls back to eager (with a warning) where compiling fails, e.g. without a C++
    compiler."""
    compiled = torch.compile(_cell_pure, dynamic=False)
    state = {"ok": True}

    def run(*args):
        if state["ok"]:
            try:
                return compiled(*args)
            except Exception as exc:  # inductor raises many types; eager is always right
                state["ok"] = False
                log.warning("meta.compile: torch.compile failed (%s); running eager", exc)
        return _cell(*args)

    return run


def _addmm_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T (+ bias) through torch's default BLAS."""
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T (+ bias) through oneDNN: the same float32 product as ``_addmm_linear``,
    2x faster on AMD CPUs, where MKL's sgemm keeps to its AVX2 kernels (measured on a Zen 5
    EPYC: 453 vs 209 GFLOP/s at 4096^3; LSTMFC's (2048 x 100) x (100 x 400): 50 vs 95 ms)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _pick_linear(device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor]:
    """oneDNN's linear for float32 on the CPU where it is there and agrees with torch.mm on a
    probe (it is a private op: a torch without it, or a changed signature, falls back)."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return _addmm_linear
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((5, 3), (4, 3), (4,)))
    try:
        ok = torch.allclose(_onednn_linear(x.t(), x.t()), _addmm_linear(x.t(), x.t()))
        ok = ok and torch.allclose(_onednn_linear(x, w, b), _addmm_linear(x, w, b))
    except (AttributeError, RuntimeError, TypeError):
        ok = False
    return _onednn_linear if ok else _addmm_linear


def _tanh_(t: Tensor) -> Tensor:
    """In-place tanh as 2 sigmoid(2t) - 1: equal to within a few float32 ulps of 1, and several
    times faster than torch.tanh on CPU, where tanh dominated the cell's elementwise cost."""
    return t.mul_(2).sigmoid_().mul_(2).sub_(1)


def _head(h: Tensor, w_out: Tensor, nonlinearity: str, a_out: Tensor, tmp: Tensor) -> Tensor | None:
    """act(h) into ``a_out`` (which is ``h`` itself without an activation) and
    d(act(h) @ w_out)/dh for one block of rows (in ``tmp``; None without an activation, where
    it is the row ``w_out``)."""
    if nonlinearity == "relu":
        torch.clamp_min(h, 0, out=a_out)
        return torch.mul(h > 0, w_out, out=tmp)
    if nonlinearity == "tanh":
        a = torch.tanh(h, out=a_out)
        return torch.mul(a, a, out=tmp).neg_().add_(1).mul_(w_out)
    return None  # w_out itself: the caller applies it per column


class LSTMFC(MetaNet):
    """g_W~ = g_W^ * Linear(h, 1)(LSTM(1, h)(W~)): one LSTM step per iteration, with hidden and
    cell state kept per coordinate across iterations (the caller detaches them).

    ``fused`` (default) computes the same function with ``_FusedLSTMFC``; ``fused=False`` is the
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
        if hidden_size < 1:
            raise ConfigError(f"meta.hidden_size={hidden_size} is too small; allowed: 1 or more")
        self.cell = nn.LSTMCell(1, hidden_size)
        self.nonlinearity = nonlinearity
        self.act = _activation(nonlinearity)
        self.out = nn.Linear(hidden_size, 1, bias=False)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if state_dtype not in dtypes:
            raise ConfigError(
                f"meta.state_dtype={state_dtype} is not known; allowed: {', '.join(dtypes)}"
            )
        self.state_dtype = dtypes[state_dtype]
        self.fused = fused
        self.block = block
        self.cell_fn = _compiled_cell() if compile else _cell
        self._cache = _BufferCache()
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
                self._linear[key] = _pick_linear(*key)
            scale, h, c = _FusedLSTMFC.apply(
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
            return grad_hat * scale, (h, c)
        dtype = self.cell.weight_ih.dtype
        h, c = self.cell(w_tilde.unsqueeze(1), (state[0].to(dtype), state[1].to(dtype)))
        scale = self.out(self.act(h)).squeeze(1)
        return grad_hat * scale, (h.to(self.state_dtype), c.to(self.state_dtype))


def build_meta_net(
    net: str,
    hidden_size: int = 100,
    num_layers: int = 3,
    nonlinearity: str = "none",
    state_dtype: str = "float32",
    compile: bool = False,
) -> MetaNet:
    """The meta net called ``net``: identity, fcgrad, multifc or lstmfc.

    ``compile`` only affects lstmfc; the others are already a few elementwise operations."""
    if net == "identity":
        return IdentitySTE()
    if net == "fcgrad":
        return FCGrad(hidden_size, num_layers, nonlinearity)
    if net == "multifc":
        return MultiFC(hidden_size, num_layers, nonlinearity)
    if net == "lstmfc":
        return LSTMFC(hidden_size, nonlinearity, state_dtype, compile=compile)
    raise ConfigError(f"meta net {net} is not known; allowed: identity, fcgrad, multifc, lstmfc")
