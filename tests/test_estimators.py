"""Weight-gradient estimators (mq.meta.estimator): the extension point keeps the STE's numbers,
each estimator's update equals its authors' rule written as an autograd Function in the forward
(in float64), and an estimator refuses a quantizer it cannot serve in one line. The estimators
are found in conf/meta/ (an option whose class is an EstimatorStep), not listed here."""

from __future__ import annotations

import copy
import functools
import json
import math

import numpy as np
import pytest
import torch
from conftest import SMOKE, build_quantizer, kill_when, launch, rows_in_epoch
from hydra.utils import get_class

from mq.cli.conf import option_file, options
from mq.core.checkpoint import load_checkpoint
from mq.core.errors import ConfigError
from mq.meta import STEStep
from mq.meta.dsq import DSQStep
from mq.meta.ede import EDEStep
from mq.meta.estimator import EstimatorStep
from mq.meta.ewgs import EWGSStep
from mq.models import build_model
from mq.quant import BWNWeight, DorefaWeight, WeightQuantizer, quantize_model
from mq.quant.functions import bwn_scale, dorefa_transform


def _is_estimator(option: str) -> bool:
    target = option_file("meta", option).get("_target_")  # MetaQuant's comes from base/
    return target is not None and issubclass(get_class(target), EstimatorStep)


ESTIMATORS = [m for m in options("meta") if _is_estimator(m)]
QUANTS = {
    "dorefa1": lambda: DorefaWeight(1),
    "dorefa2": lambda: DorefaWeight(2),
    "bwn": lambda: BWNWeight(),
    "bwn_f": lambda: BWNWeight(per_filter=True),
}
OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.05),
    "sgdm": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": functools.partial(torch.optim.Adam, lr=1e-3, weight_decay=5e-4),
}


def batches(n=4, size=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 3, 32, 32, generator=g).to(dtype),
            torch.randint(0, 10, (size,), generator=g),
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model("resnet20", 10)


class UnitScale(EstimatorStep):
    """The estimator path with the factor 1: the STE itself."""

    name = "unit"

    def scale(self, grad_hat, x, x_q):
        return torch.ones_like(grad_hat)


def test_the_estimators_are_found_in_conf_meta():
    assert {"ewgs", "ede"} <= set(ESTIMATORS)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_the_estimator_path_with_factor_one_trains_like_the_ste(base, quant, optimizer):
    steps = []
    for cls in (STEStep, UnitScale):
        model = quantize_model(copy.deepcopy(base), QUANTS[quant]())
        steps.append((model, cls(model, OPTIMIZERS[optimizer])))
    for x, y in batches(3):
        losses = [step.train_step(x, y)[0] for _, step in steps]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    (ste_model, _), (model, _) = steps
    pairs = zip(ste_model.state_dict().items(), model.state_dict().values(), strict=True)
    for (name, p), q in pairs:
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


class EWGSDiscretizer(torch.autograd.Function):
    """The authors' EWGS_discretizer (cvlab-yonsei/EWGS, CIFAR10/custom_modules.py): x on
    [0, 1] rounded to ``levels`` levels; backward g (1 + delta sign(g) (x - x_q))."""

    @staticmethod
    def forward(ctx, x, levels, delta):
        x_q = torch.round(x * (levels - 1)) / (levels - 1)
        ctx.delta = delta
        ctx.save_for_backward(x - x_q)
        return x_q

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        return g * (1 + ctx.delta * torch.sign(g) * diff), None, None


class BinaryQuantize(torch.autograd.Function):
    """IR-Net's BinaryQuantize (htqin/IR-Net, modules/binaryfunction.py): sign forward,
    k t (1 - tanh^2(t u)) g backward."""

    @staticmethod
    def forward(ctx, u, k, t):
        ctx.save_for_backward(u)
        ctx.k, ctx.t = k, t
        return torch.sign(u)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return ctx.k * ctx.t * (1 - torch.tanh(u * ctx.t) ** 2) * g, None, None


def reference_weights(quant, method, w, step):
    """W^ of one weight tensor with the authors' Function where the STE would be."""
    if quant.startswith("dorefa"):
        x = dorefa_transform(w)
        if method == "ewgs":
            return 2 * EWGSDiscretizer.apply(x, 2 ** int(quant[-1]), step.delta) - 1
        return BinaryQuantize.apply(2 * x - 1, step.k, step.t)
    alpha = bwn_scale(w, per_filter=quant == "bwn_f")
    if method == "ewgs":  # W on [-1, 1] mapped onto [0, 1], where BWN's clipped STE passes
        x = ((w + 1) / 2).clamp(0, 1)  # the authors clamp before the discretizer
        return alpha * (2 * EWGSDiscretizer.apply(x, 2, step.delta) - 1)
    return alpha * BinaryQuantize.apply(w, step.k, step.t)


def reference_step(model, quant, method, step, optimizer, x, y):
    weights = model.quantized_weights()
    w_hat = {n: reference_weights(quant, method, w, step) for n, w in weights.items()}
    loss = torch.nn.functional.cross_entropy(model(x, w_hat), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


CASES = [
    ("ewgs", "dorefa1", {"delta": 0.3}),
    ("ewgs", "dorefa2", {"delta": 0.3}),
    ("ewgs", "bwn", {"delta": 0.3}),
    ("ewgs", "bwn_f", {"delta": 0.3}),
    ("ede", "dorefa1", {}),
    ("ede", "bwn", {}),
    ("ede", "bwn_f", {}),
]


# adam in the slow suite: the rule is in the gradient, which SGD applies as it is; the factor-one
# test above hands an estimator's gradient to every optimizer
@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("method", "quant", "kwargs"), CASES, ids=lambda c: str(c))
def test_the_update_is_the_authors_rule_in_the_forward(base, method, quant, kwargs, optimizer):
    cls = {"ewgs": EWGSStep, "ede": EDEStep}[method]
    model = quantize_model(copy.deepcopy(base).double(), QUANTS[quant]())
    ref_model = copy.deepcopy(model)
    ste_model = copy.deepcopy(model)
    step = cls(model, OPTIMIZERS[optimizer], **kwargs)
    ste = STEStep(ste_model, OPTIMIZERS[optimizer])
    ref_opt = OPTIMIZERS[optimizer](ref_model.parameters())
    for epoch, (x, y) in enumerate(batches(3, dtype=torch.float64)):
        step.set_progress(epoch + 1, 4)  # EDE: t = 10^(-1 + 2 e / 4), k = max(1 / t, 1)
        loss = step.train_step(x, y)[0]
        ste.train_step(x, y)
        ref = reference_step(ref_model, quant, method, step, ref_opt, x, y)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    moved = 0.0
    for name, p in model.quantized_weights().items():
        q = ref_model.quantized_weights()[name]
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
        moved = max(moved, (p - ste_model.quantized_weights()[name]).abs().max().item())
    assert moved > 1e-6  # the rule is not the STE's


def test_ede_anneals_t_from_t_min_to_t_max_over_the_epochs(base):
    step = EDEStep(quantize_model(copy.deepcopy(base), BWNWeight()), OPTIMIZERS["sgd"])
    expected = {0: (0.1, 10.0), 50: (1.0, 1.0), 75: (10**0.5, 1.0), 100: (10.0, 1.0)}
    for epoch, (t, k) in expected.items():
        step.set_progress(epoch, 100)
        assert step.t == pytest.approx(t) and step.k == pytest.approx(k)


def test_ewgs_with_delta_zero_is_the_ste(base):
    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    step = EWGSStep(model, OPTIMIZERS["sgd"], delta=0)
    g = torch.randn(10)
    assert torch.equal(step.scale(g, torch.rand(10), torch.rand(10).round()), torch.ones(10))


class Levelless(WeightQuantizer):
    """A real quantizer with no levels on [0, 1]: W^ = W, no unit_levels."""

    bit_widths = range(1, 9)
    bit_width = 1

    def transform(self, weight, layout=None):
        return weight

    def quantize(self, w_tilde, layout=None):
        return w_tilde * 1


@pytest.mark.parametrize("method", ESTIMATORS)
def test_an_estimator_refuses_what_it_cannot_serve_in_one_line(base, method):
    cls = get_class(option_file("meta", method)._target_)
    cases = [(base, f"meta={method} needs quantized weights but quant=none")]
    cases.append((quantize_model(copy.deepcopy(base), Levelless()), "Levelless"))
    for model, message in cases:
        with pytest.raises(ConfigError) as info:
            cls(model, OPTIMIZERS["sgd"])
        assert message in str(info.value) and "\n" not in str(info.value)


def test_ede_refuses_more_than_one_bit():
    with pytest.raises(ConfigError, match="meta=ede cannot serve bits=2; allowed: 1$"):
        model = quantize_model(build_model("resnet20", 10), build_quantizer("dorefa", 2))
        EDEStep(model, OPTIMIZERS["sgd"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["meta=ede", "bits=2"], "meta=ede cannot serve bits=2; allowed: 1"),
        pytest.param(
            ["meta=ewgs", "quant=none"],
            "meta=ewgs needs quantized weights but quant=none",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["meta=ewgs", "meta.delta=-1"], "meta.delta=-1 is not allowed", marks=pytest.mark.slow
        ),
    ],
)
def test_bad_estimator_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message):
    result = launch(*args, *SMOKE, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("method", ESTIMATORS)
def test_a_resumed_estimator_continues_as_an_uninterrupted_one(base, method):
    """The state is the optimizers'; an annealing estimator is told its epoch again on resume
    (the loop calls set_progress at each epoch's start), so nothing else is saved."""
    cls = get_class(option_file("meta", method)._target_)
    data = batches(4)
    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    step = cls(model, OPTIMIZERS["adam"])
    for epoch, (x, y) in enumerate(data[:2]):
        step.set_progress(epoch, 4)
        step.train_step(x, y)
    saved = copy.deepcopy((model.state_dict(), step.state_dict()))
    resumed_model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    resumed_model.load_state_dict(saved[0])
    resumed = cls(resumed_model, OPTIMIZERS["adam"])
    resumed.load_state_dict(saved[1])
    for epoch, (x, y) in enumerate(data[2:], start=2):
        for s in (step, resumed):
            s.set_progress(epoch, 4)
        torch.testing.assert_close(resumed.train_step(x, y)[0], step.train_step(x, y)[0])
    pairs = zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True)
    for (name, p), q in pairs:
        torch.testing.assert_close(p, q, msg=name)


# DSQ (Gong et al., ICCV 2019; no official code): the soft quantizer written from the paper's
# definitions, independently of mq.meta.dsq: Q_S = Delta (i + (phi + 1) / 2) on interval i,
# phi = s tanh(k (x - m_i)), k = log(2 / alpha - 1) / Delta, s = 1 / tanh(k Delta / 2); the
# forward is the hard level Delta (i + (sign(phi) + 1) / 2), the backward Q_S's (x and alpha).


def dsq_reference(x, alpha, bits):
    n = 2**bits - 1
    delta = 1 / n
    i = torch.clamp(torch.floor(x.detach() / delta), 0, n - 1)
    k = torch.log(2 / alpha - 1) / delta
    s = 1 / torch.tanh(0.5 * k * delta)
    phi = s * torch.tanh(k * (x - (i + 0.5) * delta))
    soft = delta * (i + (phi + 1) / 2)
    hard = delta * (i + (torch.sign(phi) + 1) / 2)
    return soft + (hard - soft).detach()


def dsq_reference_step(model, quant, alphas, optimizer, x, y):
    bits = int(quant[-1]) if quant.startswith("dorefa") else 1
    w_hat = {}
    for (name, w), alpha in zip(model.quantized_weights().items(), alphas, strict=True):
        if quant.startswith("dorefa"):
            w_hat[name] = 2 * dsq_reference(dorefa_transform(w), alpha, bits) - 1
        else:  # W on [-1, 1] mapped onto [0, 1]; Q_S is constant outside it (the clamp)
            x_unit = ((w + 1) / 2).clamp(0, 1)
            scale = bwn_scale(w, per_filter=quant == "bwn_f")
            w_hat[name] = scale * (2 * dsq_reference(x_unit, alpha, 1) - 1)
    loss = torch.nn.functional.cross_entropy(model(x, w_hat), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        alphas.clamp_(1e-4, 0.5)  # the paper's (0, 0.5)
    return loss.detach()


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_dsq_factor_is_the_soft_quantizers_slope_and_its_sign_the_hard_level(base, bits):
    model = quantize_model(copy.deepcopy(base).double(), DorefaWeight(bits))
    step = DSQStep(model, OPTIMIZERS["sgd"])
    layout = model.layout()
    g = torch.Generator().manual_seed(bits)
    with torch.no_grad():
        step.alpha.copy_(0.01 + 0.48 * torch.rand(step.alpha.shape, generator=g))
    x = torch.rand(layout.numel, generator=g, dtype=torch.float64).requires_grad_()
    reference = dsq_reference(x, layout.broadcast(step.alpha.detach()), bits)
    (slope,) = torch.autograd.grad(reference.sum(), x)
    x_q = DorefaWeight(bits).unit_levels(x.detach())[1]
    torch.testing.assert_close(step.scale(torch.ones_like(x), x.detach(), x_q), slope)
    torch.testing.assert_close(reference.detach(), x_q)  # the forward is the hard level
    soft = step.soft_level(x.detach(), x_q).detach()
    assert ((soft - x_q).abs() <= 0.5 / (2**bits - 1) + 1e-12).all()
    # Q_S rises by one level over each interval: the factor averages 1 there, as the STE's
    with torch.no_grad():
        step.alpha.fill_(0.2)
    grid = (torch.arange(layout.numel, dtype=torch.float64) + 0.5) / layout.numel
    assert step.scale(grid, grid, grid).mean().item() == pytest.approx(1, abs=1e-6)
    # alpha = 0.2: 0.5 s log(2 / alpha - 1) = log(9) / 1.6 at the midpoints, 0.36 of it at the ends
    ends = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64) / (2**bits - 1)
    peak = math.log(9) / 1.6
    expected = torch.tensor([0.36 * peak, peak, 0.36 * peak], dtype=torch.float64)
    layer0 = DSQStep(
        quantize_model(torch.nn.Linear(3, 1).double(), DorefaWeight(bits)), OPTIMIZERS["sgd"]
    )
    torch.testing.assert_close(layer0.scale(ends, ends, ends), expected)


# adam in the slow suite: the rule is in the gradient, which SGD applies as it is; the factor-one
# test above hands an estimator's gradient to every optimizer
@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
@pytest.mark.parametrize("quant", ["dorefa1", "dorefa2", "bwn", "bwn_f"])
def test_dsq_trains_weights_and_alpha_as_the_soft_quantizer_in_the_forward(base, quant, optimizer):
    model = quantize_model(copy.deepcopy(base).double(), QUANTS[quant]())
    ref_model = copy.deepcopy(model)
    step = DSQStep(model, OPTIMIZERS[optimizer])
    alphas = torch.nn.Parameter(torch.full((len(model.layout().sizes),), 0.2, dtype=torch.float64))
    ref_opt = OPTIMIZERS[optimizer]([*ref_model.parameters(), alphas])
    for x, y in batches(3, dtype=torch.float64):
        loss = step.train_step(x, y)[0]
        ref = dsq_reference_step(ref_model, quant, alphas, ref_opt, x, y)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, ref_model.state_dict()[name], rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(step.alpha.detach(), alphas.detach(), rtol=1e-9, atol=1e-12)
    assert (step.alpha - 0.2).abs().max() > 1e-6  # alpha learns


def test_dsq_alpha_stays_in_its_interval_and_is_fixed_without_learning(base):
    data = batches(2)
    fixed = DSQStep(
        quantize_model(copy.deepcopy(base), DorefaWeight(2)), OPTIMIZERS["sgd"], learn_alpha=False
    )
    steep = functools.partial(torch.optim.SGD, lr=1e3)  # alpha's steps far past its interval
    clamped = DSQStep(quantize_model(copy.deepcopy(base), DorefaWeight(2)), steep)
    for x, y in data:
        fixed.train_step(x, y)
        clamped.train_step(x, y)
    assert torch.equal(fixed.alpha, torch.full_like(fixed.alpha, 0.2))
    assert "learned" not in fixed.state_dict()
    assert ((clamped.alpha >= 1e-4) & (clamped.alpha <= 0.5)).all()
    assert {1e-4, 0.5} & set(clamped.alpha.tolist())  # the clamp was needed


def test_a_resumed_dsq_restores_alpha(base):
    data = batches(4)
    model = quantize_model(copy.deepcopy(base), DorefaWeight(2))
    step = DSQStep(model, OPTIMIZERS["adam"])
    for x, y in data[:2]:
        step.train_step(x, y)
    saved = copy.deepcopy((model.state_dict(), step.state_dict()))
    resumed_model = quantize_model(copy.deepcopy(base), DorefaWeight(2))
    resumed_model.load_state_dict(saved[0])
    resumed = DSQStep(resumed_model, OPTIMIZERS["adam"])
    assert torch.equal(resumed.alpha, torch.full_like(resumed.alpha, 0.2))
    resumed.load_state_dict(saved[1])
    assert torch.equal(resumed.alpha, step.alpha) and (step.alpha != 0.2).any()
    for x, y in data[2:]:
        torch.testing.assert_close(resumed.train_step(x, y)[0], step.train_step(x, y)[0])
    torch.testing.assert_close(resumed.alpha, step.alpha)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["meta=dsq", "meta.alpha=0.7"],
            "meta.alpha=0.7 is not allowed; allowed: a number in",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["meta=dsq", "meta.alpha=0"], "meta.alpha=0 is not allowed", marks=pytest.mark.slow
        ),
        pytest.param(
            ["meta=dsq", "meta.learn_alpha=2"],
            "meta.learn_alpha=2 is not allowed",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_dsq_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message):
    test_bad_estimator_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message)


@pytest.mark.slow  # a training run killed and relaunched: 20-30 s
def test_a_killed_dsq_run_resumes_alpha_from_its_checkpoint(tmp_path):
    """alpha is in checkpoint.pt (the step's state): a run killed in its second epoch resumes
    from the end of the first and ends with the uninterrupted run's losses and alpha."""
    args = ["meta=dsq", "bits=2", "optimizer=adam", "dataset=fake", "logger=none", "epochs=2"]
    args += ["progress=false", "batch_size=32", "limit_test_batches=1", "log_every=1"]
    args += ["keep_training_state=true"]
    reference = launch(*args, "run_name=reference", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    outputs = tmp_path / "outputs/quantize/fake"
    metrics = outputs / "killed/metrics.jsonl"
    # killed once the first epoch's checkpoint is written and the second epoch is under way
    kill_when(
        [*args, "run_name=killed"], tmp_path, lambda: rows_in_epoch(outputs / "killed", 2) >= 3
    )
    resumed = launch(*args, "run_name=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at epoch 2" in resumed.stdout + resumed.stderr
    got = [json.loads(r) for r in _lines(metrics)]
    want = [json.loads(r) for r in _lines(outputs / "reference/metrics.jsonl")]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "train_loss", "test_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    (alpha,) = load_checkpoint(outputs / "killed/checkpoint.pt")["step_state"]["learned"]
    (expected,) = load_checkpoint(outputs / "reference/checkpoint.pt")["step_state"]["learned"]
    assert alpha.shape == (22,) and (alpha != 0.2).any()
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-7)


def _lines(path):
    return [line for line in path.read_text().splitlines() if line] if path.exists() else []


# ReSTE (meta=reste)


class BinaryReSTE(torch.autograd.Function):
    """The authors' Binary_ReSTE (DravenALG/ReSTE, model/binary_module/binarized_modules.py):
    sign forward; backward (1/o) |u|^((1-o)/o) on interval < |u| <= t, interval^(1/o) / interval
    on |u| <= interval, 0 beyond t, written with their masks in their order."""

    @staticmethod
    def forward(ctx, u, t, o, interval):
        ctx.save_for_backward(u)
        ctx.t, ctx.o, ctx.interval = t, o, interval
        return torch.sign(u)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        t, o, interval = ctx.t, ctx.o, ctx.interval
        tmp = torch.zeros_like(u)
        mask1 = (u <= t) & (u > interval)
        tmp[mask1] = (1 / o) * torch.pow(u[mask1], (1 - o) / o)
        mask2 = (u >= -t) & (u < -interval)
        tmp[mask2] = (1 / o) * torch.pow(-u[mask2], (1 - o) / o)
        tmp[(u <= interval) & (u >= 0)] = interval ** (1 / o) / interval
        tmp[(u <= 0) & (u >= -interval)] = interval ** (1 / o) / interval
        return tmp * g, None, None, None


def reste_reference_step(model, quant, step, optimizer, x, y):
    w_hat = {}
    for name, w in model.quantized_weights().items():
        args = (step.threshold, step.o, step.interval)
        if quant.startswith("dorefa"):
            w_hat[name] = BinaryReSTE.apply(2 * dorefa_transform(w) - 1, *args)
        else:
            alpha = bwn_scale(w, per_filter=quant == "bwn_f")
            w_hat[name] = alpha * BinaryReSTE.apply(w, *args)
    loss = torch.nn.functional.cross_entropy(model(x, w_hat), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


RESTE_CASES = [
    ("dorefa1", {}),
    ("bwn", {}),
    ("bwn_f", {}),
    ("dorefa1", {"o_end": 4.0, "threshold": 0.5, "interval": 0.2}),  # the clip inside [-1, 1]
]


# adam in the slow suite: the rule is in the gradient, which SGD applies as it is; the factor-one
# test above hands an estimator's gradient to every optimizer
@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("quant", "kwargs"), RESTE_CASES, ids=lambda c: str(c))
def test_reste_updates_as_binary_reste_in_the_forward(base, quant, kwargs, optimizer):
    from mq.meta.reste import ReSTEStep

    model = quantize_model(copy.deepcopy(base).double(), QUANTS[quant]())
    ref_model = copy.deepcopy(model)
    ste_model = copy.deepcopy(model)
    step = ReSTEStep(model, OPTIMIZERS[optimizer], **kwargs)
    ste = STEStep(ste_model, OPTIMIZERS[optimizer])
    ref_opt = OPTIMIZERS[optimizer](ref_model.parameters())
    for epoch, (x, y) in enumerate(batches(3, dtype=torch.float64)):
        step.set_progress(epoch + 1, 3)  # o = 3 - sqrt(3), 2, o_end (defaults)
        loss = step.train_step(x, y)[0]
        ste.train_step(x, y)
        ref = reste_reference_step(ref_model, quant, step, ref_opt, x, y)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    moved = 0.0
    for name, p in model.quantized_weights().items():
        q = ref_model.quantized_weights()[name]
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
        moved = max(moved, (p - ste_model.quantized_weights()[name]).abs().max().item())
    assert moved > 1e-6  # the rule is not the STE's


def test_reste_gradient_is_their_formula_at_hand_computed_points(base):
    from mq.meta.reste import ReSTEStep

    step = ReSTEStep(quantize_model(copy.deepcopy(base), BWNWeight()), OPTIMIZERS["sgd"])
    u = torch.tensor([0.0, -0.05, 0.08, 0.25, -1.0, 1.44, 1.5, -1.6, 3.0], dtype=torch.float64)
    x = (u + 1) / 2
    step.o = 2.0  # band: 0.1^(1/2) / 0.1 = sqrt(10); else (1/2) |u|^(-1/2); 0 past 1.5
    power = [0.5 / 0.25**0.5, 0.5 / 1.0, 0.5 / 1.2, 0.5 / 1.5**0.5, 0.0, 0.0]
    expected = torch.tensor([10**0.5] * 3 + power, dtype=torch.float64)
    torch.testing.assert_close(step.scale(torch.ones_like(u), x, x.round()), expected)
    step.set_progress(0, 10)  # o = 1: the STE, clipped at 1.5 instead of 1
    ste = torch.tensor([1.0] * 7 + [0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(step.scale(torch.ones_like(u), x, x.round()), ste)


def test_reste_anneals_o_from_1_to_o_end_on_a_quarter_cosine(base):
    from mq.meta.reste import ReSTEStep

    step = ReSTEStep(quantize_model(copy.deepcopy(base), DorefaWeight(1)), OPTIMIZERS["sgd"])
    # o = 1 + (1 - cos(pi/2 e/E)) (o_end - 1): cos(pi/6) = sqrt(3)/2, cos(pi/3) = 1/2
    for epoch, o in {0: 1.0, 1: 3 - 3**0.5, 2: 2.0, 3: 3.0}.items():
        step.set_progress(epoch, 3)
        assert step.o == pytest.approx(o, rel=1e-12)
    step.set_progress(99, 100)  # a run's last epoch: their loop, as mq's, stops before o_end
    assert step.o == pytest.approx(1 + 2 * (1 - math.sin(math.pi / 200)), rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"o_end": 0.5}, "meta.o_end=0.5 is not allowed; allowed: a number >= 1"),
        ({"o_end": True}, "meta.o_end=True is not allowed; allowed: a number >= 1"),
        ({"threshold": 0}, "meta.threshold=0 is not allowed; allowed: a number > 0"),
        ({"threshold": float("nan")}, "meta.threshold=nan is not allowed"),
        ({"interval": 0}, "meta.interval=0 is not allowed; allowed: a number > 0 and < "),
        ({"interval": 1.5}, "meta.interval=1.5 is not allowed; allowed: a number > 0 and < "),
        ({"interval": "0.1"}, "meta.interval=0.1 is not allowed"),
    ],
)
def test_reste_refuses_bad_keys_in_one_line(base, kwargs, message):
    from mq.meta.reste import ReSTEStep

    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    with pytest.raises(ConfigError) as info:
        ReSTEStep(model, OPTIMIZERS["sgd"], **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# Every estimator's number keys, through its constructor: the whole line, the bound's kind
# (> or >=, [a, b], integer) as each key's check says it.
@pytest.mark.parametrize(
    ("step", "kwargs", "message"),
    [
        ("ede", {"t_min": 0}, "meta.t_min=0 is not allowed; allowed: a number > 0"),
        ("ede", {"t_max": math.inf}, "meta.t_max=inf is not allowed; allowed: a number > 0"),
        (
            "reste",
            {"threshold": 1.0, "interval": 1.0},
            "meta.interval=1.0 is not allowed; allowed: a number > 0 and < meta.threshold=1.0",
        ),
        (
            "dsq",
            {"alpha": 0.7},
            "meta.alpha=0.7 is not allowed; allowed: a number in [0.0001, 0.5]",
        ),
        (
            "dsq",
            {"alpha": False},
            "meta.alpha=False is not allowed; allowed: a number in [0.0001, 0.5]",
        ),
        ("dsq", {"learn_alpha": 2}, "meta.learn_alpha=2 is not allowed; allowed: a boolean"),
        ("ewgs", {"delta": -0.1}, "meta.delta=-0.1 is not allowed; allowed: a number >= 0"),
        (
            "ewgs",
            {"hessian_every": 2.0},
            "meta.hessian_every=2.0 is not allowed; allowed: an integer >= 0 (0: delta fixed)",
        ),
    ],
)
def test_estimator_number_keys_are_refused_in_one_whole_line(base, step, kwargs, message):
    from mq.meta.reste import ReSTEStep

    steps = {"ede": EDEStep, "reste": ReSTEStep, "dsq": DSQStep, "ewgs": EWGSStep}
    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    with pytest.raises(ConfigError) as info:
        steps[step](model, OPTIMIZERS["sgd"], **kwargs)
    assert str(info.value) == message


def test_estimator_number_keys_take_their_closed_bounds(base):
    """The bounds a key's line calls >= or [a, b] are allowed themselves."""
    from mq.meta.dsq import ALPHA_MAX, ALPHA_MIN
    from mq.meta.reste import ReSTEStep

    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    assert ReSTEStep(model, OPTIMIZERS["sgd"], o_end=1).o_end == 1.0
    assert EWGSStep(model, OPTIMIZERS["sgd"], delta=0, hessian_every=0).delta == 0.0
    for alpha in (ALPHA_MIN, ALPHA_MAX):
        dsq = DSQStep(
            quantize_model(copy.deepcopy(base), DorefaWeight(2)), OPTIMIZERS["sgd"], alpha=alpha
        )
        assert (dsq.alpha == alpha).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["meta=reste", "bits=2"],
            "meta=reste cannot serve bits=2; allowed: 1",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["meta=reste", "meta.interval=2"],
            "meta.interval=2 is not allowed",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_reste_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message):
    test_bad_estimator_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message)


# EWGS with delta from the Hessian trace (meta.hessian_every)


def their_trace(params, grads, max_iter=50, tol=1e-3):
    """EWGS's trace() (CIFAR10/utils.py): Hutchinson with Rademacher vectors from torch's
    global generator, stopped when the running mean moves by less than tol."""
    values, trace = [], 0.0
    for _ in range(max_iter):
        v = [torch.randint_like(p, high=2) for p in params]
        for v_i in v:
            v_i[v_i == 0] = -1
        hv = torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=True)
        values.append(sum(torch.sum(h * v_i) for h, v_i in zip(hv, v, strict=False)).item())
        if abs(np.mean(values) - trace) / (trace + 1e-6) < tol:
            return values
        trace = np.mean(values)
    return values


def their_hessian_delta(model, quant, data, epoch):
    """EWGS's update_grad_scales for weights: per layer, over the batches, tr(H) / n over
    3 std(g), in x_q (W^ = 2 x_q - 1, times BWN's alpha), averaged and clipped at 0."""
    torch.manual_seed(epoch)  # mq draws its vectors from a generator seeded with the epoch
    weights = model.quantized_weights()
    scale = [0.0] * len(weights)
    for x, y in data:
        leaves, w_hat = [], {}
        for name, w in weights.items():
            if quant.startswith("dorefa"):
                x_q = (torch.sign(2 * dorefa_transform(w) - 1) + 1) / 2
                alpha = 1.0
            else:
                x_q, alpha = (torch.sign(w) + 1) / 2, bwn_scale(w, per_filter=quant == "bwn_f")
            leaves.append(x_q.detach().requires_grad_())
            w_hat[name] = alpha * (2 * leaves[-1] - 1)
        loss = torch.nn.functional.cross_entropy(model(x, w_hat), y)
        loss.backward(create_graph=True)
        grads = [leaf.grad for leaf in leaves]
        for i, (leaf, grad) in enumerate(zip(leaves, grads, strict=False)):
            trace = np.mean(their_trace([leaf], [grad]))
            scale[i] += trace / leaf.numel() / (grad.std().item() * 3.0)
    return [max(s / len(data), 0.0) for s in scale]


@pytest.mark.slow  # 8-20 s per quantizer: three Hutchinson traces
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")  # theirs does
@pytest.mark.parametrize("quant", ["dorefa1", "bwn", "bwn_f"])
def test_ewgs_hessian_delta_is_their_update_grad_scales(quant):
    torch.manual_seed(1)
    model = quantize_model(build_model("resnet20", 10).double(), QUANTS[quant]())
    ref_model = copy.deepcopy(model)
    step = EWGSStep(model, OPTIMIZERS["sgd"], delta=0.5, hessian_every=2)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 3, 8, 8, generator=g).double(), torch.randint(0, 10, (4,), generator=g))
        for _ in range(4)
    ]
    step.set_progress(1, 4)
    step.start_epoch(iter(data))
    assert step.delta == 0.5  # epoch 1 of every 2: no update
    step.set_progress(2, 4)
    step.start_epoch(iter(data))
    expected = their_hessian_delta(ref_model, quant, data[:3], epoch=2)
    layout = model.layout(step.weights)
    per_layer = [part[0].item() for part in step.delta.split(layout.sizes)]
    assert per_layer == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert any(d > 0 for d in expected) and any(d == 0 for d in expected)  # clipped at 0
    assert all(torch.all(part == part[0]) for part in step.delta.split(layout.sizes))
    for name, buffer in model.net.named_buffers():  # 3 forwards in train mode, as theirs
        torch.testing.assert_close(buffer, dict(ref_model.net.named_buffers())[name], msg=name)


def test_ewgs_hessian_delta_survives_a_resume_and_is_refused_when_bad(base):
    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    step = EWGSStep(model, OPTIMIZERS["sgd"], hessian_every=1)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g))]
    step.set_progress(1, 2)
    step.start_epoch(iter(data))
    resumed = EWGSStep(quantize_model(copy.deepcopy(base), DorefaWeight(1)), OPTIMIZERS["sgd"])
    resumed.load_state_dict(copy.deepcopy(step.state_dict()))
    assert torch.equal(resumed.delta, step.delta)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=f"^meta.hessian_every={bad} is not allowed; "):
            EWGSStep(model, OPTIMIZERS["sgd"], hessian_every=bad)
