"""Data loading: CIFAR held on the training device as uint8, ImageNet through a DataLoader.

CIFAR is small enough to keep whole on the device, so augmentation (random crop with zero padding
4, horizontal flip) and normalisation run batched there, as in airbench. That removes worker
processes and host-to-device copies from the inner loop, which dominate at CIFAR scale.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from mq.core.errors import ConfigError, first_line
from mq.core.folders import missing_dirs, remove_created
from mq.data.imagefolder import decode_all as _decode_all  # tests replace it here
from mq.data.imagefolder import read_cache, scan, write_cache
from mq.data.split import with_split  # dataset.val_size / split_seed: every loader below takes them

log = logging.getLogger(__name__)

# Normalisation constants from the original MetaQuant code.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5, 0.5, 0.5)
CIFAR100_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD = 4
# Seeds the choice of a limited evaluation's images: a constant, so every epoch and every run
# (whatever its seed) of one dataset is tested on the very same images.
SAMPLE_SEED = 0


class BatchSource(Protocol):
    num_samples: int
    batch_size: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]: ...

    def sample(self, batches: int) -> BatchSource: ...


class Loaders(NamedTuple):
    train: BatchSource  # iterable per epoch, augmented
    test: BatchSource  # no augmentation, fixed order
    num_classes: int
    val: BatchSource | None = None  # held-out training images (mq.data.split), evaluated like test


class _Batches:
    num_samples: int
    batch_size: int
    train: bool

    def __len__(self) -> int:
        # Train drops the last partial batch so every step sees a full batch; test keeps it.
        if self.train:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def sample(self, batches: int) -> BatchSource:
        """The first ``batches`` batches' worth of images as a fixed, class-stratified sample
        (see balanced_sample); the whole source when that is all of it. Test sets are stored
        class by class, so their first batches would hold one or two classes only."""
        n = batches * self.batch_size
        if n >= self.num_samples:
            return self
        return self._subset(balanced_sample(self._labels(), n))

    def _labels(self) -> Tensor:
        raise NotImplementedError

    def _subset(self, indices: Tensor) -> BatchSource:
        raise NotImplementedError


def balanced_sample(labels: Tensor, n: int, seed: int = SAMPLE_SEED) -> Tensor:
    """Sorted indices of ``n`` of ``labels``, stratified by class: each class gets its share of
    ``n`` in proportion to its share of ``labels`` (equal shares on a balanced set; the largest
    remainders round up), its images drawn at random by a generator seeded with ``seed`` alone."""
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    total = len(labels)
    if not 0 <= n <= total:
        raise ValueError(f"cannot sample {n} of {total} labels")
    counts = torch.bincount(labels)
    # Integer arithmetic, so the quotas add up to exactly n and never exceed a class's size.
    quota, rest = counts * n // total, counts * n % total
    short = n - int(quota.sum())
    g = torch.Generator().manual_seed(seed)
    # Ties (all classes, on a balanced set with more classes than images to spare: ImageNet
    # at 512 of 50,000) go to randomly chosen classes, not to the lowest class numbers.
    tiebreak = torch.randperm(len(counts), generator=g).tolist()
    ranked = sorted(range(len(counts)), key=lambda c: (-int(rest[c]), tiebreak[c]))
    for c in ranked[:short]:
        quota[c] += 1
    order = torch.randperm(total, generator=g)
    # Grouped by class, random within each class: the first quota[c] of class c are taken.
    order = order[torch.argsort(labels[order], stable=True)]
    grouped = labels[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(total) - starts[grouped]
    return order[rank < quota[grouped]].sort().values


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch) so that nearby pairs such as (0, 1) and (1, 0) get
    # unrelated streams; a plain sum or product would collide.
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


class DeviceLoader(_Batches):
    """Batches from a uint8 image tensor held on the device.

    images: uint8 (N, H, W, C), the layout of torchvision's CIFAR ``.data``; stored as
    (N, C, H, W). Train batches are randomly cropped back to (H, W) from the image zero-padded
    by 4 pixels (the same distribution as torchvision ``RandomCrop(H, padding=4)`` on the uint8
    image) and flipped horizontally with p=0.5.

    Data parallelism: ``batch_size`` is the global batch; rank ``rank`` of ``world_size`` gets
    its contiguous share of every global batch of the same (seed, epoch) permutation, so the
    ranks together see exactly the batches of a single process and resume at any batch.
    """

    def __init__(
        self,
        images: Tensor | np.ndarray,
        labels: Tensor | Sequence[int] | np.ndarray,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        device: torch.device | str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}"
            )
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if train and batch_size > len(images):
            raise ConfigError(
                f"batch_size={batch_size} is larger than the {len(images)} training images; "
                "lower the batch size"
            )
        self.device = torch.device(device)
        # A permuted view of contiguous NCHW data (as folder_loaders passes) needs no copy here.
        self.images = images.permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = labels.to(self.device)
        self.num_samples = len(images)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.shard = _shard(batch_size, rank, world_size)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    def _labels(self) -> Tensor:
        return self.labels

    def _subset(self, indices: Tensor) -> DeviceLoader:
        part = copy.copy(self)
        idx = indices.to(self.device)
        part.images, part.labels, part.num_samples = self.images[idx], self.labels[idx], len(idx)
        return part

    def _normalise(self, x: Tensor) -> Tensor:
        return x.float().mul_(self._scale).add_(self._shift)

    def _augment(self, x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
        n, c, h, w = x.shape
        padded = F.pad(x, (PAD, PAD, PAD, PAD)).view(n, c, -1)
        pw = w + 2 * PAD
        rows = dy[:, None] + torch.arange(h, device=x.device)
        ar = torch.arange(w, device=x.device)
        # Flipping the crop is reading its window right to left, so crop and flip are one gather.
        cols = torch.where(flip[:, None], dx[:, None] + (w - 1) - ar, dx[:, None] + ar)
        flat = (rows[:, :, None] * pw + cols[:, None, :]).view(n, 1, h * w).expand(-1, c, -1)
        return torch.gather(padded, 2, flat).view(n, c, h, w)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        bs = self.batch_size
        if not self.train:
            for i in range(start_batch, len(self)):
                sl = slice(i * bs, (i + 1) * bs)
                yield self._normalise(self.images[sl]), self.labels[sl]
            return
        # The whole epoch is drawn up front on a CPU generator, so batches do not depend on the
        # device and any start_batch continues the very same epoch.
        g, n = _epoch_generator(self.seed, epoch), self.num_samples
        order = torch.randperm(n, generator=g).to(self.device)
        dy, dx = torch.randint(0, 2 * PAD + 1, (2, n), generator=g).to(self.device)
        flip = torch.randint(0, 2, (n,), generator=g).bool().to(self.device)
        first, size = self.shard
        for i in range(start_batch, len(self)):
            sl = slice(i * bs + first, i * bs + first + size)  # this rank's part of batch i
            idx = order[sl]
            x = self._augment(self.images[idx], dy[sl], dx[sl], flip[sl])
            yield self._normalise(x), self.labels[idx]


def _shard(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, size) of rank's part of a global batch of ``batch_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} ranks")
    if batch_size % world_size:
        raise ConfigError(
            f"batch_size={batch_size} does not divide evenly across {world_size} ranks; "
            f"allowed: a multiple of {world_size} (batch_size is the global batch)"
        )
    size = batch_size // world_size
    return rank * size, size


def _device_loaders(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    batch_size: int,
    test_batch_size: int,
    device: torch.device | str,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    # Only the training data is sharded: rank 0 evaluates the whole test set (mq.job.train).
    shard = {"rank": rank, "world_size": world_size}
    return Loaders(
        DeviceLoader(*train, batch_size, mean, std, train=True, device=device, seed=seed, **shard),
        DeviceLoader(*test, test_batch_size, mean, std, train=False, device=device, seed=seed),
        num_classes,
    )


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
    progress: bool = True,  # accepted like every loader's; nothing here takes long enough
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """CIFAR-10/100 from torchvision's binary release, held on ``device``; ``rank`` of
    ``world_size``: this process's share of each global training batch (DeviceLoader)."""
    if name not in _CIFAR:
        raise ConfigError(f"dataset.name={name} is unknown; use one of {', '.join(_CIFAR)}")
    classes, folder, files, mean, std = _CIFAR[name]
    _check_classes(num_classes, classes, name)
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
    return _device_loaders(
        train, test, classes, batch_size, test_batch_size, device, seed, mean, std, rank, world_size
    )


def check_num_classes(num_classes: int | None) -> None:
    """``dataset.num_classes``: a positive integer (None: whatever the data holds)."""
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ConfigError(
            f"dataset.num_classes={num_classes} is not allowed; allowed: an integer >= 1"
        )


def _check_classes(expected: int | None, found: int, where: str) -> None:
    check_num_classes(expected)
    if expected is not None and expected != found:
        raise ConfigError(
            f"dataset.num_classes={expected} but {where} has {found} classes; allowed: {found}"
        )


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
    _check_classes(num_classes, len(classes), root)
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
    return _device_loaders(
        train,
        test,
        len(classes),
        batch_size,
        test_batch_size,
        device,
        seed,
        mean,
        std,
        rank,
        world_size,
    )


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
    progress: bool = True,  # accepted like every loader's; nothing here takes long enough
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
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    return _device_loaders(
        train,
        test,
        num_classes,
        batch_size,
        test_batch_size,
        device,
        seed,
        mean,
        std,
        rank,
        world_size,
    )


@with_split
def imagenet_loaders(
    root: str, batch_size: int, device: torch.device | str, **kw: object
) -> Loaders:
    """ImageNet: see mq.data.imagenet (JPEG decode in workers or on the GPU, sharded per rank)."""
    from mq.data.imagenet import imagenet_loaders as load  # mq.data.imagenet builds on this module

    return load(root, batch_size, device, **kw)  # type: ignore[arg-type]
