"""Data parallelism on real gloo process groups (torch.multiprocessing spawn, torchrun).

The central claim (docs/distributed.md): 2 ranks x 64 with sync_bn=true take the same steps as
1 rank x 128. Each rank feeds its shard of the global batch; the flat g_W^ and the other
gradients are averaged with one all-reduce per step, so the meta nets see identical inputs and
stay identical, and every number (losses, weights, meta net, optimizer states) matches a single
process on the whole batch to float rounding.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, launch_env, meta_net

from mq.core import distributed
from mq.data.loaders import fake_loaders
from mq.meta.step import MetaQuantStep, STEStep
from mq.quant import DorefaWeight
from mq.quant.layers import plain_state_dict, quantize_model

STEPS = 5
GLOBAL_BATCH = 16
OPTIMIZER, LR = torch.optim.Adam, 1e-2
# (meta net, meta.update): every meta net under both updates, and the STE baseline
CASES = [("ste", "paper")] + [
    (net, update) for net in ("multifc", "fcgrad", "lstmfc") for update in ("paper", "original")
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model() -> torch.nn.Module:
    # Conv, BatchNorm (the statistics that sync_bn makes global) and a biased fc, as ResNet has.
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    return quantize_model(net, DorefaWeight(bit_width=1))


def run_case(net: str, update: str, rank: int, world: int) -> dict[str, Any]:
    """STEPS steps of one case on this rank's shard; the global losses and the final state."""
    torch.manual_seed(0)
    model = _tiny_model()
    if world > 1:
        model = distributed.sync_batchnorm(model, torch.device("cpu"))
    optimizer = functools.partial(OPTIMIZER, lr=LR)
    if net == "ste":
        step: Any = STEStep(model, optimizer)
    else:
        step = MetaQuantStep(
            model, optimizer, net=meta_net(net, hidden_size=8), update=update, lr=1e-2
        )
    if world > 1:
        step.all_reduce = distributed.average_gradients
    data = fake_loaders(
        GLOBAL_BATCH, "cpu", num_train=64, num_test=8, image_size=8, rank=rank, world_size=world
    )
    losses = []
    for i, (x, y) in enumerate(data.train.epoch(0)):
        if i == STEPS:
            break
        loss, _ = step.train_step(x.to(torch.get_default_dtype()), y)
        losses.append(distributed.average_(loss.clone()).item())
    meta = getattr(step, "meta_net", None)
    params = list(model.parameters()) + ([] if meta is None else list(meta.parameters()))
    return {
        "losses": losses,
        "model": plain_state_dict(model),
        "step": step.state_dict(),
        "replicas_equal": distributed.replicas_equal(params),
    }


def _worker(rank: int, world: int, port: int, out: str, cases: list[tuple[str, str]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {f"{n}-{u}": run_case(n, u, rank, world) for n, u in cases}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, cases: list[tuple[str, str]]) -> list[dict[str, Any]]:
    out = str(tmp_path / "ranks")
    # fork: the ranks start in milliseconds instead of importing torch again (CPU only here)
    mp.start_processes(
        _worker, args=(2, _free_port(), out, cases), nprocs=2, join=True, start_method="fork"
    )
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def _close(a: Any, b: Any, path: str = "", exact: bool = False) -> list[str]:
    """Paths where nested states differ beyond float32 rounding (``exact``: at all)."""
    if isinstance(a, dict):
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}", exact)]
    if isinstance(a, (list, tuple)):
        pairs = zip(a, b, strict=True)
        return [d for i, (x, y) in enumerate(pairs) for d in _close(x, y, f"{path}[{i}]", exact)]
    if isinstance(a, torch.Tensor):
        if a.is_floating_point() and not exact:
            ok = torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)
        else:
            ok = torch.equal(a, b)
        return [] if ok else [f"{path}: max diff {(a.double() - b.double()).abs().max():.3g}"]
    return [] if a == b else [f"{path}: {a} != {b}"]


def _check(single: dict[str, Any], ranks: list[dict[str, Any]]) -> float:
    """Returns the largest relative loss difference; asserts everything else."""
    worst = 0.0
    for name, one in single.items():
        two = ranks[0][name]
        for a, b in zip(one["losses"], two["losses"], strict=True):
            worst = max(worst, abs(a - b) / abs(a))
        assert worst < 1e-5, (name, one["losses"], two["losses"])
        assert _close(one["model"], two["model"]) == [], name
        assert _close(one["step"], two["step"]) == [], name
        # The ranks hold identical replicas: bit for bit, not only within tolerance.
        assert two["replicas_equal"] and ranks[1][name]["replicas_equal"]
        other = ranks[1][name]
        assert _close(two["model"], other["model"], exact=True) == [], name
        assert (
            _close(two["step"]["meta_net"], other["step"]["meta_net"], exact=True) == []
            if ("meta_net" in two["step"])
            else True
        )
    return worst


def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path):
    """Every meta net under both updates, and STE: 2 ranks x 8 = 1 rank x 16 (real gloo)."""
    ranks = _spawn(tmp_path, CASES)
    single = {f"{n}-{u}": run_case(n, u, 0, 1) for n, u in CASES}
    worst = _check(single, ranks)
    print(f"largest relative loss difference over {len(CASES)} cases x {STEPS} steps: {worst:.2e}")


def _perturbed_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        params = list(_tiny_model().parameters())
        same = distributed.replicas_equal(params)
        with torch.no_grad():
            params[0][0, 0, 0, 0] += 1e-6 * rank  # one weight of one rank moves a little
        Path(f"{out}.{rank}").write_text(f"{same} {distributed.replicas_equal(params)}")
    finally:
        dist.destroy_process_group()


def test_the_replica_check_sees_one_changed_weight(tmp_path):
    out = str(tmp_path / "check")
    mp.start_processes(
        _perturbed_worker, args=(_free_port(), out), nprocs=2, join=True, start_method="fork"
    )
    assert [Path(f"{out}.{r}").read_text() for r in range(2)] == ["True False"] * 2


def test_shards_cover_the_global_batch():
    """The ranks' shards of batch i are the single-process batch i, in order."""
    full = fake_loaders(8, "cpu", num_train=32, num_test=8, image_size=4).train
    parts = [
        fake_loaders(8, "cpu", num_train=32, num_test=8, image_size=4, rank=r, world_size=2).train
        for r in range(2)
    ]
    for (x, y), (x0, y0), (x1, y1) in zip(
        full.epoch(3, start_batch=1), parts[0].epoch(3, 1), parts[1].epoch(3, 1), strict=True
    ):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


# ------------------------------------------------------------------------ launch.py ----
def _rank_env(world: int, **extra: str) -> dict[str, str]:
    env = launch_env()
    env.update(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), **extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["batch_size=30"], "error: batch_size=30 does not divide evenly across 4 ranks"),
        (
            ["distributed.backend=nccl", "device=cpu"],
            "error: distributed.backend=nccl needs CUDA but device=cpu",
        ),
    ],
)
def test_bad_distributed_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    """What torchrun sets for rank 0 of 4; the check comes before any folder or process group."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch.py", "dataset=fake", "logger=none", f"hydra.run.dir={run_dir}"]
        + args,
        cwd=ROOT,
        env=_rank_env(4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"WORLD_SIZE": "4"}, ["batch_size=30"], "batch_size=30 does not divide evenly across 4"),
        ({"WORLD_SIZE": "2"}, ["distributed.backend=nccl", "device=cpu"], "needs CUDA"),
        ({"WORLD_SIZE": "2"}, ["distributed.backend=mpi"], "distributed.backend=mpi is not known"),
        ({}, ["distributed.timeout_s=0"], "distributed.timeout_s=0.0 is not allowed"),
    ],
)
def test_distributed_settings_are_checked(monkeypatch, env, args, message):
    """The checks launch.py runs on every rank before anything is written (in-process)."""
    from conftest import compose_config

    from mq.core.errors import ConfigError
    from mq.job.checks import validate

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", **env}.items():
        monkeypatch.setenv(key, value)
    if not env:
        monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(["dataset=fake", *args]))


def _torchrun(run_dir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={_free_port()}", "launch.py", f"hydra.run.dir={run_dir}"]
    cmd += ["dataset=fake", "dataset.num_train=128", "dataset.num_test=32", "logger=none"]
    cmd += ["progress=false", "epochs=2", "batch_size=16", "log_every=1", "meta=multifc", *args]
    env = launch_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_rank_run_stopped_mid_epoch_resumes_to_the_same_result(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _torchrun(whole).wait(timeout=300) == 0
    proc = _torchrun(cut)
    deadline = time.monotonic() + 240
    while not (cut / "metrics.jsonl").exists() or len(_rows(cut)) < 3:  # mid epoch 1 (8 steps)
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.terminate()  # torchrun passes SIGTERM to both ranks: they agree on a step, checkpoint
    assert proc.wait(timeout=120) != 0
    stopped = json.loads((cut / "summary.json").read_text())
    assert stopped["status"] == "failed" and "interrupted by SIGTERM" in stopped["error"]
    assert (cut / "checkpoint.pt").exists()
    assert _torchrun(cut).wait(timeout=300) == 0
    a, b = _rows(whole), _rows(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in {"loss", "acc", "train_loss", "test_loss", "test_acc"} & set(x):
            assert x[key] == pytest.approx(y[key], rel=1e-6), (x, y)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_acc"] == json.loads((whole / "summary.json").read_text())["test_acc"]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int:
    env = dict(
        v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v
    )
    return int(env["RANK"])


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_within_the_collective_timeout(tmp_path):
    """Rank 1 stopped (SIGSTOP: a hang, not a crash); rank 0's next collective gives up after
    distributed.timeout_s and marks the run failed; torchrun then ends the job."""
    run_dir = tmp_path / "hang"
    proc = _torchrun(run_dir, "distributed.timeout_s=10", "epochs=3")
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").exists() or len(_rows(run_dir)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    ranks = sorted(_children(proc.pid), key=_rank_of)  # torchrun's workers
    assert [_rank_of(p) for p in ranks] == [0, 1]
    os.kill(ranks[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while json.loads((run_dir / "summary.json").read_text())["status"] == "running":
            assert time.monotonic() - t0 < 120, "rank 0 still waits for the stopped rank"
            time.sleep(0.2)
        failed_after = time.monotonic() - t0
    finally:
        os.kill(ranks[1], signal.SIGKILL)  # only the rank this test stopped
    proc.wait(timeout=120)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert summary["error"].startswith("another rank failed or hung"), summary
    assert failed_after < 10 + 30
    print(f"rank 1 stopped -> ledger failed in {failed_after:.1f} s: {summary['error'][:100]}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["hydra.launcher.gpus_per_node=1", "batch_size=32"],
            "error: hydra.launcher.tasks_per_node=2 but gpus_per_node=1; allowed: at most 1",
        ),
        (["batch_size=15"], "batch_size=15 does not divide evenly across 2 ranks"),
    ],
)
def test_a_sweep_of_jobs_that_cannot_run_is_refused_before_submission(tmp_path, args, message):
    """More GPU tasks than GPUs, and a global batch that does not split: one line, exit 2,
    nothing written, nothing submitted (checked before sbatch is called)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "-m", "hydra/launcher=slurm_local"]
        + ["hydra.launcher.tasks_per_node=2", "dataset=fake", "logger=none", "seed=0,1", *args],
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "outputs").exists()
