"""The SLURM launcher without a cluster: a refused sbatch is one line with sbatch's message;
the progress line; a request's wording."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.utils import JobReturn, JobStatus
from submitit.core.utils import FailedJobError

from hydra_plugins.mq_plugins import SlurmLauncher
from mq.core.errors import ConfigError
from mq.sweep import slurm
from mq.sweep.launcher import _progress

SBATCH_STDERR = (
    "sbatch: error: Batch job submission failed: Invalid account or account/partition "
    "combination specified"
)


class RefusingExecutor:
    def map_array(self, *args):
        print(SBATCH_STDERR, file=sys.stderr)  # what submitit does before raising
        raise FailedJobError(SBATCH_STDERR) from subprocess.CalledProcessError(1, ["sbatch"])


def test_a_refused_sbatch_is_one_line_with_its_own_message(capsys):
    with pytest.raises(ConfigError) as info:
        SlurmLauncher()._submit(RefusingExecutor(), None, [(1, 2)])
    assert str(info.value) == f"sbatch refused the jobs: {SBATCH_STDERR}"
    assert capsys.readouterr().err == ""  # not printed twice


def test_sbatch_message_keeps_the_reason_line():
    stderr = "sbatch: error: invalid partition specified: nope\nallocation failure: Invalid\n"
    assert slurm.sbatch_message(stderr) == "sbatch: error: invalid partition specified: nope"
    stderr = "allocation failure: Requested node configuration is not available\n"
    assert slurm.sbatch_message(stderr) == stderr.strip()
    assert slurm.sbatch_message("") == "sbatch failed without a message"


class Job:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


def test_progress_counts_done_failed_running_pending():
    jobs = [Job(f"7_{i}") for i in range(5)]
    results = {
        0: JobReturn(status=JobStatus.COMPLETED),
        1: JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("x")),
    }
    states = {
        "7_2": ("RUNNING", "None"),
        "7_3": ("PENDING", "Resources"),
        "7_4": ("PENDING", "Priority"),
    }
    assert _progress(jobs, results, states) == "jobs: 1 done, 1 failed, 1 running, 2 pending, of 5"
    assert _progress(jobs, results, {}) == "jobs: 1 done, 1 failed, 3 running, 0 pending, of 5"
    stuck = {"7_3": ("PENDING", "PartitionConfig"), "7_4": ("PENDING", "Resources")}
    assert slurm.stuck(stuck) == {"PartitionConfig": 1}


def test_request_reads_submitits_parameters():
    params = {"cpus_per_task": 4, "gpus_per_node": 1, "mem": "16GB"}
    assert slurm.request(params) == "each job asks 4 CPUs, 1 GPUs, 16GB"
