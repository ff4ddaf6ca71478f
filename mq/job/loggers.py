"""Metric sinks: ``metrics.jsonl`` in the run directory (always) and wandb (optional)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mq.core.errors import first_line

log = logging.getLogger(__name__)


def _no_link(path: str, flags: int) -> int:
    """Open without following a link planted in the run folder (ELOOP instead)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


class MetricsFile:
    """Append-only JSON lines. Resuming truncates it to the checkpoint's offset, so rows written
    after the last checkpoint (and replayed after the restart) are not duplicated. ``steps``:
    the checkpoint's step count (rows before it have smaller steps), to check the cut by."""

    def __init__(self, path: Path, offset: int | None = None, steps: int | None = None) -> None:
        self.path = path
        if offset is not None and path.exists():
            self._cut(offset, steps)
        self.file = open(path, "a", buffering=1, opener=_no_link)  # noqa: SIM115

    def _cut(self, offset: int, steps: int | None) -> None:
        with open(self.path, "rb", opener=_no_link) as f:
            data = f.read()
        if len(data) < offset:
            # Torn by a crash (the checkpoint is newer than the rows on disk): extending to the
            # offset would pad with NUL bytes; keep the complete lines instead.
            size, offset = len(data), data.rfind(b"\n") + 1
            log.warning(
                "%s is shorter than the checkpoint says (%d bytes): keeping its %d bytes of "
                "complete rows; the rows of the lost end are not replayed",
                self.path,
                size,
                offset,
            )
        problem = _damage(data[:offset], steps)
        if problem is None:
            with open(self.path, "r+b", opener=_no_link) as f:
                f.truncate(offset)
            return
        # Edited or mixed up since the checkpoint: cutting at the offset would merge rows.
        # The file as it was goes aside; the valid rows from before the checkpoint stay.
        aside = free_name(self.path, "damaged")
        with open(aside, "xb") as f:
            f.write(data)
        # By step when known: a line put in or taken out moves the rows across the offset.
        source = data if steps is not None else data[:offset]
        kept = [line for line in source.split(b"\n") if _row(line, steps) is not None]
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, self.path)
        log.warning(
            "%s does not match its checkpoint (%s): moved it to %s and kept its %d valid rows "
            "from before the checkpoint",
            self.path,
            problem,
            aside.name,
            len(kept),
        )

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.file.write("".join(json.dumps(row) + "\n" for row in rows))

    def offset(self) -> int:
        self.file.flush()
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


def choice_config(choices: dict[str, str | None]) -> dict[str, str | None]:
    """Each config group's option as the user typed it (``choice/meta: multifc``), for wandb's
    run config. The nested nodes (``meta: {_target_: ..., net: {...}}``) hold what an option
    resolves to, not its name, and a dashboard groups and filters by config keys; the ``/``
    keeps these keys apart from the nested nodes and from every key of conf/."""
    return {f"choice/{group}": option for group, option in choices.items()}


def _row(line: bytes, steps: int | None) -> dict[str, Any] | None:
    """``line`` as a metrics row from before a checkpoint at ``steps`` steps; None if not."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if steps is not None and (not isinstance(step, int) or isinstance(step, bool) or step >= steps):
        return None
    return row


def _damage(head: bytes, steps: int | None) -> str | None:
    """Why ``head`` (the file up to the checkpoint's offset) is not the rows the checkpoint
    saw; None when it is."""
    if head and not head.endswith(b"\n"):
        return "its offset falls inside a row"
    for number, line in enumerate(head.split(b"\n")[:-1], 1):
        if _row(line, steps) is None:
            return f"line {number} is not a row from before the checkpoint"
    return None


def free_name(path: Path, kind: str) -> Path:
    """``path`` + ``.kind-N`` for the first N that does not exist."""
    n = 1
    while path.with_name(f"{path.name}.{kind}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{kind}-{n}")


class WandbLogger:
    """One wandb run per job. Offline by default; falls back to offline, then to no wandb, when
    ``wandb.init`` fails or times out (compute nodes often have no internet)."""

    def __init__(
        self,
        project: str = "mq",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        init_timeout: float = 90,
        *,
        name: str,
        run_dir: Path,
        run_config: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        import wandb

        self.run = None
        modes = [mode] if mode != "online" else ["online", "offline"]
        for attempt in modes:
            try:
                self.run = wandb.init(
                    project=project,
                    entity=entity,
                    mode=attempt,
                    group=group,
                    job_type=job_type,
                    tags=list(tags or []),
                    name=name,
                    id=run_id,
                    resume="allow" if run_id else None,
                    dir=str(run_dir),
                    config=run_config,
                    settings=wandb.Settings(init_timeout=init_timeout, console="off"),
                )
                break
            except Exception as exc:  # network, auth or service start-up problems
                log.warning("wandb.init (mode=%s) failed: %s", attempt, first_line(exc))
        if self.run is None:
            log.warning("wandb disabled for this run; metrics.jsonl still has everything")

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def _lost(self, exc: Exception) -> None:
        """wandb stopped working mid-run; training goes on without it. Under SLURM this is
        typical: scancel and preemption signal every process of the job, wandb's service
        process included, which then dies on the SIGTERM that the training survives."""
        log.warning("wandb failed (%s); going on without it", first_line(exc))
        self.run = None

    def log(self, rows: list[dict[str, Any]]) -> None:
        if self.run is None:
            return
        try:
            for row in rows:
                data = {k: v for k, v in row.items() if k not in ("kind", "step")}
                self.run.log(data, step=row["step"])
        except Exception as exc:
            self._lost(exc)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for key, value in summary.items():
                if isinstance(value, (int, float, str)):
                    self.run.summary[key] = value
        except Exception as exc:
            self._lost(exc)

    def finish(self, exit_code: int = 0, preempting: bool = False) -> None:
        """End the run; ``preempting``: the job is requeued and will resume this run (same id)."""
        if self.run is None:
            return
        try:
            if preempting:
                self.run.mark_preempting()
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._lost(exc)
