"""python -m mq.sync: real offline wandb runs of a sweep (one of them resumed, as a requeued job
writes it: two offline segments with one id) -> the wandb commands, checked by wandb's own
`wandb sync --dry-run` (no network, nothing uploaded)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from wandb_records import read_records

from mq.results.sync import commands, find_segments, legacy_append

SEGMENT = """
import sys, time
import time
from pathlib import Path
from mq.job.loggers import WandbLogger
run_id = sys.argv[2] if len(sys.argv) > 2 else None
logger = WandbLogger(mode="offline", group="g", init_timeout=60, name="job",
                     run_dir=Path(sys.argv[1]), run_config={"a": 1}, run_id=run_id)
logger.log([{"kind": "step", "step": 0 if run_id is None else 1, "loss": 1.0}])
logger.finish()
print(logger.run_id)
"""


def segment(run_dir: Path, run_id: str | None = None) -> str:
    env = {**os.environ, "WANDB_SILENT": "true"}
    args = [sys.executable, "-c", SEGMENT, str(run_dir), *([run_id] if run_id else [])]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()[-1]


@pytest.mark.slow  # launches runs: in the slow suite, which CI runs too
def test_a_sweeps_runs_are_found_grouped_and_ordered_and_wandb_accepts_them(tmp_path):
    sweep = tmp_path / "outputs/sweeps/s"
    a, b = sweep / "bits=1,seed=0", sweep / "bits=2,seed=0"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    first = segment(a)
    time.sleep(1.1)  # the requeued segment starts a second later (folder names have seconds)
    assert segment(a, first) == first  # requeued: same run id, a second offline folder
    other = segment(b)
    runs = find_segments([sweep])
    assert set(runs) == {first, other}
    assert len(runs[first]) == 2 and runs[first][0].started < runs[first][1].started
    records = read_records(next(runs[first][1].path.glob("*.wandb")))
    assert any(r.WhichOneof("record_type") == "run" and r.run.run_id == first for r in records)

    assert not legacy_append()  # the installed wandb: wandb-core's sync, no --append
    first_cmds = commands(runs[first], [], legacy=False)  # one call: wandb orders the segments
    assert first_cmds == [["wandb", "sync", *(str(s.path) for s in runs[first])]]
    legacy = commands(runs[first], [], legacy=True)  # older wandb: plain first, then --append
    assert legacy == [
        ["wandb", "sync", str(runs[first][0].path)],
        ["wandb", "sync", "--id", first, "--append", str(runs[first][1].path)],
    ]

    env = {**os.environ, "WANDB_SILENT": "false", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mq.sync", str(sweep), "--dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "2 runs, 3 offline segments (1 runs with several)" in result.stdout
    assert "Would sync 3 run(s)" in result.stdout + result.stderr  # wandb's own dry run
    assert "checked 2/2" in result.stdout


def test_nothing_to_sync_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's mq
    result = subprocess.run(
        [sys.executable, "-m", "mq.sync", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: no wandb/offline-run-*")
