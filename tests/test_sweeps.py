"""Sweeps without a cluster: presets, launcher configs, checking before launch, the ledger
(skip completed, rerun failed), diverged and failed jobs, SIGTERM, the wandb group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, compose_config, launch
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb_records import read_records

from mq.job.preempt import GracefulStop

# preset -> number of jobs (the paper's grids; see docs/sweeps.md)
PRESETS = {
    "table1": 240,
    "table2": 160,
    "table3": 8,
    "pretrain_cifar10": 3,
    "pretrain_cifar100": 2,
    "bits": 60,
    "meta_design": 108,
    "fair_baseline": 60,
    "fair_compare": 1,  # one grid point; its 9 groups are studies (hydra/sweeper=tune)
    "step_size": 24,
    "step_size_bwn": 12,
    # w1a32, w1a1 x every option of the meta group (glob(*)) x dorefa, bwn x sgd, adam x 5 seeds
    "estimators": 2 * len(list((ROOT / "conf" / "meta").glob("*.yaml"))) * 2 * 2 * 5,
}
FAST = [*SMOKE, "meta=ste"]  # STE: the fastest step


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny jobs, often side by side on few cores: one torch thread each (oversubscribed
    intra-op threads make a 1 s job take 30 s on a busy 2-core machine)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def config_loader() -> ConfigLoaderImpl:
    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))


def grid(preset: str) -> list[list[str]]:
    cfg = compose_config([f"+sweep={preset}"])
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    # with the config loader, as the sweeper parses them: glob(*) needs the group's options
    parser = OverridesParser.create(config_loader=config_loader())
    (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
    return jobs


def test_presets_exist_and_expand_to_the_documented_grids():
    assert {p.stem for p in (ROOT / "sweeps").glob("*.yaml")} == set(PRESETS)
    docs = (ROOT / "docs" / "sweeps.md").read_text()
    for preset, size in PRESETS.items():
        assert len(grid(preset)) == size, preset
        assert f"+sweep={preset}" in docs, preset


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_point_composes_and_checks(preset):
    from mq.job.checks import check

    covered: set[str] = set()
    for job in grid(preset):
        if covered.issuperset(job):
            continue  # every option of every key is checked in some job, not every job
        covered.update(job)
        cfg = compose_config([f"+sweep={preset}", *job, "model.pretrained=null"])
        assert cfg.sweep_name == preset
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        check(task)
    if preset == "table3":
        # the paper's ImageNet protocol (Sec. 5.1): alpha 1e-4, gamma 1e-3, /10 at 10 and 20
        assert (cfg.epochs, cfg.lr_step, cfg.optimizer.lr, cfg.batch_size) == (30, 10, 1e-4, 128)
        assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.dataset.num_classes == 1000
        assert compose_config(["+sweep=table3", "meta=multifc"]).meta.lr == 1e-3  # gamma
    if preset == "estimators":  # every meta option, W1A32 as Table 1 and the binary papers' W1A1
        w1a32 = compose_config(["+sweep=estimators", "+sweep/precision=w1a32"])
        assert (w1a32.model.name, w1a32.model.pretrained) == ("resnet20", "original")
        assert w1a32.act._target_ is None  # act=none
        w1a1 = compose_config(["+sweep=estimators", "+sweep/precision=w1a1"])
        assert (w1a1.model.name, w1a1.act._target_.rsplit(".")[-1]) == (
            "resnet20_irnet",
            "SignActivation",
        )
        assert w1a1.model.pretrained == "outputs/pretrain/cifar10/resnet20_irnet-fp-sgdm-s0"
        assert {o.split("=")[1] for o in covered if o.startswith("meta=")} == {
            p.stem for p in (ROOT / "conf" / "meta").glob("*.yaml")
        }


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_launcher_configs_extend_the_submitit_plugin(launcher):
    cfg = compose_config([f"hydra/launcher={launcher}", "sweep_name=s"]).hydra.launcher
    assert cfg._target_ == f"hydra_plugins.mq_plugins.{launcher.capitalize()}Launcher"
    assert cfg.submitit_folder == "outputs/sweeps/s/.submitit/%j"  # one per sweep
    if launcher == "slurm":
        assert cfg.max_num_timeout > 0 and cfg.gpus_per_node == 1 and cfg.signal_delay_s > 0
        assert "additional_parameters" in cfg and "array_parallelism" in cfg
    default = compose_config(["sweep_name=s"]).hydra
    assert default.launcher._target_.endswith("BasicLauncher")
    assert default.sweep.dir == "outputs/sweeps/s"  # no timestamp: relaunches find it


@pytest.mark.slow  # launches runs: in the slow suite, which CI runs too
def test_one_bad_point_fails_the_launch_with_one_line_and_runs_nothing(tmp_path):
    result = launch("-m", *FAST, "quant=dorefa,bwn", "bits=1,2", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: sweep point ") and "quant=bwn bits=2" in lines[-1]
    assert "bits=2 is not allowed for bwn" in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
    twins = launch("-m", *FAST, "logger=none,wandb", cwd=tmp_path)  # logger: not in folder names
    assert twins.returncode == 2 and "would share the folder" in twins.stderr.splitlines()[-1]


def test_failed_and_diverged_jobs_do_not_stop_the_sweep_and_relaunch_reruns_only_failed(tmp_path):
    (tmp_path / "garbage.pth").write_text("not a checkpoint")  # fails in the job, not the check
    args = [
        "-m",
        *FAST,
        "sweep_name=s",
        "model.pretrained=null,./garbage.pth",  # a path: one folder garbage-HASH, not nested
        "optimizer.lr=1e-3,1e38",  # finite (validate() rejects inf): the weights overflow
    ]
    first = launch(*args, cwd=tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    sweep = tmp_path / "outputs/sweeps/s"
    runs = {d.name: summary(d) for d in sweep.iterdir() if (d / "summary.json").exists()}
    statuses = sorted((s["status"], "garbage" in name, "e+38" in name) for name, s in runs.items())
    assert statuses == [
        ("completed", False, False),
        ("diverged", False, True),
        ("failed", True, False),
        ("failed", True, True),
    ]
    failed = [s for s in runs.values() if s["status"] == "failed"]
    assert all("garbage.pth is not a readable checkpoint" in s["error"] for s in failed)
    assert first.stderr.count("failed: ") == 2 and "2 of 4 jobs failed" in first.stderr
    group = json.loads((sweep / "sweep.json").read_text())["group"]
    assert group.startswith("s-")

    (done,) = [sweep / n for n, s in runs.items() if s["status"] == "completed"]
    (tmp_path / "garbage.pth").unlink()
    (tmp_path / "garbage.pth").symlink_to(done / "checkpoint.pt")  # now a good checkpoint
    wandb = ["logger=wandb", "logger.mode=offline"]  # not part of the job's folder name
    again = launch(*args, *wandb, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 jobs (1 completed, 1 diverged, 2 failed); launching 2, skipping 2" in again.stdout
    after = {d.name: summary(d)["status"] for d in sweep.iterdir() if d.is_dir()}
    assert sorted(after.values()) == ["completed", "completed", "diverged", "diverged"]
    assert json.loads((sweep / "sweep.json").read_text())["group"] == group

    # The wandb run of a sweep job: the sweep's group, named by its overrides.
    rerun = next(sweep / n for n in after if "garbage" in n and "e+38" not in n)
    (run_file,) = rerun.glob("wandb/offline-run-*/run-*.wandb")
    (run,) = [r.run for r in read_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.display_name, run.job_type) == (group, rerun.name, "ste")
    assert "model.pretrained=garbage-" in rerun.name and "/" not in run.display_name
    assert {"resnet20", "fake", "dorefa", "w1", "ste", "sgd"} <= set(run.tags)


@pytest.mark.slow  # three launches; test_launch's kill-and-resume covers resume in the fast suite
def test_sigterm_checkpoints_marks_failed_and_the_rerun_matches(tmp_path):
    args = [*FAST, "limit_train_batches=8", "log_every=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), *args, f"run_name={name}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("ref", "cut")  # the uninterrupted reference runs alongside
    }
    proc = procs["cut"]
    run_dir = tmp_path / "outputs/quantize/fake/cut"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # mid-epoch 0: no epoch checkpoint yet
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    s = summary(run_dir)
    assert s["status"] == "failed" and "SIGTERM" in s["error"]
    assert (run_dir / "checkpoint.pt").exists()
    assert procs["ref"].wait(timeout=120) == 0
    resumed = launch(*args, "run_name=cut", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch 1, batch " in resumed.stdout
    assert summary(run_dir)["status"] == "completed"
    want = summary(tmp_path / "outputs/quantize/fake/ref")["test_acc"]
    assert summary(run_dir)["test_acc"] == pytest.approx(want, rel=1e-5)
    got = [json.loads(x) for x in metrics.read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "outputs/quantize/fake/ref/metrics.jsonl").open()]
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref, strict=True):
        for key in ("loss", "test_acc"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)


def test_preemption_signal_is_handed_to_its_owner_after_the_checkpoint():
    calls = []
    usr2 = signal.SIGUSR2
    previous = signal.signal(usr2, lambda signum, frame: calls.append(signum))
    try:
        with GracefulStop(on_terminate=calls.append) as stop:
            assert stop.poll() is None
            os.kill(os.getpid(), usr2)
            time.sleep(0.01)  # the handler runs in the main thread, between bytecodes
            assert calls == []  # nothing happens in the handler: the loop checkpoints first
            assert stop.poll() == "stop" and calls == ["interrupted by SIGUSR2"]
            assert stop.poll() is None
            stop.hand_over()  # submitit's handler: requeue and exit
            assert calls[-1] == usr2
    finally:
        signal.signal(usr2, previous)


CONCURRENT_INIT = """
import sys, time
from pathlib import Path
from mq.job.loggers import WandbLogger
t = time.monotonic()
logger = WandbLogger(mode="offline", group="g", init_timeout=60, name=sys.argv[1],
                     run_dir=Path(sys.argv[2]), run_config={"i": sys.argv[1]})
logger.log([{"kind": "step", "step": 0, "loss": 1.0}])
logger.finish()
print(logger.run_id, round(time.monotonic() - t, 1))
"""


def test_concurrent_offline_wandb_inits_do_not_hang(tmp_path):
    env = {**os.environ, "WANDB_SILENT": "true"}
    procs = []
    for i in range(4):
        (tmp_path / str(i)).mkdir()
        cmd = [sys.executable, "-c", CONCURRENT_INIT, str(i), str(tmp_path / str(i))]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    ids = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        ids.append(out.split()[0])
    assert len(set(ids)) == 4 and "None" not in ids
