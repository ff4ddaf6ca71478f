"""`python launch.py --help` is written from conf/: every option of every group and every key,
with its comment; shell completion answers from the same config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config, launch_env
from omegaconf import OmegaConf

from mq.cli.conf import groups, options
from mq.cli.helptext import keys, text
from mq.core.keys import flatten

HELP = text()


@pytest.mark.parametrize("group", groups())
def test_help_lists_every_option_and_its_keys(group):
    for option in options(group):
        assert f" {option} " in HELP or f"*{option} " in HELP, option  # * marks the default
        cfg = compose_config([f"{group}={option}"])
        node = OmegaConf.to_container(cfg[group], resolve=False) if group in cfg else {}
        for key in flatten(node) if isinstance(node, dict) else {}:
            if not key.split(".")[-1].startswith("_"):
                assert f"{group}.{key}=" in HELP, f"{group}={option}: {group}.{key}"


def test_help_gives_every_top_level_key_its_default_and_comment():
    cfg = compose_config([])
    listed = {k: (v, c) for k, v, c in keys(ROOT / "conf" / "config.yaml")}
    # plain keys and the leaves of plain nodes (distributed.backend), not config groups
    top = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("hydra", *groups())}
    plain = list(flatten(top))
    # config.yaml also sets keys inside groups (dataset.val_size): checked below, not here
    assert sorted(plain) == sorted(k for k in listed if k.split(".")[0] not in groups())
    for key, (value, comment) in listed.items():
        assert comment, f"{key} has no comment in conf/config.yaml"
        assert f"  {key}={value}" in HELP.replace("$$", "$")


def test_launch_help_and_shell_completion_run_from_conf():
    env = launch_env()
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "meta.net.hidden_size=100" in result.stdout, result.stderr
    assert "--shell-completion" in result.stdout
    env = {**env, "COMP_LINE": "python launch.py meta="}
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "-sc", "query=bash"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert result.stdout.split() == [f"meta={m}" for m in options("meta")], result.stderr
