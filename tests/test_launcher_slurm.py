"""The README's SLURM commands against the real local cluster (scripts/slurm-cluster.sh): a
request no node can hold fails before anything is written, in one line naming the request and
what the partition offers; hydra/launcher=slurm_local runs; the launcher prints per-job
progress while it waits; a pending reason that waiting will not cure is recognised."""

from __future__ import annotations

import subprocess

import pytest
from conftest import SMOKE, launch
from slurm_util import require_slurm_cluster

from mq.sweep import slurm

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster() -> None:
    require_slurm_cluster()


def queued(name: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_readme_request_fails_in_one_line_before_anything_is_written(tmp_path):
    offer = slurm.partition_offer(None)
    assert offer is not None and offer.cpus < 4  # the local cluster: the default asks 4 CPUs
    # The README's first SLURM command, a smaller grid (same request per job).
    result = launch(
        "-m", "hydra/launcher=slurm", "quant=dorefa", "bits=1,2", "sweep_name=big", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: SLURM cannot run these jobs (")
    assert "each job asks 4 CPUs, 1 GPUs, 16GB" in line
    assert f"partition {offer.partition} offers at most {offer.cpus} CPUs" in line
    assert "hydra/launcher=slurm_local" in line
    assert not (tmp_path / "outputs").exists() and queued("mq-big") == ""
    bad = launch(
        "-m", "hydra/launcher=slurm_local", "hydra.launcher.partition=nope", "seed=0", cwd=tmp_path
    )
    assert bad.returncode == 2 and "invalid partition" in bad.stderr.lower()
    assert len(bad.stderr.strip().splitlines()) == 1


def test_slurm_local_runs_and_reports_progress_as_jobs_end(tmp_path):
    args = [*SMOKE, "meta=ste", "bits=1,2,3", "sweep_name=progress"]
    result = launch("-m", "hydra/launcher=slurm_local", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [line.split("] ")[-1] for line in result.stdout.splitlines() if "] jobs: " in line]
    assert (
        progress[0].endswith("of 3")
        and progress[-1] == "jobs: 3 done, 0 failed, 0 running, 0 pending, of 3"
    )
    assert len(set(progress)) >= 2  # counts printed as they change, not only at the end
    assert len(list((tmp_path / "outputs/sweeps/progress").glob("*bits=*/summary.json"))) == 3


def test_a_pending_job_that_can_never_start_is_recognised(tmp_path):
    script = tmp_path / "big.sh"
    script.write_text("#!/bin/bash\n#SBATCH --cpus-per-task=64\n#SBATCH --array=0-1\ntrue\n")
    out = subprocess.run(
        ["sbatch", "--parsable", "-J", "mq-stuck", str(script)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr  # accepted: SLURM lets it pend instead of refusing
    array = out.stdout.strip().split(";")[0]
    try:
        states = {}
        for _ in range(40):
            states = slurm.queue(array)
            if slurm.stuck(states):
                break
            subprocess.run(["sleep", "0.5"], check=True)
        assert set(states) == {f"{array}_0", f"{array}_1"}
        assert slurm.stuck(states) == {"PartitionConfig": 2}
    finally:
        subprocess.run(["scancel", array], check=False)
