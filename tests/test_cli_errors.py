"""Bad command lines end in one line `error: ...`, exit code 2, nothing written: Hydra's own
composition errors (key typos, a preset without +, bad syntax), non-finite numbers, bad seeds,
and constructors refusing a value (with the constructor's reason, also in the sweep pre-check)."""

from __future__ import annotations

import pytest
from conftest import CONF, SMOKE, compose_config, launch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from mq.cli.conf import options
from mq.core.errors import ConfigError, find_config_error, hydra_error_line
from mq.job.checks import check, validate

METAS = ", ".join(options("meta"))  # conf/meta/'s options, as the errors list them


def composition_error(overrides: list[str]) -> str | None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(Exception) as info:
            compose("config", overrides=overrides)
    return hydra_error_line(info.value)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["bitz=1"], "bitz is not a config key; did you mean bits?"),
        (
            ["meta.net.hidden_sise=3"],
            "meta.net.hidden_sise is not a config key; did you mean meta.net.hidden_size?",
        ),
        (["optimizer.momentum=0.9"], "optimizer.momentum is not a config key; allowed: lr"),
        (["sweep=table1"], "sweep is a preset: use +sweep=table1"),
        (["hydra/launcher=foo"], "hydra/launcher=foo is not known; allowed: basic, local, slurm"),
        (["bits=[1"], "cannot parse the command line: no viable alternative at input '[1'"),
        (["meta=nosuch"], f"meta=nosuch is not known; allowed: {METAS}"),
        (["meta=ste,multifc"], "meta=ste,multifc is a sweep: add -m"),
        (["bits=range(1,3)"], "bits=range(1,3) is a sweep: add -m"),
        # conf/'s schemas (mq/cli/schema.py) type every key as Hydra composes
        (["seed=abc"], "seed=abc is not allowed; allowed: an integer"),
        (["seed=1.5"], "seed=1.5 is not allowed; allowed: an integer"),
        (
            ["checkpoint_every_min=abc"],
            "checkpoint_every_min=abc is not allowed; allowed: a number",
        ),
        (
            ["meta.net.hidden_size=abc"],
            "meta.net.hidden_size=abc is not allowed; allowed: an integer",
        ),
    ],
)
def test_hydra_composition_errors_become_one_line(overrides, line):
    got = composition_error(overrides)
    assert got is not None and got.startswith(line) and "\n" not in got


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=nan", "optimizer.lr=nan is not allowed; allowed: a finite number"),
        ("meta.lr=inf", "meta.lr=inf is not allowed; allowed: a finite number"),
        ("optimizer.lr=1e300", "optimizer.lr=1e+300 is not allowed"),  # inf in float32
        ("seed=-1", "seed=-1 is not allowed"),
    ],
)
def test_validate_rejects_non_finite_numbers_bad_seeds_and_sizes(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config([override]))
    assert str(info.value) == message or str(info.value).startswith(message)


def test_a_constructors_refusal_keeps_its_reason():
    cfg = compose_config(["optimizer=sgdm", "optimizer.momentum=-1"])
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    with pytest.raises(Exception) as info:
        check(task)
    error = find_config_error(info.value)  # what the sweep pre-check and launch.py print
    assert error is not None and "Invalid momentum value: -1" in str(error)


@pytest.mark.parametrize(
    "args, line",
    [
        (["bitz=1"], "error: bitz is not a config key; did you mean bits?"),
        (
            ["meta=nosuch"],
            f"error: meta=nosuch is not known; allowed: {METAS}",
        ),
        (
            ["-m", "meta=glob(nosuch*)"],
            f"error: meta=glob(nosuch*) selects nothing; allowed: {METAS}",
        ),
        (
            ["-m", "bits=interval(1,3)"],
            "error: bits=interval(1,3) is a continuous sweep; allowed in a grid: a,b, choice(), "
            "range(), glob()",
        ),
        (["seed=abc"], "error: seed=abc is not allowed; allowed: an integer"),
    ],
)
def test_launch_prints_one_line_exits_2_and_writes_nothing(tmp_path, args, line):
    result = launch(*args, *SMOKE, cwd=tmp_path)  # -m before the overrides
    assert result.returncode == 2 and result.stderr.strip() == line, result.stderr
    outputs = tmp_path / "outputs"
    assert not [p for p in outputs.rglob("*") if p.is_file()] if outputs.exists() else True
