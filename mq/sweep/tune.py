"""Hyperparameter studies with Optuna, driven by mq's own sweeper (``hydra/sweeper=tune``).

Why not hydra-optuna-sweeper: it replaces the sweeper, so trials would lose what mq.sweep.sweeper
gives every job (each point composed and checked before submission, the ledger that skips
completed runs and leaves jobs still in SLURM alone), and its objective is the task function's
return value, which a SLURM job killed and requeued never returns. Here the driver is the one
process that talks to the study (ask/tell); trials are ordinary mq runs in their own folders
(checkpoint, requeue and resume as always), and a trial's value is read from its summary.json.

One study per group (a point of the grid times one of ``groups``, e.g. ``meta=ste
optimizer=sgd``), all in one storage (default: ``sqlite:///SWEEP_DIR/study.db``). Each study gets
``trials`` trials, ``parallel`` in flight at once (across studies, round-robin). A relaunch of
the same command reopens the studies: a trial the last launch left RUNNING is finished from its
folder (told from its summary.json when it completed, waited for while SLURM still runs it,
relaunched from its checkpoint otherwise), never asked again. Then, with ``final_seeds``, the
best configuration of each study and its default configuration are trained with each seed
(tuned vs tuned, defaults vs defaults; ``python -m mq.report`` compares them).
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mq.core.checkpoint import read_json, write_json
from mq.core.errors import ConfigError
from mq.job import ledger
from mq.sweep.sweeper import IN_SLURM, Point, Sweeper, grid
from mq.sweep.tune_space import Dist, check_objective, override_value, rounded, space_for

log = logging.getLogger(__name__)
TUNE_FILE = "tune.json"  # the studies, their trials and the final runs, for mq.results.report
WAIT_S = 5.0  # a trial still in SLURM from an earlier launch: its summary.json is read this often


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def varying(group: list[str], groups: list[list[str]]) -> list[str]:
    """The overrides of ``group`` whose key takes other values in other groups (the name of its
    study: what the command line has in common stays out)."""
    parsed = [dict(o.split("=", 1) for o in g if "=" in o) for g in groups]
    keys = {k for p in parsed for k in p if len({q.get(k) for q in parsed}) > 1}
    return [o for o in group if o.split("=", 1)[0] in keys]


class TuneSweeper(Sweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        groups: list[str] | None = None,
        trials: int = 8,
        parallel: int = 2,
        objective: str = "best_val_acc",
        direction: str | None = None,
        storage: str | None = None,
        sampler_seed: int = 0,
        space: list[Any] | None = None,
        final_seeds: list[int] | None = None,
        final_defaults: bool = True,
        pack: Any = 1,
        fuse: Any = None,
    ) -> None:
        # pack, fuse: the basic sweeper's keys, left in hydra.sweeper when a preset names this
        # class (conf/sweep/fair_compare.yaml); a study's trials are not packed
        super().__init__(max_batch_size=max_batch_size, params=params)
        if pack != 1:
            log.warning("hydra.sweeper.pack=%s: a tuning study's trials are not packed", pack)
        self.groups = [str(g) for g in (groups or [""])]
        self.trials, self.parallel = int(trials), max(int(parallel), 1)
        self.objective, self.direction = objective, direction
        self.storage_url, self.sampler_seed = storage, int(sampler_seed)
        self.space = OmegaConf.to_container(space) if OmegaConf.is_config(space) else space
        self.final_seeds = [int(s) for s in (final_seeds or [])]
        self.final_defaults = bool(final_defaults)
        self.job_idx = 0
        self.trials_ran = 0  # trials this launch ran (not those told from an earlier launch)

    # -- set-up: everything checked before the storage is opened or a job submitted ----------
    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        from mq.sweep.tune_study import shown, storage_url, study_name

        assert self.config is not None and self.hydra_context is not None
        direction = self._checked(lambda: check_objective(self.objective, self.direction))
        params = self._job_params(arguments)
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = grid(parser.parse_overrides(params))  # the grid sweeper's expansion
        groups = [list(job) + g.split() for job in jobs for g in self.groups]
        spaces = [self._group_space(g) for g in groups]
        for group, space in zip(groups, spaces, strict=True):  # every corner is a valid job
            corners = [[f"{k}={override_value(c)}"] for k, d in space.items() for c in d.corners()]
            self._compose_all([group + c for c in corners])
        if self.trials < 1:
            fail(f"hydra.sweeper.trials={self.trials} is not allowed; allowed: an integer >= 1")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        name = str(self.config.get("sweep_name", sweep_dir.name))
        url = storage_url(self.storage_url, sweep_dir)
        preflight = getattr(self.launcher, "preflight", None)
        if preflight is not None:
            self._checked(lambda: preflight(self.parallel))
        storage = self._open(url, sweep_dir)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        studies = []
        for group, space in zip(groups, spaces, strict=True):
            study = optuna.create_study(
                storage=storage,
                study_name=study_name(name, varying(group, groups)),
                direction=direction,
                load_if_exists=True,
            )
            # Reseeded by the trials already there: a relaunch does not redraw the first ones.
            # The study's name enters too, so that studies do not draw the same first values.
            seed = self.sampler_seed + zlib.crc32(study.study_name.encode()) + len(study.trials)
            study.sampler = optuna.samplers.TPESampler(seed=seed % 2**32)
            studies.append((group, space, study))
        ledger.record_launch(sweep_dir, name, {"studies": len(studies), "launcher": "tune"})
        log.info("%d studies of %d trials in %s", len(studies), self.trials, shown(url))
        failed_trials = self._run_studies(studies)
        if failed_trials:  # results of the study (a diverged lr, say), not a failed launch
            log.warning("%d trials failed (recorded as FAIL in their study)", failed_trials)
        finals, returns = self._final_runs(studies) if self.final_seeds else ([], [])
        self._write_tune_json(sweep_dir, shown(url), studies, finals)
        # a failed final run: listed, exit code 1
        self._report(returns, sweep_dir, trials=self.trials_ran)
        return []

    def _open(self, url: str, sweep_dir: Path) -> Any:
        """The study storage, with multirun.yaml written first: a launch killed while the
        storage is made leaves a folder that is recognisably an mq sweep (mq.folders), so its
        relaunch resumes there. A storage that cannot be opened removes what this made."""
        from mq.core.folders import missing_dirs
        from mq.sweep.tune_study import open_storage

        created = missing_dirs(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        try:
            return self._checked(lambda: open_storage(url, sweep_dir, self.storage_url is None))
        except BaseException:
            if created:
                (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
                for folder in created:  # deepest first; only empty folders
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            raise

    @staticmethod
    def _checked(fn: Any) -> Any:
        try:
            return fn()
        except ConfigError as exc:
            fail(str(exc))

    def _group_space(self, group: list[str]) -> dict[str, Dist]:
        cfg = self._compose(group)
        choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if "/" not in k}
        space = self._checked(lambda: space_for(self.space, choices))
        for key in space:
            if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
                fail(f"search space key {key} is not a config key of the study {' '.join(group)}")
        val_size = OmegaConf.select(cfg, "dataset.val_size", default=0) or 0
        if not val_size:
            fail(
                f"hydra.sweeper.objective={self.objective} needs a validation split: set "
                "dataset.val_size=N (the test set is never an objective)"
            )
        return space

    def _compose(self, overrides: list[str]) -> Any:
        from hydra.core.hydra_config import HydraConfig

        assert self.config is not None and self.hydra_context is not None
        master = HydraConfig.instance().cfg
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except Exception as exc:
            from mq.sweep.sweeper import _one_line

            fail(f"sweep point {' '.join(overrides)}: {_one_line(exc)}")
        finally:
            if master is not None:
                HydraConfig.instance().set_config(master)
        return cfg

    # -- the studies ------------------------------------------------------------------------
    def _run_studies(self, studies: list[tuple[list[str], dict[str, Dist], Any]]) -> int:
        from mq.sweep.tune_study import reconcile, tell

        failed = 0
        # Trials an earlier launch left RUNNING: finished from their folders, never asked again.
        pending: list[tuple[Any, Any, Point]] = []
        for group, space, study in studies:

            def rebuild(params: dict[str, Any], group=group, space=space) -> list[str] | None:
                if set(params) != set(space):
                    return None
                values = {k: rounded(d, params[k]) for k, d in space.items()}
                return group + [f"{k}={override_value(v)}" for k, v in values.items()]

            for trial, point in reconcile(study, self._points_of, rebuild):
                pending.append((study, trial, point))
        while True:
            batch = pending[: self.parallel]
            pending = pending[self.parallel :]
            while len(batch) < self.parallel:
                asked = self._ask_next(studies)
                if asked is None:
                    break
                batch.append(asked)
            if not batch:
                return failed
            waiting = [b for b in batch if b[2].status == IN_SLURM]
            to_run = [b for b in batch if b[2].status not in (*ledger.FINAL, IN_SLURM)]
            if to_run:
                self.launcher.launch([b[2].overrides for b in to_run], self.job_idx)
                self.job_idx += len(to_run)
                self.trials_ran += len(to_run)
            for _, _, point in waiting:
                self._wait_for(point)
            for study, trial, point in batch:
                value = tell(study, trial, point.run_dir, self.objective)
                failed += value is None
                log.info(
                    "study %s: trial %d ended: %s",
                    study.study_name,
                    trial.number,
                    f"{self.objective} = {value:.4g}"
                    if value is not None
                    else f"failed ({ledger.job_status(point.run_dir)}), recorded as FAIL",
                )

    def _points_of(self, overrides: list[str]) -> Point:
        (point,) = self._compose_all([overrides])
        self._mark_live([point])
        return point

    def _ask_next(self, studies: list[tuple[list[str], dict[str, Dist], Any]]) -> Any:
        """A new trial of the study with the fewest trials that still has budget left."""
        from mq.sweep.tune_study import used

        open_ = [s for s in studies if used(s[2]) < self.trials]
        if not open_:
            return None
        group, space, study = min(open_, key=lambda s: used(s[2]))
        trial = study.ask()
        values = {k: rounded(d, d.suggest(trial, k)) for k, d in space.items()}
        overrides = group + [f"{k}={override_value(v)}" for k, v in values.items()]
        point = self._points_of(overrides)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("values", values)
        trial.set_user_attr("run_dir", str(point.run_dir))
        log.info("study %s: trial %d: %s", study.study_name, trial.number, overrides[len(group) :])
        return study, trial, point

    @staticmethod
    def _wait_for(point: Point) -> None:
        log.info("waiting for %s (still in SLURM from an earlier launch)", point.run_dir.name)
        while True:
            status = ledger.job_status(point.run_dir)
            live = ledger.live_slurm_jobs() or set()
            if status in (*ledger.FINAL, "failed") or ledger.slurm_job(point.run_dir) not in live:
                return
            time.sleep(WAIT_S)

    # -- the final runs: best and default configuration of each study, each seed -------------
    def _final_runs(
        self, studies: list[tuple[list[str], dict[str, Dist], Any]]
    ) -> tuple[list[dict], list[Any]]:
        from mq.sweep.tune_study import best_values

        jobs, meta = [], []
        for group, _, study in studies:
            best = best_values(study)
            if best is None:
                log.warning("study %s has no completed trial: no final runs", study.study_name)
                continue
            for seed in self.final_seeds:
                tuned = group + [f"{k}={override_value(v)}" for k, v in best.items()]
                kinds = [("tuned", tuned)] + [("default", group)] * self.final_defaults
                for kind, overrides in kinds:
                    jobs.append([*overrides, f"seed={seed}"])
                    meta.append({"study": study.study_name, "kind": kind, "seed": seed})
        points = self._compose_all(jobs)
        self._mark_live(points)
        todo = [p for p in points if p.status not in (*ledger.FINAL, IN_SLURM)]
        log.info("final runs: %d (%d to run)", len(points), len(todo))
        size = self.max_batch_size or len(todo) or 1
        returns: list[Any] = []
        for start in range(0, len(todo), size):
            chunk = [p.overrides for p in todo[start : start + size]]
            returns += list(self.launcher.launch(chunk, self.job_idx))
            self.job_idx += len(chunk)
        for p in points:
            if p.status == IN_SLURM:
                self._wait_for(p)
        finals = [
            {**m, "overrides": p.overrides, "run_dir": str(p.run_dir)}
            for m, p in zip(meta, points, strict=True)
        ]
        return finals, returns

    def _write_tune_json(
        self, sweep_dir: Path, url: str, studies: list, finals: list[dict]
    ) -> None:
        from mq.sweep.tune_study import describe

        data = read_json(sweep_dir / TUNE_FILE) or {}
        data.update(
            {
                "storage": url,
                "objective": self.objective,
                "trials_per_study": self.trials,
                "final_seeds": self.final_seeds,
                "studies": [describe(study, group) for group, _, study in studies],
                "final": finals,
                "updated": time.time(),
            }
        )
        write_json(data, sweep_dir / TUNE_FILE)
