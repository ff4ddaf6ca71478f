"""What conf/ offers, read from conf/ itself: the options of each config group, and the one
list of keys that do not change a run's result. Bench, report, tests and error messages ask
here instead of keeping their own copies. Free of torch (Hydra's plugin scan imports it)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mq.core.keys import VOLATILE, VOLATILE_DATASET

CONF = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    """The options of a config group, e.g. ``options("meta")`` -> ``["fcgrad", ..., "ste"]``
    (subfolders such as conf/meta/base/ hold shared parts, not options)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def groups() -> list[str]:
    """The config groups a run composes (not Hydra's own, not the +sweep presets)."""
    return sorted(
        p.name
        for p in CONF.iterdir()
        if p.is_dir() and not p.is_symlink() and p.name != "hydra" and any(p.glob("*.yaml"))
    )


def option_file(group: str, name: str) -> Any:
    """conf/<group>/<name>.yaml as written (its defaults list not merged in), a DictConfig."""
    from omegaconf import OmegaConf

    return OmegaConf.load(CONF / group / f"{name}.yaml")


def exclude_keys() -> list[str]:
    """Override keys left out of sweep folder names (conf/config.yaml reads them through the
    ``${mq.exclude_keys:}`` resolver): mq.core.keys's volatile keys, with the dataset's location
    keys under ``dataset.``, plus the launcher and the +sweep preset (the sweep folder says it).
    Not run_name: the resume check ignores it, but ``-m run_name=a,b`` must give two folders.
    A volatile key that is a node in conf/config.yaml (``distributed``) is listed by its leaves,
    since Hydra matches an override's whole key (``distributed.backend``)."""
    from omegaconf import OmegaConf

    main = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"), resolve=False)
    assert isinstance(main, dict)
    dataset = [f"dataset.{k}" for k in VOLATILE_DATASET]
    volatile: list[str] = []
    for key in VOLATILE:
        node = main.get(key)
        if isinstance(node, dict):
            volatile += [f"{key}.{child}" for child in node]
        elif key != "run_name":
            volatile.append(key)
    return [*volatile, "logger.mode", "hydra.launcher", "sweep", *dataset]


def upgrade(config: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (a run folder's config.yaml) in today's layout, so that the resume
    check and the report compare old and new runs key by key: each step below turns one earlier
    layout into today's and returns other configs as given."""
    for step in (_meta_net_by_target, _task_by_target, _model_by_target):
        config = step(config)
    return config


def _meta_net_by_target(config: dict[str, Any]) -> dict[str, Any]:
    """``meta.net: multifc`` next to ``meta.hidden_size`` ... -> the net built from its own
    ``_target_`` (``meta.net: {_target_: mq.meta.MultiFC, hidden_size: ...}``)."""
    meta = config.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("net"), str):
        return config
    config = copy.deepcopy(config)
    meta = config["meta"]
    name = meta.pop("net")
    if name not in options("meta"):
        return config
    from omegaconf import OmegaConf

    today = OmegaConf.to_container(option_file("meta", name).net)
    assert isinstance(today, dict)
    meta["net"] = {"_target_": today["_target_"]}
    meta["net"].update({k: meta.pop(k) for k in list(meta) if k in today and k != "_target_"})
    return config


def _task_by_target(config: dict[str, Any]) -> dict[str, Any]:
    """``task: {name: quantize}`` -> the task conf/task/quantize.yaml names by ``_target_``."""
    task = config.get("task")
    if not isinstance(task, dict) or "_target_" in task or task.get("name") not in options("task"):
        return config
    from omegaconf import OmegaConf

    option = OmegaConf.to_container(option_file("task", task["name"]))
    assert isinstance(option, dict)
    today = option.get("task", option)  # a _global_ option (pretrain, eval) nests its node
    return {**config, "task": {k: v for k, v in today.items() if k != "defaults"}}


# The one constructor of every model before each conf/model option named its own.
BUILD_MODEL = "mq.models.build_model"


def _model_by_target(config: dict[str, Any]) -> dict[str, Any]:
    """``model._target_: mq.models.build_model``, which chose the architecture by model.name ->
    the constructor conf/model's option of that name (else torchvision's) names, with the keys
    of that option the old layout lacked (a CIFAR ResNet's ``depth``)."""
    model = config.get("model")
    if not isinstance(model, dict) or model.get("_target_") != BUILD_MODEL:
        return config
    name = model.get("name")
    option = name if isinstance(name, str) and name in options("model") else "torchvision"
    from omegaconf import OmegaConf

    today = OmegaConf.to_container(option_file("model", option))
    assert isinstance(today, dict)
    added = {k: v for k, v in today.items() if k not in model and k != "defaults"}
    return {**config, "model": {**model, **added, "_target_": today["_target_"]}}
