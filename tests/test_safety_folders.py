"""Run and sweep folders: mq writes only into a folder it made or one that holds an mq run (or
sweep) it recognises, never through a link planted in it, never outside its sweep folder; a
refused or failed start writes nothing and says why in one line.

Every victim folder is compared byte for byte and mtime for mtime with a snapshot taken
before the refused command (tests/test_safety.py's helpers)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config, launch, launch_env
from omegaconf import OmegaConf
from PIL import Image
from test_safety import TINY, one_line_error, snapshot, summary, victim

from mq.core.errors import ConfigError

F = [*TINY, "meta=ste"]
RUN = "outputs/quantize/fake/resnet20-dorefa-w1-ste-sgd-s0"


def hydra_project(folder: Path) -> Path:
    """Another Hydra application's output folder."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("lr: 0.1\nmodel: bert\n")
    (folder / ".hydra" / "hydra.yaml").write_text("hydra:\n  run:\n    dir: .\n")
    (folder / "summary.json").write_text('{"f1": 0.91}\n')
    (folder / "model.bin").write_bytes(os.urandom(128))
    return folder


def look_alike(folder: Path) -> Path:
    """Files with mq's names that mq did not write."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text('{"status": "mine"}\n')
    (folder / "metrics.jsonl").write_text('{"loss": 1}\n')
    (folder / "results.txt").write_text("keep\n")
    return folder


def job_config(overrides: list[str]) -> dict:
    """What Hydra writes to .hydra/config.yaml for an mq job."""
    cfg = compose_config(overrides)
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra")
    return data


# ---------------------------------------------------------- 1. whose folder is it ----
@pytest.mark.parametrize("make", [hydra_project, pytest.param(look_alike, marks=pytest.mark.slow)])
def test_a_folder_that_holds_no_mq_run_is_refused_untouched(tmp_path, make):
    folder = make(tmp_path / "theirs")
    before = snapshot(folder)
    result = launch(*F, f"hydra.run.dir={folder}", cwd=tmp_path)
    one_line_error(result, f"run folder {folder} holds files that are not an mq run")
    assert snapshot(folder) == before


def test_mq_runs_are_recognised_by_what_mq_and_hydra_wrote(tmp_path):
    from mq.core.folders import is_mq_run, is_mq_sweep

    overrides = ["dataset=fake", "meta=ste"]
    record = tmp_path / "killed-before-training"  # Hydra's record of an mq job, a lock
    (record / ".hydra").mkdir(parents=True)
    (record / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(job_config(overrides)))
    assert is_mq_run(record)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "run.lock").write_text("pid 12 on node-3\n")
    assert is_mq_run(locked)
    from mq.job.guard import _task_config
    from mq.job.identity import result_config

    trained = tmp_path / "trained"  # config.yaml as mq writes it when training starts
    trained.mkdir()
    OmegaConf.save(
        OmegaConf.create(result_config(_task_config(compose_config(overrides)))),
        trained / "config.yaml",
    )
    assert is_mq_run(trained)
    for other in (hydra_project(tmp_path / "a"), look_alike(tmp_path / "b")):
        assert not is_mq_run(other)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "run.lock").write_text("my notes\n")
    assert not is_mq_run(tmp_path / "c")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"group": "adhoc-1", "launches": []}))
    assert is_mq_sweep(sweep) and not is_mq_sweep(tmp_path / "a")


# ------------------------------------------------------ 2-4. Hydra's own locations ----
# one fast; the other spellings of "outside" in the slow suite (a launch each)
@pytest.mark.parametrize(
    "subdir",
    [
        "../theirs",
        *(pytest.param(s, marks=pytest.mark.slow) for s in ("ABS", "x/../../theirs", "..")),
    ],
)
def test_output_subdir_must_be_a_folder_name_inside_the_run_folder(tmp_path, subdir):
    theirs = victim(tmp_path / "theirs")
    (theirs / "config.yaml").write_text("mine: 1\n")
    before = snapshot(tmp_path)
    value = str(theirs) if subdir == "ABS" else subdir
    result = launch(*F, f"hydra.output_subdir={value}", cwd=tmp_path)
    one_line_error(result, f"hydra.output_subdir={value!r} is not allowed", "one folder name")
    assert snapshot(tmp_path) == before  # no outputs/ either


@pytest.mark.slow  # a launch; a run folder of user files is the fast one
def test_a_sweep_folder_of_user_files_is_refused_untouched(tmp_path):
    theirs = victim(tmp_path / "theirs")
    (theirs / "multirun.yaml").write_text("mine: 1\n")
    before = snapshot(tmp_path)
    result = launch("-m", *F, "bits=1,2", f"hydra.sweep.dir={theirs}", cwd=tmp_path)
    one_line_error(result, f"sweep folder {theirs} holds files that are not an mq sweep")
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # launches; the output_subdir test keeps the folder check fast
def test_a_sweep_job_folder_must_be_inside_the_sweep_folder(tmp_path):
    result = launch("-m", *F, "bits=1", "hydra.sweep.subdir=../../../x", cwd=tmp_path)
    one_line_error(result, "is outside its sweep folder outputs/sweeps/")
    result = launch("-m", *F, "bits=1", "hydra.output_subdir=../../x", cwd=tmp_path)
    one_line_error(result, "hydra.output_subdir='../../x' is not allowed")
    assert not list(tmp_path.iterdir())  # no outputs/, no x/


# ------------------------------------------------------------- 5. dataset.cache ----
@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def test_only_a_cache_mq_wrote_is_replaced(tmp_path, tiny_tree):
    from mq.data.loaders import folder_loaders

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("not a cache\n")
    torch.save({"weight": torch.ones(3)}, theirs / "model.pt")  # a torch file, not a cache
    (theirs / "torn.pt").write_bytes(b"PK\x03\x04 torn")
    before = snapshot(theirs)
    for name in ("notes.txt", "model.pt", "torn.pt"):
        with pytest.raises(ConfigError, match="is an existing file that is not an mq image cache"):
            folder_loaders(str(tiny_tree), 16, "cpu", cache=str(theirs / name), progress=False)
    assert snapshot(theirs) == before
    ours = tmp_path / "cache.pt"
    folder_loaders(str(tiny_tree), 16, "cpu", cache=str(ours), progress=False)
    stale = torch.load(ours, weights_only=True)
    torch.save({**stale, "files": stale["files"][:-1]}, ours)  # an mq cache of other files
    folder_loaders(str(tiny_tree), 16, "cpu", cache=str(ours), progress=False)
    assert torch.load(ours, weights_only=True)["files"] == stale["files"]  # rewritten
    # and from the command line: one line, nothing written
    data = ["dataset=cifar10_folder", f"dataset.root={tiny_tree}"]
    cache = f"dataset.cache={theirs / 'notes.txt'}"
    args = [a for a in F if a != "dataset=fake"]
    result = launch(*args, *data, cache, "dataset.num_classes=2", cwd=tmp_path)
    one_line_error(result, f"{cache} is an existing file that is not an mq image cache")
    assert snapshot(theirs) == before and not (tmp_path / "outputs").exists()


# --------------------------------------------------------------- 6. planted links ----
@pytest.mark.slow  # seven launches
def test_links_planted_in_a_run_folder_are_refused_and_stale_tmp_removed(tmp_path):
    args = [*F, "keep_training_state=true"]  # resumable below
    first = launch(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / RUN
    theirs = victim(tmp_path / "theirs")
    for name in ("notes.txt", "log.txt", "data.jsonl"):
        (theirs / name).write_text(f"{name}: mine\n" * 20)
    (theirs / "config.yaml").write_text("mine: 1\n")
    before = snapshot(theirs)
    for name, target in [
        ("run.lock", theirs / "notes.txt"),
        ("metrics.jsonl", theirs / "data.jsonl"),
        (".hydra", theirs),
        ("launch.log", theirs / "log.txt"),
        ("config.yaml", theirs / "config.yaml"),
    ]:
        real = run / name
        real.rename(run / f"{name}.real")
        real.symlink_to(target)
        result = launch(*args, cwd=tmp_path)
        one_line_error(result, f"{name} is a symbolic link", "does not write through it")
        assert snapshot(theirs) == before, name
        real.unlink()
        (run / f"{name}.real").rename(real)
    # What a kill during a save leaves: mq's temporary files (removed), and files of the
    # user's that only look alike (kept).
    mq_tmp = ["checkpoint.pt.4242-0123abcd.tmp", "summary.json.77-deadbeef.tmp"]
    kept = ["notes.tmp", "checkpoint.pt.tmp", "metrics.jsonl.1-0123abcd.tmp"]
    for name in mq_tmp + kept:
        (run / name).write_bytes(b"partial")
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "failed"}))
    again = launch(*args, cwd=tmp_path)  # resumes the (finished) training, completes
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary(run)["status"] == "completed"
    names = {p.name for p in run.iterdir()}
    assert not names & set(mq_tmp) and set(kept) <= names


@pytest.mark.slow  # launches
def test_run_folder_that_is_a_file_or_whose_lock_is_a_folder(tmp_path):
    (tmp_path / "afile").write_text("mine\n")
    run = tmp_path / "run"
    (run / "run.lock").mkdir(parents=True)
    before = snapshot(tmp_path)
    result = launch(*F, f"hydra.run.dir={tmp_path / 'afile'}", cwd=tmp_path)
    one_line_error(result, "afile is a file, not a folder")
    result = launch(*F, f"hydra.run.dir={run}", cwd=tmp_path)
    one_line_error(result, "run.lock is not a regular file")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------- 7. full disk ----
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (mounting needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int) -> None:
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


@pytest.mark.slow  # a launch; the full disk during a save is the fast one
def test_full_disk_at_start_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    for leave in (0, 500 * 1024):  # full; some room, not enough for a run
        fill(small_disk, leave)
        before = snapshot(small_disk)
        result = launch(*F, f"hydra.run.dir={small_disk}/a/run", cwd=tmp_path)
        one_line_error(result, f"no space left in {small_disk}/a/run")
        assert snapshot(small_disk) == before
        (small_disk / "filler").unlink()


@pytest.mark.slow  # a launch; the full disk during a save is the fast one
def test_file_too_large_while_hydra_writes_is_one_line_and_leaves_nothing(tmp_path):
    def limit() -> None:  # Hydra's hydra.yaml (~3 KB) is the first file over 1 KB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    result = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *F, "hydra.run.dir=out/run"],
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    one_line_error(result, f"no space left in {tmp_path}/out/run (File too large")
    assert not (tmp_path / "out").exists()


def test_full_disk_during_a_save_is_one_line_and_the_run_says_failed(tmp_path, small_disk):
    # resnet56's checkpoint (~3.4 MB) does not fit on the 2 MB disk; the rest does.
    result = launch(*F, "model=resnet56", f"hydra.run.dir={small_disk}/run", cwd=tmp_path)
    one_line_error(result, f"no space left in {small_disk}/run", "No space left on device")
    run = small_disk / "run"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert not (run / "checkpoint.pt").exists()
    s = summary(run)
    assert s["status"] == "failed" and "No space left" in s["error"], s


# --------------------------------------------------------------------- 8. torchrun ----
@pytest.mark.slow  # two ranks, twice: ~30 s
def test_torchrun_refusal_is_printed_once_and_leaves_no_folder(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    for bad in (["batch_size=33"], ["dataset=cifar10", "dataset.root=nowhere"]):
        replaced = {b.split("=")[0] for b in bad}
        args = [a for a in F if a.split("=")[0] not in replaced]
        result = subprocess.run(
            [str(torchrun), "--nproc_per_node=2", str(ROOT / "launch.py"), *args, *bad],
            cwd=tmp_path,
            env=launch_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and bad[-1] in errors[0], result.stderr[-3000:]
        assert not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))


def test_a_run_folder_name_too_long_is_one_line_and_makes_no_folder(tmp_path):
    """The file system refuses the name (ENAMETOOLONG): one line, and not even outputs/ is left
    (the check used to raise inside Hydra's callback, which Hydra only warns about)."""
    result = launch(*F, f"hydra.run.dir=outputs/{'a' * 300}", cwd=tmp_path)
    one_line_error(result, "cannot be used: File name too long")
    assert not list(tmp_path.iterdir())
