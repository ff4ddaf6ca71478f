"""A study through the real local SLURM cluster: 8 trials, 2 in flight, the launcher killed
mid-study (SIGTERM, what scancel sends) and launched again. The study resumes: no trial runs
twice, trials SLURM was still running are waited for, and the SQLite study and the ledger (each
trial's summary.json) agree."""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import optuna
import pytest
from conftest import SMOKE, launch, start_launch
from slurm_util import SLURM, require_slurm_cluster, wait_for

STUDY = [
    "-m",
    *SLURM,
    *SMOKE,
    "meta=ste",
    "hydra/sweeper=tune",
    "dataset.val_size=64",
    "sweep_name=slurm_study",
    "hydra.sweeper.trials=8",
    "hydra.sweeper.parallel=2",
    "hydra.sweeper.space=[{params: {optimizer.lr: {type: float, low: 1e-4, high: 1e-1, log: 1}}}]",
]


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster() -> None:
    require_slurm_cluster()


def _states(db) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return [r[0] for r in con.execute("select state from trials order by number")]
    except sqlite3.Error:  # tables not created yet
        return []


@pytest.mark.slurm
@pytest.mark.slow
def test_study_survives_a_killed_launcher(tmp_path):
    sweep = tmp_path / "outputs/sweeps/slurm_study"
    db = sweep / "study.db"
    proc = start_launch(*STUDY, cwd=tmp_path)
    # mid-study: some trials told, others running in SLURM
    wait_for(
        lambda: _states(db).count("COMPLETE") >= 2 and "RUNNING" in _states(db),
        timeout=400,
        what="2 completed trials and one running",
    )
    before = _states(db)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert before.count("COMPLETE") < 8
    t0 = time.monotonic()
    again = launch(*STUDY, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]

    study = optuna.load_study(study_name="slurm_study:all", storage=f"sqlite:///{db}")
    # a trial killed between ask and its values never started: FAIL, not counted, no folder
    never = [t for t in study.trials if t.user_attrs.get("status") == "never started"]
    assert all(t.state.name == "FAIL" and "run_dir" not in t.user_attrs for t in never)
    trials = [t for t in study.trials if t not in never]
    assert len(trials) == 8 and all(t.state.name == "COMPLETE" for t in trials), [
        (t.number, t.state.name) for t in trials
    ]
    dirs = [tmp_path / t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == 8  # one folder per trial
    for t, run_dir in zip(trials, dirs, strict=True):
        summary = json.loads((run_dir / "summary.json").read_text())
        # the ledger and the study agree
        assert summary["status"] == "completed" and t.value == summary["best_val_acc"]
        assert t.user_attrs["status"] == "completed"
        # no trial ran twice: one attempt's rows only (3 steps, one epoch), no set-aside rows
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sum(r["kind"] == "step" for r in rows) == 3
        assert sum(r["kind"] == "epoch" for r in rows) == 1
        assert not list(run_dir.glob("metrics.jsonl.attempt-*"))
    # the relaunch asked only the trials the first launch had not
    asked_again = [n for n in range(len(study.trials)) if f"trial {n}:" in again.stdout]
    assert asked_again and min(asked_again) >= len(before)
    launches = json.loads((sweep / "sweep.json").read_text())["launches"]
    assert len(launches) == 2
    print(f"relaunch finished the study in {time.monotonic() - t0:.0f} s; before: {before}")
