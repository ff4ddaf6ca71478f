"""CUDA code paths against the CPU's: skipped without a GPU; scripts/gpu-check.sh runs them.

What differs on CUDA: the flat quantizer's per-layer reductions (one multi-tensor kernel), the
fused LSTMFC (one block over all rows, the compiled cell through Triton) and the training loop
on the device. TF32 is switched off here so both devices compute in float32.
"""

import copy
import functools
import json

import pytest
import torch
from conftest import SMOKE, launch, meta_net

from mq.meta import MetaQuantStep, STEStep
from mq.models import build_model
from mq.quant import BWNWeight, DorefaWeight, quantize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SGDM = functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=5e-4)
TOL = {"rtol": 1e-4, "atol": 1e-4}  # as tests/test_speed_equivalence.py: float32 reordering


@pytest.fixture(autouse=True)
def float32_only():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("quant", ["dorefa", "bwn", "bwn_f"])
def test_flat_quantizer_on_cuda_matches_cpu(quant):
    make = {
        "dorefa": lambda: DorefaWeight(2),
        "bwn": BWNWeight,
        "bwn_f": lambda: BWNWeight(per_filter=True),
    }[quant]
    torch.manual_seed(0)
    cpu = quantize_model(build_model("resnet20", 10), make())
    gpu = copy.deepcopy(cpu).cuda()
    results = []
    for model in (cpu, gpu):
        weights = model.quantize_weights()
        sum((w * w.detach().abs()).sum() for w in weights.values()).backward()
        grads = [p.grad.cpu() for p in model.quantized_weights().values()]
        results.append(([w.detach().cpu() for w in weights.values()], grads))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1], strict=True):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize(
    ("net", "compile"), [("ste", False), ("multifc", False), ("lstmfc", False), ("lstmfc", True)]
)
def test_training_steps_on_cuda_match_cpu(net, compile, caplog):
    torch.manual_seed(0)
    base = build_model("resnet20", 10)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(3)
    ]
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        model = quantize_model(copy.deepcopy(base), DorefaWeight(1)).to(device)
        if net == "ste":
            step = STEStep(model, SGDM)
        else:
            meta = meta_net(net, hidden_size=16, compile=compile)
            step = MetaQuantStep(model, SGDM, meta, lr=1e-2)
        losses = [step.train_step(x.to(device), y.to(device))[0].cpu() for x, y in data]
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        results.append((torch.stack(losses), state))
    assert "torch.compile failed" not in caplog.text  # the cell compiled (Triton on CUDA)
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, **TOL, msg=name)


@pytest.mark.parametrize("meta", ["multifc", "lstmfc"])
def test_launch_trains_on_cuda(tmp_path, meta):
    result = launch(*SMOKE, f"meta={meta}", "device=cuda", "run_name=r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs/quantize/fake/r"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)  # where it was saved
    assert checkpoint["model"]["conv1.weight"].is_cuda


@pytest.mark.parametrize("update", ["paper", "original"])
def test_a_pack_on_cuda_equals_its_runs_alone_on_cuda(update):
    """The fused network (vmap, grouped convolutions, channels-last weights) on the GPU, in
    float64 there too: the pack's tests (tests/test_pack.py) run on the CPU."""
    from test_pack import batches, check_pack_equals_alone

    torch.manual_seed(0)
    network = build_model("resnet20", 10).double().cuda()
    runs = [
        ("ste", "sgd", 0.05, None),
        ("multifc", "adam", 0.05, update),
        ("lstmfc", "sgdm", 0.02, update),
        ("fcgrad", "sgd", 0.1, update),
    ]
    check_pack_equals_alone(network, "dorefa", runs, device="cuda")
    assert batches(0)[0][0].dtype == torch.float64
