"""Packed-runs benchmark (``python -m mq.bench --pack 1,2,4,8,16``): images per second of a
pack of K runs (mq.meta.pack) in one process, fused (one network for all K: the GPU's default)
and one network after another (the CPU's), beside K separate processes each training one run at
the same time, and beside one run alone (K runs one after another take K times its time). Each
measurement is a fresh process (spawn); the K separate processes start their timed steps
together (a barrier) and the aggregate is K x batch x steps over the slowest one's time. The
runs of a pack differ in lr, as a sweep's would; the data is a fixed random batch per run, so
this times the step, not the data path (``python -m mq.bench`` times that).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch

from mq.meta.pack import Pack


def _runs(k: int, args: argparse.Namespace, device: torch.device) -> list[Any]:
    from mq.tools.bench import Variant, build_step

    steps = []
    for i in range(k):
        step = build_step(Variant(args.pack_quant, args.pack_net), args, device)
        for opt in (step.weight_optimizer, step.other_optimizer):
            for group in opt.param_groups if opt is not None else []:
                group["lr"] = 1e-3 * (1 + i)  # every run its own lr
        steps.append(step)
    return steps


def _time(k: int, fused: bool, args: argparse.Namespace, barrier: Any, out: Any) -> None:
    """Time ``args.steps`` steps of ``k`` runs: a Pack (``fused``: one fused network, else one
    network after another) or, for k == 1, the run's own step."""
    from mq.tools.bench import sync

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    steps = _runs(k, args, device)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, 3, 32, 32, generator=g).to(device) for _ in range(k)]
    ys = [torch.randint(0, 10, (args.batch,), generator=g).to(device) for _ in range(k)]
    if k > 1:
        pack = Pack([s.model for s in steps], steps, fuse=fused)

        def step() -> None:
            pack.train_step(xs, ys)
    else:

        def step() -> None:
            for s, x, y in zip(steps, xs, ys, strict=True):
                s.train_step(x, y)

    for _ in range(args.warmup):
        step()
    sync(device)
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    out.send((time.perf_counter() - start, len(steps)))


MODES = ("fused", "one by one", "processes")


def measure(k: int, mode: str, args: argparse.Namespace) -> tuple[float, int, int]:
    """Seconds for ``args.steps`` steps of ``k`` runs: a pack in one process ("fused", or "one
    by one": its networks unfused), or "processes" (k at once, the slowest one's time); with
    the processes and the runs each stepped."""
    ctx = mp.get_context("spawn")
    n = k if mode == "processes" else 1
    barrier = ctx.Barrier(n) if n > 1 else None
    pipes, procs = [], []
    for _ in range(n):
        parent, child = ctx.Pipe()
        runs = 1 if mode == "processes" else k
        proc = ctx.Process(target=_time, args=(runs, mode == "fused", args, barrier, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    results = [p.recv() for p in pipes]
    for proc in procs:
        proc.join()
    return max(t for t, _ in results), n, results[0][1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m mq.bench``: this benchmark with ``--pack``, else mq.tools.bench's."""
    from mq.tools import bench

    args = bench.parse(argv)
    return run(args) if args.pack is not None else bench.main(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(k) for k in args.pack.split(",")]
    threads = args.threads
    print(
        f"device {args.device}, {threads} threads per process, {args.pack_quant}/{args.pack_net}"
        f", batch {args.batch}, {args.steps} timed steps after {args.warmup} (fixed batches)"
    )
    rows = []
    images = args.batch * args.steps
    single = None
    for k in sizes:
        for mode in MODES if k > 1 else ("alone",):
            if mode == "processes" and args.device == "cpu":
                args.threads = max(1, threads // k)  # the cores shared out, not oversubscribed
            seconds, processes, runs = measure(k, mode, args)
            args.threads = threads
            aggregate = k * images / seconds
            single = aggregate if k == 1 else single
            rows.append(
                {
                    "k": k,
                    "mode": mode,
                    "seconds": seconds,
                    "processes": processes,
                    "runs_per_process": runs,
                    "images_per_s_per_run": aggregate / k,
                    "images_per_s": aggregate,
                    "x_one_run": aggregate / single if single else float("nan"),
                }
            )
            print(_line(rows[-1]), flush=True)
    result = {"args": vars(args), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _line(row: dict[str, Any]) -> str:
    return (
        f"K={row['k']:<3} {row['mode']:<11} {row['images_per_s_per_run']:>9.1f} img/s per run"
        f" {row['images_per_s']:>9.1f} img/s together  x{row['x_one_run']:.2f} one run alone"
    )
