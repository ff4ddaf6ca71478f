"""Data-parallel sweep jobs on the real local SLURM cluster (scripts/slurm-cluster.sh): each
sweep point is one job of 2 tasks (gloo on the CPU; the cluster's GPUs are fake), ranks from
submitit's JobEnvironment. One run folder and one wandb run per job; preemption requeues the
2-rank job and it resumes to the uninterrupted result; a rank that dies fails the job fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurm_util import SLURM, require_slurm_cluster, wait_for
from test_sweeps_slurm import finish, job_log, slurm_job_id, start, steps, summary, the_run_dir

DDP = [
    *(o for o in SLURM if not o.startswith("hydra.launcher.mem_gb=")),
    "hydra.launcher.mem_gb=2",  # two ranks per job
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.tasks_per_node=2",
]
TINY = [
    "dataset=fake",
    "progress=false",
    "meta=ste",
    "batch_size=32",
    "limit_test_batches=2",
]


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster() -> None:
    require_slurm_cluster()


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]


@pytest.mark.slurm
def test_two_jobs_of_two_ranks_one_folder_and_one_wandb_run_each(tmp_path):
    args = [*DDP, *TINY, "logger=wandb", "logger.mode=offline", "epochs=1"]
    args += ["limit_train_batches=3", "seed=0,1", "sweep_name=ddp"]
    out = finish(start(["-m", *args], tmp_path), 400)
    assert "2 jobs ran, 0 failed" in out, out[-3000:]
    sweep = tmp_path / "outputs/sweeps/ddp"
    runs = sorted(d for d in sweep.glob("*=*") if d.is_dir())
    assert len(runs) == 2
    for run_dir in runs:
        assert summary(run_dir)["status"] == "completed"
        assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # rank 0's only
        assert not list(run_dir.glob("*.tmp"))
    log = job_log(sweep)
    assert log.count("rank 1 of 2 joined (gloo)") == 2 and log.count("rank 0 of 2 joined") == 2


@pytest.mark.slurm
def test_preempted_two_rank_job_is_requeued_and_resumes_to_the_same_result(tmp_path):
    config = [*DDP, *TINY, "logger=none", "epochs=2", "log_every=1", "limit_train_batches=12"]
    config += ["seed=3"]
    ref = finish(start(["-m", *config, "sweep_name=ref"], tmp_path), 400)
    assert "1 jobs ran, 0 failed" in ref, ref[-3000:]
    proc = start(["-m", *config, "sweep_name=preempt"], tmp_path)
    sweep = tmp_path / "outputs/sweeps/preempt"
    wait_for(lambda: the_run_dir(sweep) or proc.poll() is not None, 200, "the job to start")
    run_dir = the_run_dir(sweep)
    assert run_dir is not None
    wait_for(lambda: steps(run_dir) >= 4 or proc.poll() is not None, 200, "the job to train")
    assert proc.poll() is None, proc.stdout.read()
    job_id = slurm_job_id("mq-preempt")
    for sig in ("SIGTERM", "USR2"):  # what submitit's job._interrupt() does
        subprocess.run(["scancel", job_id, "--signal", sig], check=True)
    out = finish(proc, 400)
    assert proc.returncode == 0, out[-3000:]
    log = job_log(sweep)
    assert log.count("rank 1 of 2 joined") == 2, log[-3000:]  # the requeued job: 2 ranks again
    assert "preempted by SIGUSR2" in log and "resumed at epoch" in log
    want = the_run_dir(tmp_path / "outputs/sweeps/ref")
    assert want is not None and summary(run_dir)["status"] == "completed"
    assert summary(run_dir)["test_acc"] == summary(want)["test_acc"]
    got, ref_rows = _rows(run_dir), _rows(want)
    assert [r["step"] for r in got] == [r["step"] for r in ref_rows]  # nothing lost or twice
    for a, b in zip(got, ref_rows, strict=True):
        for key in {"loss", "test_loss"} & set(b):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)


def _rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of global rank ``rank`` of the job's step 0 (scontrol listpids, on this node)."""
    out = subprocess.run(
        ["scontrol", "listpids", job_id], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines()[1:]:
        pid, _, step, _, global_rank = (line.split() + ["-"] * 5)[:5]
        if step == "0" and global_rank == str(rank):
            return int(pid)
    return None


@pytest.mark.slurm
def test_a_rank_that_dies_fails_the_job_within_a_bounded_time(tmp_path):
    config = [*DDP, *TINY, "logger=none", "epochs=2", "log_every=1", "limit_train_batches=15"]
    config += ["seed=3", "distributed.timeout_s=30", "sweep_name=dies"]
    proc = start(["-m", *config], tmp_path)
    sweep = tmp_path / "outputs/sweeps/dies"
    wait_for(lambda: the_run_dir(sweep) or proc.poll() is not None, 200, "the job to start")
    run_dir = the_run_dir(sweep)
    assert run_dir is not None
    wait_for(lambda: steps(run_dir) >= 3 or proc.poll() is not None, 200, "the job to train")
    pid = _rank_pid(slurm_job_id("mq-dies"), 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # rank 1 dies mid-step (out of memory, a node failure)
    t0 = time.monotonic()
    wait_for(lambda: summary(run_dir).get("status") != "running", 60, "the ledger to say failed")
    failed_after = time.monotonic() - t0
    out = finish(proc, 120)
    assert proc.returncode == 1 and "1 of 1 jobs failed" in out, out[-3000:]
    got = summary(run_dir)
    assert got["status"] == "failed" and got["error"].startswith("another rank failed"), got
    print(f"rank 1 killed -> ledger failed in {failed_after:.1f} s: {got['error'][:80]}")
