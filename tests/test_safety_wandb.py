"""Comparing in wandb: each config group's choice is a plain config key of the run, and
``python -m mq.sync`` uploads several runs at once and reports each run that fails.

Uploads go to tests/fake_wandb.py, a local stand-in for the wandb server, through the real
``wandb sync``: nothing leaves the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, launch
from fake_wandb import fake_wandb
from test_sync import SEGMENT, segment
from wandb_records import read_records


def offline_runs(folders: list[Path]) -> list[str]:
    """One offline wandb run in each folder (made at once); their run ids."""
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    for folder in folders:
        folder.mkdir(parents=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", SEGMENT, str(f)], env=env, stdout=subprocess.PIPE)
        for f in folders
    ]
    return [p.communicate(timeout=120)[0].decode().split()[-1] for p in procs]


def sync(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    cmd = [sys.executable, "-m", "mq.sync", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def synced(folder: Path) -> bool:
    files = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
    return bool(files) and all(f.with_name(f.name + ".synced").exists() for f in files)


@pytest.mark.slow  # launches a run
def test_each_groups_choice_is_a_top_level_config_key_and_reaches_the_server(tmp_path):
    smoke = ["dataset=fake", "progress=false", "epochs=1", "batch_size=32", "meta=ste"]
    args = [*smoke, "limit_train_batches=2", "limit_test_batches=2", "logger.mode=offline"]
    result = launch(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs/quantize/fake/resnet20-dorefa-w1-ste-sgd-s0"
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    (run,) = [r.run for r in read_records(run_file) if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    choices = {k: v for k, v in config.items() if k.startswith("choice/")}
    assert choices == {
        "choice/model": "resnet20",
        "choice/dataset": "fake",
        "choice/quant": "dorefa",
        "choice/act": "none",
        "choice/meta": "ste",
        "choice/optimizer": "sgd",
        "choice/logger": "wandb",
        "choice/task": "quantize",
        "choice/bits": "1",
        "choice/seed": "0",
    }
    assert config["meta"]["_target_"] == "mq.meta.STEStep"  # the nested node stays as it was
    assert json.loads((run_dir / "summary.json").read_text())["choices"]["meta"] == "ste"

    with fake_wandb() as server:  # what a dashboard groups by: the uploaded run's config
        result = sync(str(run_dir), cwd=tmp_path, env=server.env())
    assert result.returncode == 0, result.stdout + result.stderr
    (uploaded,) = server.configs.values()
    assert uploaded["choice/meta"] == "ste" and uploaded["choice/dataset"] == "fake"


@pytest.mark.slow  # makes four offline runs and uploads them three times
def test_sync_uploads_runs_at_once_and_reports_each_failed_run(tmp_path):
    sweep = tmp_path / "outputs/sweeps/s"
    jobs = [sweep / f"seed={i}" for i in range(4)]
    ids = offline_runs(jobs[1:])
    resumed = segment_pair(jobs[0])  # a requeued job: two segments of one run
    ids.insert(0, resumed)
    bad = ids[2]

    with fake_wandb(delay=0.2, refuse=set(ids)) as server:  # a server refusing everything
        result = sync(str(sweep), "--jobs", "1", cwd=tmp_path, env=server.env())
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors)
    assert errors[-1] == f"error: 4 of 4 runs failed: {', '.join(sorted(ids))}"
    assert all(f"run {i} refused" in result.stderr for i in ids)  # wandb's reason, per run
    assert server.max_runs_at_once == 1  # --jobs 1: one run after the other
    assert not any(synced(j) for j in jobs)

    with fake_wandb(delay=0.2, refuse={bad}) as server:
        start = time.monotonic()
        result = sync(str(sweep), "--jobs", "4", cwd=tmp_path, env=server.env())
        took = time.monotonic() - start
    assert result.returncode == 1, result.stdout + result.stderr
    assert server.max_runs_at_once >= 2, took  # several runs uploading at the same time
    progress = [line for line in result.stdout.splitlines() if line.startswith("synced ")]
    assert [line.split(":")[0] for line in progress] == ["synced 1/4", "synced 2/4", "synced 3/4"]
    (error, summary) = result.stderr.splitlines()
    assert error.startswith(f"error: run {bad} ({jobs[2]}) failed: ") and "refused" in error
    assert summary == f"error: 1 of 4 runs failed: {bad}"
    assert [synced(j) for j in jobs] == [True, True, False, True]  # the others went on
    assert set(server.configs) == set(ids) - {bad}

    with fake_wandb() as server:  # once the server takes it, the failed run goes up too
        result = sync(str(sweep), cwd=tmp_path, env=server.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(synced(j) for j in jobs) and set(server.configs) == {bad}


def segment_pair(folder: Path) -> str:
    folder.mkdir(parents=True)
    first = segment(folder)
    time.sleep(1.1)  # the requeued segment starts a second later (folder names have seconds)
    assert segment(folder, first) == first
    return first


def test_jobs_below_one_is_refused_in_one_line(tmp_path):
    result = sync(str(tmp_path), "--jobs", "0", cwd=tmp_path, env={})
    assert result.returncode == 2
    assert result.stderr == "error: --jobs=0 is not allowed; allowed: 1 or more\n"


@pytest.mark.slow  # makes three offline runs
def test_a_wandb_sync_per_run_as_for_the_legacy_sync_runs_at_once(tmp_path, monkeypatch, capsys):
    # The legacy sync (no -n) gets one chain of calls per run; the installed wandb-core sync
    # runs the same path here with its own command lines.
    from mq.results.sync import Report, find_segments, upload_each

    jobs = [tmp_path / f"seed={i}" for i in range(3)]
    ids = offline_runs(jobs)
    runs = find_segments([tmp_path])
    with fake_wandb(delay=0.2, refuse={ids[1]}) as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        report = Report(runs, "synced")
        upload_each(runs, [], 3, dry_run=False, legacy=False, report=report)
    assert set(report.failed) == {ids[1]} and "refused" in report.failed[ids[1]]
    assert server.max_runs_at_once >= 2
    assert [synced(j) for j in jobs] == [True, False, True]
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("synced")]
    assert len(progress) == 2


def test_a_run_folder_without_its_wandb_file_is_a_failed_run_not_a_synced_one(tmp_path):
    folder = tmp_path / "wandb/offline-run-20261203_000000-abc123"  # wandb.init died early
    folder.mkdir(parents=True)
    result = sync(str(tmp_path), cwd=tmp_path, env={"WANDB_API_KEY": "a" * 40})
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"error: run abc123 ({tmp_path}) failed: no run-*.wandb file in {folder}",
        "error: 1 of 1 runs failed: abc123",
    ]
