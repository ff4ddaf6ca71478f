"""Kernel-running ops per training step, for each variant, as the GPU would launch them.

    python scripts/count_ops.py               # CUDA's code paths (foreach SGD and reductions)
    python scripts/count_ops.py --cpu-paths   # this machine's paths (what mq.bench counts here)

A launch costs host time on a GPU, so for ResNet20 this count bounds a step in eager mode.
The CUDA paths are forced on the CPU: the count does not need a GPU. The steps are the bench's
(mq.tools.bench.build_step), counted as the bench counts them (mq.tools.bench.count_ops).
"""

from __future__ import annotations

import argparse
import functools

import torch

from mq.quant.flat import FlatLayout
from mq.tools.bench import Variant, build_step, count_ops
from mq.tools.bench import parse as bench_args

VARIANTS = [Variant("none", "ste")] + [
    Variant(q, n) for q in ("dorefa", "bwn") for n in ("ste", "multifc", "fcgrad")
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--cpu-paths", action="store_true", help="this machine's code paths")
    args = p.parse_args()
    bench = bench_args(["--device", "cpu", "--model", args.model, "--batch", "8"])
    if not args.cpu_paths:  # the per-layer reductions as CUDA runs them: one multi-tensor kernel
        FlatLayout.amax = functools.partialmethod(FlatLayout.amax, foreach=True)
        FlatLayout.mean_abs = functools.partialmethod(FlatLayout.mean_abs, foreach=True)
    x, y = torch.randn(bench.batch, 3, 32, 32), torch.randint(0, 10, (bench.batch,))
    for variant in VARIANTS:
        step = build_step(variant, bench, torch.device("cpu"))
        if not args.cpu_paths:  # foreach optimizer steps, CUDA's default
            for opt in (step.weight_optimizer, step.other_optimizer):
                for group in opt.param_groups if opt is not None else ():
                    group["foreach"] = True
        for _ in range(bench.warmup):  # past MetaQuant's first step, which differs
            step.train_step(x, y)
        print(f"{variant.name:<16}{count_ops(step, x, y):>6}")


if __name__ == "__main__":
    main()
