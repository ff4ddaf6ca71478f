"""A grid sweeper (``key=a,b``, ``choice()``, ``range()``, ``glob()`` and ``hydra.sweeper.params``,
as Hydra's basic sweeper) on Hydra's public ``Sweeper`` interface, plus three things a long sweep
needs, for every launcher (basic, submitit local, SLURM):

1. every point is composed and checked (mq.job.checks.check) before anything runs; one bad point
   ends the launch with one line naming its overrides, exit code 2, nothing submitted;
2. points whose run directory says completed or diverged are skipped (not submitted at all),
   so launching the same command again reruns only the failed and unfinished jobs;
3. sweep.json records the launch and fixes the sweep's wandb group.

After the jobs, a failed one is listed with its error and the exit code is 1; the other jobs
of the sweep have run regardless. A job another launch of the same sweep was running at the
time (its folder locked) is waited for and counted by its own result, so two concurrent
launches that complete every job both exit 0.
"""

from __future__ import annotations

import copy
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper as HydraSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mq.cli.conf import options
from mq.core.errors import ConfigError
from mq.job import ledger
from mq.sweep.packing import check_fuse, check_pack, pack_jobs, pack_member

log = logging.getLogger(__name__)
IN_SLURM = "in SLURM"  # running or pending (requeued) under an earlier launch: not again
LEGACY_NAME = "adhoc"  # mq's earlier default sweep_name: sweeps launched with it are there


@dataclass
class Point:
    """One job of the sweep, composed."""

    overrides: list[str]
    run_dir: Path
    status: str  # ledger status before this launch
    member: Any = None  # mq.job.packjob.Member: what a pack job needs of it (pack > 1)
    pack_key: Any = None  # points with equal keys can share a pack; None: packed alone


def _one_line(exc: BaseException) -> str:
    from mq.core.errors import find_config_error, first_line, hydra_error_line

    error = find_config_error(exc)  # ours, or a constructor's refusal: its own words
    return first_line(error) if error is not None else hydra_error_line(exc) or first_line(exc)


def grid(overrides: list[Override]) -> list[list[str]]:
    """Every job of the cartesian product of ``overrides`` (later keys vary fastest, a key given
    twice keeps its last value), in the order Hydra's basic sweeper launches them. A
    non-discrete sweep (``interval()``) has no grid: a one-line error."""
    values: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
            if not values[key]:  # glob(x*) matching nothing: no jobs at all, not "done"
                allowed = ", ".join(options(key)) or "a pattern that matches"
                raise HydraException(f"{override.input_line} selects nothing; allowed: {allowed}")
        else:
            raise HydraException(
                f"{override.input_line} is a continuous sweep; allowed in a grid: a,b, "
                "choice(), range(), glob()"
            )
    return [list(job) for job in itertools.product(*values.values())]


class Sweeper(HydraSweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict | None = None,
        pack: Any = 1,
        fuse: Any = None,
    ) -> None:
        super().__init__()
        self.pack, self.fuse = pack, fuse
        self.auto_name: str | None = None
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.auto_name = self._name_sweep(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    @staticmethod
    def _name_sweep(config: DictConfig) -> str | None:
        """Without a sweep_name, name the sweep from its overrides (mq.sweep.sweepname) before
        anything resolves the sweep folder (the launcher's submitit folder and job name do,
        when it is instantiated); None when the command or a preset named it."""
        from mq.cli.conf import exclude_keys
        from mq.sweep.sweepname import sweep_name

        if config.get("sweep_name") is not None:
            return None
        name = sweep_name(config.hydra.overrides.task, config.hydra.overrides.hydra, exclude_keys())
        with read_write(config), open_dict(config):
            # The same command launched into LEGACY_NAME finds its jobs there (multirun.yaml
            # records the last command launched into that folder).
            config.sweep_name = LEGACY_NAME
            legacy = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
            task = list(config.hydra.overrides.task)
            if (
                legacy.is_file()
                and OmegaConf.select(OmegaConf.load(legacy), "hydra.overrides.task") == task
            ):
                name = LEGACY_NAME
            config.sweep_name = name
        return name

    def _job_params(self, arguments: list[str]) -> list[str]:
        """The grid's overrides: the sweeper's params, the command line, and the sweep's
        name when it was chosen here (each job composes its folder from it)."""
        params = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        return params + ([f"sweep_name='{self.auto_name}'"] if self.auto_name else [])

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        try:
            self.pack, self.fuse = check_pack(self.pack), check_fuse(self.fuse)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        params = self._job_params(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = grid(parser.parse_overrides(params))

        points = self._compose_all(jobs)
        self._mark_live(points)
        todo = [p for p in points if p.status not in (*ledger.FINAL, IN_SLURM)]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        name = str(self.config.get("sweep_name", sweep_dir.name))
        skipped = len(points) - len(todo)
        statuses = ledger.count([p.status for p in points])
        log.info(
            "sweep %s: %d jobs (%s); launching %d, skipping %d (done or still in SLURM)",
            name,
            len(points),
            statuses,
            len(todo),
            skipped,
        )
        launcher = OmegaConf.select(self.config, "hydra.launcher._target_", default="?")
        preflight = getattr(self.launcher, "preflight", None)  # SLURM: can the jobs ever run?
        try:
            if preflight is not None:
                preflight(len(todo))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        record = ledger.record_launch(
            sweep_dir,
            name,
            {"jobs": len(points), "launched": len(todo), "before": statuses, "launcher": launcher},
        )
        log.info("wandb group: %s", record["group"])
        if not todo:
            return []

        jobs = [p.overrides for p in todo]
        if self.pack > 1:
            jobs = pack_jobs(todo, self.pack, sweep_dir, self.fuse)
        size = self.max_batch_size or len(jobs)
        returns: list[list[JobReturn]] = []
        for start in range(0, len(jobs), size):
            chunk = jobs[start : start + size]
            try:
                returns.append(list(self.launcher.launch(chunk, initial_job_idx=start)))
            except ConfigError as exc:  # sbatch refused: its message, one line
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)
        self._report([r for batch in returns for r in batch], sweep_dir)
        return returns

    def _compose_all(self, jobs: list[list[str]]) -> list[Point]:
        """Compose and check every job; exit 2 with one line at the first bad one."""
        from mq.job.checks import check  # torch is imported only when a sweep is launched
        from mq.job.rundir import check_output_subdir

        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        master = HydraConfig.instance().cfg
        points = []
        try:
            for overrides in jobs:
                try:
                    cfg = loader.load_sweep_config(self.config, list(overrides))
                    # ${hydra:...} (run_name, the subdir) resolves against the job's own config.
                    HydraConfig.instance().set_config(cfg)
                    run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                    check_output_subdir(cfg.hydra.output_subdir)
                    task_cfg = copy.deepcopy(cfg)
                    with read_write(task_cfg), open_dict(task_cfg):
                        del task_cfg["hydra"]
                    check(task_cfg, run_dir)
                except Exception as exc:
                    print(
                        f"error: sweep point {' '.join(overrides)}: {_one_line(exc)}",
                        file=sys.stderr,
                    )
                    sys.exit(2)
                twin = next((p for p in points if p.run_dir == run_dir), None)
                if twin is not None:  # e.g. logger=none,wandb: folder names leave logger out
                    print(
                        f"error: sweep points {' '.join(twin.overrides)} and {' '.join(overrides)}"
                        f" would share the folder {run_dir}",
                        file=sys.stderr,
                    )
                    sys.exit(2)
                point = Point(list(overrides), run_dir, ledger.job_status(run_dir))
                if self.pack > 1:
                    point.member, point.pack_key = pack_member(cfg, task_cfg, run_dir)
                points.append(point)
        finally:
            if isinstance(master, DictConfig):
                HydraConfig.instance().set_config(master)
        return points

    @staticmethod
    def _mark_live(points: list[Point]) -> None:
        """A running or preempted job whose SLURM job is still queued or running belongs to
        an earlier launch: launching it again would run it twice into one folder."""
        # "stopped" too: a filesystem whose locks are local to a node (Lustre's localflock)
        # shows a job on another node as stopped
        unfinished = [p for p in points if p.status in ("running", "stopped", "preempted")]
        ids = {id(p): ledger.slurm_job(p.run_dir) for p in unfinished}
        if not any(ids.values()):
            return
        live = ledger.live_slurm_jobs()
        if live is None:
            log.warning("squeue not available: unfinished jobs are launched again")
            return
        for p in unfinished:
            if ids[id(p)] in live:
                p.status = IN_SLURM

    @staticmethod
    def _report(results: list[JobReturn], sweep_dir: Path, trials: int = 0) -> None:
        """One line per failed job; exit 1 if any failed (a diverged run is a result, not a
        failure). Jobs that raised, were cancelled or died all count, except a job whose
        folder another process held: it is waited for, and its own final status counts.
        ``trials``: tuning trials this launch ran besides ``results`` (their failures are
        results of the study)."""
        from mq.job.runlock import wait_for_holder

        failed, elsewhere = [], 0
        for r in results:
            if r.status == JobStatus.COMPLETED:
                continue
            out = OmegaConf.select(r.hydra_cfg, "hydra.runtime.output_dir") if r.hydra_cfg else None
            run_dir = Path(str(out)) if out else None
            if run_dir is not None:
                wait_for_holder(run_dir)
                # A job that fails here never leaves a final status: another process ran it.
                if ledger.job_status(run_dir) in ledger.FINAL:
                    elsewhere += 1
                    continue
            failed.append(r)
        ran = f"{len(results) - elsewhere + trials} jobs ran"
        if trials:
            ran += f" ({trials} trials, {len(results) - elsewhere} final runs)"
        if elsewhere:
            ran += f", {elsewhere} more completed by another launch of this sweep"
        log.info("sweep done: %s, %d failed; results in %s", ran, len(failed), sweep_dir)
        if not failed:
            return
        for r in failed:
            print(
                f"failed: {' '.join(r.overrides or [])}: {_one_line(r._return_value)}",
                file=sys.stderr,
            )
        print(
            f"error: {len(failed)} of {len(results)} jobs failed; launch the same command again "
            "to rerun them (completed jobs are skipped)",
            file=sys.stderr,
        )
        sys.exit(1)
