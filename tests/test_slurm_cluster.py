"""Plain-submitit tests against the real local SLURM cluster (scripts/slurm-cluster.sh).

Skipped when the cluster is not up; MQ_REQUIRE_SLURM=1 turns that into a failure (CI).
Every test uses its own submitit folder (job ids restart after a cluster state wipe).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from slurm_util import (
    PARTITION,
    job_logs,
    require_slurm_cluster,
    result_within,
    wait_done,
    wait_for,
)
from submitit.core.utils import UncompletedJobError

# The jobs unpickle the functions below in a fresh interpreter that cannot import this
# test module (tests/ is not a package on the job's sys.path): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster() -> None:
    require_slurm_cluster()


def _executor(folder: Path, **extra) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = dict(slurm_partition=PARTITION, timeout_min=5, cpus_per_task=1, mem_gb=1)
    executor.update_parameters(**{**params, **extra})
    return executor


# ---------------------------------------------------------------- job functions ----
def add(a: int, b: int) -> int:
    return a + b


def square(x: int) -> tuple[int, str | None]:
    return x * x, os.environ.get("SLURM_ARRAY_TASK_ID")


def gpu_env() -> dict[str, str]:
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def sleep_then_return(seconds: float, started_file: str) -> str:
    Path(started_file).write_text("started")
    time.sleep(seconds)
    return "not cancelled"


class SlowCounter(submitit.helpers.Checkpointable):
    """Counts to n_steps, persisting progress; the default checkpoint() requeues it
    with the same arguments, so a restarted job resumes from the progress file."""

    def __call__(self, workdir: str, n_steps: int, step_s: float) -> int:
        work = Path(workdir)
        progress = work / "progress"
        step = int(progress.read_text()) if progress.exists() else 0
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        with open(work / "starts", "a") as f:
            f.write(f"{step} {restarts} {time.time():.1f}\n")
        while step < n_steps:
            time.sleep(step_s)
            step += 1
            tmp = work / "progress.tmp"
            tmp.write_text(str(step))
            os.replace(tmp, progress)  # atomic: never read half-written
        return step


# ------------------------------------------------------------------------- tests ----
@pytest.mark.slurm
def test_submit_function_and_job_array(tmp_path: Path) -> None:
    executor = _executor(tmp_path / "submitit")
    job = executor.submit(add, 2, 3)
    wait_done(job, 60)
    assert result_within(job, 10) == 5, job_logs(job)

    jobs = executor.map_array(square, [1, 2, 3])
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array job
    for j in jobs:
        wait_done(j, 60)
    results = [result_within(j, 10) for j in jobs]
    assert [r[0] for r in results] == [1, 4, 9]
    assert sorted(r[1] for r in results) == ["0", "1", "2"]

    with executor.batch():
        batch = [executor.submit(add, i, i) for i in range(3)]
    for j in batch:
        wait_done(j, 60)
    assert [result_within(j, 10) for j in batch] == [0, 2, 4]


@pytest.mark.slurm
def test_fake_gpu_job_is_scheduled(tmp_path: Path) -> None:
    executor = _executor(tmp_path / "submitit", slurm_gpus_per_node=1)
    job = executor.submit(gpu_env)
    wait_done(job, 60)
    env = result_within(job, 10)
    # With the fake gres (gpu:2 on /dev/mq-fakegpu*), slurm sets both variables to
    # the index of the allocated device, like on a real GPU node.
    assert env.get("CUDA_VISIBLE_DEVICES") in {"0", "1"}, env
    assert env.get("SLURM_JOB_GPUS") in {"0", "1"}, env
    assert env.get("SLURM_GPUS_ON_NODE") == "1", env


@pytest.mark.slurm
def test_scancel_makes_result_raise(tmp_path: Path) -> None:
    executor = _executor(tmp_path / "submitit")
    started = tmp_path / "started"
    job = executor.submit(sleep_then_return, 300, str(started))
    wait_for(started.exists, 60, f"job {job.job_id} to start")

    job.cancel()  # scancel <id>
    wait_done(job, 30)
    state = job.get_info(mode="force").get("State", "")
    assert state.startswith("CANCELLED"), state
    # submitit waits up to _results_timeout_s (15 s) for a result file that a cancelled
    # job never writes (slow NFS); nothing to wait for on a local filesystem.
    job._results_timeout_s = 1
    with pytest.raises(UncompletedJobError, match="has not produced any output"):
        result_within(job, 30)


@pytest.mark.slurm
def test_preempted_checkpointable_job_is_requeued_and_resumes(tmp_path: Path) -> None:
    t0 = time.monotonic()
    work = tmp_path / "work"
    work.mkdir()
    # timeout_min >= 50: submitit then treats USR2 as preemption, not as a time-out
    executor = _executor(tmp_path / "submitit", timeout_min=60)
    n_steps, step_s = 30, 0.2  # >= 5 s of work left after the interrupt
    job = executor.submit(SlowCounter(), str(work), n_steps, step_s)

    progress = work / "progress"

    def step() -> int:
        return int(progress.read_text()) if progress.exists() else 0

    wait_for(lambda: step() >= 5, 40, f"job {job.job_id} to make progress")
    step_at_interrupt = step()
    t_interrupt = time.time()
    job._interrupt()  # submitit's preemption: scancel --signal SIGTERM, then USR2

    wait_done(job, max(10.0, 60 - (time.monotonic() - t0)))
    try:
        assert result_within(job, 10) == n_steps, job_logs(job)
    except submitit.core.utils.FailedJobError as e:
        pytest.fail(f"{e}\n{job_logs(job)}")

    starts = [line.split() for line in (work / "starts").read_text().splitlines()]
    assert len(starts) == 2, f"expected one requeue, got starts={starts}\n{job_logs(job)}"
    (first_step, first_restarts, _), (resumed_step, resumed_restarts, _) = starts
    assert (first_step, first_restarts) == ("0", "0")
    assert resumed_restarts == "1"
    assert int(resumed_step) >= step_at_interrupt > 0  # resumed, did not start over
    assert job.stdout().count("Starting with JobEnvironment") == 2, job_logs(job)
    # the result file appears before slurm has recorded the end of the job
    wait_for(
        lambda: job.get_info(mode="force").get("State") == "COMPLETED",
        10,
        f"sacct to report job {job.job_id} COMPLETED",
    )
    print(f"requeued job restarted {float(starts[1][2]) - t_interrupt:.1f} s after the interrupt")
