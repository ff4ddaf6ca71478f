"""Packed runs (mq.meta.pack): a pack of K runs, its networks fused, trains each run exactly as it
would train alone (float64), whatever each run's quantizer step, meta net and optimizer."""

import copy
import functools

import pytest
import torch
from conftest import build_quantizer, compose_config
from hydra.utils import instantiate

from mq.core.errors import ConfigError
from mq.meta.pack import Pack
from mq.models import build_model
from mq.quant import quantize_model
from mq.quant.activations import SignActivation

OPTIMIZERS = {  # every run of a pack its own optimizer and lr
    "sgd": lambda lr: functools.partial(torch.optim.SGD, lr=lr),
    "sgdm": lambda lr: functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4),
    "adam": lambda lr: functools.partial(torch.optim.Adam, lr=lr / 50, weight_decay=5e-4),
}
STEPS = 5


@functools.cache
def _meta_node(meta: str):
    return compose_config([f"meta={meta}"]).meta


def make_step(model, meta: str, optimizer: str, lr: float, update: str | None):
    node = copy.deepcopy(_meta_node(meta))
    if update is not None:
        node.update = update
    if "compile" in node.get("net", {}):
        node.net.compile = False  # torch.compile costs seconds per test; its numbers are eager's
    return instantiate(node, model=model, optimizer=OPTIMIZERS[optimizer](lr))


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_model("resnet20", 10).double()


def small_network():
    """Conv, BatchNorm, shortcut-free: the matrix below tests the steps, not ResNet-20, and
    LSTMFC on ResNet-20's 270,000 weights takes a minute per case in float64."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    ).double()


def make_runs(network, quant, runs):
    """(model, step) per (meta, optimizer, lr, update) in ``runs``, from one network."""
    out = []
    for k, (meta, optimizer, lr, update) in enumerate(runs):
        model = quantize_model(copy.deepcopy(network), build_quantizer(quant, 1))
        model = model.to(next(network.parameters()).device)
        torch.manual_seed(k)  # the meta net's initial weights
        out.append((model, make_step(model, meta, optimizer, lr, update)))
    return out


def batches(k, steps=STEPS, size=4):
    g = torch.Generator().manual_seed(100 + k)  # every run its own data
    return [
        (
            torch.randn(size, 3, 32, 32, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (size,), generator=g),
        )
        for _ in range(steps)
    ]


def tensors_of(value, prefix=""):
    """Every tensor in a (nested) state dict, by path."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, v in value.items():
            yield from tensors_of(v, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from tensors_of(v, f"{prefix}/{i}")


def assert_same_state(alone, packed, what):
    a, b = dict(tensors_of(alone)), dict(tensors_of(packed))
    assert a.keys() == b.keys(), what
    for key, t in a.items():
        u = b[key]
        if t.is_floating_point():
            scale = max(1.0, t.abs().max().item())
            diff = (t - u).abs().max().item() if t.numel() else 0.0
            assert diff <= 1e-10 * scale, f"{what} {key}: {diff}"
        else:
            assert torch.equal(t, u), f"{what} {key}"


def check_pack_equals_alone(network, quant, runs, device="cpu"):
    alone, packed = make_runs(network, quant, runs), make_runs(network, quant, runs)
    data = [[(x.to(device), y.to(device)) for x, y in batches(k)] for k in range(len(runs))]
    losses_alone = [
        [step.train_step(x, y)[0].item() for x, y in d]
        for (_, step), d in zip(alone, data, strict=True)
    ]
    pack = Pack([m for m, _ in packed], [s for _, s in packed], fuse=True)
    losses_packed = [[] for _ in runs]
    for i in range(STEPS):
        out = pack.train_step([d[i][0] for d in data], [d[i][1] for d in data])
        for k, (loss, logits) in enumerate(out):
            assert logits.shape == (4, 10)
            losses_packed[k].append(loss.item())
    for k, run in enumerate(runs):
        for a, b in zip(losses_alone[k], losses_packed[k], strict=True):
            assert abs(a - b) <= 1e-10 * abs(a), f"run {k} {run}: loss {a} vs {b}"
        (m_a, s_a), (m_p, s_p) = alone[k], packed[k]
        assert_same_state(m_a.state_dict(), m_p.state_dict(), f"run {k} {run} model")
        assert_same_state(s_a.state_dict(), s_p.state_dict(), f"run {k} {run} step")


META_UPDATES = [("ste", None), ("ewgs", None), ("ede", None), ("reste", None), ("dsq", None)] + [
    (net, update) for net in ("multifc", "fcgrad", "lstmfc") for update in ("paper", "original")
]


def pack_of(meta, update):
    """Four runs of one meta option: SGD, SGD-M, Adam and SGD with another lr."""
    return [
        (meta, "sgd", 0.05, update),
        (meta, "sgdm", 0.02, update),
        (meta, "adam", 0.05, update),
        (meta, "sgd", 0.2, update),
    ]


@pytest.mark.parametrize("quant", ["dorefa", "bwn", "bwn_f"])
@pytest.mark.parametrize(("meta", "update"), META_UPDATES)
def test_pack_of_four_equals_four_alone(quant, meta, update):
    check_pack_equals_alone(small_network(), quant, pack_of(meta, update))


@pytest.mark.parametrize("quant", ["dorefa", pytest.param("bwn_f", marks=pytest.mark.slow)])
def test_a_mixed_pack_equals_its_runs_alone(network, quant):
    """Table 1's configurations differ in meta net, update rule and optimizer, not network:
    one pack holds them all."""
    runs = [
        ("ste", "sgd", 0.05, None),
        ("multifc", "adam", 0.05, "original"),
        ("lstmfc", "sgdm", 0.02, "paper"),
        ("fcgrad", "sgd", 0.1, "original"),
    ]
    check_pack_equals_alone(network, quant, runs)


def test_a_diverging_run_leaves_the_others_alone(network):
    runs = [("multifc", "sgd", 0.05, "paper"), ("ste", "sgd", 0.05, None)]
    alone, packed = make_runs(network, "dorefa", runs), make_runs(network, "dorefa", runs)
    pack = Pack([m for m, _ in packed], [s for _, s in packed], fuse=True)
    data = [batches(k) for k in range(2)]
    nan = data[0][1][0].clone()
    nan[0, 0, 0, 0] = float("nan")
    out = pack.train_step([d[0][0] for d in data], [d[0][1] for d in data])
    out = pack.train_step([nan, data[1][1][0]], [data[0][1][1], data[1][1][1]])
    assert torch.isnan(out[0][0]) and torch.isfinite(out[1][0])
    model, step = alone[1]
    for x, y in data[1][:2]:
        loss = step.train_step(x, y)[0]
    assert abs(loss.item() - out[1][0].item()) <= 1e-10 * loss.item()
    assert_same_state(model.state_dict(), packed[1][0].state_dict(), "the finite run")


def test_packed_models_still_work_alone_and_save_compact(network, tmp_path):
    from mq.core.checkpoint import load_checkpoint, save_checkpoint

    runs = make_runs(network, "dorefa", pack_of("ste", None)[:2])
    Pack([m for m, _ in runs], [s for _, s in runs], fuse=True)
    model = runs[1][0]
    x, y = batches(1, steps=1)[0]
    runs[1][1].train_step(x, y)  # a step of its own, on views of the pack's tensors
    save_checkpoint({"model": model.state_dict(), "progress": {}}, tmp_path / "c.pt")
    size = (tmp_path / "c.pt").stat().st_size
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size < 1.2 * params  # one run's tensors, not the pack's whole storage
    saved = load_checkpoint(tmp_path / "c.pt")["model"]
    assert_same_state(model.state_dict(), saved, "saved")


def test_what_cannot_be_packed_is_refused(network):
    runs = make_runs(network, "dorefa", pack_of("ste", None)[:2])
    other = quantize_model(build_model("resnet32", 10).double(), build_quantizer("dorefa", 1))
    step = make_step(other, "ste", "sgd", 0.1, None)
    with pytest.raises(ConfigError, match="run 2 of the pack has another network"):
        Pack([runs[0][0], runs[1][0], other], [runs[0][1], runs[1][1], step])
    act = quantize_model(copy.deepcopy(network), build_quantizer("dorefa", 1), SignActivation(1))
    with pytest.raises(ConfigError, match="run 1 .* activation quantizers"):
        Pack([runs[0][0], act], [runs[0][1], make_step(act, "ste", "sgd", 0.1, None)])


def test_on_a_cpu_a_pack_runs_its_networks_one_by_one_as_alone(network):
    """Unfused (the CPU's default): each run's own step, so the numbers are the run's alone."""
    runs = [("multifc", "sgd", 0.05, "paper"), ("ste", "adam", 0.05, None)]
    alone, packed = make_runs(network, "dorefa", runs), make_runs(network, "dorefa", runs)
    pack = Pack([m for m, _ in packed], [s for _, s in packed])
    assert not pack.fused
    data = [batches(k, steps=2) for k in range(2)]
    for i in range(2):
        out = pack.train_step([d[i][0] for d in data], [d[i][1] for d in data])
        for k, (_, step) in enumerate(alone):
            loss, _ = step.train_step(*data[k][i])
            assert torch.equal(loss, out[k][0])
    for (a, _), (b, _) in zip(alone, packed, strict=True):
        assert all(torch.equal(t, b.state_dict()[n]) for n, t in a.state_dict().items())
