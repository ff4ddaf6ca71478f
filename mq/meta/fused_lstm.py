"""The fused LSTMFC step: one LSTM cell step and its linear head over N coordinates, forward
and analytic backward in row blocks (see ``FusedLSTMFC``), with the helpers it runs on: oneDNN
products, the elementwise cell (eager and a pure form for torch.compile), reused buffers.
``mq.meta.nets.LSTMFC`` is the module that uses it; ``LSTMFC(fused=False)`` is the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class BufferCache:
    """Large output buffers of ``FusedLSTMFC`` kept across calls. Fresh (N, 4h) memory costs a
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


class FusedLSTMFC(torch.autograd.Function):
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
        cell: Callable[[Block], None],
        linear: Callable[..., Tensor],
        cache: BufferCache | None,
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
        state_same = h.dtype == dtype
        act = h_new if nonlinearity == "none" and state_same else empty("act", n, hidden)
        d_gates = empty("d_gates", n, 4 * hidden)
        scale = torch.empty(n, dtype=dtype, device=dev)
        # eager_cell wants the g gate's pre-activations doubled: scale its rows of the weights
        gate_scale = torch.ones(4 * hidden, 1, dtype=dtype, device=dev)
        gate_scale[2 * hidden : 3 * hidden] = 2
        w_hh = w_hh * gate_scale
        bias, w_x = ((b_ih + b_hh) * gate_scale[:, 0]), w_ih[:, 0] * gate_scale[:, 0]
        w_out_row, one = w_out[0], torch.ones((), dtype=dtype, device=dev)
        # The cell leaves per-column constant factors of d(scale)/d(gates) out (eager_cell says
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
            (cell if m == block else eager_cell)(
                Block(
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


class Block(NamedTuple):
    """One row block's inputs, outputs and scratch for a cell function."""

    gates: Tensor  # h W_hh^T + b for the block (the g gate's columns doubled)
    x: Tensor  # the block's inputs (W~)
    w_x: Tensor  # W_ih's column (g rows doubled)
    c: Tensor  # cell state
    w_out: Tensor  # the head's weight row
    nonlinearity: str
    h_out: Tensor  # h'
    c_out: Tensor  # c'
    a_out: Tensor  # act(h'); h_out itself without an activation
    d_out: Tensor  # d(scale)/d(gates), up to per-column factors
    scale_out: Tensor  # act(h') @ w_out
    t1: Tensor  # scratch of h_out's shape
    t2: Tensor  # scratch of h_out's shape
    one: Tensor  # a 0-dim 1 on the block's device


def eager_cell(b: Block) -> None:
    """The rest of one block after the product h W_hh^T + b (``gates``, modified in place): adds
    the input term x w_x and writes the block's outputs (see ``Block``). The g gate's
    pre-activations come doubled (the caller scales its weights by 2, exact in floating point),
    so that one sigmoid over all four gates also gives tanh(z_g) = 2 sigmoid(2 z_g) - 1: a few
    wide passes instead of many narrow ones. ``d_out`` leaves out two factors that are constant
    per column, which the caller applies to the weight gradients: 4 for g (tanh' = 4 s (1 - s)
    at doubled inputs), and w_out when there is no activation (d(scale)/dh' is then w_out)."""
    gates, x, w_x, c, w_out, nonlinearity, h_out, c_out, a_out, d_out, scale_out, t1, t2, one = b
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


def pure_cell(b: Block) -> None:
    """``eager_cell`` (same outputs, same factors left out) written without in-place steps, for
    torch.compile: Inductor fuses it into one loop over the block that only writes the outputs
    (given in-place code, it keeps every step a separate write and ends up slower than eager).
    Leaves ``gates``, ``t1``, ``t2`` alone."""
    gates, x, w_x, c, w_out, nonlinearity, h_out, c_out, a_out, d_out, scale_out, t1, t2, one = b
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
        a, v = h, 1  # w_out is applied per column by the caller, as with eager_cell
    d_c = (1 - tanh_c * tanh_c) * o * v
    d_i, d_f, d_g, d_o = d_s.chunk(4, 1)
    d = torch.cat([d_i * g * d_c, d_f * c * d_c, d_g * i * d_c, d_o * tanh_c * v], 1)
    h_out.copy_(h), c_out.copy_(c_new), d_out.copy_(d), scale_out.copy_((a * w_out).sum(1))
    if a_out is not h_out:
        a_out.copy_(a)


def compiled_cell() -> Callable[[Block], None]:
    """``pure_cell`` through torch.compile: one fused loop instead of ~25 passes over the
    block. Falls back to eager (with a warning) where compiling fails, e.g. without a C++
    compiler."""
    compiled = torch.compile(pure_cell, dynamic=False)
    state = {"ok": True}

    def run(block: Block) -> None:
        if state["ok"]:
            try:
                return compiled(block)
            except Exception as exc:  # inductor raises many types; eager is always right
                state["ok"] = False
                log.warning("meta.net.compile: torch.compile failed (%s); running eager", exc)
        return eager_cell(block)

    return run


def addmm_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T (+ bias) through torch's default BLAS."""
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight^T (+ bias) through oneDNN: the same float32 product as ``addmm_linear``,
    2x faster on AMD CPUs, where MKL's sgemm keeps to its AVX2 kernels (measured on a Zen 5
    EPYC: 453 vs 209 GFLOP/s at 4096^3; LSTMFC's (2048 x 100) x (100 x 400): 50 vs 95 ms)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pick_linear(device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor]:
    """oneDNN's linear for float32 on the CPU where it is there and agrees with torch.mm on a
    probe (it is a private op: a torch without it, or a changed signature, falls back)."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return addmm_linear
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((5, 3), (4, 3), (4,)))
    try:
        ok = torch.allclose(onednn_linear(x.t(), x.t()), addmm_linear(x.t(), x.t()))
        ok = ok and torch.allclose(onednn_linear(x, w, b), addmm_linear(x, w, b))
    except (AttributeError, RuntimeError, TypeError):
        ok = False
    return onednn_linear if ok else addmm_linear


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
