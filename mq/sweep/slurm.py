"""What SLURM says about a sweep's jobs, in one line each: can they run at all (``sbatch
--test-only`` on the very script submitit would submit, and what the partition's nodes offer),
and, while the launcher waits, how many are pending, running, done or failed, and why pending
ones cannot start. Used by mq.sweep.launcher; every query is a plain SLURM command."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# squeue reasons that do not go away by waiting: the request exceeds the partition, names nodes
# or features it lacks, or an account/QOS that may not use it. ("Resources" and "Priority" are
# ordinary waiting.)
NEVER_STARTS = {
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "ReqNodeNotAvail",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "AssocMaxCpuPerJobLimit",
    "AssocMaxNodePerJobLimit",
    "QOSMaxCpuPerJobLimit",
    "QOSMaxGRESPerJob",
    "QOSMaxMemoryPerJob",
}


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def sbatch_message(stderr: str) -> str:
    """sbatch's own reason, one line: its first ``error:`` line (it names the bad value), else
    its ``failure`` line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    failures = [line for line in lines if "failure" in line.lower()]
    return (errors or failures or [*lines[-1:], "sbatch failed without a message"])[0]


@dataclass
class Offer:
    """The most one node of a partition has: CPUs, memory (MB), GPUs."""

    partition: str
    cpus: int
    mem_mb: int
    gpus: int

    def __str__(self) -> str:
        return (
            f"partition {self.partition} offers at most {self.cpus} CPUs, {self.gpus} GPUs, "
            f"{self.mem_mb / 1024:.0f} GB per node"
        )


def partition_offer(partition: str | None) -> Offer | None:
    """``sinfo``'s largest node of ``partition`` (the default one when None)."""
    cmd = ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G", *(["-p", partition] if partition else [])]
    result = _run(cmd)
    if result is None or result.returncode != 0:
        return None
    best: Offer | None = None
    for line in result.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, cpus, mem, gres = fields
        if partition is None and not name.endswith("*"):
            continue  # the default partition is starred
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        try:
            offer = Offer(name.rstrip("*"), int(cpus), int(mem.rstrip("+")), gpus)
        except ValueError:
            continue
        if best is None:
            best = offer
        else:
            best = Offer(
                best.partition,
                max(best.cpus, offer.cpus),
                max(best.mem_mb, offer.mem_mb),
                max(best.gpus, offer.gpus),
            )
    return best


def request(params: dict[str, Any]) -> str:
    """A job's request from submitit's sbatch parameters, as a user would say it."""
    cpus = int(params.get("cpus_per_task") or 1) * int(params.get("ntasks_per_node") or 1)
    gpus = params.get("gpus_per_node") or params.get("gpus_per_task") or 0
    mem = str(params.get("mem") or "the default memory")
    return f"each job asks {cpus} CPUs, {gpus} GPUs, {mem}"


def refusal(params: dict[str, Any], folder: Path, n_jobs: int) -> str | None:
    """Why sbatch would refuse or never start this job array, or None if it would run.

    ``sbatch --test-only`` validates the script submitit builds from these parameters (partition,
    account, QOS, time, and whether any node can ever hold the request) without submitting."""
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(
        command="true", folder=folder, **{**params, "map_count": max(n_jobs, 1)}
    )
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="mq-test-only-") as f:
        f.write(script)
        f.flush()
        result = _run(["sbatch", "--test-only", f.name])
    if result is None or result.returncode == 0:
        return None  # no sbatch here or it accepts: the real submission will tell
    offer = partition_offer(params.get("partition"))
    where = f"; {offer}" if offer else ""
    why = sbatch_message(result.stderr)
    return f"SLURM cannot run these jobs ({why}): {request(params)}{where}"


def queue(array_id: str) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` of the array's tasks still in squeue (one line each)."""
    result = _run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T|%r"])
    if result is None or result.returncode != 0:
        return {}
    out = {}
    for line in result.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            out[fields[0]] = (fields[1], fields[2])
    return out


def stuck(states: dict[str, tuple[str, str]]) -> Counter[str]:
    """Pending jobs per reason that waiting will not cure."""
    return Counter(r for s, r in states.values() if s == "PENDING" and r in NEVER_STARTS)
