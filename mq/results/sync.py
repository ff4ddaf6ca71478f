"""Upload a sweep's (or a run's) offline wandb runs: ``python -m mq.sync outputs/sweeps/NAME``.

Finds every ``wandb/offline-run-*`` folder below the given folders (no shell globstar needed),
groups them by run id (a requeued or resumed job writes one folder per segment, all with the
job's id) and orders each run's segments by start time. Each run is uploaded by its own
``wandb sync`` process, ``--jobs`` of them at once (wandb#10220: one after the other takes
longer than the training); a run that fails is reported and the others go on. How a run's
segments are uploaded depends on the installed wandb's ``wandb sync`` (checked against wandb's
source):

- wandb-core's sync (wandb >= 0.30; no ``--append`` option): one ``wandb sync`` call with all of
  the run's folders; wandb replays them one after the other in order of start time
  (core/internal/runsync/runsyncoperation.go, ``initAndPlan``). It exits 0 also when the server
  refused the run, so a run counts as synced once wandb has marked each of its files synced.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

# offline-run-20261129_210150-abc123xy (wandb's run folder: start time, then the run id)
RUN_DIR = re.compile(r"^offline-run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")
# Runs uploaded at once: each is a wandb sync process (Python and wandb-core, ~150 MB) that
# mostly waits on the network.
JOBS = 8


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


def commands(segments: list[Segment], extra: list[str], legacy: bool) -> list[list[str]]:
    """The ``wandb sync`` command lines that upload one run's ``segments``, in this order."""
    if not legacy:  # wandb-core orders a run's segments itself
        return [["wandb", "sync", *extra, *(str(s.path) for s in segments)]]
    first, *later = segments
    run_id = first.run_id
    rest = [["wandb", "sync", *extra, "--id", run_id, "--append", str(s.path)] for s in later]
    return [["wandb", "sync", *extra, str(first.path)], *rest]


def sync_run(
    cmds: list[list[str]], segments: list[Segment], dry_run: bool, legacy: bool
) -> tuple[str, str]:
    """Run one run's ``wandb sync`` commands in order: (``""`` when it synced, else why not;
    what wandb printed).

    wandb-core's ``wandb sync`` exits 0 also when the server refused the run: it marks each file
    it uploaded with ``run-ID.wandb.synced``, so a missing mark is a failure too."""
    out = []
    for cmd in cmds:
        dry = ["--dry-run"] if dry_run else []
        full = [sys.executable, "-m", "wandb", "sync", *dry, *cmd[2:]]  # this venv's wandb
        # No stdin: a login prompt would wait unseen behind the captured output; without a key
        # wandb says so and exits 1.
        done = subprocess.run(
            full, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        out.append((done.stdout + done.stderr).strip())
        if done.returncode != 0:
            return f"wandb sync exited with {done.returncode}: {_reason(out[-1])}", "\n".join(out)
    unmarked = [s for s in segments for f in s.path.glob("*.wandb") if not _synced(f)]
    if unmarked and not (dry_run or legacy):
        return f"not uploaded: {_reason(out[-1])}", "\n".join(out)
    return "", "\n".join(out)


def _synced(run_file: Path) -> bool:
    return run_file.with_name(run_file.name + ".synced").exists()


def _reason(output: str) -> str:
    """wandb's last error line (or last line) of a ``wandb sync`` call."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return (errors or lines or ["no output"])[-1]


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
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=JOBS,
        help=f"runs uploaded at once, each by its own wandb sync (default {JOBS})",
    )
    parser.add_argument("--project", help="wandb project to upload to (wandb sync --project)")
    parser.add_argument("--entity", help="wandb entity (user or team) (wandb sync --entity)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs={args.jobs} is not allowed; allowed: 1 or more", file=sys.stderr)
        return 2
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
    plans = {run_id: commands(segs, extra, legacy) for run_id, segs in runs.items()}
    for cmds in plans.values():
        for cmd in cmds:
            print(shlex.join(cmd))
    if args.dry_run and legacy:
        return 0  # the legacy sync has no --dry-run
    verb = "checked" if args.dry_run else "synced"
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job waits on a process
        todo = {
            pool.submit(sync_run, plans[run_id], segs, args.dry_run, legacy): run_id
            for run_id, segs in runs.items()
        }
        for done, future in enumerate(as_completed(todo), 1):
            run_id, (error, output) = todo[future], future.result()
            if output:
                print(output, flush=True)
            where = runs[run_id][0].path.parent.parent  # the job's folder (above wandb/)
            if error:
                failed.append(run_id)
                print(f"error: run {run_id} ({where}) failed: {error}", file=sys.stderr, flush=True)
            else:
                print(f"{verb} {done - len(failed)}/{len(runs)}: {run_id} ({where})", flush=True)
    if failed:
        print(
            f"error: {len(failed)} of {len(runs)} runs failed: {', '.join(sorted(failed))}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
