"""Training-step benchmark: ms per step, epoch throughput with the real data path, peak memory.

    python -m mq.bench                      # CPU or CUDA (auto), ResNet20, batch 128
    python -m mq.bench --quick              # a few steps of everything, about a minute on CPU
    python -m mq.bench --device cuda --out bench.json

Variants: full precision (fp), then STE and each meta net under every ``--quants`` entry.
Step times come from one process with every variant built, timed in interleaved rounds
(A, B, C, A, B, C, ...) so that load from other work hits all variants alike; the median over
all timed steps is reported, with the interquartile range as the noise. Throughput and peak
memory come from one fresh child process per variant: a whole epoch (or ``--epoch-batches``)
through ``DeviceLoader`` (uint8 images on the device, crop and flip per batch), and the peak
resident set (CPU, reset per process) or ``torch.cuda.max_memory_allocated`` (CUDA). ``ops``
counts the kernel-running aten ops of one step: on a GPU each is a launch that costs host time.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from mq.cli.conf import options
from mq.cli.resolvers import compose
from mq.core.allocator import keep_freed_memory
from mq.core.errors import ConfigError
from mq.data.base import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader
from mq.data.loaders import folder_loaders
from mq.models import MODELS, build_model
from mq.quant import quantize_model

# conf/'s options: STE first, then every meta net; every quantizer (none is the FP variant)
NETS = tuple(sorted(options("meta"), key=lambda name: name != "ste"))
QUANTS = tuple(q for q in options("quant") if q != "none")


@dataclass(frozen=True)
class Variant:
    quant: str  # "none" (full precision), "dorefa" or "bwn"
    net: str  # "ste" or a meta net

    @property
    def name(self) -> str:
        return "fp" if self.quant == "none" else f"{self.quant}/{self.net}"


def build_step(variant: Variant, args: argparse.Namespace, device: torch.device) -> Any:
    torch.manual_seed(0)
    net = build_model(args.model, 10, channels_last=not args.no_channels_last)
    # The quantizer and the meta net as a run with these choices builds them (conf/ defaults:
    # MultiFC 3 layers, FCGrad 2, hidden 100, no activation); bwn is 1 bit whatever --bits says.
    try:
        cfg = compose([f"quant={variant.quant}", f"meta={variant.net}", f"bits={args.bits}"])
        quantizer = instantiate(cfg.quant) if cfg.quant.get("_target_") else None
    except ConfigError:
        cfg = compose([f"quant={variant.quant}", f"meta={variant.net}", "bits=1"])
        quantizer = instantiate(cfg.quant)
    model = quantize_model(net, quantizer).to(device)
    optimizer = functools.partial(torch.optim.SGD, lr=1e-3)
    for key, value in (("state_dtype", args.state_dtype), ("compile", args.compile)):
        if key in cfg.meta.get("net", {}):  # LSTMFC's
            cfg.meta.net[key] = value
    step = instantiate(cfg.meta, model=model, optimizer=optimizer)
    if args.reference and hasattr(step.meta_net, "fused"):
        step.meta_net.fused = False
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# aten ops that only allocate or reinterpret memory; every other op runs at least one kernel
NO_KERNEL = {"empty", "empty_like", "empty_strided", "_unsafe_view", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops below autograd that run a kernel (not views, not allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if (
            func.namespace == "aten"
            and not func.is_view
            and func.__name__.split(".")[0] not in NO_KERNEL
        ):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Any, x: torch.Tensor, y: torch.Tensor) -> int:
    """Kernel-running ops in one training step: on a GPU each is a launch costing host time
    (~5-20 us in eager mode), which can bound a small model's step however fast the device is."""
    with OpCounter() as counter:
        step.train_step(x, y)
    return counter.ops


def time_steps(variants: list[Variant], args: argparse.Namespace, device: torch.device) -> dict:
    """Median ms per step of each variant, interleaved rounds on one fixed random batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    steps = {v: build_step(v, args, device) for v in variants}
    ops = {}
    for v, step in steps.items():
        for _ in range(args.warmup):
            step.train_step(x, y)
        ops[v] = count_ops(step, x, y)
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, step in steps.items():
            for _ in range(args.steps):
                sync(device)
                start = time.perf_counter()
                step.train_step(x, y)
                sync(device)
                times[v].append(1000 * (time.perf_counter() - start))
    out = {}
    for v, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[v.name] = {"ms": statistics.median(ts), "q1": q[0], "q3": q[2], "n": len(ts)}
        out[v.name]["ops"] = ops[v]
    return out


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets VmHWM, the peak resident set, of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mb("VmHWM")


def _train_loader(args: argparse.Namespace, device: torch.device) -> DeviceLoader:
    if args.data_root:
        cache = str(Path(args.data_root) / "cache.pt")
        return folder_loaders(args.data_root, args.batch, device, cache=cache).train
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    return DeviceLoader(images, labels, args.batch, mean, std, True, device)


def _batches(loader: DeviceLoader, args: argparse.Namespace):
    limit = len(loader) if args.epoch_batches is None else min(args.epoch_batches, len(loader))
    for i, batch in enumerate(loader.epoch(0)):
        if i >= limit:
            return
        yield batch


def epoch_run(variant: Variant | None, args: argparse.Namespace) -> dict:
    """In a fresh process: images/s over an epoch and peak memory; ``None``: the loader alone."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if not args.glibc_defaults:
        keep_freed_memory()
    loader = _train_loader(args, device)
    sync(device)
    before = (
        _rss_mb("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
    )
    _reset_peak(device)
    step = None if variant is None else build_step(variant, args, device)
    if step is not None:  # warm-up outside the timed epoch (allocator, oneDNN/cuDNN plans)
        x, y = next(iter(loader.epoch(1)))
        for _ in range(args.warmup):
            step.train_step(x, y)
    sync(device)
    start, seen = time.perf_counter(), 0
    for x, y in _batches(loader, args):
        if step is not None:
            step.train_step(x, y)
        seen += y.numel()
    sync(device)
    seconds = time.perf_counter() - start
    peak = _peak_mb(device)
    return {
        "images_per_s": seen / seconds,
        # training time of a 100-epoch run at this rate (test passes and checkpoints not included)
        "projected_100_epochs_min": 100 * loader.num_samples / (seen / seconds) / 60,
        "ms_per_batch": 1000 * seconds / max(seen // args.batch, 1),
        "peak_mb": peak,  # CPU: peak RSS of the process; CUDA: max allocated
        "peak_over_data_mb": peak - before,  # what model, step and epoch added to the data
    }


def _child(conn, variant: Variant | None, args: argparse.Namespace) -> None:
    conn.send(epoch_run(variant, args))
    conn.close()


def in_child(variant: Variant | None, args: argparse.Namespace) -> dict:
    # A fresh process per variant, so the peak memory of one does not hide another's.
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, variant, args))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def table(results: dict, variants: list[Variant]) -> str:
    steps, epochs = results["steps"], results["epochs"]
    fp = steps["fp"]["ms"]
    head = f"{'variant':<16}{'ms/step':>9}{'IQR':>15}{'x STE':>7}{'x FP':>7}{'ops':>6}"
    head += f"{'img/s':>8}{'100ep min':>10}{'peak MB':>9}{'+MB':>8}"
    lines = [head, "-" * len(head)]
    for v in variants:
        s = steps[v.name]
        ste = steps["fp" if v.quant == "none" else f"{v.quant}/ste"]["ms"]
        e = epochs.get(v.name, {})
        iqr = f"{s['q1']:.0f}-{s['q3']:.0f}"
        lines.append(
            f"{v.name:<16}{s['ms']:>9.1f}{iqr:>15}"
            f"{s['ms'] / ste:>7.2f}{s['ms'] / fp:>7.2f}{s['ops']:>6}"
            f"{e.get('images_per_s', float('nan')):>8.0f}"
            f"{e.get('projected_100_epochs_min', float('nan')):>10.1f}"
            f"{e.get('peak_mb', float('nan')):>9.0f}"
            f"{e.get('peak_over_data_mb', float('nan')):>8.0f}"
        )
    data = epochs.get("data")
    if data:
        lines.append(f"data pipeline alone: {data['ms_per_batch']:.2f} ms/batch")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mq.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to run (auto: CUDA when present)",
    )
    p.add_argument("--model", default="resnet20", help="model config name (conf/model/)")
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--bits", type=int, default=1, help="dorefa bit width")
    p.add_argument("--quants", default="dorefa,bwn", help=f"subset of {','.join(QUANTS)}")
    p.add_argument("--nets", default=",".join(NETS), help=f"subset of {','.join(NETS)}")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument(
        "--epoch-batches",
        type=int,
        default=None,
        help="batches timed for throughput (default: an epoch)",
    )
    p.add_argument("--images", type=int, default=50_000, help="synthetic training images")
    p.add_argument("--data-root", default=None, help="cifar10 image folder (train/, test/)")
    p.add_argument("--state-dtype", default="float32", help="LSTMFC state: float32 | bfloat16")
    p.add_argument("--reference", action="store_true", help="straightforward LSTMFC (no fusing)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LSTMFC cell through torch.compile (meta.net.compile; on by default, as in conf/)",
    )
    p.add_argument("--no-channels-last", action="store_true", help="NCHW weights")
    p.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: cuDNN picks its fastest algorithms per shape (on, as in conf/)",
    )
    p.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds alone (mq raises them: mq/core/allocator.py)",
    )
    p.add_argument("--no-epoch", action="store_true", help="skip throughput and memory")
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch intra-op threads (default: torch's, one per core)",
    )
    p.add_argument("--quick", action="store_true", help="2 warm-up, 2x3 steps, 20-batch epoch")
    p.add_argument(
        "--pack",
        default=None,
        help="pack sizes, e.g. 1,2,4,8,16: fused packs beside separate processes (bench_pack)",
    )
    p.add_argument("--pack-net", default="multifc", help="--pack: the meta option of its runs")
    p.add_argument("--pack-quant", default="dorefa", help="--pack: the quantizer of its runs")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; allowed: auto, cpu")
    for option, values, allowed in (
        ("--nets", args.nets.split(","), NETS),
        ("--quants", args.quants.split(","), QUANTS),
        ("--model", [args.model], MODELS),
        ("--state-dtype", [args.state_dtype], ("float32", "bfloat16", "float16")),
        ("--pack-net", [args.pack_net], NETS),
        ("--pack-quant", [args.pack_quant], QUANTS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{option} {','.join(bad)} is not known; allowed: {', '.join(allowed)}")
    if args.pack is not None:
        sizes = args.pack.split(",")
        if not all(k.isdigit() and int(k) >= 1 for k in sizes):
            p.error(f"--pack {args.pack} is not a list of pack sizes; allowed: e.g. 1,2,4,8,16")
    if args.quick:
        args.warmup, args.steps, args.rounds = 2, 2, 3
        args.epoch_batches = args.epoch_batches or 20
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # as mq.job.run does for every run
    if not args.glibc_defaults:
        keep_freed_memory()  # as mq.job.run does for every run
    nets = args.nets.split(",")
    variants = [Variant("none", "ste")] + [
        Variant(q, n) for q in args.quants.split(",") for n in NETS if n in nets
    ]
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results: dict[str, Any] = {"args": vars(args), "device": str(device), "epochs": {}}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    results["steps"] = time_steps(variants, args, device)
    if not args.no_epoch:  # step times first: the epochs take much longer
        print(table(results, variants), flush=True)
        results["epochs"]["data"] = in_child(None, args)
        for v in variants:
            results["epochs"][v.name] = in_child(v, args)
    results["variants"] = [asdict(v) | {"name": v.name} for v in variants]
    print(table(results, variants))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
