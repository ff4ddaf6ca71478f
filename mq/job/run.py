"""One job: config -> objects -> train or evaluate. Called by launch.py inside a Hydra job."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mq.cli.conf import upgrade
from mq.cli.schema import check_config
from mq.core import distributed
from mq.core.allocator import keep_freed_memory
from mq.core.checkpoint import json_text, load_checkpoint, read_json, save_checkpoint, write_json
from mq.core.errors import ConfigError, first_line
from mq.core.folders import disk_full, remove_stale_tmp
from mq.core.keys import VOLATILE, VOLATILE_DATASET, flatten
from mq.data.base import check_num_classes
from mq.data.split import check_split
from mq.job.evaluation import evaluate_only
from mq.job.ledger import FINAL
from mq.job.loggers import choice_config, free_name
from mq.job.preempt import GracefulStop
from mq.job.progress import summarize
from mq.job.resume import completed_progress, rebuild_summary
from mq.job.rundir import (
    FolderRefused,
    check_location,
    check_name,
    remove_created,
    started,
    take_lock,
)
from mq.job.train import Interrupted, Settings, Training
from mq.models import check_model, checkpoint_file, resolve_original
from mq.quant.layers import quantize_model

log = logging.getLogger(__name__)

TASKS = ("quantize", "pretrain", "eval")
DEVICES = ("auto", "cpu", "cuda")
ARTIFACTS = ("checkpoint.pt", "metrics.jsonl", "summary.json")
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
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name} is not known; allowed: {', '.join(TASKS)}")
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
    if cfg.task.name == "eval" and not cfg.model.pretrained:
        raise ConfigError("task=eval needs model.pretrained=PATH (a checkpoint or run directory)")
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


def check(cfg: DictConfig, run_dir: Path | None = None) -> None:
    """Everything about a job that can be checked in milliseconds, before it is submitted:
    plain values, every interpolation, the constructors of the quantizer, optimizer and meta
    net (on a two-layer stand-in model), the model name, that model.pretrained exists, and that
    ``run_dir`` holds no other run. Not the data (it may only exist on the compute nodes)."""
    resolve_original(cfg)  # model.pretrained=original -> the released file, in cfg itself
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # an interpolation that fails, fails here
    check_model(cfg.model.name, cfg.model.pretrained, cfg.model.num_classes)
    quantizer = instantiate(cfg.quant) if cfg.quant.get("_target_") else None
    if cfg.task.name != "eval":
        stand_in = quantize_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), quantizer)
        instantiate(cfg.meta, model=stand_in, optimizer=instantiate(cfg.optimizer))
    if run_dir is not None:
        check_location(run_dir, sweep_dir())
        check_run_dir(cfg, run_dir)


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


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus the keys that do not change results."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for key in VOLATILE:
        data.pop(key, None)
    for key in VOLATILE_DATASET:
        data.get("dataset", {}).pop(key, None)
    # The validation split and the calibration at their defaults are left out: a config that
    # does not name them describes the same run, so it resumes.
    if not data.get("dataset", {}).get("val_size"):
        for key in ("val_size", "split_seed"):
            data.get("dataset", {}).pop(key, None)
    if data.get("quant", {}).get("calibration") == "paper":
        data["quant"].pop("calibration")
    if cfg.task.name == "eval" and cfg.model.pretrained:
        # The folder names the checkpoint's path; its content is part of the result too: a
        # repeat after that file changed is refused rather than answered with the old number.
        data["pretrained_sha256"] = _file_sha256(checkpoint_file(str(cfg.model.pretrained)))
    return data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old} -> {new}"]


def check_run_dir(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The existing summary when ``run_dir`` already holds this run; an error if it holds
    another one (we never overwrite or mix runs)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return None
    old = upgrade(read_run_config(saved))  # runs from before meta.net.*
    diff = _differences(old, result_config(cfg))
    if diff:
        raise ConfigError(
            f"{run_dir} holds a run with another config ({'; '.join(diff[:3])}); "
            "set run_name=NAME for a new run, or delete that directory"
        )
    return read_json(run_dir / "summary.json") or {}


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's config.yaml as a dict; a ConfigError when it is not one (broken YAML,
    not a mapping): that folder's run cannot be compared with this one, so it is not touched."""
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except YAMLError as exc:
        data = f"invalid YAML: {first_line(exc)}"
    except (OmegaConfBaseException, OSError, UnicodeDecodeError) as exc:
        data = first_line(exc)
    if not isinstance(data, dict):
        reason = data if isinstance(data, str) else "not a mapping of config keys"
        raise ConfigError(
            f"{path} cannot be read ({reason}); that folder is left as it is: "
            "set run_name=NAME for a new run, or move that folder away"
        )
    return data


def finished_message(run_dir: Path, summary: dict[str, Any]) -> str:
    status = summary.get("status")
    if status == "diverged":  # deterministic: the same config diverges again
        return (
            f"{run_dir} already ended as diverged after {summary.get('epochs_completed')} "
            "epochs; nothing to do (move that folder away to run it again)"
        )
    acc = summary.get("final_test_acc")
    return f"{run_dir} is already completed (test acc {acc}); nothing to do"


def run(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str],
    logger_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the job described by ``cfg`` in ``run_dir``; returns its summary. ``logger_args``
    (a sweep's wandb group and run name) fill logger keys that the config leaves null."""
    # A single run was checked and locked by mq.job.guard.Guard before Hydra made its folder; a
    # sweep job is checked here, after Hydra made its folder (the sweep checked it before).
    before = started(run_dir)
    lock = None
    main = distributed.ranks_from_env().main
    try:
        check_location(run_dir, sweep_dir())
        if main:  # one process per run folder; the other ranks of a job write nothing
            lock = take_lock(run_dir)
            for name in remove_stale_tmp(run_dir):  # a save killed mid-write left it
                log.info("removed %s, left by an interrupted save", name)
        return _run(cfg, run_dir, choices, logger_args or {})
    except BaseException as exc:
        # Failed before training started: remove what this invocation created, and only that
        # (Guard knows which folders are new; a sweep job's summary.json says it failed).
        started_training = any((run_dir / name).exists() for name in ARTIFACTS)
        created = before is not None and not started_training and main
        if created and not isinstance(exc, FolderRefused):
            remove_created(run_dir, before.created, extra=("config.yaml",))
        raise
    finally:
        distributed.shutdown()
        if lock is not None:
            lock.release()


def _run(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], logger_args: dict[str, Any]
) -> dict[str, Any]:
    check(cfg)  # values and constructors, before the model and the data are built
    ranks = distributed.ranks_from_env()
    device = resolve_device(cfg.device)
    if ranks.launched and cfg.task.name != "eval":
        backend = distributed.choose_backend(backend_name(cfg), cfg.device, ranks)
        timeout = OmegaConf.select(cfg, "distributed.timeout_s", default=600)
        if device.type == "cuda":  # one GPU per rank: cuda:LOCAL_RANK
            device = torch.device("cuda", ranks.local_rank)
        distributed.init(ranks, backend, timeout)
        if not ranks.main:  # rank 0 tells the story once; the others only warn
            logging.getLogger("mq").setLevel(logging.WARNING)
    elif ranks.launched:  # task=eval under torchrun: rank 0 evaluates and writes, alone
        if not ranks.main:
            return {}
        ranks = distributed.SINGLE
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # fixed shapes: time once, then reuse
    keep_freed_memory()  # a CPU step otherwise page-faults its memory back in every step
    previous = check_run_dir(cfg, run_dir)
    if previous and previous.get("status") in FINAL:
        log.info("%s", finished_message(run_dir, previous))
        return previous

    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.model)
    quantizer = instantiate(cfg.quant) if cfg.quant.get("_target_") else None
    if cfg.task.name == "quantize" and quantizer is not None and not cfg.model.pretrained:
        log.warning(
            "model.pretrained is not set: quantizing a randomly initialised %s. The paper starts "
            "from a full-precision model: run task=pretrain first (see README).",
            choices.get("model", cfg.model.name),
        )
    model = quantize_model(net, quantizer).to(device)
    if cfg.get("sync_bn", False) and ranks.launched:  # before the optimizers take the params
        model = distributed.sync_batchnorm(model, device)
    data = instantiate(
        cfg.dataset,
        batch_size=cfg.batch_size,
        device=device,
        seed=cfg.seed,
        progress=cfg.progress and ranks.main,
        **({"rank": ranks.rank, "world_size": ranks.world_size} if ranks.parallel else {}),
    )
    if cfg.task.name == "eval":
        summary = evaluate_only(model, data.test, cfg.limit_test_batches, cfg.progress)
        # config.yaml makes a repeat find this result (reported, never overwritten)
        OmegaConf.save(OmegaConf.create(result_config(cfg)), run_dir / "config.yaml")
        write_json(
            {**summary, "choices": choices, "pretrained": cfg.model.pretrained},
            run_dir / "summary.json",
        )
        return summary

    step = instantiate(cfg.meta, model=model, optimizer=instantiate(cfg.optimizer))
    if ranks.launched:
        step.all_reduce = distributed.average_gradients
    resume = None
    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.exists():
        resume = load_checkpoint(checkpoint_path, device)
        done = completed_progress(resume, checkpoint_path, cfg.epochs)
        if done is not None:  # completed, but summary.json was lost: nothing to train
            if not ranks.main:
                return {}
            return rebuild_summary(cfg, run_dir, done, data, previous or {}, choices)
    if not ranks.main:
        return _train(cfg, run_dir, model, step, data, resume, ranks, None, None)
    if resume is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        set_aside_metrics(run_dir)
        OmegaConf.save(OmegaConf.create(result_config(cfg)), run_dir / "config.yaml")
    # A fresh start is a new wandb run too: the old one holds the steps of the lost attempt.
    run_id = (previous or {}).get("wandb_id") if resume is not None else None
    logger = None
    if cfg.logger.get("_target_"):
        extra = {k: v for k, v in logger_args.items() if cfg.logger.get(k) is None}
        logger = instantiate(
            cfg.logger,
            _recursive_=False,  # run_config holds _target_ keys that are data here
            _convert_="all",
            name=extra.pop("name", cfg.run_name),
            **extra,
            run_dir=run_dir,
            run_config={**OmegaConf.to_container(cfg, resolve=True), **choice_config(choices)},
            run_id=run_id,
        )
        run_id = logger.run_id or run_id
    first_launch = (previous or {}).get("started") or time.time()  # kept across resumes
    head = {"name": cfg.run_name, "choices": choices, "wandb_id": run_id, "started": first_launch}
    if os.environ.get("SLURM_JOB_ID"):  # a relaunch leaves a job SLURM still runs alone
        head["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    write_json({**head, "status": "running", "updated": time.time()}, run_dir / "summary.json")

    return _train(cfg, run_dir, model, step, data, resume, ranks, logger, head)


def _train(
    cfg: DictConfig,
    run_dir: Path,
    model: torch.nn.Module,
    step: Any,
    data: Any,
    resume: dict[str, Any] | None,
    ranks: distributed.Ranks,
    logger: Any,
    head: dict[str, Any] | None,
) -> dict[str, Any]:
    """Train, and keep the ledger (summary.json, rank 0 alone: ``head`` is None elsewhere)
    through every way training can end."""
    summary_path = run_dir / "summary.json"
    settings = Settings.of(cfg)
    loop: Training | None = None

    def mark_failed(error: str, status: str = "failed") -> None:
        if head is None:
            return
        done = (
            summarize(loop.progress, status, error) if loop else {"status": status, "error": error}
        )
        write_summary({**head, **done}, summary_path)

    # SIGTERM / preemption: checkpoint between steps, mark the ledger (see mq.job.preempt).
    with GracefulStop(on_terminate=mark_failed) as stop:
        try:
            loop = Training(
                model,
                step,
                data.train,
                data.test,
                run_dir,
                settings,
                val_data=data.val,
                resume=resume,
                logger=logger,
                interrupt=stop.poll,
                ranks=ranks,
            )
            summary = loop.run()
        except Interrupted as exc:
            signame = stop.received.name if stop.received else "a signal"
            requeue = stop.received is not None and stop.received.name != "SIGTERM"
            error = f"{'preempted' if requeue else 'interrupted'} by {signame}; {exc}"
            mark_failed(error, "preempted" if requeue else "failed")
            log.warning("%s; run again to resume", error)
            if logger is not None:
                logger.finish(exit_code=1, preempting=requeue)
            stop.hand_over()  # under submitit: requeue this job and exit
            raise Interrupted(f"{error}; run the same command again to resume") from None
        except KeyboardInterrupt:  # Ctrl-C: no checkpoint here (the step may be half done)
            mark_failed("interrupted by SIGINT (Ctrl-C); resumes from the last checkpoint")
            log.warning("interrupted; run the same command again to resume")
            if logger is not None:
                logger.finish(exit_code=1)
            raise
        except BaseException as exc:
            text = str(exc).strip()
            error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            if ranks.parallel and distributed.is_collective_error(exc):
                error = f"another rank failed or hung (its log has the cause); {error}"
            mark_failed(error)
            if disk_full(exc) is not None:  # the files are safe; the cause is all there is
                log.error("run failed: %s", error)
            else:
                log.exception("run failed")  # the traceback, in launch.log and the job's stderr
            if logger is not None:
                logger.finish(exit_code=1)
            raise
    if head is None:
        return summary
    summary = {**head, **summary}
    write_json(summary, summary_path)  # the one writer of a training run's summary.json
    # After the summary says completed: a kill in between leaves a large checkpoint, never a
    # "running" run whose checkpoint cannot resume.
    if summary.get("status") == "completed" and not cfg.get("keep_training_state", False):
        drop_training_state(run_dir / "checkpoint.pt", next(model.parameters()).device)
    if logger is not None:
        logger.summary(summary)
        logger.finish()
    return summary


def set_aside_metrics(run_dir: Path) -> None:
    """A start without a checkpoint must not append to the rows of an earlier attempt (killed
    before its first checkpoint, say): move that metrics.jsonl to metrics.jsonl.attempt-N."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    aside = free_name(metrics, "attempt")
    os.replace(metrics, aside)
    log.warning("no checkpoint: starting over; the earlier attempt's rows are in %s", aside.name)


def write_summary(data: dict[str, Any], path: Path) -> None:
    """write_json, and when that fails (a full disk has no room for the temporary file)
    rewrite the small summary in place, so that it never keeps saying "running"."""
    try:
        write_json(data, path)
    except OSError as exc:
        log.warning("could not write %s atomically (%s); writing in place", path, first_line(exc))
        with open(path, "r+" if path.exists() else "w") as f:
            f.write(json_text(data))
            f.truncate()


def drop_training_state(path: Path, device: torch.device) -> None:
    """A completed run's checkpoint keeps the weights (model.pretrained reads them) and its
    progress, not the optimizers, meta net and per-weight LSTM state (LSTMFC: ~220 MB)."""
    if not path.exists():
        return
    state = load_checkpoint(path, device)  # saved back where training kept it
    kept = {k: state[k] for k in ("version", "model", "progress", "metrics_offset") if k in state}
    save_checkpoint({**kept, "training_state": "dropped at completion"}, path)
