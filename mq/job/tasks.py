"""What a job does with the objects its config builds. conf/task/*.yaml names a task's class
by ``_target_`` (like every other group), so a new task is its class and its YAML file; the job
(mq.job.run) builds the model and the data, then calls the task with them."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mq.core import distributed
from mq.core.checkpoint import load_checkpoint, write_json
from mq.core.errors import ConfigError
from mq.job.evaluation import evaluate_only
from mq.job.identity import result_config
from mq.job.preempt import GracefulStop
from mq.job.record import RunRecord
from mq.job.resume import check_resumable, completed_progress, rebuild_summary
from mq.job.rundir import check_name
from mq.job.train import Settings, Training
from mq.models import checkpoint_file
from mq.quant.layers import load_act_state, quantize_model

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A job's config and what mq.job.run built from it, handed to its task."""

    cfg: DictConfig
    run_dir: Path
    choices: dict[str, str]  # group -> option, as Hydra chose them (and bits, seed)
    logger_args: dict[str, Any]  # a sweep's wandb group and run name
    ranks: distributed.Ranks
    model: torch.nn.Module  # on its device; quantized when cfg.quant names a quantizer
    data: Any  # mq.data's Data: train, test and val BatchSources
    previous: dict[str, Any]  # the folder's summary.json from an earlier attempt, or {}


def build_quantizer(cfg: DictConfig) -> Any:
    """The weight quantizer cfg.quant names, or None (quant=none: full precision)."""
    return instantiate(cfg.quant) if cfg.quant.get("_target_") else None


def build_act_quantizer(cfg: DictConfig) -> Any:
    """The activation quantizer cfg.act names, or None (act=none, and configs from before the
    act group: activations full precision)."""
    act = cfg.get("act")
    return instantiate(act) if act is not None and act.get("_target_") else None


def build_quantized(cfg: DictConfig, net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with cfg's weight and activation quantizers (mq.quant.layers.quantize_model)."""
    return quantize_model(net, build_quantizer(cfg), build_act_quantizer(cfg))


def pretrained_act_state(cfg: DictConfig) -> dict[str, torch.Tensor] | None:
    """The activation quantizers' state (PACT's alpha, LSQ's s) saved with model.pretrained, when
    that is a checkpoint of an mq run with act; None otherwise (a full-precision model, an
    original checkpoint, a run with act=none). Read only when cfg quantizes activations."""
    path = cfg.model.pretrained
    if not path or build_act_quantizer(cfg) is None:
        return None
    state = load_checkpoint(checkpoint_file(str(path)), "cpu")
    act = state.get("act") if isinstance(state, dict) else None
    return act if isinstance(act, dict) else None


def load_pretrained_act(cfg: DictConfig, model: torch.nn.Module, strict: bool) -> None:
    """Give ``model``'s activation quantizers the state saved with model.pretrained, if any.
    ``strict`` (task=eval): a state of another act choice is an error; else (a run that
    starts from another run's weights) it is left out, logged, and they start fresh."""
    state = pretrained_act_state(cfg)
    if state is None:
        return
    try:
        load_act_state(model, state, f"model.pretrained={cfg.model.pretrained}")
    except ConfigError as exc:
        if strict:
            raise
        log.info("%s: the activation quantizers start fresh", exc)


class Task:
    """A task's interface. ``name`` names its outputs/ folder (conf/config.yaml)."""

    trains_in_parallel = True  # under torchrun every rank runs it (else rank 0 alone)

    def __init__(self, name: str) -> None:
        check_name("task.name", name)
        self.name = name

    def check(self, cfg: DictConfig) -> None:
        """The checks of this task's own needs, in milliseconds, with no data (mq.job.checks)."""

    def check_folder(self, cfg: DictConfig, run_dir: Path) -> None:
        """Checks of an existing run folder before Hydra writes into it (mq.job.guard)."""

    def identity(self, cfg: DictConfig) -> dict[str, Any]:
        """What decides this task's result besides the config (saved in config.yaml)."""
        return {}

    def __call__(self, job: Job) -> dict[str, Any]:
        raise NotImplementedError


class Train(Task):
    """Train cfg.model with the meta step cfg.meta builds around cfg.optimizer: quantization-aware
    training (task=quantize) or full-precision training (task=pretrain, quant=none).
    ``from_pretrained``: the run is meant to start from model.pretrained; warn when it does not."""

    def __init__(self, name: str, from_pretrained: bool = False) -> None:
        super().__init__(name)
        self.from_pretrained = from_pretrained

    def check(self, cfg: DictConfig) -> None:
        stand_in = build_quantized(cfg, torch.nn.Sequential(torch.nn.Linear(2, 2)))
        instantiate(cfg.meta, model=stand_in, optimizer=instantiate(cfg.optimizer))

    def check_folder(self, cfg: DictConfig, run_dir: Path) -> None:
        check_resumable(run_dir, cfg.epochs)  # a refused relaunch writes nothing

    def __call__(self, job: Job) -> dict[str, Any]:
        begun = self.begin(job)
        if isinstance(begun, dict):
            return begun
        record, loop = begun
        # SIGTERM / preemption: checkpoint between steps, mark the summary (mq.job.preempt).
        with GracefulStop(on_terminate=record.mark) as stop:
            try:
                record.loop = loop(stop.poll)
                summary = record.loop.run()
            except BaseException as exc:
                instead = record.failed(exc, stop, job.ranks)
                if instead is not None:
                    raise instead from None
                raise
        return self.end(job, record, summary)

    def begin(self, job: Job) -> dict[str, Any] | tuple[RunRecord, Callable[..., Training]]:
        """Everything up to the loop: the step, the checkpoint to resume, summary.json
        "running" and the logger. Returns the summary of a run with nothing left to train, or
        its record and the loop to build with a signal poll (mq.job.packjob runs many)."""
        cfg, run_dir, ranks = job.cfg, job.run_dir, job.ranks
        if self.from_pretrained and cfg.quant.get("_target_") and not cfg.model.pretrained:
            log.warning(
                "model.pretrained is not set: quantizing a randomly initialised %s. The paper "
                "starts from a full-precision model: run task=pretrain first (see README).",
                job.choices.get("model", cfg.model.name),
            )
        load_pretrained_act(cfg, job.model, strict=False)  # a run with act: its alpha or s go on
        step = instantiate(cfg.meta, model=job.model, optimizer=instantiate(cfg.optimizer))
        if ranks.launched:
            step.all_reduce = distributed.average_gradients
        device = next(job.model.parameters()).device
        resume = None
        checkpoint_path = run_dir / "checkpoint.pt"
        if checkpoint_path.exists():
            resume = load_checkpoint(checkpoint_path, device)
            done = completed_progress(resume, checkpoint_path, cfg.epochs)
            if done is not None:  # completed, but summary.json was lost: nothing to train
                if not ranks.main:
                    return {}
                return rebuild_summary(cfg, run_dir, done, job.data, job.previous, job.choices)
        if ranks.main:
            args = (cfg, run_dir, job.choices, job.logger_args, job.previous, resume)
            record = RunRecord.start(*args)
        else:  # the other ranks of a data-parallel job write nothing
            record = RunRecord(run_dir, head=None)

        def loop(interrupt: Callable[[], str | None]) -> Training:
            return Training(
                *(job.model, step, job.data.train, job.data.test, run_dir, Settings.of(cfg)),
                val_data=job.data.val,
                resume=resume,
                logger=record.logger,
                interrupt=interrupt,
                ranks=ranks,
            )

        return record, loop

    def end(self, job: Job, record: RunRecord, summary: dict[str, Any]) -> dict[str, Any]:
        """The summary of a run whose loop ended (completed or diverged), written."""
        device = next(job.model.parameters()).device
        return record.completed(summary, job.cfg.get("keep_training_state", False), device)


class Evaluate(Task):
    """Test accuracy of model.pretrained with cfg.quant's quantizer (task=eval); under torchrun
    rank 0 evaluates and writes alone."""

    trains_in_parallel = False

    def check(self, cfg: DictConfig) -> None:
        if not cfg.model.pretrained:
            raise ConfigError(
                "task=eval needs model.pretrained=PATH (a checkpoint or run directory)"
            )
        build_quantized(cfg, torch.nn.Sequential(torch.nn.Linear(2, 2)))
        act = build_act_quantizer(cfg)
        learned = act is not None and bool(act.state_dict())  # sign learns nothing
        if learned and pretrained_act_state(cfg) is None:
            # a fresh alpha or s would be tested, not the trained one
            raise ConfigError(
                f"task=eval act={act.name} needs model.pretrained from a run trained with "
                f"act={act.name}: {cfg.model.pretrained} holds no activation quantizer state"
            )

    def identity(self, cfg: DictConfig) -> dict[str, Any]:
        # The folder names the checkpoint's path; its content is part of the result too: a
        # repeat after that file changed is refused rather than answered with the old number.
        if not cfg.model.pretrained:
            return {}
        return {"pretrained_sha256": _file_sha256(checkpoint_file(str(cfg.model.pretrained)))}

    def __call__(self, job: Job) -> dict[str, Any]:
        cfg = job.cfg
        load_pretrained_act(cfg, job.model, strict=True)  # the run's trained alpha or s
        summary = evaluate_only(job.model, job.data.test, cfg.limit_test_batches, cfg.progress)
        # config.yaml makes a repeat find this result (reported, never overwritten)
        OmegaConf.save(OmegaConf.create(result_config(cfg)), job.run_dir / "config.yaml")
        write_json(
            {**summary, "choices": job.choices, "pretrained": cfg.model.pretrained},
            job.run_dir / "summary.json",
        )
        return summary


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
