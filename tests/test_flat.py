"""The flat layout: all quantized weights in one vector, quantized in a few kernels, giving the
per-layer quantizer's values and gradients and the per-layer MetaQuant step's training."""

import copy
import functools

import pytest
import torch
from conftest import meta_net
from reference_step import PerLayerMetaQuantStep

from mq.meta import MetaQuantStep
from mq.meta.nets import LSTMFC
from mq.models import build_model
from mq.quant import BWNWeight, DorefaWeight, quantize_model
from mq.quant.flat import FlatLayout

SGDM = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
QUANTIZERS = {
    "dorefa1": lambda: DorefaWeight(1),
    "dorefa2": lambda: DorefaWeight(2),
    "dorefa4": lambda: DorefaWeight(4),
    "bwn": lambda: BWNWeight(),
    "bwn_f": lambda: BWNWeight(per_filter=True),
}


def mixed_tensors() -> list[torch.Tensor]:
    """Every layout a model can hand over: channels-last 3x3 and 1x1 convs, NCHW, linear."""
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(16, 3, 3, 3, generator=g).to(memory_format=torch.channels_last),
        torch.randn(8, 16, 3, 3, generator=g),
        torch.randn(32, 16, 1, 1, generator=g).to(memory_format=torch.channels_last),
        torch.randn(10, 64, generator=g),
    ]


def test_unflatten_gives_views_with_the_tensors_strides():
    tensors = mixed_tensors()
    layout = FlatLayout(tensors)
    flat = layout.flatten(tensors)
    assert flat.shape == (sum(t.numel() for t in tensors),)
    for t, view in zip(tensors, layout.unflatten(flat), strict=True):
        assert torch.equal(view, t)
        assert view.stride() == t.stride()
        assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    # the flat order is each tensor's memory order: for contiguous strides, its own storage
    conv = tensors[0]
    first = flat[: conv.numel()]
    assert torch.equal(first, conv.permute(0, 2, 3, 1).reshape(-1))


def test_flatten_carries_gradients_back_per_tensor():
    tensors = [t.requires_grad_() for t in mixed_tensors()]
    layout = FlatLayout(tensors)
    upstream = torch.randn(layout.numel)
    (layout.flatten(tensors) * upstream).sum().backward()
    for t, expected in zip(tensors, layout.unflatten(upstream), strict=True):
        torch.testing.assert_close(t.grad, expected, rtol=0, atol=0)


def test_reorder_from_row_major_and_between_layouts():
    tensors = mixed_tensors()
    layout = FlatLayout(tensors)
    row_major = torch.cat([t.reshape(-1) for t in tensors])
    assert torch.equal(layout.reorder(row_major, None), layout.flatten(tensors))
    # rows of a per-coordinate state (N, hidden) move as rows
    state = torch.stack([row_major, 2 * row_major, -row_major], dim=1)
    expected = torch.stack([layout.flatten(tensors) * k for k in (1, 2, -1)], dim=1)
    assert torch.equal(layout.reorder(state, None), expected)
    # from another memory layout of the same tensors (a run saved with NCHW weights)
    nchw = [t.contiguous() for t in tensors]
    other = FlatLayout(nchw)
    assert other.orders != layout.orders
    assert torch.equal(layout.reorder(other.flatten(nchw), other.orders), layout.flatten(tensors))
    flat = layout.flatten(tensors)
    assert torch.equal(layout.reorder(flat, layout.orders), flat)


@pytest.mark.parametrize("foreach", [False, True])
def test_segment_reductions_match_per_tensor(foreach):
    tensors = mixed_tensors()
    layout = FlatLayout(tensors)
    flat = layout.flatten(tensors)
    amax = layout.amax(flat, foreach=foreach)
    assert torch.equal(amax, torch.stack([t.abs().max() for t in tensors]))
    mean = layout.mean_abs(flat, foreach=foreach)
    torch.testing.assert_close(mean, torch.stack([t.abs().mean() for t in tensors]))
    per_filter = layout.mean_abs(flat, per_filter=True)
    expected = torch.cat([t.abs().reshape(t.shape[0], -1).mean(1) for t in tensors])
    torch.testing.assert_close(per_filter, expected)
    # broadcast repeats each value over its segment (per tensor, or per filter)
    spread = layout.unflatten(layout.broadcast(amax))
    for t, s, m in zip(tensors, spread, amax, strict=True):
        assert torch.equal(s, torch.full_like(t, m.item()))
    spread = layout.unflatten(layout.broadcast(per_filter, per_filter=True))
    for t, s in zip(tensors, spread, strict=True):
        means = t.abs().reshape(t.shape[0], -1).mean(1)
        torch.testing.assert_close(s, means.view(-1, *[1] * (t.dim() - 1)).expand_as(t))


# Quantizing all layers at once like layer by layer: tests/test_quant_contract.py, for every
# quantizer of conf/quant/.


def _pair(base, quant, net, update, seed=1):
    steps = []
    for cls in (PerLayerMetaQuantStep, MetaQuantStep):
        torch.manual_seed(seed)
        model = quantize_model(copy.deepcopy(base), QUANTIZERS[quant]())
        if net == "lstmfc":
            meta = LSTMFC(8, fused=False)
        else:
            meta = meta_net(net, hidden_size=8)
        steps.append((model, cls(model, SGDM, meta, lr=1e-2, update=update)))
    return steps


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(n)
    ]


def _assert_same_training(a, b):
    (ref_model, ref), (model, step) = a, b
    torch.testing.assert_close(model.state_dict(), ref_model.state_dict(), rtol=1e-4, atol=1e-5)
    for p, q in zip(step.meta_net.parameters(), ref.meta_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("quant", "net", "update"),
    [
        ("dorefa1", "multifc", "paper"),
        ("dorefa2", "fcgrad", "paper"),
        ("dorefa1", "lstmfc", "original"),
        ("bwn_f", "multifc", "original"),
        ("bwn_f", "lstmfc", "paper"),
    ],
)
def test_flat_step_trains_like_the_per_layer_step(quant, net, update):
    torch.manual_seed(0)
    base = build_model("resnet20", 10)
    (ref_model, ref), (model, step) = _pair(base, quant, net, update)
    for x, y in _batches(4):
        torch.testing.assert_close(
            step.train_step(x, y)[0], ref.train_step(x, y)[0], rtol=1e-4, atol=1e-5
        )
    _assert_same_training((ref_model, ref), (model, step))
    # the weights did move, so the comparison is not between two untouched models
    assert not torch.equal(model.net.conv1.weight, base.conv1.weight)


@pytest.mark.parametrize(
    ("quant", "net", "update"), [("dorefa1", "lstmfc", "original"), ("bwn", "multifc", "paper")]
)
def test_resumes_a_checkpoint_from_before_the_flat_layout(quant, net, update):
    """Step state saved by the per-layer code (row-major flat tensors, previous_update as a
    list, no flat_orders) is reordered on load: the flat step continues the run exactly."""
    torch.manual_seed(0)
    base = build_model("resnet20", 10)
    data = _batches(4)
    (ref_model, ref), (model, step) = _pair(base, quant, net, update)
    for x, y in data[:2]:
        ref.train_step(x, y)
    old = copy.deepcopy((ref_model.net.state_dict(), ref.state_dict()))
    assert "flat_orders" not in old[1]
    model.net.load_state_dict(old[0])
    step.load_state_dict(old[1])
    for x, y in data[2:]:
        torch.testing.assert_close(
            step.train_step(x, y)[0], ref.train_step(x, y)[0], rtol=1e-4, atol=1e-5
        )
    _assert_same_training((ref_model, ref), (model, step))


@pytest.mark.parametrize("quant", ["dorefa1", "bwn"])
def test_quantizer_kernels_do_not_grow_with_depth(quant, monkeypatch):
    """On a GPU every kernel costs a launch: quantizing all layers (forward and backward) runs
    the same few kernels for ResNet20's 22 layers and ResNet56's 58 (CUDA's reductions)."""
    from mq.tools.bench import OpCounter

    monkeypatch.setattr(FlatLayout, "amax", functools.partialmethod(FlatLayout.amax, foreach=True))
    monkeypatch.setattr(
        FlatLayout, "mean_abs", functools.partialmethod(FlatLayout.mean_abs, foreach=True)
    )
    counts = []
    for name in ("resnet20", "resnet56"):
        model = quantize_model(build_model(name, 10), QUANTIZERS[quant]())
        model.quantize_weights()  # build the layout and its cached segment lengths
        upstream = [torch.ones_like(w) for w in model.quantized_weights().values()]
        with OpCounter() as counter:
            torch.autograd.backward(list(model.quantize_weights().values()), upstream)
        counts.append(counter.ops)
    assert counts[0] == counts[1] and counts[0] < 30, counts
