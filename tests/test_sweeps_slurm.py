"""Sweeps through the real local SLURM cluster (scripts/slurm-cluster.sh): launch.py -m with
hydra/launcher=slurm, the report, scancel -> failed -> rerun, preemption -> checkpoint ->
requeue -> resume with the uninterrupted result. Skipped when the cluster is down
(MQ_REQUIRE_SLURM=1: failed). Each test has its own sweep (and so submitit) folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, launch
from slurm_util import SLURM, require_slurm_cluster, wait_for

TINY = [*SMOKE, "meta=ste"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny jobs, often side by side on few cores: one torch thread each (oversubscribed
    intra-op threads make a 1 s job take 30 s on a busy 2-core machine)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny(**changes: object) -> list[str]:
    """TINY with some keys changed or added (one override per key)."""
    base = dict(a.split("=", 1) for a in TINY)
    base.update({k.replace("__", "."): str(v) for k, v in changes.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster() -> None:
    require_slurm_cluster()


def summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """launch.py in the background: it blocks until its SLURM jobs end."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env={**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"launch.py still running after {timeout:.0f} s:\n{out[-3000:]}")
    return out


def slurm_job_id(name: str) -> str:
    """The job id of the running job named ``name`` (the launcher names jobs mq-SWEEP)."""
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(out) == 1, out
    return out[0]


def steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"kind": "step"' in line for line in path.read_text().splitlines())


def the_run_dir(sweep: Path) -> Path | None:
    dirs = [d for d in sweep.glob("*=*") if d.is_dir()] if sweep.is_dir() else []
    return dirs[0] if len(dirs) == 1 else None


def job_log(sweep: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.*")))


@pytest.mark.slurm
def test_multirun_through_slurm_then_the_report(tmp_path):
    t0 = time.monotonic()
    args = ["-m", *SLURM, *TINY, "sweep_name=grid", "quant=dorefa,bwn", "seed=0,1"]
    result = launch(*args, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    sweep = tmp_path / "outputs/sweeps/grid"
    runs = [d for d in sweep.iterdir() if (d / "summary.json").exists()]
    assert len(runs) == 4 and all(summary(d)["status"] == "completed" for d in runs)
    # Folders are the overrides, never a SLURM job id.
    assert sorted(d.name.split(",quant=")[1] for d in runs) == [
        "bwn,seed=0",
        "bwn,seed=1",
        "dorefa,seed=0",
        "dorefa,seed=1",
    ]
    assert (sweep / ".submitit").is_dir()
    report = subprocess.run(
        [sys.executable, "-m", "mq.report", str(sweep), "--no-plots"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("| resnet20")]
    assert len(rows) == 2 and all("n=2" in row for row in rows), report.stdout
    again = launch(*args, cwd=tmp_path, timeout=120)  # everything done: nothing submitted
    assert again.returncode == 0 and "launching 0, skipping 4" in again.stdout
    print(f"4-job sweep + report + relaunch: {time.monotonic() - t0:.1f} s")


@pytest.mark.slurm
def test_scancelled_job_is_failed_and_the_relaunch_reruns_it(tmp_path):
    t0 = time.monotonic()
    config = tiny(log_every=1, epochs=20, limit_train_batches=20, seed=7)  # > KillWait (5 s)
    args = ["-m", *SLURM, *config, "sweep_name=cancel"]
    sweep = tmp_path / "outputs/sweeps/cancel"
    proc = start(args, tmp_path)
    wait_for(lambda: the_run_dir(sweep) or proc.poll() is not None, 120, "the job to start")
    run_dir = the_run_dir(sweep)
    assert proc.poll() is None and run_dir is not None, proc.stdout.read()
    wait_for(lambda: steps(run_dir) >= 2 or proc.poll() is not None, 120, "the job to train")
    assert proc.poll() is None, proc.stdout.read()
    meanwhile = launch(*args, cwd=tmp_path, timeout=120)  # a relaunch while it runs ...
    assert meanwhile.returncode == 0, (meanwhile.stdout + meanwhile.stderr)[-3000:]
    assert "1 jobs (1 in SLURM); launching 0" in meanwhile.stdout  # ... leaves it alone
    subprocess.run(["scancel", slurm_job_id("mq-cancel")], check=True)
    out = finish(proc, 120)
    assert proc.returncode == 1, out[-3000:]
    assert "1 of 1 jobs failed" in out
    s = summary(run_dir)
    assert s["status"] == "failed" and "SIGTERM" in s["error"], s
    assert (run_dir / "checkpoint.pt").exists()

    again = launch(*args, cwd=tmp_path, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "1 jobs (1 failed); launching 1, skipping 0" in again.stdout
    assert summary(run_dir)["status"] == "completed"
    assert "resumed at epoch" in job_log(sweep)
    print(f"scancel + rerun: {time.monotonic() - t0:.1f} s")


@pytest.mark.slurm
def test_preempted_job_is_requeued_resumes_and_matches_an_uninterrupted_run(tmp_path):
    t0 = time.monotonic()
    config = tiny(
        log_every=1,
        epochs=2,
        limit_train_batches=12,
        seed=3,
        logger="wandb",
        logger__mode="offline",
    )
    reference = start([*config, "run_name=reference"], tmp_path)  # plain, in parallel
    proc = start(["-m", *SLURM, *config, "sweep_name=preempt"], tmp_path)
    sweep = tmp_path / "outputs/sweeps/preempt"
    wait_for(lambda: the_run_dir(sweep) or proc.poll() is not None, 120, "the job to start")
    run_dir = the_run_dir(sweep)
    assert proc.poll() is None and run_dir is not None, proc.stdout.read()
    wait_for(lambda: steps(run_dir) >= 4 or proc.poll() is not None, 120, "the job to train")
    assert proc.poll() is None, proc.stdout.read()
    job_id = slurm_job_id("mq-preempt")
    # What submitit's job._interrupt() does: SIGTERM, then the preemption signal.
    for sig in ("SIGTERM", "USR2"):
        subprocess.run(["scancel", job_id, "--signal", sig], check=True)
    wait_for(
        lambda: summary(run_dir).get("status") in ("preempted", "running", "completed"),
        60,
        "the preempted job's summary",
    )
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-3000:]
    log = job_log(sweep)
    assert log.count("Starting with JobEnvironment") == 2, log[-3000:]
    assert "preempted by SIGUSR2" in log and "resumed at epoch" in log
    finish(reference, 120)
    ref_dir = tmp_path / "outputs/quantize/fake/reference"
    got, want = summary(run_dir), summary(ref_dir)
    assert got["status"] == "completed"
    assert got["test_acc"] == pytest.approx(want["test_acc"], rel=1e-5)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    ref = [json.loads(x) for x in (ref_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]  # nothing lost, nothing twice
    for a, b in zip(rows, ref, strict=True):
        for key in ("loss", "test_acc"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
    # The same wandb run continues: two offline segments with one id.
    segments = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(segments) == 2 and len({p.name.rsplit("-", 1)[1] for p in segments}) == 1
    assert got["wandb_id"] == segments[0].name.rsplit("-", 1)[1]
    print(f"preempt -> requeue -> resume: {time.monotonic() - t0:.1f} s")


@pytest.mark.slurm
def test_a_packed_sweep_is_one_slurm_job_per_pack(tmp_path):
    t0 = time.monotonic()
    args = ["-m", *SLURM, *TINY, "sweep_name=packed", "quant=dorefa,bwn", "seed=0,1"]
    args.append("hydra.sweeper.pack=2")
    result = launch(*args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "4 runs in 2 packs (2, 2)" in result.stdout + result.stderr
    sweep = tmp_path / "outputs/sweeps/packed"
    runs = [d for d in sweep.iterdir() if (d / "summary.json").exists()]
    assert len(runs) == 4 and all(summary(d)["status"] == "completed" for d in runs)
    assert all((d / "config.yaml").exists() and steps(d) == 3 for d in runs)
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # one SLURM job per pack
    assert job_log(sweep).count("training 2 runs as one pack") == 2
    again = launch(*args, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "launching 0, skipping 4" in again.stdout
    print(f"4 runs in 2 packs through SLURM + relaunch: {time.monotonic() - t0:.1f} s")
