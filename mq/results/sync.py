"""Upload a sweep's (or a run's) offline wandb runs: ``python -m mq.sync outputs/sweeps/NAME``.

Finds every ``wandb/offline-run-*`` folder below the given folders (no shell globstar needed),
groups them by run id (a requeued or resumed job writes one folder per segment, all with the
job's id) and orders each run's segments by start time. ``--jobs`` runs are uploaded at once
(wandb#10220: one after the other takes longer than the training), each run is reported as it
ends, and a run that fails does not stop the others. How depends on the installed wandb's
``wandb sync`` (checked against wandb's source):

- wandb-core's sync (wandb >= 0.30; no ``--append`` option): one ``wandb sync -n JOBS`` call
  with every folder; wandb uploads JOBS runs at once and replays the files of one run one after
  the other in order of start time (core/internal/runsync/runsyncoperation.go,
  ``initAndPlan``). One call, not one per run: each call starts a Python and a wandb-core
  process, which took longer than the uploads in a measurement on 12 runs. It exits 0 also
  when the server refused a run: a run counts as uploaded once wandb has written
  ``run-ID.wandb.synced`` next to each of its files.
- the legacy Python sync (``--append`` not marked "legacy only"; no ``-n``): a second plain
  ``wandb sync`` of a run id replaces the run (wandb#3841, #4624), so the first segment is
  synced plainly and each later one with ``--id ID --append``, in time order; JOBS runs' chains
  of calls run at once.

``--dry-run`` prints the commands and runs wandb's own ``wandb sync --dry-run`` on the same
folders (no network, nothing uploaded).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# offline-run-20261129_210150-abc123xy (wandb's run folder: start time, then the run id)
RUN_DIR = re.compile(r"^offline-run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")
# Runs uploaded at once: uploads mostly wait on the network (wandb's own default is 5).
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


def parallel_option() -> bool:
    """Whether the installed ``wandb sync`` uploads several runs at once (``-n``)."""
    from wandb.cli.cli import sync

    return any(p.name == "parallelism" for p in sync.params)


def commands(segments: list[Segment], extra: list[str], legacy: bool) -> list[list[str]]:
    """The ``wandb sync`` command lines that upload one run's ``segments``, in this order."""
    if not legacy:  # wandb-core orders a run's segments itself
        return [["wandb", "sync", *extra, *(str(s.path) for s in segments)]]
    first, *later = segments
    run_id = first.run_id
    rest = [["wandb", "sync", *extra, "--id", run_id, "--append", str(s.path)] for s in later]
    return [["wandb", "sync", *extra, str(first.path)], *rest]


def _wandb(cmd: list[str], dry_run: bool) -> list[str]:
    dry = ["--dry-run"] if dry_run else []
    return [sys.executable, "-m", "wandb", "sync", *dry, *cmd[2:]]  # this venv's wandb


def _wandb_env() -> dict[str, str]:
    """The environment for ``wandb sync``: without WANDB_SILENT, which also hides the error
    lines that say why a run was not uploaded (the reason each failed run is reported with)."""
    return {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET")}


def _files(segments: list[Segment]) -> list[Path]:
    return [f for s in segments for f in s.path.glob("*.wandb")]


def _synced(segments: list[Segment]) -> bool:
    files = _files(segments)  # a folder without one (wandb.init died) has nothing uploaded
    return bool(files) and all(f.with_name(f.name + ".synced").exists() for f in files)


def _why_not(segments: list[Segment], lines: list[str]) -> str:
    if not _files(segments):
        return f"no run-*.wandb file in {segments[0].path}"
    return f"not uploaded: {_reason(lines, segments[0].run_id)}"


def _reason(lines: list[str], run_id: str = "") -> str:
    """wandb's last error line about ``run_id`` (else its last error line, else last line)."""
    lines = [line.strip() for line in lines if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    about = [line for line in errors if run_id and run_id in line]
    return (about or errors or lines or ["no output"])[-1]


class Report:
    """The progress lines (``synced 3/12: ID (folder)``) and the failed runs, from any thread."""

    def __init__(self, runs: dict[str, list[Segment]], verb: str) -> None:
        self.runs, self.verb, self.done, self.failed = runs, verb, 0, {}
        self.lock = threading.Lock()

    def where(self, run_id: str) -> Path:
        return self.runs[run_id][0].path.parent.parent  # the job's folder (above wandb/)

    def say(self, text: str, err: bool = False) -> None:
        with self.lock:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)

    def ok(self, run_id: str) -> None:
        with self.lock:
            self.done += 1
            print(f"{self.verb} {self.done}/{len(self.runs)}: {run_id} ({self.where(run_id)})")
            sys.stdout.flush()

    def fail(self, run_id: str, why: str) -> None:
        with self.lock:
            self.failed[run_id] = why
            print(f"error: run {run_id} ({self.where(run_id)}) failed: {why}", file=sys.stderr)
            sys.stderr.flush()


def upload_together(
    runs: dict[str, list[Segment]], extra: list[str], jobs: int, dry_run: bool, report: Report
) -> None:
    """wandb-core: one ``wandb sync -n JOBS`` call, which uploads that many runs at once and
    each run's segments in order; a run is reported as wandb marks its files synced."""
    paths = [str(s.path) for segments in runs.values() for s in segments]
    cmd = ["wandb", "sync", *(["-n", str(jobs)] if parallel_option() else []), *extra, *paths]
    report.say(shlex.join(cmd))
    # No stdin: wandb would ask for a login there; without a key it says so and exits 1.
    proc = subprocess.Popen(
        _wandb(cmd, dry_run),
        stdin=subprocess.DEVNULL,
        env=_wandb_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def relay() -> None:
        for line in proc.stdout or []:
            lines.append(line)
            report.say(line.rstrip())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    if dry_run:
        proc.wait()
        reader.join()
        for run_id in runs:
            if proc.returncode:
                report.fail(run_id, f"wandb sync --dry-run exited with {proc.returncode}")
            else:
                report.ok(run_id)
        return
    pending = dict(runs)
    while pending:
        ended = proc.poll() is not None  # before the marks: none is written after the end
        for run_id in [r for r, segments in pending.items() if _synced(segments)]:
            del pending[run_id]
            report.ok(run_id)
        if ended:
            break
        time.sleep(0.2)
    reader.join()
    for run_id, segments in pending.items():  # wandb-core exits 0 also on a refused run
        report.fail(run_id, _why_not(segments, lines))


def upload_each(
    runs: dict[str, list[Segment]],
    extra: list[str],
    jobs: int,
    dry_run: bool,
    legacy: bool,
    report: Report,
) -> None:
    """A ``wandb sync`` chain per run (the legacy sync has no ``-n``), ``jobs`` runs at once."""
    plans = {run_id: commands(segments, extra, legacy) for run_id, segments in runs.items()}
    report.say("\n".join(shlex.join(cmd) for cmds in plans.values() for cmd in cmds))
    if dry_run and legacy:
        return  # the legacy sync has no --dry-run

    def upload(run_id: str) -> None:
        for cmd in plans[run_id]:
            done = subprocess.run(
                _wandb(cmd, dry_run),
                stdin=subprocess.DEVNULL,
                env=_wandb_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            output = (done.stdout + done.stderr).strip()
            if output:
                report.say(output)
            if done.returncode != 0:
                why = f"wandb sync exited with {done.returncode}: {_reason(output.splitlines())}"
                report.fail(run_id, why)
                return
        if legacy or dry_run or _synced(runs[run_id]):
            report.ok(run_id)
        else:
            report.fail(run_id, _why_not(runs[run_id], output.splitlines()))

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each thread waits on its processes
        list(pool.map(upload, runs))


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
        help=f"runs uploaded at once (default {JOBS})",
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
    report = Report(runs, "checked" if args.dry_run else "synced")
    if legacy_append():
        upload_each(runs, extra, args.jobs, args.dry_run, True, report)
    else:
        upload_together(runs, extra, args.jobs, args.dry_run, report)
    if report.failed:
        failed = ", ".join(sorted(report.failed))
        print(f"error: {len(report.failed)} of {len(runs)} runs failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
