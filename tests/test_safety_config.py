"""No setting misread: every config key has a type (conf/'s schemas, mq/cli/schema.py), so a word
such as ``no`` is a boolean or a one-line error, never a truthy string; keys added with ``+`` or
removed with ``~``, interpolations that fail and values out of range end in one line, exit 2,
with nothing written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, compose_config, launch, launch_env, task_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_cli_errors import composition_error

from mq.core.errors import ConfigError, find_config_error
from mq.job.checks import check, validate
from mq.job.identity import check_run_dir

BOOL = "allowed: true, false (also yes, no, on, off, 1, 0)"


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("meta.lr_decay=no", "meta.lr_decay", False),
        ("meta.lr_decay=off", "meta.lr_decay", False),
        ("keep_training_state=off", "keep_training_state", False),
        ("keep_training_state=yes", "keep_training_state", True),
        ("progress=no", "progress", False),
        ("cudnn_benchmark=0", "cudnn_benchmark", False),
        ("dataset.download=on", "dataset.download", True),
        ("meta=lstmfc meta.net.compile=no", "meta.net.compile", False),
        ("bits=2", "bits", 2),
        ("optimizer.lr=1", "optimizer.lr", 1.0),
    ],
)
def test_words_for_booleans_and_numbers_become_their_type(override, key, value):
    cfg = compose_config(override.split())
    got = OmegaConf.select(cfg, key)
    assert got == value and type(got) is type(value)


def test_lr_decay_no_reaches_the_meta_step_as_false():
    import torch

    from mq.quant import quantize_model

    cfg = compose_config(["meta.lr_decay=no", "quant=dorefa"])
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), instantiate(cfg.quant))
    step = instantiate(cfg.meta, model=model, optimizer=instantiate(cfg.optimizer))
    assert step.lr_decay is False


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["meta.lr_decay=maybe"], f"meta.lr_decay=maybe is not allowed; {BOOL}"),
        (["keep_training_state=of"], f"keep_training_state=of is not allowed; {BOOL}"),
        (["progress=nope"], f"progress=nope is not allowed; {BOOL}"),
        (["bits=true"], "bits=true is not allowed; allowed: an integer"),
        (["epochs=ten"], "epochs=ten is not allowed; allowed: an integer"),
        (["optimizer.lr=fast"], "optimizer.lr=fast is not allowed; allowed: a number"),
        (["dataset=fake", "dataset.num_train=many"], "dataset.num_train=many is not allowed"),
        (["meta=lstmfc", "meta.net.compile=perhaps"], "meta.net.compile=perhaps is not allowed"),
        (["quant=bwn", "quant.per_filter=sometimes"], "quant.per_filter=sometimes is not"),
        (["logger.init_timeout=soon"], "logger.init_timeout=soon is not allowed"),
        (["distributed.timeout_s=x"], "distributed.timeout_s=x is not allowed"),
        (["bits=null"], "bits=null is not allowed; allowed: an integer"),
        (["meta.lr_decay=null"], f"meta.lr_decay=null is not allowed; {BOOL}"),
        (
            ["~meta.net.hidden_size"],
            "~meta.net.hidden_size is not allowed: meta.net.hidden_size is a required key",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(overrides, line):
    got = composition_error(overrides)
    assert got is not None and got.startswith(line) and "\n" not in got, got


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+foo=bar"], "foo is not a config key; allowed: bits, epochs, batch_size"),
        (["+meta.lr_decayy=1"], "meta.lr_decayy is not a config key; did you mean meta.lr_decay?"),
        (
            ["+meta.net.hidden_sizes=3"],
            "meta.net.hidden_sizes is not a config key; did you mean meta.net.hidden_size?",
        ),
        (
            ["dataset=fake", "+dataset.num_trian=5"],
            "dataset.num_trian is not a config key; did you mean dataset.num_train?",
        ),
        (
            ["model=resnet18", "+model.depth=20"],
            "model.depth is not a config key; allowed: name, num_classes",
        ),
        (["+task.mode=x"], "task.mode is not a config key; allowed: name"),
        (["~bits"], "~bits is not allowed: bits is a required key; allowed: bits=VALUE"),
        (["~meta"], "~meta is not allowed: meta is a required key"),
        (
            ["optimizer.lr=${oc.env:MQ_NO_SUCH_VARIABLE}"],
            "optimizer.lr=${oc.env:MQ_NO_SUCH_VARIABLE} cannot be resolved: "
            "\"Environment variable 'MQ_NO_SUCH_VARIABLE' not found\"",
        ),
        (["bits=${oc.env:HOME}"], "bits=${oc.env:HOME} cannot be resolved"),
        (["seed=99999999999999999999"], "seed=99999999999999999999 is not allowed; allowed: an"),
        (["dataset.num_classes=0"], "dataset.num_classes=0 is not allowed; allowed: an integer"),
        (["dataset.num_classes=-2"], "dataset.num_classes=-2 is not allowed"),
    ],
)
def test_added_removed_unresolvable_and_out_of_range_keys_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert str(info.value).startswith(message) and "\n" not in str(info.value), info.value


def test_an_optimizer_takes_the_other_arguments_of_its_constructor():
    """torch's optimizers check their own arguments: +optimizer.KEY stays open for them."""
    validate(compose_config(["optimizer=sgdm", "+optimizer.nesterov=true"]))
    with pytest.raises(Exception) as info:
        check(task_config(["+optimizer.lrr=1"]))
    assert "unexpected keyword argument 'lrr'" in str(find_config_error(info.value))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_classes=0"], "model.num_classes=0 is not allowed; allowed: an integer in"),
        (["model.num_classes=10000000"], "model.num_classes=10000000 is not allowed"),
        (
            ["meta.net.hidden_size=10000000"],
            "meta.net.hidden_size=10000000 is not allowed; allowed: an integer in 1..4096",
        ),
        (["meta=lstmfc", "meta.net.hidden_size=5000"], "meta.net.hidden_size=5000 is not"),
        (["meta=fcgrad", "meta.net.hidden_size=5000"], "meta.net.hidden_size=5000 is not"),
    ],
)
def test_sizes_beyond_what_memory_holds_are_refused_by_their_constructor(overrides, message):
    with pytest.raises(Exception) as info:
        check(task_config(overrides))
    error = find_config_error(info.value)
    assert error is not None and str(error).startswith(message), info.value


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["meta.net.hidden_size=0"],
            "meta.net.hidden_size=0 is not allowed; allowed: an integer in 1..4096",
        ),
        (
            ["meta=lstmfc", "meta.net.hidden_size=-1"],
            "meta.net.hidden_size=-1 is not allowed; allowed: an integer in 1..4096",
        ),
        (
            ["meta.net.num_layers=1"],
            "meta.net.num_layers=1 is not allowed; allowed: an integer >= 2",
        ),
        (
            ["meta=fcgrad", "meta.net.num_layers=0"],
            "meta.net.num_layers=0 is not allowed; allowed: an integer >= 2",
        ),
    ],
)
def test_meta_net_sizes_are_refused_by_its_constructor_in_one_line(overrides, message):
    with pytest.raises(Exception) as info:
        check(task_config(overrides))
    assert str(find_config_error(info.value)) == message


def test_constructors_own_their_checks():
    from mq.data.loaders import fake_loaders
    from mq.meta import LSTMFC, MultiFC
    from mq.models import build_model

    with pytest.raises(ConfigError, match="model.num_classes=0 is not allowed"):
        build_model("resnet20", 0)
    with pytest.raises(ConfigError, match="dataset.num_classes=0 is not allowed"):
        fake_loaders(batch_size=8, device="cpu", num_classes=0)
    for net in (MultiFC, LSTMFC):
        with pytest.raises(ConfigError, match="meta.net.hidden_size=10000000 is not allowed"):
            net(hidden_size=10_000_000)
        with pytest.raises(ConfigError, match="meta.net.hidden_size=2.5 is not allowed"):
            net(hidden_size=2.5)
    with pytest.raises(ConfigError, match="meta.net.num_layers=3.0 is not allowed"):
        MultiFC(num_layers=3.0)


@pytest.mark.parametrize("text", ["a: [1\n", "- just\n- a list\n", "\x00\x01binary"])
def test_an_unreadable_run_config_is_one_line(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        check_run_dir(task_config(["dataset=fake"]), tmp_path)
    assert str(info.value).startswith(f"{tmp_path}/config.yaml cannot be read (")
    assert "\n" not in str(info.value)


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


FAST = [*SMOKE, "meta=ste"]  # the default run_name: it interpolates bits, seed, ...


@pytest.mark.parametrize(
    "args, line",
    [
        (["~bits"], "error: ~bits is not allowed: bits is a required key; allowed: bits=VALUE"),
        (["bits=${oc.env:HOME}"], "error: bits=${oc.env:HOME} cannot be resolved: Value '"),
        (
            ["optimizer.lr=${oc.env:MQ_NO_SUCH_VARIABLE}"],
            "error: optimizer.lr=${oc.env:MQ_NO_SUCH_VARIABLE} cannot be resolved: "
            "\"Environment variable 'MQ_NO_SUCH_VARIABLE' not found\"",
        ),
        (
            ["meta=multifc", "meta.lr_decay=maybe"],
            f"error: meta.lr_decay=maybe is not allowed; {BOOL}",
        ),
        (["+foo=bar"], "error: foo is not a config key; allowed: bits, epochs, batch_size"),
        (["model.num_classes=0"], "error: model.num_classes=0 is not allowed; allowed: an integer"),
        pytest.param(
            ["seed=99999999999999999999"],
            "error: seed=99999999999999999999 is not allowed",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["meta=multifc", "meta.net.hidden_size=10000000"],
            "error: meta.net.hidden_size=1000",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_launch_refuses_in_one_line_with_exit_2_and_writes_nothing(tmp_path, args, line):
    result = launch(*FAST, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "outputs").exists()


def test_launch_on_a_run_folder_with_broken_yaml_leaves_it_as_it_was(tmp_path):
    folder = tmp_path / "outputs" / "quantize" / "fake" / "resnet20-dorefa-w1-ste-sgd-s0"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("bits: [1\n")
    (folder / "metrics.jsonl").write_text('{"kind": "step", "step": 0}\n')
    # The lock file an mq run leaves (what makes the folder an mq run despite its config).
    (folder / "run.lock").write_text("pid 4242 on node1\n")
    before = tree(tmp_path)
    result = launch(*FAST, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {folder.relative_to(tmp_path)}/config.yaml cannot")
    assert "invalid YAML" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert tree(tmp_path) == before


def test_schemas_are_registered_by_call_not_on_import_and_without_torch():
    """Hydra's plugin scan imports mq.cli.conf and mq.cli.resolvers: they must stay quick and
    must not fill the ConfigStore behind the caller's back; launch.py, jobs, mq.bench and tests
    call register."""
    code = (
        "import sys\n"
        "from hydra.core.config_store import ConfigStore\n"
        "import mq.cli.conf, mq.cli.resolvers, mq.cli.schema\n"
        "assert ConfigStore.instance().repo.get('schema') is None, 'registered on import'\n"
        "mq.cli.resolvers.register_resolvers()\n"
        "assert 'config.yaml' in ConfigStore.instance().repo['schema']\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=launch_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
