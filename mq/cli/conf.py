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


def option_node(group: str, name: str) -> dict[str, Any]:
    """The node conf/<group>/<name>.yaml gives its group, as a dict without its defaults list
    (an option packaged ``_global_``, like task=pretrain, nests it under the group's key)."""
    from omegaconf import OmegaConf

    option = OmegaConf.to_container(option_file(group, name))
    assert isinstance(option, dict)
    node = option.get(group, option) if isinstance(option.get(group), dict) else option
    return {k: v for k, v in node.items() if k != "defaults"}


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
    for step in (_meta_net_by_target, _task_by_target, _model_by_target, _act_group):
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
    today = option_node("meta", name)["net"]
    meta["net"] = {"_target_": today["_target_"]}
    meta["net"].update({k: meta.pop(k) for k in list(meta) if k in today and k != "_target_"})
    return config


def _task_by_target(config: dict[str, Any]) -> dict[str, Any]:
    """``task: {name: quantize}`` -> the task conf/task/quantize.yaml names by ``_target_``."""
    task = config.get("task")
    if not isinstance(task, dict) or "_target_" in task or task.get("name") not in options("task"):
        return config
    return {**config, "task": option_node("task", task["name"])}


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
    today = option_node("model", option)
    added = {k: v for k, v in today.items() if k not in model}
    return {**config, "model": {**model, **added, "_target_": today["_target_"]}}


def _act_group(config: dict[str, Any]) -> dict[str, Any]:
    """A run from before the act group (no ``act`` node) quantized no activations: it is the
    run of act=none (whose ``act_bits`` mq.job.identity leaves out, as it changes nothing)."""
    if "act" in config or "quant" not in config:
        return config
    return {**config, "act": option_node("act", "none")}
