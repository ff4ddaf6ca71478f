"""hydra-submitit-launcher's SLURM and local launchers, with two changes:

- a job that ends without a result (scancel, out of memory, node failure) is a failed job of the
  sweep, not an exception that stops the submitting process from collecting the other results;
- what each job runs is a :class:`SubmititJob` from this module, not the launcher itself: Hydra
  only accepts launchers from the ``hydra_plugins`` package (ours is hydra_plugins/mq_plugins,
  next to launch.py), which a compute node may not be able to import, while ``mq`` is installed.

Checking and skipping happen before, in mq.sweeper; checkpoint-and-requeue is the plugin's own
``checkpoint()`` (it resubmits the same call; the job resumes from its run directory).
"""

from __future__ import annotations

import logging
import os
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

log = logging.getLogger(__name__)


class SubmititJob(BaseSubmititLauncher):
    """One job: the plugin's ``__call__`` (compose the job's config, run the task) and
    ``checkpoint()`` (requeue the same call), pickled by submitit by reference to this module."""


class TolerantLauncher(BaseSubmititLauncher):
    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        # The plugin's launch(), except for the last lines (results collected one by one).
        import submitit

        assert self.config is not None
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
        jobs = executor.map_array(runner, *zip(*args, strict=True))
        log.info("submitted job array %s; waiting for its jobs", jobs[0].job_id.split("_")[0])
        return [_result(j, overrides) for j, overrides in zip(jobs, job_overrides, strict=True)]


def _result(job: Any, overrides: Sequence[str]) -> JobReturn:
    try:
        return job.results()[0]
    except Exception as exc:  # no result pickle: cancelled, killed, node failure, ...
        state = job.state
        log.error("job %s (%s) ended without a result: %s", job.job_id, state, exc)
        error = RuntimeError(f"job {job.job_id} ended {state} without a result")
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)
