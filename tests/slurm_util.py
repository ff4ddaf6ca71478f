"""Helpers for tests that need the local SLURM cluster from scripts/slurm-cluster.sh.

Usage in a test module::

    from slurm_util import require_slurm_cluster

    @pytest.fixture(scope="module", autouse=True)
    def _slurm_cluster():
        require_slurm_cluster()

If the cluster is not up, the tests are skipped -- or fail when MQ_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

PARTITION = os.environ.get("MQ_SLURM_PARTITION", "debug")
# The launcher overrides every SLURM test starts from: small jobs on the local test cluster.
SLURM = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]
START_HINT = "start it with scripts/slurm-cluster.sh start"
_READY_NODE_STATES = {"idle", "mixed", "allocated"}


def _run(cmd: list[str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _controller_unreachable() -> str | None:
    """Fast pre-check (sinfo retries for ~10 s when slurmctld is down)."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError as e:
        return f"cannot read {conf} ({e.strerror})"
    host = re.search(
        r"^\s*(?:SlurmctldHost|ControlMachine)\s*=\s*([^\s#(]+)(?:\(([^)]+)\))?", text, re.M | re.I
    )
    port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
    if host is None:
        return None  # unusual config: let sinfo decide
    addr = host.group(2) or host.group(1)
    try:
        socket.create_connection((addr, int(port.group(1)) if port else 6817), timeout=2).close()
    except OSError as e:
        return f"slurmctld at {addr} not reachable ({e})"
    return None


def slurm_cluster_problem() -> str | None:
    """Why the local SLURM cluster is not usable, or None if it is."""
    for tool in ("sinfo", "sbatch", "sacct", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install with scripts/slurm-cluster.sh install)"
    problem = _controller_unreachable()
    if problem:
        return problem
    try:
        sinfo = _run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"])
        if sinfo.returncode != 0:
            return f"sinfo failed: {sinfo.stderr.strip() or sinfo.stdout.strip()}"
        states = [line.split()[-1] for line in sinfo.stdout.splitlines() if line.strip()]
        if not any(s in _READY_NODE_STATES for s in states):  # "idle*" = not responding
            return f"no idle node in partition {PARTITION!r} (sinfo: {sinfo.stdout.strip()!r})"
        sacct = _run(["sacct", "-n", "-X", "-S", "now-1hour", "-o", "JobID"])
        if sacct.returncode != 0:
            return f"sacct (accounting) not working: {sacct.stderr.strip()}"
    except subprocess.TimeoutExpired as e:
        return f"`{' '.join(e.cmd)}` timed out"
    return None


def require_slurm_cluster() -> None:
    """Skip (or fail, with MQ_REQUIRE_SLURM=1) unless the local cluster is up."""
    problem = slurm_cluster_problem()
    if problem is None:
        return
    msg = f"local SLURM cluster not available: {problem}; {START_HINT}"
    if os.environ.get("MQ_REQUIRE_SLURM") == "1":
        pytest.fail(msg + " (MQ_REQUIRE_SLURM=1)", pytrace=False)
    pytest.skip(msg)


def job_logs(job: Any) -> str:
    """stdout/stderr of a submitit job, for failure messages."""
    out = []
    for name, getter in (("stdout", job.stdout), ("stderr", job.stderr)):
        try:
            text = getter()
        except Exception as e:  # noqa: BLE001 -- diagnostics only
            text = f"<unreadable: {e}>"
        out.append(f"----- {name} of job {job.job_id}:\n{text}")
    return "\n".join(out)


def wait_done(job: Any, timeout: float, poll: float = 0.5) -> None:
    """Wait until a submitit job is done (result file or final sacct state), bounded.

    On timeout the job is cancelled and the test fails with the job's logs.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.done(force_check=True):
            return
        time.sleep(poll)
    job.cancel(check=False)
    pytest.fail(
        f"job {job.job_id} not done after {timeout:.0f} s (state {job.state})\n" + job_logs(job)
    )


def result_within(job: Any, timeout: float) -> Any:
    """job.result(), failing (not hanging) if it takes longer than ``timeout`` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = job.result()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)  # daemon: never blocks exit
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        job.cancel(check=False)
        pytest.fail(
            f"job.result() of job {job.job_id} still blocked after {timeout:.0f} s\n"
            + job_logs(job)
        )
    if "error" in box:
        raise box["error"]
    return box["result"]


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
