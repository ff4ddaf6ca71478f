"""Status that tells the truth: a run killed without a word is "stopped", not "running"; a
completed run whose summary.json was lost is recovered, not failed; a checkpoint that cannot
resume and a damaged metrics.jsonl are said in one line and lose nothing; rows of the wrong type
hide no run; ``python -m mq.runs | head`` ends quietly."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launch, launch_env, start_launch
from test_safety import one_line_error, rows, snapshot, summary

from mq.core.checkpoint import read_json
from mq.job.ledger import job_status
from mq.job.loggers import MetricsFile
from mq.job.rundir import LOCK_FILE
from mq.job.runlock import RunLock

F = [
    "dataset=fake",
    "logger=none",
    "progress=false",
    "epochs=1",
    "limit_train_batches=2",
    "limit_test_batches=1",
    "batch_size=32",
    "meta=ste",
]
RUN = "outputs/quantize/fake/resnet20-dorefa-w1-ste-sgd-s0"


def cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real completed run (its training state kept: tests drop it where they need to)."""
    where = tmp_path_factory.mktemp("completed")
    result = launch(*F, "keep_training_state=true", cwd=where)
    assert result.returncode == 0, result.stderr[-3000:]
    return where


def copy_run(completed: Path, to: Path, *, drop_state: bool = True) -> Path:
    """A copy of the completed run's outputs/ in ``to``; its run folder. ``drop_state``: as a
    completed run keeps its checkpoint by default (weights and progress only)."""
    shutil.copytree(completed / "outputs", to / "outputs")
    run_dir = to / RUN
    if drop_state:
        from mq.job.record import drop_training_state

        drop_training_state(run_dir / "checkpoint.pt", torch.device("cpu"))
    return run_dir


# ------------------------------------------------------------------ 1. killed: stopped ----
def test_a_run_killed_by_sigkill_is_stopped_not_running(tmp_path):
    args = [*F, "epochs=50", "limit_train_batches=4", "log_every=1"]
    proc = start_launch(*args, cwd=tmp_path)
    run_dir = tmp_path / RUN
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            state = read_json(run_dir / "summary.json") or {}
            metrics = run_dir / "metrics.jsonl"
            written = metrics.exists() and metrics.read_text().count("\n") >= 2
            if state.get("status") == "running" and written:
                break
            time.sleep(0.05)
        listed = cli("mq.runs", str(tmp_path / "outputs"))
        assert listed.stdout.splitlines()[1].startswith("running"), listed.stdout
        assert job_status(run_dir) == "running"
    finally:
        proc.send_signal(signal.SIGKILL)  # the OOM killer's way: no handler runs
        proc.communicate(timeout=60)
    assert summary(run_dir)["status"] == "running"  # what the dead job left
    before = snapshot(run_dir)
    listed = cli("mq.runs", str(tmp_path / "outputs"))
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.splitlines()[1]
    assert row.startswith("stopped") and row.endswith("quantize/fake/resnet20-dorefa-w1-ste-sgd-s0")
    assert " s ago" in row or "min ago" in row
    assert listed.stdout.splitlines()[-1].endswith(
        "1 runs under " + str(tmp_path / "outputs") + ": 1 stopped"
    )
    assert job_status(run_dir) == "stopped"  # the sweep ledger agrees
    report = cli("mq.report", str(tmp_path / "outputs"), "--no-plots", "--out", str(tmp_path / "r"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "stopped: resnet20 fake dorefa w1 sgd ste seed 0" in report.stdout
    assert snapshot(run_dir) == before  # probing the lock changed nothing
    # Held by a live process: running; no run.lock at all: stopped, and none is created.
    lock = RunLock(run_dir).acquire()
    try:
        assert (
            cli("mq.runs", str(tmp_path / "outputs")).stdout.splitlines()[1].startswith("running")
        )
    finally:
        lock.release()
    (run_dir / LOCK_FILE).unlink()
    assert job_status(run_dir) == "stopped"
    assert not (run_dir / LOCK_FILE).exists()


def test_lock_probe_never_follows_a_symlink_nor_blocks_on_a_fifo(tmp_path):
    from mq.core.folders import lock_held

    outside = tmp_path / "outside.lock"
    outside.write_text("not ours\n")
    (tmp_path / LOCK_FILE).symlink_to(outside)
    with open(outside) as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)  # someone else's lock, through the link
        assert lock_held(tmp_path) is None  # not followed: the run's status stays as written
    (tmp_path / LOCK_FILE).unlink()
    os.mkfifo(tmp_path / LOCK_FILE)
    assert lock_held(tmp_path) is None  # returns at once (a FIFO opened plainly would block)


# ----------------------------------------------------------- 2. summary.json lost ----
def lose_summary(completed: Path, tmp_path: Path, damages: tuple[str, ...]) -> Path:
    """Damage the copied run's summary.json each way in turn; each relaunch must rebuild it
    from checkpoint.pt and metrics.jsonl, in one log line, touching neither."""
    run_dir = copy_run(completed, tmp_path)
    original = summary(run_dir)
    kept = {n: (run_dir / n).read_bytes() for n in ("checkpoint.pt", "metrics.jsonl")}
    for damage in damages:
        if damage == "missing":
            (run_dir / "summary.json").unlink()
        else:
            (run_dir / "summary.json").write_text(damage)
        again = launch(*F, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "Traceback" not in again.stderr + again.stdout
        said = [line for line in (again.stdout + again.stderr).splitlines() if "rebuilt" in line]
        assert len(said) == 1 and "summary.json was missing or unreadable" in said[0], said
        rebuilt = summary(run_dir)
        assert rebuilt["status"] == "completed" and rebuilt["error"] is None
        for key in ("test_acc", "epochs_completed", "steps", "final_test_acc", "choices"):
            assert rebuilt[key] == original[key], key
        for key in ("test_images", "train_batches", "train_batches_total", "limit_train_batches"):
            assert rebuilt[key] == original[key], key
        assert abs(rebuilt["started"] - original["started"]) < 60
        assert {n: (run_dir / n).read_bytes() for n in kept} == kept  # weights and rows kept
    return run_dir


@pytest.mark.slow  # launches over a completed run
def test_completed_run_whose_summary_was_lost_is_rebuilt_not_failed(completed, tmp_path):
    lose_summary(completed, tmp_path, ("missing",))
    repeat = launch(*F, cwd=tmp_path)
    assert "is already completed" in repeat.stdout + repeat.stderr


@pytest.mark.slow
def test_completed_run_whose_summary_is_garbage_is_rebuilt(completed, tmp_path):
    lose_summary(completed, tmp_path, ('{"status": "compl', "[1, 2]"))


# --------------------------------------------------- 2b. checkpoints that cannot resume ----
@pytest.mark.parametrize(
    "kind, message",
    [
        ("progress-only", "lacks model, step_state, rng, metrics_offset: it cannot resume"),
        pytest.param(
            "weights-only",
            "holds weights only (0 of 1 epochs, no training state)",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_checkpoint_that_cannot_resume_is_one_line(completed, tmp_path, kind, message):
    state = torch.load(completed / RUN / "checkpoint.pt", weights_only=True)
    if kind == "progress-only":
        state = {"progress": {}}
    else:  # a completed run's kept weights, in a folder whose run is not done
        state = {k: state[k] for k in ("version", "model", "progress", "metrics_offset")}
        state["progress"]["epoch"] = 0
    run_dir = tmp_path / RUN
    run_dir.mkdir(parents=True)
    # The run's own config.yaml: a lone checkpoint.pt is not recognised as an mq run folder.
    (run_dir / "config.yaml").write_bytes((completed / RUN / "config.yaml").read_bytes())
    torch.save(state, run_dir / "checkpoint.pt")
    before = {n: (run_dir / n).read_bytes() for n in ("checkpoint.pt", "config.yaml")}
    result = launch(*F, cwd=tmp_path)
    one_line_error(result, f"{RUN}/checkpoint.pt {message}", "move it away to start the run over")
    assert {n: (run_dir / n).read_bytes() for n in before} == before
    # Refused before Hydra writes: no .hydra/, launch.log or run.lock either.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.yaml"]


# --------------------------------------------------------- 3. damaged metrics.jsonl ----
@pytest.mark.slow  # a launch; test_safety's torn metrics file is the fast one
def test_resume_over_a_garbage_line_moves_the_file_aside_and_merges_no_rows(completed, tmp_path):
    run_dir = copy_run(completed, tmp_path, drop_state=False)  # resumable at its last epoch
    original = (run_dir / "metrics.jsonl").read_bytes()
    lines = original.splitlines(keepends=True)
    damaged = b"".join([lines[0], b"garbage, not a row\n", *lines[1:]])
    (run_dir / "metrics.jsonl").write_bytes(damaged)
    s = summary(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({**s, "status": "failed"}))
    again = launch(*F, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    said = [line for line in (again.stdout + again.stderr).splitlines() if "damaged-1" in line]
    assert len(said) == 1 and "does not match its checkpoint" in said[0], said
    assert (run_dir / "metrics.jsonl.damaged-1").read_bytes() == damaged  # the user's file
    assert (run_dir / "metrics.jsonl").read_bytes() == original  # every row, none merged
    assert summary(run_dir)["status"] == "completed"


def test_metrics_file_checks_the_rows_before_the_offset(tmp_path, caplog):
    def write(*steps: int) -> bytes:
        text = "".join(json.dumps({"kind": "step", "step": s, "loss": 1.0}) + "\n" for s in steps)
        return text.encode()

    path = tmp_path / "metrics.jsonl"
    offset = len(write(0, 1))  # the checkpoint after step 1; step 2 is replayed
    path.write_bytes(write(0, 1, 2))
    MetricsFile(path, offset).close()
    assert path.read_bytes() == write(0, 1) and not list(tmp_path.glob("*.damaged-*"))
    # A line put in before the offset: the cut falls inside a row; nothing is merged.
    damaged = write(0) + b"not a row\n" + write(1, 2)
    path.write_bytes(damaged)
    metrics = MetricsFile(path, offset)
    metrics.write([{"kind": "step", "step": 2}])
    metrics.close()
    assert [r["step"] for r in rows(tmp_path)] == [0, 2]  # the rows before the cut, then on
    assert (tmp_path / "metrics.jsonl.damaged-1").read_bytes() == damaged
    # Knowing the checkpoint's steps, the rows are kept by step: a line taken out (the cut
    # would keep step 2, which is replayed) or a row of another type put in.
    cases = [(write(1, 2, 3), [1, 2]), (write(0) + b"[1, 2]\n" + write(1, 2), [0, 1, 2])]
    for n, (text, steps) in enumerate(cases, 2):
        path.write_bytes(text)
        metrics = MetricsFile(path, offset, steps=2)
        metrics.write([{"kind": "step", "step": 2}])
        metrics.close()
        assert [r["step"] for r in rows(tmp_path)] == steps  # step 2 once
        assert (tmp_path / f"metrics.jsonl.damaged-{n}").read_bytes() == text
    assert caplog.text.count("does not match its checkpoint") == 3


# ----------------------------------------------------------------- 4. bad rows ----
def test_rows_and_fields_of_the_wrong_type_hide_no_run(completed, tmp_path):
    out = tmp_path / "outputs"
    for name in ("good", "bad-rows", "bad-summary"):
        shutil.copytree(completed / RUN, out / name)
    with open(out / "bad-rows" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "epoch", "epoch": "x", "test_acc": 1.0}\n')
        f.write("null\n")
        f.write('{"kind": "epoch", "epoch": 2, "test_acc": ["abc"]}\n')
        f.write('{"kind": "epoch", "epoch": null}\n')
    s = json.loads((out / "bad-summary" / "summary.json").read_text())
    s |= {"test_acc": ["abc"], "updated": "x", "choices": 3, "test_images": "many"}
    (out / "bad-summary" / "summary.json").write_text(json.dumps(s))
    listed = cli("mq.runs", str(out))
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert listed.stdout.splitlines()[-1].endswith("3 runs under " + str(out) + ": 3 completed")
    for name in ("good", "bad-rows", "bad-summary"):
        row = next(line for line in listed.stdout.splitlines() if line.endswith(name))
        assert " 1/1 " in row, row
    warnings = listed.stderr.splitlines()
    assert len(warnings) == 2, listed.stderr
    rows_line = next(w for w in warnings if "bad-rows" in w)
    assert rows_line.startswith(f"warning: {out / 'bad-rows' / 'metrics.jsonl'} line 4: ")
    assert "epoch 'x' is not a whole number; row skipped (and 3 more)" in rows_line
    assert f"{out / 'bad-summary' / 'summary.json'}: " in next(w for w in warnings if "bad-s" in w)
    report = cli("mq.report", str(out), "--no-plots", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Runs found: 3" in report.stdout


# --------------------------------------------------------------- 5. | head -1 ----
def test_runs_piped_to_head_exits_quietly(tmp_path):
    out = tmp_path / "outputs"
    for i in range(400):  # more than a pipe holds (64 KiB), so that the writer meets EPIPE
        run_dir = out / f"{'x' * 150}-{i:03d}"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text('{"status": "failed", "error": "x"}')
    result = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m mq.runs "{out}" | head -1; exit ${{PIPESTATUS[0]}}'],
        cwd=ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split() == [
        "status",
        "epochs",
        "final",
        "best",
        "limited",
        "updated",
        "path",
    ]
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE  # as a Unix tool that SIGPIPE ended


def test_a_killed_trial_is_told_stopped_not_running(tmp_path):
    """A tuning trial whose run was killed (summary says running, nobody holds run.lock) is
    recorded in its study as stopped and FAIL, not as a running trial."""
    import optuna

    from mq.sweep.tune_study import tell

    run_dir = tmp_path / "trial"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "running"}))
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    assert tell(study, trial, run_dir, "best_val_acc") is None
    (told,) = study.get_trials(deepcopy=False)
    assert told.user_attrs["status"] == "stopped"
    assert told.state == optuna.trial.TrialState.FAIL
