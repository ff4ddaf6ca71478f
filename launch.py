"""Entry point: `python launch.py [group=option ...] [key=value ...]` (Hydra).

python launch.py model=resnet20 quant=dorefa bits=1
python launch.py task=pretrain model=resnet20 dataset=cifar10
python launch.py task=eval model.pretrained=PATH quant=dorefa bits=1
python launch.py -m +sweep=table1 hydra/launcher=slurm      # a preset sweep (docs/sweeps.md)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mq.cli.resolvers import register_resolvers
from mq.core.errors import ConfigError, find_config_error, first_line, hydra_error_line
from mq.core.folders import disk_full, disk_full_message


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from mq.job.run import run  # torch is imported only once the config is known to compose
    from mq.job.train import Interrupted

    hydra_cfg = HydraConfig.get()
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    choices.update(bits=str(cfg.bits), seed=str(cfg.seed))
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    logger_args = {}
    if sweep:  # one wandb group per sweep, stable across relaunches; runs named by overrides
        from mq.job.ledger import wandb_group

        group = wandb_group(Path(hydra_cfg.sweep.dir), fallback=str(cfg.get("sweep_name")))
        # The job's folder name (path values shortened, mq/cli/dirname.py), not Hydra's raw one.
        logger_args = {"group": group, "name": str(hydra_cfg.sweep.subdir) or cfg.run_name}
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if cfg.get("pack_file"):  # runs a sweep packed together (hydra.sweeper.pack)
            from mq.job.packjob import run_pack

            return {"runs": run_pack(Path(cfg.pack_file))}
        return run(cfg, run_dir, choices, logger_args)
    except Interrupted as exc:  # SIGTERM outside SLURM: checkpointed, marked failed; stop here
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except Exception as exc:
        error = find_config_error(exc)
        if sweep:  # the ledger says failed; raising (not exiting) lets the other jobs run
            from mq.job.ledger import record_failure
            from mq.job.rundir import FolderRefused

            if isinstance(error, FolderRefused):  # not its folder (or another job's): no write
                raise

            extra = {"name": cfg.run_name, "choices": choices}
            record_failure(run_dir, first_line(error or exc), extra)
            raise
        full = disk_full(exc)
        if full is not None:
            error = ConfigError(disk_full_message(full, run_dir))
        if error is None:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {error}", file=sys.stderr)
        else:  # every rank meets it; rank 0 says so and removes what its start created
            from mq.job.runlock import wait_for_lock

            wait_for_lock(run_dir, held=False)
        sys.exit(2)


if __name__ == "__main__":
    # Hydra reports its own composition errors in several lines and exits 1; with
    # HYDRA_FULL_ERROR they reach us and become one line (unless the user asked for them).
    register_resolvers()  # conf/'s ${mq.subdir:}, ${mq.help:}, ... before Hydra composes it
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: summary.json says failed and keeps the epochs done
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as exc:
        line = None if full_error else hydra_error_line(exc)
        full = disk_full(exc)
        if full is not None:  # Hydra could not write its files into the run folder
            from mq.job.runlock import undo_starts

            undone = undo_starts()
            line = disk_full_message(full, undone[0] if undone else Path(full.filename or "."))
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
