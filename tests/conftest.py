"""Shared helpers: compose the Hydra config in-process, run launch.py as a user would."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mq.cli.resolvers import register_resolvers

register_resolvers()  # conf/'s ${mq.subdir:} etc., as launch.py does before Hydra starts
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = Path(os.environ.get("MQ_SHARED_DATA", ROOT.parent / "shared" / "data"))
# Small, fast settings for launch.py runs on fake data.
SMOKE = [
    "dataset=fake",
    "logger=none",
    "epochs=1",
    "batch_size=32",
    "limit_train_batches=3",
    "limit_test_batches=2",
    "progress=false",
]


def compose_config(overrides: list[str]) -> DictConfig:
    """The config launch.py would see, with ``${hydra:...}`` interpolations resolvable."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def task_config(overrides: list[str]) -> DictConfig:
    """The config the job function receives (compose_config without the ``hydra`` node)."""
    cfg = compose_config(overrides)
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def launch_env() -> dict[str, str]:
    # One thread per job: on a busy 2-core machine two torch threads per process thrash.
    # PYTHONPATH: jobs (SLURM ones too) import this checkout's mq, not another installed copy;
    # what PYTHONPATH held already (packages carried to a GPU machine, say) stays after it.
    return {
        **os.environ,
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def launch(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python launch.py ARGS`` in ``cwd`` (outputs/ goes there)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_launch(*args: str, cwd: Path) -> subprocess.Popen:
    """``python launch.py ARGS`` in ``cwd``, left running (stdout and stderr piped)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` written so far ([] before it exists); a last line
    still being written (no newline yet) is left for the next read."""
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def rows_in_epoch(run_dir: Path, epoch: int) -> int:
    """How many rows of ``run_dir``'s metrics.jsonl so far belong to ``epoch``."""
    return sum(row.get("epoch") == epoch for row in metrics_rows(run_dir))


def kill_when(
    args: Sequence[str], cwd: Path, condition: Callable[[], bool], timeout: float = 240
) -> None:
    """Start ``python launch.py ARGS`` in ``cwd`` and SIGKILL it (no handler runs, as after the
    OOM killer or a node failure) as soon as ``condition()`` holds; returns once it is dead.
    AssertionError, with the run's last output, if it exits or ``timeout`` seconds pass first."""
    # Output to a file, not a pipe: a pipe nobody reads until the end can fill and stall the run.
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), *args],
            cwd=cwd,
            env=launch_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                if proc.poll() is not None:
                    output.seek(0)
                    raise AssertionError(
                        f"launch.py exited ({proc.returncode}) before the kill condition held:"
                        f"\n{output.read()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"the kill condition did not hold within {timeout} s")
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA} (set MQ_SHARED_DATA)")
    return SHARED_DATA


def meta_net(name: str, **overrides: object):
    """The meta net conf/meta/<name>.yaml builds, with ``overrides`` for the keys it has (others
    are ignored, so one call fits every net); eager unless ``compile=True`` (torch.compile
    costs seconds per test)."""
    from hydra.utils import instantiate

    from mq.cli.conf import option_file

    node = option_file("meta", name).net
    overrides = {"compile": False, **overrides}
    return instantiate(node, **{k: v for k, v in overrides.items() if k in node})


@functools.cache
def _quant_config(quant: str) -> DictConfig:
    return compose_config([f"quant={quant}"])  # once per quantizer: composing takes ~0.1 s


def build_quantizer(quant: str, bits: int):
    """The quantizer ``quant=QUANT bits=BITS`` builds (None for quant=none); the ConfigError
    of its constructor where it refuses (not Hydra's wrapper)."""
    from hydra.utils import instantiate

    from mq.core.errors import find_config_error

    cfg = copy.deepcopy(_quant_config(quant))
    cfg.bits = bits  # what bits=BITS on the command line sets; quant's ${bits} reads it
    if not cfg.quant.get("_target_"):
        return None
    try:
        return instantiate(cfg.quant)
    except Exception as exc:
        error = find_config_error(exc)
        if error is None:
            raise
        raise error from exc


def allowed_bits(quant: str) -> range:
    """The bit widths ``quant``'s quantizer declares it takes (``bit_widths``); 1..8 for
    quant=none, which has none (validate() takes those)."""
    from hydra.utils import get_class

    target = _quant_config(quant).quant.get("_target_")
    return get_class(target).bit_widths if target else range(1, 9)


def lowest_bits(quant: str) -> int:
    """The lowest bit width that ``quant`` accepts (1 for most)."""
    return allowed_bits(quant)[0]
