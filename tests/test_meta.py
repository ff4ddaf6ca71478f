"""MetaQuant training steps: identity meta net == STE, real meta nets learn, state round-trips."""

import copy
import functools

import pytest
import torch
from conftest import meta_net as conf_meta_net

from mq.meta import IdentitySTE, MetaQuantStep, STEStep
from mq.meta.step import released_adam_eps
from mq.models import build_model
from mq.quant import BWNWeight, DorefaWeight, quantize_model
from mq.quant.functions import bwn_scale

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


def batches(n=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def recording(model):
    """Record the quantized weights every forward of ``model`` sees."""
    seen = []
    forward = model.forward

    def record(x, weights=None):
        if weights is None:
            weights = {n: model.weight_quant(w) for n, w in model.quantized_weights().items()}
        seen.append({n: w.detach().clone() for n, w in weights.items()})
        return forward(x, weights)

    model.forward = record
    return seen


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model("resnet20", 10)


class AlphaIdentity(IdentitySTE):
    """The BWN STE written as a meta net: g_W~ = alpha * g_W^ * 1{|W~| <= 1}, alpha = mean|W~|
    of the previous step's W~ (= W for BWN), per tensor or per conv filter."""

    def __init__(self, layout, per_filter):
        super().__init__()
        self.layout, self.per_filter = layout, per_filter

    def forward(self, grad_hat, w_tilde, state):
        g, state = super().forward(grad_hat, w_tilde, state)
        return g * bwn_scale(w_tilde, self.per_filter, self.layout), state


def _assert_same_trajectory(base, quant, optimizer, meta_net):
    """STE and MetaQuant with ``meta_net`` (a callable of the model) see the same quantized
    weights and losses at every step, and BatchNorm moves alike, step 0 included."""
    ste_model = quantize_model(copy.deepcopy(base), QUANTS[quant]())
    meta_model = quantize_model(copy.deepcopy(base), QUANTS[quant]())
    ste_seen, meta_seen = recording(ste_model), recording(meta_model)
    ste = STEStep(ste_model, OPTIMIZERS[optimizer])
    meta = MetaQuantStep(meta_model, OPTIMIZERS[optimizer], net=meta_net(meta_model))
    for t, (x, y) in enumerate(batches(4)):
        ste_loss, _ = ste.train_step(x, y)
        meta_loss, _ = meta.train_step(x, y)
        torch.testing.assert_close(meta_loss, ste_loss, msg=f"loss differs at step {t}")
        for name in ste_seen[t]:
            torch.testing.assert_close(meta_seen[t][name], ste_seen[t][name], msg=f"{name} at {t}")
        for p, q in zip(
            ste_model.net.bn1.parameters(), meta_model.net.bn1.parameters(), strict=True
        ):
            torch.testing.assert_close(p, q)
    # and the quantized weights did move: the test would be empty otherwise
    assert any(not torch.equal(ste_seen[0][n], ste_seen[-1][n]) for n in ste_seen[0])


@pytest.mark.parametrize(
    ("quant", "optimizer"),
    [
        ("dorefa1", "sgd"),
        pytest.param("dorefa1", "sgdm", marks=pytest.mark.slow),  # sgd and adam cover the path
        ("dorefa1", "adam"),
        ("dorefa2", "sgd"),
    ],
)
def test_identity_meta_net_is_dorefa_ste_in_disguise(base, quant, optimizer):
    """DoReFa: calibration x identity == the STE chain (slope 2 x dA/dW), so paper-mode
    MetaQuant with the identity meta net trains exactly like the STE baseline."""
    _assert_same_trajectory(base, quant, optimizer, lambda model: IdentitySTE())


@pytest.mark.parametrize(
    ("quant", "optimizer"),
    [
        ("bwn", "sgd"),
        pytest.param("bwn", "sgdm", marks=pytest.mark.slow),
        ("bwn", "adam"),
        ("bwn_f", "sgd"),
    ],
)
def test_alpha_times_identity_is_bwn_ste(base, quant, optimizer):
    """BWN: the STE carries alpha, MetaQuant's calibration is 1, so it is alpha x identity
    (alpha of the previous W~, which the STE step used) that reproduces the STE baseline."""
    per_filter = quant == "bwn_f"
    _assert_same_trajectory(
        base, quant, optimizer, lambda model: AlphaIdentity(model.layout(), per_filter)
    )


@pytest.mark.parametrize("quant", ["bwn", "bwn_f"])
def test_bwn_metaquant_steps_one_over_alpha_further_than_ste(base, quant):
    """Under SGD the identity meta net moves each weight 1/alpha times as far as BWN STE."""
    models = [quantize_model(copy.deepcopy(base), QUANTS[quant]()) for _ in range(2)]
    ste = STEStep(models[0], OPTIMIZERS["sgd"])
    meta = MetaQuantStep(models[1], OPTIMIZERS["sgd"], net=IdentitySTE())
    x, y = batches(1)[0]
    start = models[0].layout().flatten(list(models[0].quantized_weights().values())).detach()
    alpha = bwn_scale(start, quant == "bwn_f", models[0].layout())
    ste.train_step(x, y)
    meta.train_step(x, y)
    meta.train_step(*batches(2, seed=1)[0])  # the first meta step moves by step 0's gradient
    moved = [
        m.layout().flatten(list(m.quantized_weights().values())).detach() - start for m in models
    ]
    assert moved[0].abs().sum() > 0
    torch.testing.assert_close(moved[0], alpha * moved[1])
    assert alpha.max() < 0.5  # so MetaQuant's step is the larger one, by 1/alpha


@pytest.mark.parametrize("update", ["paper", "original"])
def test_step_zero_leaves_quantized_weights_alone(base, update):
    """Step 0 has no meta gradient yet: the quantized weights wait. BatchNorm and the fc bias
    take their step in paper mode; the released code (original) updates nothing at all."""
    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    before = {n: w.detach().clone() for n, w in model.quantized_weights().items()}
    bn_before = model.net.bn1.weight.detach().clone()
    bias_before = model.net.fc.bias.detach().clone()
    step = MetaQuantStep(model, OPTIMIZERS["sgd"], net=conf_meta_net("multifc"), update=update)
    step.train_step(*batches(1)[0])
    for n, w in model.quantized_weights().items():
        assert torch.equal(w, before[n])
    moved = update == "paper"
    assert torch.equal(model.net.bn1.weight, bn_before) != moved
    assert torch.equal(model.net.fc.bias, bias_before) != moved
    assert step.grad_hat is not None and step.grad_hat.abs().sum() > 0


def test_released_adam_eps_is_the_released_formula():
    """The released Adam: p <- p - lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps), eps before
    the bias correction (torch adds it after). Written out here and compared over 3 steps."""
    torch.manual_seed(0)
    p = torch.randn(50, dtype=torch.float64, requires_grad=True)
    ref = p.detach().clone()
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-3, 5e-4  # a big eps makes the gap visible
    opt = torch.optim.Adam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    q = p.detach().clone().requires_grad_()
    plain = torch.optim.Adam([q], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)  # torch alone
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    for t in range(1, 4):
        g = torch.randn(50, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        released_adam_eps(opt)
        opt.step()
        plain.step()
        g = g + wd * ref
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref -= lr * (1 - b2**t) ** 0.5 / (1 - b1**t) * m / (v.sqrt() + eps)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(q.detach(), p.detach(), rtol=1e-6, atol=0)


def test_original_look_ahead_follows_the_current_lr(base):
    """The released look-ahead is the current lr times the previous refined gradient: when the
    lr drops, the stored previous update (weights and biases) drops with it."""
    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    step = MetaQuantStep(model, OPTIMIZERS["sgd"], net=conf_meta_net("multifc"), update="original")
    for x, y in batches(2):
        step.train_step(x, y)
    weights, biases = step.previous_update.clone(), [u.clone() for u in step.previous_bias_update]
    assert weights.abs().sum() > 0 and len(biases) == 1 and biases[0].abs().sum() > 0
    step.set_lr(0.005)  # from 0.05
    torch.testing.assert_close(step.previous_update, weights * 0.1)
    torch.testing.assert_close(step.previous_bias_update[0], biases[0] * 0.1)
    step.set_lr(0.005)
    torch.testing.assert_close(step.previous_update, weights * 0.1)


@pytest.mark.parametrize("net", ["multifc", "fcgrad", "lstmfc"])
@pytest.mark.parametrize("nonlinearity", ["none", "tanh"])
def test_meta_net_gets_gradients_and_changes(base, net, nonlinearity):
    model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
    step = MetaQuantStep(
        model,
        OPTIMIZERS["sgd"],
        net=conf_meta_net(net, hidden_size=8, nonlinearity=nonlinearity),
        lr=1e-2,
    )
    start = [p.detach().clone() for p in step.meta_net.parameters()]
    weights_start = model.net.conv1.weight.detach().clone()
    data = batches(3)
    for x, y in data:  # LSTM's recurrent weights first see a non-zero state at step 2
        step.train_step(x, y)
    grads = [p.grad for p in step.meta_net.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(
        not torch.equal(a, b) for a, b in zip(start, step.meta_net.parameters(), strict=True)
    )
    assert not torch.equal(weights_start, model.net.conv1.weight)


def test_original_update_moves_by_previous_step(base):
    """update=original: the forward at step 1 sees W - lr * (STE gradient of step 0)."""
    model = quantize_model(copy.deepcopy(base), BWNWeight())
    seen = recording(model)
    step = MetaQuantStep(model, OPTIMIZERS["sgd"], net=IdentitySTE(), update="original")
    ste_model = quantize_model(copy.deepcopy(base), BWNWeight())
    ste_seen = recording(ste_model)
    ste = STEStep(ste_model, OPTIMIZERS["sgd"])
    data = batches(3)
    for x, y in data[:2]:
        step.train_step(x, y)
        ste.train_step(x, y)
    # with the identity net the first two forwards coincide with STE's ...
    for name in ste_seen[1]:
        torch.testing.assert_close(seen[1][name], ste_seen[1][name])
    step.train_step(*data[2])
    ste.train_step(*data[2])
    # ... the third lags one update behind paper mode: it sees W_2 - lr*u_1, not W_2 - lr*u_2
    assert any(not torch.allclose(seen[2][n], ste_seen[2][n]) for n in seen[2])


def test_lstm_state_is_per_coordinate_and_carried(base):
    model = quantize_model(copy.deepcopy(base), DorefaWeight(2))
    step = MetaQuantStep(model, OPTIMIZERS["sgd"], net=conf_meta_net("lstmfc", hidden_size=4))
    n = sum(w.numel() for w in model.quantized_weights().values())
    assert step.meta_state[0].shape == (n, 4)
    for x, y in batches(2):
        step.train_step(x, y)
    h, c = step.meta_state
    assert not h.requires_grad and h.abs().sum() > 0 and c.abs().sum() > 0


@pytest.mark.parametrize(
    ("net", "update"),
    [
        ("multifc", "paper"),
        ("lstmfc", "paper"),
        pytest.param("multifc", "original", marks=pytest.mark.slow),
        pytest.param("lstmfc", "original", marks=pytest.mark.slow),
    ],
)
def test_step_state_round_trip_gives_identical_continuation(base, net, update):
    data = batches(4)

    def fresh(seed):
        torch.manual_seed(seed)
        model = quantize_model(copy.deepcopy(base), DorefaWeight(1))
        step = MetaQuantStep(
            model, OPTIMIZERS["sgdm"], net=conf_meta_net(net, hidden_size=8), update=update
        )
        return model, step

    _, ref_step = fresh(0)
    losses = [ref_step.train_step(x, y)[0] for x, y in data]
    model, step = fresh(0)
    for x, y in data[:2]:
        step.train_step(x, y)
    saved = copy.deepcopy((model.net.state_dict(), step.state_dict()))
    model2, step2 = fresh(1)  # different meta-net init: everything must come from the state
    model2.net.load_state_dict(saved[0])
    step2.load_state_dict(saved[1])
    resumed = [step2.train_step(x, y)[0] for x, y in data[2:]]
    torch.testing.assert_close(torch.stack(resumed), torch.stack(losses[2:]))
