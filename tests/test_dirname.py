"""Sweep folder names: Hydra's override_dirname for plain values (existing sweeps keep their
folders), a short stable `stem-hash` for path values (no nested folders, no 190-char names)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from mq.cli.dirname import override_dirname, short_value

PLAIN = [
    ["quant=dorefa", "bits=1", "meta=ste", "seed=0"],
    ["+sweep=table1", "model=resnet32", "dataset=cifar10", "optimizer=adam", "seed=3"],
    ["meta.net.hidden_size=50", "meta.net.nonlinearity=relu", "optimizer.lr=0.001", "bits=2"],
    ["dataset.root=/data/cifar", "device=cpu", "logger=none", "limit_train_batches=100"],
    ["model.pretrained=null", "run_name=abc", "epochs=2"],
]


def subdir(overrides: list[str]) -> tuple[str, str]:
    """(our sweep subdir, Hydra's own override_dirname) for a job with these overrides."""
    cfg = compose_config(overrides)
    return str(cfg.hydra.sweep.subdir), str(cfg.hydra.job.override_dirname)


@pytest.mark.parametrize("overrides", PLAIN, ids=lambda o: " ".join(o))
def test_plain_overrides_keep_hydras_folder_name(overrides):
    ours, hydras = subdir(overrides)
    assert ours == hydras  # a relaunch of an existing sweep finds its completed jobs


def test_a_path_value_becomes_one_short_stable_unique_folder(tmp_path):
    ckpt = "/work/shared/data/original-checkpoints/ResNet20-CIFAR10-pretrain.pth"
    ours, hydras = subdir(["bits=1", f"model.pretrained={ckpt}", "seed=0"])
    assert "/" in hydras  # Hydra's own name nests folders (hydra#1832)
    assert "/" not in ours and len(ours) < 80
    assert ours.startswith("bits=1,model.pretrained=ResNet20-CIFAR10-pretrain-")
    assert ours.endswith(",seed=0")
    assert subdir(["bits=1", f"model.pretrained={ckpt}", "seed=0"])[0] == ours  # stable
    other = ckpt.replace("/work/", "/scratch/")  # same file name, another file
    assert subdir(["bits=1", f"model.pretrained={other}", "seed=0"])[0] != ours
    run_dir = "outputs/pretrain/cifar10/resnet20-fp-sgdm-s0/"
    assert short_value(run_dir).startswith("resnet20-fp-sgdm-s0-")


def test_excluded_keys_and_separators_follow_hydras_options():
    options = OmegaConf.create({"kv_sep": "_", "item_sep": "__", "exclude_keys": ["seed"]})
    name = override_dirname(["b=/x/y.pt", "seed=1", "a=2"], options.exclude_keys, "__", "_")
    assert name == f"a_2__b_y-{short_value('/x/y.pt').split('-')[-1]}"
    assert Path(name).name == name


def test_folder_names_leave_out_mq_keys_volatile_keys_and_the_same_keys_as_before():
    from conftest import compose_config

    from mq.core.keys import VOLATILE

    excluded = set(compose_config([]).hydra.job.config.override_dirname.exclude_keys)
    # -m run_name=a,b: two folders; distributed is a node: its leaves are listed
    assert set(VOLATILE) - excluded == {"run_name", "distributed"}
    # the list conf/config.yaml held before it read mq.core.keys, so sweep folder names are
    # unchanged, plus dataset.decode (new with the ImageNet loader: where JPEGs are decoded)
    assert excluded == {
        *("device", "cudnn_benchmark", "progress", "log_every", "checkpoint_every_min"),
        *("keep_training_state", "logger", "logger.mode", "hydra.launcher", "sweep"),
        *("dataset.root", "dataset.cache", "dataset.download", "dataset.workers", "sweep_name"),
        "dataset.decode",
        *("distributed.backend", "distributed.timeout_s"),  # new with data-parallel runs
        "checkpoints_dir",  # where model.pretrained=original is read (the file is recorded)
    }


def test_a_name_over_the_limit_is_shortened_and_hashed():
    """Tuning trials with many keys: a name over MAX_NAME bytes keeps its first whole items and
    a hash of the whole name (the file system refuses names over 255 bytes); shorter names
    unchanged."""
    from mq.cli.dirname import MAX_NAME

    keys = [f"key{i}.with.a.long.name={i / 7:.6f}" for i in range(12)]
    name = override_dirname(keys, [])
    other = override_dirname([*keys[:-1], "key11.with.a.long.name=0"], [])
    assert len(name.encode()) <= MAX_NAME + 9 and name != other
    assert name.startswith("key0.with.a.long.name=0.000000,key1")
    assert override_dirname(keys[:2], []) == ",".join(sorted(keys[:2]))


def test_a_long_name_shows_each_value_whole_or_not_at_all():
    """A name over MAX_NAME never cuts a value into a string that reads as another number:
    long floats become their rounding plus a hash of the value, then whole items are left out
    (their count and a hash of the whole name take their place)."""
    from mq.cli.dirname import MAX_NAME

    trial = [
        "+sweep=fair_compare",
        "meta=multifc",
        "optimizer=sgdm",
        "model=resnet20",
        "dataset.val_size=5000",
        "optimizer.lr=0.0017906784086",
        "meta.lr=0.00061084512345",
        "optimizer.momentum=0.9234567",
        "optimizer.weight_decay=0.000123456789",
        "meta.net.hidden_size=100",
        "meta.net.num_layers=3",
        "lr_step=30",
        "quant.calibration=exact",
    ]
    name = override_dirname(trial, ["sweep"])
    assert len(name.encode()) <= MAX_NAME
    assert "optimizer.lr=1.79e-3~" in name and "meta.lr=6.11e-4~" in name, name
    assert "model=resnet20" in name and "0.0017" not in name
    whole = {o for o in trial}
    for item in name.split(","):
        key, _, value = item.partition("=")
        if item in whole or item.startswith("+"):
            continue
        assert "~" in value and float(value.split("~")[0]) > 0, item  # a rounding, labelled
    # many long keys: whole items are left out, never cut
    keys = [f"key{i}.with.a.long.name=v{i}x" for i in range(12)]
    name = override_dirname(keys, [])
    assert len(name.encode()) <= MAX_NAME
    *kept, tail = name.split(",")
    assert all(k in keys for k in kept) and tail.startswith(f"+{12 - len(kept)}~"), name
    assert name != override_dirname([*keys[:-1], "key11.with.a.long.name=0"], [])
    # a short name is Hydra's, whatever its values (existing sweeps keep their folders)
    assert override_dirname(["optimizer.lr=0.0017906784086"], []) == "optimizer.lr=0.0017906784086"
