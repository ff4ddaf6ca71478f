"""The validation split: ``dataset.val_size`` training images held out for model selection.

The held-out images are a class-stratified sample (mq.data.base.balanced_sample) drawn by a
generator seeded with ``dataset.split_seed`` alone, never the run's seed: every run of a study
and every seed of the final runs train on the same images and are validated on the same
others. They are evaluated like the test set (no augmentation, fixed order,
mq.job.evaluation.evaluate), so hyperparameters can be chosen without ever reading the test set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mq.core.errors import ConfigError
from mq.data.base import Loaders, balanced_sample

SPLIT_KEYS = ("val_size", "split_seed")
# Training images per dataset choice when the config alone says it (checked before a sweep is
# submitted; folder datasets are counted when their folder is readable here).
KNOWN_TRAIN = {"cifar10": 50_000, "cifar100": 50_000}


def split_options(dataset: DictConfig | dict[str, Any]) -> tuple[int, int]:
    """(val_size, split_seed) of a dataset config; (0, 0) when it has none."""
    val_size = dataset.get("val_size", 0) or 0
    seed = dataset.get("split_seed", 0)
    for key, value in (("val_size", val_size), ("split_seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"dataset.{key}={value} is not allowed; allowed: an integer >= 0")
    return val_size, seed


def train_size(dataset: DictConfig) -> int | None:
    """Training images the config implies, when that can be known without loading them."""
    if dataset.get("num_train") is not None:  # fake data
        return int(dataset.num_train)
    name = dataset.get("name")
    if name in KNOWN_TRAIN:
        return KNOWN_TRAIN[name]
    root = dataset.get("root")
    if root and (Path(str(root)) / "train").is_dir():  # an image folder readable from here
        return sum(1 for p in (Path(str(root)) / "train").glob("*/*") if p.is_file())
    return None


def check_split(dataset: DictConfig, batch_size: int) -> None:
    """val_size must leave at least one training batch (checked before a job is submitted)."""
    val_size, _ = split_options(dataset)
    total = train_size(dataset) if val_size else None
    if total is not None:
        check_val_size(val_size, total, batch_size)


def check_val_size(val_size: int, total: int, batch_size: int) -> None:
    """The held-out images must leave at least one batch of ``total`` training images."""
    if val_size > total - batch_size:
        raise ConfigError(
            f"dataset.val_size={val_size} is too large: the training set has {total} images "
            f"and batch_size={batch_size}; allowed: 0..{max(total - batch_size, 0)}"
        )


def with_split(loader: Callable[..., Loaders]) -> Callable[..., Loaders]:
    """A dataset loader (mq.data) that also takes ``val_size`` and ``split_seed`` and holds
    the validation images out of what it loaded: the hook every dataset group goes through."""

    @functools.wraps(loader)
    def wrapped(*args: Any, val_size: int = 0, split_seed: int = 0, **kwargs: Any) -> Loaders:
        val_size, split_seed = split_options({"val_size": val_size, "split_seed": split_seed})
        return hold_out(loader(*args, **kwargs), val_size, split_seed)

    return wrapped


def val_indices(labels: torch.Tensor, val_size: int, split_seed: int) -> torch.Tensor:
    """Sorted indices of the held-out images among ``labels`` (the training set's)."""
    return balanced_sample(labels, val_size, seed=split_seed)


def hold_out(data: Loaders, val_size: int, split_seed: int) -> Loaders:
    """``data`` with ``val_size`` training images moved into a validation source, through the
    BatchSource contract alone (``labels``, ``subset``, ``for_evaluation``)."""
    if val_size == 0:
        return data
    train = data.train
    total = train.num_samples
    check_val_size(val_size, total, train.batch_size)
    held = val_indices(torch.as_tensor(train.labels), val_size, split_seed)
    keep = torch.ones(total, dtype=torch.bool)
    keep[held] = False
    kept = keep.nonzero().squeeze(1)
    # Evaluated like the test set: no augmentation (ImageNet: resize and center crop), fixed
    # order, the test batch size, whole on every rank.
    val = train.subset(held).for_evaluation(data.test.batch_size)
    return Loaders(train.subset(kept), data.test, data.num_classes, val)


__all__ = ["check_split", "hold_out", "split_options", "val_indices", "with_split"]
