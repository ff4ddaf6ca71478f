"""mq's Hydra extension: light at start-up, packaged, and pinned to the upstream code it copies.

mq.sweep.launcher re-implements hydra-submitit-launcher's ``launch()`` (and runs its ``__call__``,
``checkpoint`` and ``setup`` as they are); mq.sweep.sweeper re-implements Hydra's basic sweeper's
grid expansion on the public ``Sweeper`` interface. When one of those upstream functions changes, a
hash below fails: read the new upstream code, carry the change over, then update the hash."""

from __future__ import annotations

import hashlib
import inspect
import subprocess
import sys

import pytest
import tomllib
from conftest import ROOT, launch_env
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from mq.sweep.sweeper import grid

UPSTREAM = {  # function: sha256 of its source, first 16 hex digits
    BaseSubmititLauncher.launch: "546875669010f80d",  # copied by mq.sweep.launcher.TolerantLauncher
    BaseSubmititLauncher.__call__: "22ce7b022ecb59e5",  # what each job runs (SubmititJob)
    BaseSubmititLauncher.checkpoint: "2c95102ffc42d753",  # requeue on preemption
    BaseSubmititLauncher.setup: "f0607f2aed707a71",  # called by TolerantLauncher.launch
    BasicSweeper.split_arguments: "1b56f58380a27a88",  # the grid mq.sweep.sweeper.grid reproduces
    BasicSweeper.setup: "09346fa4c18d9997",  # re-implemented by mq.sweep.sweeper.Sweeper.setup
}


@pytest.mark.parametrize("function", UPSTREAM, ids=lambda f: f.__qualname__)
def test_the_upstream_code_mq_copies_is_unchanged(function):
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == UPSTREAM[function], (
        f"{function.__module__}.{function.__qualname__} changed upstream: compare it with "
        "mq/sweep/launcher.py and mq/sweep/sweeper.py, carry the change over, then update this hash"
    )


def test_the_pinned_version_is_the_installed_one():
    from importlib.metadata import version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("hydra-submitit-launcher")]
    assert (
        pin.split("#")[0].strip()
        == f"hydra-submitit-launcher=={version('hydra-submitit-launcher')}"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["a=1,2", "b=x,y"],
        ["a=range(1,4)", "b=choice(p,q)", "c=3"],
        ["meta=glob(*)", "a=1"],
        ["a=1,2", "a=3"],
    ],
)
def test_grid_matches_hydras_basic_sweeper(args):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(args)
    (expected,) = BasicSweeper.split_arguments(overrides, None)
    assert grid(overrides) == expected


def test_the_plugin_is_packaged_by_pyproject():
    from setuptools import find_namespace_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert find["find"].get("namespaces", True)
    packages = find_namespace_packages(str(ROOT), include=find["find"]["include"])
    assert "hydra_plugins.mq_plugins" in packages and "mq.meta" in packages


def test_launch_help_imports_no_torch_nor_training_code():
    # Hydra imports every hydra_plugins module at start-up: mq's must stay light.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "launch.py"), "--help"],
        capture_output=True,
        text=True,
        env=launch_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if "|" in line}
    heavy = {
        m for m in modules if m.split(".")[0] == "torch" or m in ("mq.job.run", "mq.job.train")
    }
    # Hydra's plugin scan loads hydra_plugins.mq_plugins without an importtime line of its
    # own; mq.sweep.sweeper (which only the plugin imports) shows that the scan ran.
    assert "mq.sweep.sweeper" in modules and not heavy
