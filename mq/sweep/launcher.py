"""hydra-submitit-launcher's SLURM and local launchers, with two changes:

- a job that ends without a result (scancel, out of memory, node failure) is a failed job of the
  sweep, not an exception that stops the submitting process from collecting the other results;
- what each job runs is a :class:`SubmititJob` from this module, not the launcher itself: Hydra
  only accepts launchers from the ``hydra_plugins`` package (ours is hydra_plugins/mq_plugins,
  next to launch.py), which a compute node may not be able to import, while ``mq`` is installed.

Checking and skipping happen before, in mq.sweep.sweeper; checkpoint-and-requeue is the plugin's own
``checkpoint()`` (it resubmits the same call; the job resumes from its run directory).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    BaseSubmititLauncher,
)
from omegaconf import OmegaConf

from mq.core.errors import ConfigError
from mq.sweep import slurm

log = logging.getLogger(__name__)


class SubmititJob(BaseSubmititLauncher):
    """One job: the plugin's ``__call__`` (compose the job's config, run the task) and
    ``checkpoint()`` (requeue the same call), pickled by submitit by reference to this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        from mq.cli.resolvers import register_resolvers

        register_resolvers()  # a fresh process on the node: conf/'s resolvers, before Hydra's
        return super().__call__(*args, **kwargs)


class TolerantLauncher(BaseSubmititLauncher):
    POLL_S = 1.0  # result files are checked this often (a stat per job)
    SQUEUE_S = 15.0  # squeue (pending/running counts, reasons) at most this often

    def _executor(self) -> Any:
        """The plugin's executor set-up (hydra_submitit_launcher's launch(), first lines)."""
        import submitit

        init_keys = {"submitit_folder", "max_num_timeout"}
        init = {
            f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k == "max_num_timeout"
        }
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"], **init
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                k if k in base else f"{self._EXECUTOR}_{k}": v
                for k, v in self.params.items()
                if k not in init_keys
            }
        )
        return executor

    def preflight(self, n_jobs: int) -> None:
        """Raise ConfigError when SLURM would refuse the jobs or never start them (called by
        mq.sweep.sweeper before anything is written or submitted)."""
        tasks, gpus = self.params.get("tasks_per_node") or 1, self.params.get("gpus_per_node")
        if gpus and tasks > gpus:  # NCCL: one GPU per rank (mq.core.distributed)
            raise ConfigError(
                f"hydra.launcher.tasks_per_node={tasks} but gpus_per_node={gpus}; allowed: "
                f"at most {gpus} tasks per node (one GPU per rank), or gpus_per_node=0 for gloo "
                "on the CPU"
            )
        if self._EXECUTOR != "slurm" or n_jobs == 0:
            return
        executor = self._executor()
        reason = slurm.refusal(dict(executor.parameters), executor.folder, n_jobs)
        if reason:
            raise ConfigError(f"{reason}; {FIX}")

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        # The plugin's launch(), except for submission errors (one line) and the wait
        # (progress as jobs end; a job without a result is a failed job).
        assert self.config is not None
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("submitit '%s': %d jobs into %s", self._EXECUTOR, len(job_overrides), sweep_dir)
        args = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            args.append(
                (
                    list(overrides),
                    "hydra.sweep.dir",
                    idx,
                    f"job_id_for_{idx}",
                    Singleton.get_state(),
                )
            )
        runner = SubmititJob()
        assert self.hydra_context is not None and self.task_function is not None
        runner.setup(
            hydra_context=self.hydra_context, task_function=self.task_function, config=self.config
        )
        jobs = self._submit(executor, runner, args)
        array = jobs[0].job_id.split("_")[0]
        log.info("submitted job array %s; waiting for its jobs", array)
        return self._wait(jobs, job_overrides, array, dict(executor.parameters))

    def _submit(self, executor: Any, runner: SubmititJob, args: list[tuple]) -> list[Any]:
        from submitit.core.utils import FailedJobError

        quiet = io.StringIO()  # submitit prints sbatch's stderr before raising: say it once
        try:
            with contextlib.redirect_stderr(quiet):
                return executor.map_array(runner, *zip(*args, strict=True))
        except FailedJobError as exc:
            message = slurm.sbatch_message(str(exc) or quiet.getvalue())
            raise ConfigError(f"sbatch refused the jobs: {message}") from None

    def _wait(
        self,
        jobs: list[Any],
        job_overrides: Sequence[Sequence[str]],
        array: str,
        params: dict[str, Any],
    ) -> list[JobReturn]:
        """Collect each job's result as it ends; log the counts whenever they change and, once,
        a pending reason that waiting will not cure."""
        results: dict[int, JobReturn] = {}
        states: dict[str, tuple[str, str]] = {}
        last_squeue, last_line, warned, seen = 0.0, "", set(), -1
        while True:
            for i, job in enumerate(jobs):
                if i not in results and job.done():
                    results[i] = _result(job, job_overrides[i])
            if len(results) == len(jobs):
                break
            now = time.monotonic()
            fresh = len(results) != seen  # a job ended: the others' states moved too
            if self._EXECUTOR == "slurm" and (fresh or now - last_squeue >= self.SQUEUE_S):
                states, last_squeue, seen = slurm.queue(array), now, len(results)
                for reason, n in slurm.stuck(states).items():
                    if reason not in warned:
                        warned.add(reason)
                        log.warning(
                            "%d jobs cannot start (SLURM: %s): %s; %s; scancel %s to stop them",
                            n,
                            reason,
                            slurm.request(params),
                            slurm.partition_offer(params.get("partition")) or "?",
                            array,
                        )
            line = _progress(jobs, results, states)
            if line != last_line:
                log.info(line)
                last_line = line
            time.sleep(self.POLL_S)
        log.info(_progress(jobs, results, {}))
        return [results[i] for i in range(len(jobs))]


FIX = (
    "lower hydra.launcher.cpus_per_task / gpus_per_node / mem_gb or pick another "
    "hydra.launcher.partition (scripts/slurm-cluster.sh: hydra/launcher=slurm_local)"
)


def _progress(jobs: list[Any], results: dict[int, JobReturn], states: dict) -> str:
    failed = sum(r.status != JobStatus.COMPLETED for r in results.values())
    waiting = [j.job_id for i, j in enumerate(jobs) if i not in results]
    running = sum(states.get(j, ("",))[0] in ("RUNNING", "COMPLETING") for j in waiting)
    pending = sum(states.get(j, ("",))[0] == "PENDING" for j in waiting)
    if not states:  # local executor, or squeue not asked yet: whatever is not done runs
        running, pending = len(waiting), 0
    return (
        f"jobs: {len(results) - failed} done, {failed} failed, {running} running, "
        f"{pending} pending, of {len(jobs)}"
    )


def _result(job: Any, overrides: Sequence[str]) -> JobReturn:
    try:
        return job.results()[0]
    except Exception as exc:  # no result pickle: cancelled, killed, node failure, ...
        state = job.state
        log.error("job %s (%s) ended without a result: %s", job.job_id, state, exc)
        error = RuntimeError(f"job {job.job_id} ended {state} without a result")
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)
