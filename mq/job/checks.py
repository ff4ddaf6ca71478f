"""The checks of a job that take milliseconds and need no data: plain values, every
interpolation, the constructors (on a stand-in model), the model and its files, the ranks, and
the run folder. They run before anything is written: in mq.job.guard.Guard for a single run, in
mq.sweep.sweeper for every point of a sweep, and in a sweep job itself (mq.job.run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mq.cli.schema import check_config
from mq.core import distributed
from mq.core.errors import ConfigError
from mq.core.keys import flatten
from mq.data.base import check_num_classes
from mq.data.split import check_split
from mq.job.identity import check_run_dir
from mq.job.rundir import check_location, check_name
from mq.models import check_model, resolve_original

if TYPE_CHECKING:
    from mq.job.tasks import Task

DEVICES = ("auto", "cpu", "cuda")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# numpy's seed range; torch takes 64 bits, but the fake data offsets each seed's images by
# seed * 1_000_003, which must stay within them too.
MAX_SEED = 2**32 - 1


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ConfigError(f"device={name} is not known; allowed: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; allowed here: auto, cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def validate(cfg: DictConfig) -> None:
    """Checks of plain values; group options and constructor arguments check themselves."""
    check_config(cfg)  # the schemas' keys, every interpolation resolved
    check_name("run_name", cfg.get("run_name"))
    if cfg.get("sweep_name") is not None:  # null: a sweep names itself (mq.sweep.sweepname)
        check_name("sweep_name", cfg.get("sweep_name"))
    for key in ("epochs", "batch_size", "lr_step", "log_every"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value} is not allowed; allowed: an integer >= 1")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device={cfg.device} is not known; allowed: {', '.join(DEVICES)}")
    if not isinstance(cfg.cudnn_benchmark, bool):
        raise ConfigError(
            f"cudnn_benchmark={cfg.cudnn_benchmark} is not allowed; allowed: true, false"
        )
    if not cfg.quant.get("_target_") and cfg.bits not in range(1, 9):
        # quant=none has no constructor to refuse bits (a quantizer's own takes its range)
        raise ConfigError(f"bits={cfg.bits} is not allowed; allowed: an integer in 1..8")
    act = cfg.get("act")
    if "act_bits" in cfg and not (act and act.get("_target_")) and cfg.act_bits not in range(1, 9):
        # act=none quantizes nothing, so nothing else refuses an act_bits no quantizer takes
        raise ConfigError(f"act_bits={cfg.act_bits} is not allowed; allowed: an integer in 1..8")
    for key in ("optimizer.lr", "meta.lr"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"{key}={value} is not allowed; allowed: a number >= 0")
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=False)).items():
        # nan/inf end diverged; beyond float32's range a step fails with "overflow"
        if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
            raise ConfigError(f"{key}={value} is not allowed; allowed: a finite number")
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed={seed} is not allowed; allowed: an integer in 0..{MAX_SEED}")
    every = cfg.checkpoint_every_min
    if not isinstance(every, (int, float)) or isinstance(every, bool) or every <= 0:
        raise ConfigError(f"checkpoint_every_min={every} is not allowed; allowed: a number > 0")
    for key in ("limit_train_batches", "limit_test_batches"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value} is not allowed; allowed: null or an integer >= 1")
    check_num_classes(OmegaConf.select(cfg, "dataset.num_classes"))
    check_split(cfg.dataset, cfg.batch_size)
    validate_ranks(cfg, planned_ranks())


def validate_ranks(cfg: DictConfig, ranks: distributed.Ranks) -> None:
    """Data parallelism (mq.core.distributed): the settings, and that this job's ranks fit them."""
    if not isinstance(cfg.get("sync_bn", False), bool):
        raise ConfigError(f"sync_bn={cfg.sync_bn} is not allowed; allowed: true, false")
    timeout = OmegaConf.select(cfg, "distributed.timeout_s", default=600)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"distributed.timeout_s={timeout} is not allowed; allowed: a number > 0")
    if ranks.launched or ranks.parallel:
        distributed.check_batch(cfg.batch_size, ranks)
        distributed.choose_backend(backend_name(cfg), cfg.device, ranks)


def planned_ranks() -> distributed.Ranks:
    """This job's ranks: from torchrun's or submitit's environment inside the job; before a
    sweep is submitted, the launcher's shape (nodes x tasks_per_node ranks per job)."""
    ranks = distributed.ranks_from_env()
    from hydra.core.hydra_config import HydraConfig

    if ranks.launched or not HydraConfig.initialized():
        return ranks
    launcher = HydraConfig.get().get("launcher") or {}
    per_node = int(launcher.get("tasks_per_node") or 1)
    world = int(launcher.get("nodes") or 1) * per_node
    return distributed.Ranks(world_size=world, local_world_size=per_node) if world > 1 else ranks


def backend_name(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "distributed.backend", default="auto"))


def check(cfg: DictConfig, run_dir: Path | None = None) -> Task:
    """Everything about a job that can be checked in milliseconds, before it is submitted:
    plain values, every interpolation, the model name, that model.pretrained exists, the task
    and the constructors it uses, and that ``run_dir`` holds no other run. Not the data (it may
    only exist on the compute nodes). Returns the task."""
    resolve_original(cfg)  # model.pretrained=original -> the released file, in cfg itself
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # an interpolation that fails, fails here
    check_model(cfg.model)
    task: Task = instantiate(cfg.task)
    task.check(cfg)
    if run_dir is not None:
        check_location(run_dir, sweep_dir())
        check_run_dir(cfg, run_dir)
    return task


def sweep_dir() -> Path | None:
    """The sweep's folder when Hydra runs (or composes) a multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hydra_cfg.sweep.dir))
