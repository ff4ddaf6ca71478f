"""Upload a sweep's (or a run's) offline wandb runs: ``python -m mq.sync outputs/sweeps/NAME``.

Finds every ``wandb/offline-run-*`` folder below the given folders (no shell globstar needed),
groups them by run id (a requeued or resumed job writes one folder per segment, all with the
job's id) and orders each run's segments by start time. How they are uploaded depends on the
installed wandb's ``wandb sync`` (checked against wandb's source):

- wandb-core's sync (wandb >= 0.30; no ``--append`` option): one ``wandb sync`` call with every
  folder; wandb groups the files of one run and replays them one after the other in order of
  start time (core/internal/runsync/runsyncoperation.go, ``initAndPlan``).
- the legacy Python sync (``--append`` not marked "legacy only"): a second plain ``wandb sync``
  of a run id replaces the run (wandb#3841, #4624), so the first segment is synced plainly and
  each later one with ``--id ID --append``, in time order.

``--dry-run`` prints the commands and runs wandb's own ``wandb sync --dry-run`` on the same
folders (no network, nothing uploaded).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# offline-run-20261129_210150-abc123xy (wandb's run folder: start time, then the run id)
RUN_DIR = re.compile(r"^offline-run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


@dataclass(frozen=True)
class Segment:
    path: Path
    started: str  # YYYYMMDD_HHMMSS, sorts in time order
    run_id: str


def find_segments(roots: list[Path]) -> dict[str, list[Segment]]:
    """``{run id: its offline segments, oldest first}`` below ``roots``."""
    runs: dict[str, list[Segment]] = defaultdict(list)
    seen: set[Path] = set()
    for root in roots:
        candidates = [root] if RUN_DIR.match(root.name) else root.rglob("offline-run-*")
        for path in candidates:
            match = RUN_DIR.match(path.name)
            if match is None or not path.is_dir() or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            runs[match.group(2)].append(Segment(path, match.group(1), match.group(2)))
    for segments in runs.values():
        # A same-second restart: the run-*.wandb file's mtime breaks the tie.
        segments.sort(key=lambda s: (s.started, _mtime(s.path)))
    return dict(sorted(runs.items()))


def _mtime(path: Path) -> float:
    files = list(path.glob("*.wandb"))
    return max((f.stat().st_mtime for f in files), default=0.0)


def legacy_append() -> bool:
    """Whether the installed ``wandb sync`` is the legacy one that needs ``--append``."""
    from wandb.cli.cli import sync

    append = next((p for p in sync.params if p.name == "append"), None)
    return append is not None and "legacy only" not in str(getattr(append, "help", "") or "")


def commands(runs: dict[str, list[Segment]], extra: list[str], legacy: bool) -> list[list[str]]:
    """The ``wandb sync`` command lines that upload ``runs`` correctly."""
    if not runs:
        return []
    if not legacy:  # wandb-core orders each run's segments itself
        return [["wandb", "sync", *extra, *(str(s.path) for r in runs.values() for s in r)]]
    out = []
    for run_id, segments in runs.items():
        first, *later = segments
        out.append(["wandb", "sync", *extra, str(first.path)])
        out += [["wandb", "sync", *extra, "--id", run_id, "--append", str(s.path)] for s in later]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mq.sync",
        description="Upload the offline wandb runs of sweeps or runs (requeued runs in order).",
    )
    parser.add_argument(
        "folders", nargs="+", type=Path, help="sweep or run folders, e.g. outputs/sweeps/table1"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the wandb commands and wandb's own --dry-run listing; upload nothing",
    )
    parser.add_argument("--project", help="wandb project to upload to (wandb sync --project)")
    parser.add_argument("--entity", help="wandb entity (user or team) (wandb sync --entity)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"error: {', '.join(missing)} is not a folder", file=sys.stderr)
        return 2
    runs = find_segments(args.folders)
    if not runs:
        where = " ".join(map(str, args.folders))
        print(f"error: no wandb/offline-run-* folders below {where}", file=sys.stderr)
        return 2
    extra = [f"--{k}={v}" for k in ("project", "entity") if (v := getattr(args, k))]
    segments = sum(len(s) for s in runs.values())
    resumed = sum(len(s) > 1 for s in runs.values())
    print(f"{len(runs)} runs, {segments} offline segments ({resumed} runs with several)")
    legacy = legacy_append()
    for cmd in commands(runs, extra, legacy):
        print(shlex.join(cmd), flush=True)
        if args.dry_run and legacy:
            continue  # the legacy sync has no --dry-run
        dry = ["--dry-run"] if args.dry_run else []
        full = [sys.executable, "-m", "wandb", "sync", *dry, *cmd[2:]]  # this venv's wandb
        if subprocess.run(full, check=False).returncode != 0:
            print(f"error: {shlex.join(cmd)} failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
