"""The dataset factories (the contract: mq.data.base.DatasetFactory): CIFAR, image folders and
fake data held on the training device as uint8, ImageNet through a DataLoader.

CIFAR is small enough to keep whole on the device, so augmentation (random crop with zero padding
4, horizontal flip) and normalisation run batched there, as in airbench. That removes worker
processes and host-to-device copies from the inner loop, which dominate at CIFAR scale.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision

from mq.core.errors import ConfigError, first_line
from mq.core.folders import missing_dirs, remove_created
from mq.data.base import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    LoaderArgs,
    Loaders,
    check_classes,
    check_num_classes,
)
from mq.data.imagefolder import decode_all as _decode_all  # tests replace it here
from mq.data.imagefolder import read_cache, scan, write_cache
from mq.data.split import with_split  # dataset.val_size / split_seed: every loader below takes them

log = logging.getLogger(__name__)

_C10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_CIFAR = {  # name: (classes, folder, files it needs, mean, std)
    "cifar10": (10, "cifar-10-batches-py", _C10_FILES, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (100, "cifar-100-python", ["train", "test"], CIFAR100_MEAN, CIFAR100_STD),
}


@with_split
def cifar_loaders(
    name: str,
    root: str,
    download: bool,
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    test_batch_size: int = 500,
    num_classes: int | None = None,
    progress: bool = True,  # the factory contract's (mq.data.base); nothing here is slow
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """CIFAR-10/100 from torchvision's binary release, held on ``device``; ``rank`` of
    ``world_size``: this process's share of each global training batch (DeviceLoader)."""
    if name not in _CIFAR:
        raise ConfigError(f"dataset.name={name} is unknown; use one of {', '.join(_CIFAR)}")
    classes, folder, files, mean, std = _CIFAR[name]
    check_classes(num_classes, classes, name)
    label = f"CIFAR-{classes}"
    if not download and not all((Path(root) / folder / f).is_file() for f in files):
        raise ConfigError(
            f"dataset.root={root} has no {label} data (expected {folder}/); set "
            "dataset.download=true or point dataset.root at a folder that has it"
        )
    cls = getattr(torchvision.datasets, name.upper())
    created = missing_dirs(Path(root))  # what a failed download must not leave behind
    try:
        sets = [cls(root, train=t, download=download) for t in (True, False)]
    except (OSError, RuntimeError) as e:
        # Download failures and md5 mismatches both land here; torchvision's text is multi-line.
        # A folder this call made holds only its (partial) download: take both away again.
        remove_created(Path(root), created, extra=(cls.filename,))
        raise ConfigError(f"dataset.root={root}: could not load {label} ({first_line(e)})") from e
    train, test = ((torch.from_numpy(s.data), torch.tensor(s.targets)) for s in sets)
    args = LoaderArgs(batch_size, device, seed, test_batch_size, rank, world_size)
    return args.on_device(train, test, classes, mean, std)


@with_split
def folder_loaders(
    root: str,
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    test_batch_size: int = 500,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    cache: str | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """32x32 images in ``root/{train,test}/<class>/*.{png,jpg}``, decoded once, held on device.

    ``cache``: optional file for the decoded tensors; reused when it lists the same files and
    classes, rewritten otherwise (an unreadable one too). ``progress``: a bar on stderr while
    decoding.
    """
    for split in ("train", "test"):
        if not (Path(root) / split).is_dir():
            raise ConfigError(
                f"dataset.root={root} has no {split}/ folder; point dataset.root at a folder "
                "with train/<class>/ and test/<class>/ images"
            )
    classes, train_paths, train_y = scan(Path(root) / "train")
    test_classes, test_paths, test_y = scan(Path(root) / "test")
    if test_classes != classes:
        raise ConfigError(f"dataset.root={root}: train/ and test/ have different class folders")
    check_classes(num_classes, len(classes), root)
    # The key is relative so a moved tree still hits its cache.
    key = [os.path.relpath(p, root) for p in train_paths + test_paths]
    data = None if cache is None else read_cache(cache, key, classes)
    if data is None:
        # The one slow step of a folder dataset (about a minute for CIFAR-10 on 2 cores).
        log.info(
            "decoding %d images under %s%s",
            len(key),
            root,
            "" if cache is None else f" (once: kept in dataset.cache={cache})",
        )
        images = _decode_all(train_paths + test_paths, progress)
        n = len(train_paths)
        data = {"files": key, "classes": classes, "train": images[:n], "test": images[n:]}
        if cache is not None:
            write_cache(cache, data)
    # ImageFolder order is class by class; DeviceLoader takes NHWC, which here is a free view.
    train = (data["train"].permute(0, 2, 3, 1), torch.tensor(train_y))
    test = (data["test"].permute(0, 2, 3, 1), torch.tensor(test_y))
    args = LoaderArgs(batch_size, device, seed, test_batch_size, rank, world_size)
    return args.on_device(train, test, len(classes), mean, std)


@with_split
def fake_loaders(
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    num_train: int = 512,
    num_test: int = 256,
    num_classes: int = 10,
    image_size: int = 32,
    test_batch_size: int = 500,
    progress: bool = True,  # the factory contract's (mq.data.base); nothing here is slow
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """Random images from torchvision's FakeData, deterministic for a given seed."""
    check_num_classes(num_classes)
    # FakeData seeds image i with i + random_offset; spacing the offsets keeps train, test and
    # different seeds from sharing images.
    offset = seed * 1_000_003
    tensors = []
    for size, off in ((num_train, offset), (num_test, offset + num_train)):
        shape = (3, image_size, image_size)
        ds = torchvision.datasets.FakeData(size, shape, num_classes, random_offset=off)
        pairs = [ds[i] for i in range(size)]
        images = torch.from_numpy(np.stack([np.asarray(img) for img, _ in pairs]))
        tensors.append((images, torch.tensor([y for _, y in pairs])))
    train, test = tensors
    args = LoaderArgs(batch_size, device, seed, test_batch_size, rank, world_size)
    return args.on_device(train, test, num_classes, CIFAR10_MEAN, CIFAR10_STD)


@with_split
def imagenet_loaders(
    root: str, batch_size: int, device: torch.device | str, **kw: object
) -> Loaders:
    """ImageNet: see mq.data.imagenet (JPEG decode in workers or on the GPU, sharded per rank)."""
    from mq.data.imagenet import (
        imagenet_loaders as load,  # torchvision's v2 transforms: only for ImageNet
    )

    return load(root, batch_size, device, **kw)  # type: ignore[arg-type]
