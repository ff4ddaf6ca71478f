"""Kernel-running ops per training step, for each variant, as the GPU would launch them.

    python scripts/count_ops.py               # CUDA's code paths (foreach SGD and reductions)
    python scripts/count_ops.py --cpu-paths   # this machine's paths (what mq.bench counts here)

A launch costs host time on a GPU, so for ResNet20 this count bounds a step in eager mode.
The CUDA paths are forced on the CPU: the count does not need a GPU.
"""

from __future__ import annotations

import argparse
import functools

import torch

from mq.bench import OpCounter
from mq.meta import MetaQuantStep, STEStep
from mq.models import build_model
from mq.quant import BWNWeight, DorefaWeight, quantize_model
from mq.quant.flat import FlatLayout

VARIANTS = [("none", "ste")] + [
    (q, n) for q in ("dorefa", "bwn") for n in ("ste", "multifc", "fcgrad")
]


def count(quant: str, net: str, model_name: str, cuda_paths: bool) -> int:
    torch.manual_seed(0)
    quantizer = {"none": None, "dorefa": DorefaWeight(1), "bwn": BWNWeight()}[quant]
    model = quantize_model(build_model(model_name, 10), quantizer)
    optimizer = functools.partial(torch.optim.SGD, lr=1e-3, foreach=cuda_paths)
    if net == "ste":
        step = STEStep(model, optimizer)
    else:
        layers = 3 if net == "multifc" else 2
        step = MetaQuantStep(model, optimizer, net=net, hidden_size=100, num_layers=layers)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):  # past MetaQuant's first step, which differs
        step.train_step(x, y)
    with OpCounter() as counter:
        step.train_step(x, y)
    return counter.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--cpu-paths", action="store_true", help="this machine's code paths")
    args = p.parse_args()
    cuda_paths = not args.cpu_paths
    if cuda_paths:  # the per-layer reductions as CUDA runs them: one multi-tensor kernel
        FlatLayout.amax = functools.partialmethod(FlatLayout.amax, foreach=True)
        FlatLayout.mean_abs = functools.partialmethod(FlatLayout.mean_abs, foreach=True)
    for quant, net in VARIANTS:
        name = "fp" if quant == "none" else f"{quant}/{net}"
        print(f"{name:<16}{count(quant, net, args.model, cuda_paths):>6}")


if __name__ == "__main__":
    main()
