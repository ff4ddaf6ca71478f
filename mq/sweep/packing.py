"""Packing a sweep (``hydra.sweeper.pack=K``): points that differ only in what changes no shape
of the network (seed, lr, optimizer, quantizer, meta net, ...) are grouped, up to K a pack, and
each pack is submitted as one job that trains its runs as one fused network (mq.job.packjob).
Every run keeps its own folder, so a relaunch packs only the runs that are not finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mq.core.errors import ConfigError
from mq.job import ledger

log = logging.getLogger(__name__)
PACKS = ".packs"  # in the sweep folder: pack files and the pack jobs' own folders

# The keys whose values must be equal in a pack: the network's shape and code path, the data's
# batches (same shapes, same number of steps) and where it runs.
SHARED = ("model", "dataset", "batch_size", "epochs", "limit_train_batches", "device", "act")


def check_pack(pack: Any) -> int:
    """``hydra.sweeper.pack`` as an int >= 1, or a one-line ConfigError."""
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise ConfigError(
            f"hydra.sweeper.pack={pack} is not a pack size; allowed: an integer >= 1 "
            "(1: every run its own job)"
        )
    return pack


def check_fuse(fuse: Any) -> bool | None:
    """``hydra.sweeper.fuse``: null, true or false, or a one-line ConfigError."""
    if fuse is not None and not isinstance(fuse, bool):
        raise ConfigError(
            f"hydra.sweeper.fuse={fuse} is not known; allowed: null (fused on a GPU, one "
            "network after another on a CPU), true, false"
        )
    return fuse


def why_alone(cfg: DictConfig, choices: dict[str, str]) -> str | None:
    """Why a (task) config's run cannot share a pack; None when it can."""
    if cfg.task.get("_target_", "").rsplit(".", 1)[-1] != "Train":
        return f"task={choices.get('task', cfg.task.name)} is not packed"
    act = cfg.get("act")
    if act is not None and act.get("_target_"):
        return f"act={choices.get('act', '?')} is not packed (activation quantizers)"
    return None


def pack_member(cfg: DictConfig, task_cfg: DictConfig, run_dir: Path) -> tuple[Any, Any]:
    """(member, key) of a composed sweep point: what its pack job needs of it, and the key
    that decides which points share a pack (None: it cannot share one, and why)."""
    from mq.job.packjob import Member

    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    choices.update(bits=str(task_cfg.bits), seed=str(task_cfg.seed))
    member = Member(task_cfg, run_dir, choices, {"name": str(cfg.hydra.sweep.subdir)})
    reason = why_alone(task_cfg, choices)
    launcher = cfg.hydra.get("launcher", {})
    if int(launcher.get("tasks_per_node", 1) or 1) * int(launcher.get("nodes", 1) or 1) > 1:
        reason = "data-parallel jobs are not packed"
    if reason is not None:
        return member, ("alone", reason)
    model = OmegaConf.to_container(task_cfg.model, resolve=True)
    assert isinstance(model, dict)
    model.pop("pretrained", None)  # the starting values, not the shapes
    shared = {k: OmegaConf.select(task_cfg, k) for k in SHARED}
    shared = {
        k: OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for k, v in shared.items()
    }
    shared.update(model=model, quantized=bool(task_cfg.quant.get("_target_")))
    return member, json.dumps(shared, sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def pack_jobs(
    points: list[Any], size: int, sweep_dir: Path, fuse: bool | None = None
) -> list[list[str]]:
    """The jobs to launch for ``points`` packed ``size`` at most: a pack's job overrides are its
    first run's, its own folder and its pack file; a point alone keeps its own overrides."""
    groups: dict[Any, list[Any]] = {}
    for p in points:
        key = p.pack_key if not isinstance(p.pack_key, tuple) else id(p)
        groups.setdefault(key, []).append(p)
    group = ledger.wandb_group(sweep_dir, fallback=sweep_dir.name)
    jobs, sizes = [], []
    for members in groups.values():
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            if len(chunk) == 1:
                jobs.append(chunk[0].overrides)
                continue
            sizes.append(len(chunk))
            jobs.append(_pack_job(chunk, sweep_dir, group, fuse))
    alone = Counter(p.pack_key[1] for p in points if isinstance(p.pack_key, tuple))
    log.info(
        "hydra.sweeper.pack=%d: %d runs in %d packs (%s), %d runs alone",
        size,
        sum(sizes),
        len(sizes),
        ", ".join(map(str, sizes)) or "-",
        len(points) - sum(sizes),
    )
    for reason, count in alone.items():
        log.warning("%d runs packed alone: %s", count, reason)
    return jobs


def _pack_job(chunk: list[Any], sweep_dir: Path, group: str, fuse: bool | None) -> list[str]:
    from mq.job.packjob import write_pack_file

    digest = hashlib.sha1("\n".join(str(p.run_dir) for p in chunk).encode()).hexdigest()[:12]
    name = f"pack-{digest}"
    path = sweep_dir / PACKS / f"{name}.json"
    members = []
    for p in chunk:
        p.member.logger_args = {**p.member.logger_args, "group": group}
        members.append(p.member)
    write_pack_file(path, members, fuse)
    quoted = str(path.resolve()).replace("\\", "\\\\").replace("'", "\\'")
    return [*chunk[0].overrides, f"hydra.sweep.subdir={PACKS}/{name}", f"+pack_file='{quoted}'"]
