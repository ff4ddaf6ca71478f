"""Metric sinks: ``metrics.jsonl`` in the run directory (always) and wandb (optional)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mq.errors import first_line

log = logging.getLogger(__name__)


def _no_link(path: str, flags: int) -> int:
    """Open without following a link planted in the run folder (ELOOP instead)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


class MetricsFile:
    """Append-only JSON lines. Resuming truncates it to the checkpoint's offset, so rows written
    after the last checkpoint (and replayed after the restart) are not duplicated."""

    def __init__(self, path: Path, offset: int | None = None) -> None:
        self.path = path
        if offset is not None and path.exists():
            with open(path, "r+b", opener=_no_link) as f:
                size = f.seek(0, 2)
                if size < offset:
                    # Torn by a crash (the checkpoint is newer than the rows on disk): extending
                    # to the offset would pad with NUL bytes; keep the complete lines instead.
                    f.seek(0)
                    offset = f.read().rfind(b"\n") + 1
                    log.warning(
                        "%s is shorter than the checkpoint says (%d bytes): keeping its %d "
                        "bytes of complete rows; the rows of the lost end are not replayed",
                        path,
                        size,
                        offset,
                    )
                f.truncate(offset)
        self.file = open(path, "a", buffering=1, opener=_no_link)  # noqa: SIM115

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.file.write("".join(json.dumps(row) + "\n" for row in rows))

    def offset(self) -> int:
        self.file.flush()
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


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
