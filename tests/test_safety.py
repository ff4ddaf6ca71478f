"""Nothing lost: bad input never deletes what mq did not create, one process per run folder,
restarts without duplicated rows, checkpoints that cannot run code, full disks, Ctrl-C.

Data-loss tests make a victim folder, run the bad command and compare the victim byte for byte
(and mtime for mtime) with a snapshot taken before."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE, compose_config, launch, start_launch
from omegaconf import OmegaConf, open_dict, read_write

from mq.core.checkpoint import load_checkpoint, save_checkpoint
from mq.job.loggers import MetricsFile

RUN = "outputs/quantize/fake/resnet20-dorefa-w1-multifc-sgd-s0"
TINY = [*SMOKE, "limit_train_batches=2", "limit_test_batches=1"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under ``folder``: content hash and mtime."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            out[rel + "/"] = ("dir", path.stat().st_mtime_ns)
        else:
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def victim(folder: Path, git: bool = False) -> Path:
    """A folder with files in it (and a fake ``.git``), that nothing may touch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sentinel.txt").write_text("do not delete\n")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    if git:
        (folder / ".git" / "objects").mkdir(parents=True, exist_ok=True)
        (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return folder


def fake_run(folder: Path, status: str = "completed") -> Path:
    """A run folder as a finished run leaves it (contents need not be real)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"status": status, "final_test_acc": 50.0}))
    (folder / "metrics.jsonl").write_text('{"kind": "step", "step": 0}\n')
    (folder / "checkpoint.pt").write_bytes(b"weights")
    (folder / "notes.txt").write_text("mine\n")
    return folder


def started_run(run_dir: Path, overrides: list[str]) -> Path:
    """A run folder as the start of training leaves it: mq's config.yaml of that run."""
    from mq.job.guard import _task_config
    from mq.job.identity import result_config

    run_dir.mkdir(parents=True, exist_ok=True)
    config = result_config(_task_config(compose_config(overrides)))
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    return run_dir


def one_line_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --------------------------------------------------------------------------- 1. deletion ----
def test_bad_value_with_run_dir_dot_keeps_the_clone(tmp_path):
    clone = victim(tmp_path / "clone", git=True)
    before = snapshot(clone)
    result = launch(*TINY, "bits=9", "hydra.run.dir=.", cwd=clone)
    one_line_error(result, "run folder .", "current directory")
    assert snapshot(clone) == before


@pytest.mark.slow  # a launch; test_safety_folders' foreign folders are the fast ones
def test_run_dir_that_is_a_git_checkout_elsewhere_is_refused(tmp_path):
    clone = victim(tmp_path / "clone", git=True)
    before = snapshot(clone)
    (tmp_path / "work").mkdir()
    result = launch(*TINY, "bits=9", f"hydra.run.dir={clone}", cwd=tmp_path / "work")
    one_line_error(result, "is a git checkout")
    assert snapshot(clone) == before


@pytest.mark.slow  # launches a run: in the slow suite, which CI runs too
def test_run_dir_with_foreign_files_is_refused(tmp_path):
    folder = victim(tmp_path / "docs")
    before = snapshot(folder)
    result = launch(*TINY, f"hydra.run.dir={folder}", cwd=tmp_path)
    one_line_error(result, "holds files that are not an mq run (sentinel.txt, sub)")
    assert snapshot(folder) == before


@pytest.mark.parametrize("name", [".", "..", "", "../escape", "a/b", "/abs", ".hidden", "a b"])
def test_run_and_sweep_names_are_one_plain_folder_name(name):
    from mq.core.errors import ConfigError
    from mq.job.rundir import check_name

    with pytest.raises(ConfigError, match="letters, digits"):
        check_name("run_name", name)
    for good in ("resnet20-dorefa-w1-multifc-sgd-s0", "bits=1,seed=2", "a.b+c_d"):
        check_name("run_name", good)


@pytest.mark.slow  # launches; the names themselves: the in-process test above
@pytest.mark.parametrize("name", [".", "../escape"])
def test_bad_run_name_is_refused_and_other_runs_survive(tmp_path, name):
    done = fake_run(tmp_path / "outputs/quantize/fake/done")
    before = snapshot(tmp_path)
    result = launch(*TINY, f"run_name={name}", "bits=9", cwd=tmp_path)
    one_line_error(result, f"run_name={name!r} is not allowed", "letters, digits")
    assert snapshot(tmp_path) == before and (done / "notes.txt").exists()


@pytest.mark.slow  # launches a run: in the slow suite, which CI runs too
def test_sweep_folder_that_is_the_current_directory_is_refused(tmp_path):
    clone = victim(tmp_path / "clone", git=True)
    before = snapshot(clone)
    result = launch("-m", *TINY, "bits=1,2", "hydra.sweep.dir=.", cwd=clone)
    assert (
        result.returncode == 2
        and "sweep folder . is or contains the current directory"
        in (result.stderr.splitlines()[-1])
    )
    assert snapshot(clone) == before


@pytest.mark.slow  # launches a run: in the slow suite, which CI runs too
def test_bad_sweep_name_is_refused(tmp_path):
    result = launch("-m", *TINY, "sweep_name=../x", "bits=1,2", cwd=tmp_path)
    assert result.returncode == 2 and "sweep_name='../x' is not allowed" in result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "x").exists()


@pytest.mark.slow  # a launch; test_launch's dataset.root=nowhere is the fast one
def test_data_error_removes_only_the_folders_it_created(tmp_path):
    outputs = victim(tmp_path / "outputs")
    before = snapshot(outputs)
    bad = ["dataset=cifar10", "dataset.root=nowhere"]
    result = launch(*[a for a in TINY if a != "dataset=fake"], *bad, cwd=tmp_path)
    one_line_error(result, "dataset.root=nowhere")
    assert snapshot(outputs) == before  # quantize/cifar10/<run> made and removed; outputs kept


@pytest.mark.slow  # launches a run: in the slow suite, which CI runs too
def test_data_error_in_an_existing_unfinished_run_folder_removes_nothing(tmp_path):
    # An earlier attempt that failed before training (Hydra's files), and the user's notes.
    run_dir = tmp_path / "outputs/quantize/cifar10/mine"
    (run_dir / ".hydra").mkdir(parents=True)
    job = compose_config(["dataset=cifar10", "run_name=mine"])  # Hydra's record of the job
    with read_write(job), open_dict(job):
        del job["hydra"]
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(job))
    (run_dir / "launch.log").write_text("an earlier attempt\n")
    (run_dir / "notes.txt").write_text("mine\n")
    before = snapshot(run_dir)
    bad = ["dataset=cifar10", "dataset.root=nowhere", "run_name=mine"]
    result = launch(*[a for a in TINY if a != "dataset=fake"], *bad, cwd=tmp_path)
    one_line_error(result, "dataset.root=nowhere")
    # Nothing removed: Hydra rewrote .hydra/ and appended to launch.log, as for any attempt.
    assert snapshot(run_dir)["notes.txt"] == before["notes.txt"]
    assert (run_dir / "launch.log").read_text().startswith("an earlier attempt\n")
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_sweep_whose_overrides_are_all_left_out_of_folder_names_is_refused(tmp_path):
    sweep = tmp_path / "outputs/sweeps/adhoc"
    fake_run(sweep / "bits=1")
    (sweep / "sweep.json").write_text('{"group": "adhoc-1"}\n')
    before = snapshot(tmp_path / "outputs")
    # every override is one that folder names leave out: the job's folder is the sweep's
    result = launch("-m", "dataset.root=/bad", "logger=none", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "would be the sweep folder" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path / "outputs") == before


# ------------------------------------------------------------------------------- 3. lock ----
def test_second_launch_of_a_locked_run_folder_refuses_in_one_line(tmp_path):
    from mq.job.rundir import LOCK_FILE
    from mq.job.runlock import RunLock

    run_dir = tmp_path / RUN
    run_dir.mkdir(parents=True)
    lock = RunLock(run_dir).acquire()  # as a running launch holds it
    try:
        result = launch(*TINY, cwd=tmp_path)
        one_line_error(result, str(Path(RUN)), f"in use by pid {os.getpid()} on")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # Hydra wrote nothing
    finally:
        lock.release()


@pytest.mark.slow
def test_two_simultaneous_launches_one_completes_one_refuses(tmp_path):
    # long enough (5 x 16 steps) for the second launch to start while the first still runs
    args = [*SMOKE, "epochs=5", "limit_train_batches=16", "log_every=1"]
    first = start_launch(*args, cwd=tmp_path)
    metrics = tmp_path / RUN / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.05)
    second = launch(*args, cwd=tmp_path)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    one_line_error(second, "is in use by pid")
    steps = [r["step"] for r in rows(tmp_path / RUN) if r["kind"] == "step"]
    assert steps == list(range(80))  # no duplicated rows
    assert not list((tmp_path / RUN).glob("*.tmp"))


def test_checkpoint_temporary_names_are_unique_and_removed_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"progress": {}, "x": torch.ones(2)}, path)
    names = []
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        names.extend(p.name for p in tmp_path.glob("*.tmp"))
        real_save(obj, f, *a, **k)  # a written temporary file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    for _ in range(2):
        with pytest.raises(OSError):
            save_checkpoint({"progress": {}, "x": torch.zeros(2)}, path)
    assert len(set(names)) == 2 and all(str(os.getpid()) in n for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["x"].tolist() == [1.0, 1.0]  # the previous version


# ------------------------------------------------------------------ 4. restarts, metrics ----
@pytest.mark.slow
def test_start_without_checkpoint_sets_the_old_rows_aside(tmp_path):
    first = launch(*TINY, "log_every=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / RUN
    old = (run_dir / "metrics.jsonl").read_bytes()
    # What a kill before the first checkpoint leaves: rows, no checkpoint, status running.
    (run_dir / "checkpoint.pt").unlink()
    (run_dir / "summary.json").write_text('{"status": "running"}')
    again = launch(*TINY, "log_every=1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [r["step"] for r in rows(run_dir) if r["kind"] == "step"]
    assert steps == [0, 1]  # not [0, 1, 0, 1]
    assert (run_dir / "metrics.jsonl.attempt-1").read_bytes() == old
    assert summary(run_dir)["status"] == "completed"


def test_resume_with_a_torn_metrics_file_keeps_complete_rows_and_no_nul(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"ste')  # the crash tore the last row
    metrics = MetricsFile(path, offset=200)  # the checkpoint saw more than survived
    metrics.write([{"step": 2}])
    metrics.close()
    data = path.read_bytes()
    assert b"\0" not in data
    assert [json.loads(line)["step"] for line in data.decode().splitlines()] == [0, 1, 2]
    assert "shorter than the checkpoint says" in caplog.text


@pytest.mark.slow
def test_repeat_of_a_diverged_run_changes_nothing(tmp_path):
    first = launch(*TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / RUN
    s = {**summary(run_dir), "status": "diverged"}  # as a run whose loss turned NaN ends
    (run_dir / "summary.json").write_text(json.dumps(s))
    before = snapshot(run_dir)
    again = launch(*TINY, cwd=tmp_path)
    assert again.returncode == 0 and "already ended as diverged" in again.stdout + again.stderr
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------- 5. checkpoints ----
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_checkpoint_cannot_run_code(tmp_path):
    run_dir = tmp_path / RUN
    started_run(run_dir, TINY)
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    (run_dir / "checkpoint.pt").write_bytes(pickle.dumps({"progress": payload}))
    result = launch(*TINY, cwd=tmp_path)
    one_line_error(result, "checkpoint.pt is unreadable", "move it away")
    assert not marker.exists()


@pytest.mark.slow  # launches runs: in the slow suite, which CI runs too
def test_corrupt_checkpoint_is_one_line_with_what_to_do(tmp_path):
    run_dir = tmp_path / RUN
    started_run(run_dir, TINY)
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    before = snapshot(run_dir)
    result = launch(*TINY, cwd=tmp_path)
    one_line_error(result, f"{RUN}/checkpoint.pt is unreadable", "move it away")
    assert snapshot(run_dir)["checkpoint.pt"] == before["checkpoint.pt"]


@pytest.mark.slow  # launches a run: in the slow suite, which CI runs too
def test_planted_pretrained_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    (tmp_path / "model.pth").write_bytes(pickle.dumps({"conv1.weight": payload}))
    result = launch(*TINY, f"model.pretrained={tmp_path / 'model.pth'}", cwd=tmp_path)
    one_line_error(result, "is not a readable checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize(
    "meta, optimizer", [("ste", "sgd"), ("multifc", "adam"), ("fcgrad", "sgdm"), ("lstmfc", "adam")]
)
def test_checkpoints_of_every_step_kind_load_with_weights_only(tmp_path, meta, optimizer):
    from hydra.utils import instantiate

    from mq.job.progress import rng_state
    from mq.models import build_model
    from mq.quant.layers import plain_state_dict, quantize_model

    extra = {"ste": [], "lstmfc": ["meta.net.hidden_size=8", "meta.net.compile=false"]}
    cfg = compose_config([f"meta={meta}", f"optimizer={optimizer}", *extra.get(meta, [])])
    model = quantize_model(build_model("resnet20", 10), instantiate(cfg.quant))
    step = instantiate(cfg.meta, model=model, optimizer=instantiate(cfg.optimizer))
    step.train_step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    state = {
        "model": plain_state_dict(model),
        "step_state": step.state_dict(),
        "progress": {"epoch": 1, "test_acc": [1.5], "partial": {}},
        "rng": rng_state(),
        "metrics_offset": 10,
    }
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    step.load_state_dict(loaded["step_state"])
    assert loaded["rng"]["python"] == state["rng"]["python"]


# ------------------------------------------------------------------------- 6. full disk ----
def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too large write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # launches runs: in the slow suite, which CI runs too
def test_full_disk_during_a_checkpoint_leaves_no_tmp_and_says_failed(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # A real write failure: no file of this process may exceed 256 KB; the checkpoint does.
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *TINY],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(256 * 1024),
    )
    assert result.returncode != 0
    run_dir = tmp_path / RUN
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    assert not (run_dir / "checkpoint.pt").exists()
    s = summary(run_dir)
    assert s["status"] == "failed" and "File too large" in s["error"], s


# ------------------------------------------------------------------------------ 7. eval ----
def test_checkpoint_tag_is_short_stable_and_path_safe(tmp_path):
    from mq.cli.dirname import checkpoint_tag

    run = tmp_path / "outputs/pretrain/fake/resnet20-fp-sgdm-s0"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"x")
    tag = checkpoint_tag(str(run))
    assert tag == checkpoint_tag(str(run / "checkpoint.pt"))  # folder or its file: one tag
    assert tag.startswith("resnet20-fp-sgdm-s0-") and len(tag) == len("resnet20-fp-sgdm-s0-") + 8
    assert checkpoint_tag("/some where/My Model (v2).pth").startswith("My_Model_v2-")
    assert checkpoint_tag(str(tmp_path / "a.pth")) != checkpoint_tag(str(tmp_path / "b.pth"))


@pytest.mark.slow
def test_eval_folders_name_the_checkpoint_and_never_overwrite(tmp_path):
    from mq.models import build_model

    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        torch.save(build_model("resnet20", 10).state_dict(), tmp_path / f"{name}.pth")
    args = [*TINY, "task=eval", "quant=none"]
    for name in ("a", "b"):
        result = launch(*args, f"model.pretrained={tmp_path / name}.pth", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "outputs/eval/fake").iterdir())
    assert [f.split("-")[-2] for f in folders] == ["a", "b"], folders
    first = tmp_path / "outputs/eval/fake" / folders[0]
    before = snapshot(first)
    again = launch(*args, f"model.pretrained={tmp_path}/a.pth", cwd=tmp_path)
    assert again.returncode == 0 and "already completed" in again.stdout + again.stderr
    assert snapshot(first) == before
    (tmp_path / "b.pth").replace(tmp_path / "a.pth")  # another checkpoint at the same path
    changed = launch(*args, f"model.pretrained={tmp_path}/a.pth", cwd=tmp_path)
    one_line_error(changed, "holds a run with another config (pretrained_sha256: ")
    assert snapshot(first) == before


# ------------------------------------------------------------- 8. repeats touch nothing ----
@pytest.mark.slow
def test_repeated_and_refused_commands_leave_a_completed_run_untouched(tmp_path):
    first = launch(*TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / RUN
    before = snapshot(run_dir)
    assert ".hydra/config.yaml" in before and "launch.log" in before
    again = launch(*TINY, cwd=tmp_path)
    assert again.returncode == 0 and "already completed" in again.stdout + again.stderr
    refused = launch(*TINY, "optimizer.lr=0.5", cwd=tmp_path)
    one_line_error(refused, "optimizer.lr: 0.001 -> 0.5")
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------- 9. Ctrl-C ----
@pytest.mark.slow
def test_ctrl_c_is_one_line_and_keeps_the_progress(tmp_path):
    args = [*SMOKE, "epochs=3", "limit_train_batches=4", "log_every=1"]
    proc = start_launch(*args, cwd=tmp_path)
    metrics = tmp_path / RUN / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        text = metrics.read_text() if metrics.exists() else ""
        complete = text[: text.rfind("\n") + 1]  # a line being written is not JSON yet
        rows = [json.loads(line) for line in complete.splitlines() if line]
        if any(row["kind"] == "epoch" for row in rows):  # the first epoch is complete
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    s = summary(tmp_path / RUN)
    assert s["status"] == "failed" and "SIGINT" in s["error"]
    assert s["epochs_completed"] >= 1 and len(s["test_acc"]) == s["epochs_completed"]
    resumed = launch(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(tmp_path / RUN)["status"] == "completed"


def test_ctrl_c_during_a_save_comes_after_the_file_is_complete(tmp_path):
    """A Ctrl-C that lands inside torch.save broke the zip writer ("unexpected pos") and lost
    the checkpoint; now the save completes and the KeyboardInterrupt follows it."""
    path = tmp_path / "checkpoint.pt"
    state = {"w": torch.arange(100_000, dtype=torch.float64)}

    class InterruptingDict(dict):
        def __reduce_ex__(self, protocol):  # pickled by torch.save, mid-write
            os.kill(os.getpid(), signal.SIGINT)
            return dict, (dict(self),)  # saved as a plain dict

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"state": InterruptingDict(state), "step": 7}, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded["step"] == 7 and torch.equal(loaded["state"]["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
