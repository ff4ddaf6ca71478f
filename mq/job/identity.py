"""Run identity: the part of a config that decides a run's result (``result_config``, saved as
the run folder's config.yaml), and whether a folder already holds this run, another one, or a
finished one. A relaunch of the same command finds its own folder and resumes or reports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mq.cli.conf import upgrade
from mq.core.checkpoint import read_json
from mq.core.errors import ConfigError, first_line
from mq.core.keys import VOLATILE, VOLATILE_DATASET


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus the keys that do not change results, plus what the task adds
    (task=eval: the checkpoint file's hash)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for key in VOLATILE:
        data.pop(key, None)
    for key in VOLATILE_DATASET:
        data.get("dataset", {}).pop(key, None)
    # The validation split and the calibration at their defaults are left out: a config that
    # does not name them describes the same run, so it resumes.
    if not data.get("dataset", {}).get("val_size"):
        for key in ("val_size", "split_seed"):
            data.get("dataset", {}).pop(key, None)
    if data.get("quant", {}).get("calibration") == "paper":
        data["quant"].pop("calibration")
    if not (data.get("act") or {}).get("_target_"):  # act=none: act_bits quantizes nothing
        data.pop("act_bits", None)
    return {**data, **instantiate(cfg.task).identity(cfg)}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old} -> {new}"]


def check_run_dir(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The existing summary when ``run_dir`` already holds this run; an error if it holds
    another one (we never overwrite or mix runs)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return None
    old = upgrade(read_run_config(saved))  # runs saved in an earlier layout of the config
    diff = _differences(old, result_config(cfg))
    if diff:
        raise ConfigError(
            f"{run_dir} holds a run with another config ({'; '.join(diff[:3])}); "
            "set run_name=NAME for a new run, or delete that directory"
        )
    return read_json(run_dir / "summary.json") or {}


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's config.yaml as a dict; a ConfigError when it is not one (broken YAML,
    not a mapping): that folder's run cannot be compared with this one, so it is not touched."""
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except YAMLError as exc:
        data = f"invalid YAML: {first_line(exc)}"
    except (OmegaConfBaseException, OSError, UnicodeDecodeError) as exc:
        data = first_line(exc)
    if not isinstance(data, dict):
        reason = data if isinstance(data, str) else "not a mapping of config keys"
        raise ConfigError(
            f"{path} cannot be read ({reason}); that folder is left as it is: "
            "set run_name=NAME for a new run, or move that folder away"
        )
    return data


def finished_message(run_dir: Path, summary: dict[str, Any]) -> str:
    status = summary.get("status")
    if status == "diverged":  # deterministic: the same config diverges again
        return (
            f"{run_dir} already ended as diverged after {summary.get('epochs_completed')} "
            "epochs; nothing to do (move that folder away to run it again)"
        )
    acc = summary.get("final_test_acc")
    return f"{run_dir} is already completed (test acc {acc}); nothing to do"
