"""The fast paths give the straightforward implementation's numbers, over a few training steps.

Fast paths: the fused LSTMFC (``LSTMFC(fused=True)``, reference ``fused=False``: nn.LSTMCell)
and channels-last weights (``build_model(channels_last=True)``, reference NCHW). Both change
only the order of floating-point operations, so results agree to float32 rounding, not bitwise.
"""

import copy
import functools

import pytest
import torch
from conftest import meta_net

from mq.meta import MetaQuantStep, STEStep
from mq.meta.nets import LSTMFC
from mq.models import build_model
from mq.quant import BWNWeight, DorefaWeight, quantize_model

SGDM = functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=5e-4)
# Measured: up to 2e-5 absolute after 3 steps (binary weights magnify a conv's rounding into
# BatchNorm's parameters); a wrong formula or a lost term shows up orders of magnitude above.
TOL = {"rtol": 1e-4, "atol": 1e-4}


def batches(n: int = 3, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def run(step, model, data) -> tuple[torch.Tensor, dict]:
    losses = torch.stack([step.train_step(x, y)[0] for x, y in data])
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b) -> None:
    torch.testing.assert_close(a[0], b[0], **TOL, msg="losses differ")
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TOL, msg=f"{name} differs")


@pytest.mark.parametrize(
    ("hidden", "nonlinearity", "state_dtype", "compile", "block"),
    [
        # Full width (about 40 s each on 2 cores): the slow suite; width 16 covers the paths.
        pytest.param(100, "none", "float32", False, 50_000, marks=pytest.mark.slow),
        pytest.param(100, "none", "float32", True, 50_000, marks=pytest.mark.slow),
        (16, "tanh", "float32", False, 50_000),
        (16, "relu", "bfloat16", False, 50_000),
        (16, "none", "float32", True, None),  # one block of all rows, as on a GPU (compiled)
    ],
)
def test_fused_lstmfc_matches_lstm_cell(hidden, nonlinearity, state_dtype, compile, block):
    torch.manual_seed(0)
    base = build_model("resnet20", 10)
    if block is None:
        block = quantize_model(base, DorefaWeight(1)).layout().numel
    results = []
    for fused in (False, True):
        torch.manual_seed(1)
        model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
        # block 50_000: several blocks and a ragged last one over ResNet20's 270,896 weights
        net = LSTMFC(
            hidden, nonlinearity, state_dtype, fused=fused, block=block, compile=compile and fused
        )
        step = MetaQuantStep(model, SGDM, net, lr=1e-2)
        losses, weights = run(step, model, batches())
        meta = {k: v.clone() for k, v in net.state_dict().items()}
        results.append((losses, weights | {f"meta.{k}": v for k, v in meta.items()}, step))
    assert_same(results[0][:2], results[1][:2])
    # A bfloat16 state may round a value differently (one bf16 ulp, 2^-9 relative) where the
    # float32 values differ in the last bit; those then carry on through the next step.
    tol = TOL if state_dtype == "float32" else {"rtol": 2e-2, "atol": 4e-3}
    for ref, fast in zip(results[0][2].meta_state, results[1][2].meta_state, strict=True):
        assert fast.dtype == ref.dtype
        torch.testing.assert_close(fast.float(), ref.float(), **tol)


@pytest.mark.parametrize(
    ("quant", "net"),
    [
        ("bwn", "ste"),
        pytest.param("dorefa", "ste", marks=pytest.mark.slow),
        pytest.param("dorefa", "multifc", marks=pytest.mark.slow),
    ],
)
def test_channels_last_matches_nchw(quant, net):
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet20", 10, channels_last=channels_last)
        model = quantize_model(model, BWNWeight() if quant == "bwn" else DorefaWeight(1))
        if net == "ste":
            step = STEStep(model, SGDM)
        else:
            step = MetaQuantStep(model, SGDM, meta_net(net, hidden_size=8), lr=1e-2)
        results.append(run(step, model, batches()))
    assert_same(*results)


@pytest.mark.slow  # ResNet-20 twice, full precision; bwn-ste above covers channels-last
def test_full_precision_channels_last_matches_nchw():
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet20", 10, channels_last=channels_last)
        results.append(run(STEStep(model, SGDM), model, batches()))
    assert_same(*results)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_fused_lstmfc_buffer_reuse_keeps_held_results(state_dtype):
    """The fused path reuses its large buffers across calls; results a caller still holds (old
    states, graphs not yet backpropagated) must not be overwritten by later calls."""
    torch.manual_seed(0)
    ref = LSTMFC(16, "none", state_dtype, fused=False)
    fast = LSTMFC(16, "none", state_dtype, fused=True, block=300)
    fast.load_state_dict(ref.state_dict())
    n = 1000
    inputs = [(torch.randn(n), torch.randn(n)) for _ in range(4)]
    for hold in (True, False):
        outs = {}
        for name, net in (("ref", ref), ("fast", fast)):
            state = net.initial_state(n, torch.device("cpu"))
            kept, grads = [], []
            for g, w in inputs:
                out, state = net(g, w, state)
                state = (state[0].detach(), state[1].detach())  # as the step does
                kept.append((out, *state))  # every output, state and graph stays alive
                if not hold:
                    net.zero_grad()
                    out.square().sum().backward()
                    grads.append([p.grad.clone() for p in net.parameters()])
            if hold:
                for out, *_ in kept:  # backward only after all later calls ran
                    net.zero_grad()
                    out.square().sum().backward()
                    grads.append([p.grad.clone() for p in net.parameters()])
            outs[name] = (kept, grads)
        # as in test_fused_lstmfc_matches_lstm_cell: a bf16 state may round one ulp apart
        tol = TOL if state_dtype == "float32" else {"rtol": 2e-2, "atol": 4e-3}
        for a, b in zip(outs["ref"][0], outs["fast"][0], strict=True):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(y.detach().float(), x.detach().float(), **tol)
        for a, b in zip(outs["ref"][1], outs["fast"][1], strict=True):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(y, x, **TOL)


@pytest.mark.parametrize("nonlinearity", ["none", "tanh"])
def test_compiled_lstmfc_cell_matches_eager(nonlinearity, caplog):
    """meta.net.compile=true runs the cell's pure form through torch.compile; it must give the
    eager cell's outputs, states and gradients, and must really compile (not fall back)."""
    torch.manual_seed(0)
    nets = [LSTMFC(16, nonlinearity, fused=True, block=700, compile=c) for c in (False, True)]
    nets[1].load_state_dict(nets[0].state_dict())
    n = 1500  # two full blocks and a ragged one
    g, w = torch.randn(n), torch.randn(n)
    state = (torch.randn(n, 16) * 0.5, torch.randn(n, 16) * 0.5)
    results = []
    for net in nets:
        out, (h, c) = net(g, w, state)
        out.square().sum().backward()
        results.append([out.detach(), h, c] + [p.grad for p in net.parameters()])
    assert "torch.compile failed" not in caplog.text
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_lstmfc_linear_picks_onednn_and_matches_mm():
    """The fused LSTMFC's products go through oneDNN on the CPU (MKL's sgemm is half as fast on
    AMD); the probe must choose it where oneDNN is built in, and it must give torch.mm's
    product for the layouts the forward (contiguous) and backward (transposed views) use."""
    from mq.meta import fused_lstm

    linear = fused_lstm.pick_linear(torch.device("cpu"), torch.float32)
    if torch.backends.mkldnn.is_available():
        assert linear is fused_lstm.onednn_linear
    assert fused_lstm.pick_linear(torch.device("cpu"), torch.float64) is fused_lstm.addmm_linear
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(300, 20, generator=g), torch.randn(80, 20, generator=g), torch.randn(80)
    torch.testing.assert_close(linear(h, w, b), h @ w.t() + b, rtol=1e-5, atol=1e-4)
    inputs, d_gates = torch.randn(300, 22, generator=g), torch.randn(300, 80, generator=g)
    # sums of 300 products, in another order: float32 rounding of values around 17
    close = {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(linear(inputs.t(), d_gates.t()), inputs.t() @ d_gates, **close)
