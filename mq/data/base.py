"""The dataset contract and what every dataset's loaders share.

The contract, in two parts:

- ``DatasetFactory``: the function a conf/dataset/*.yaml names by ``_target_`` (exported by
  mq.data, where saved run configs point), what it receives and what it returns (``Loaders``).
- ``BatchSource``: one set of images in batches, what the training loop, evaluation and the
  validation split (mq.data.split) read from it.

Shared parts: ``LoaderArgs`` (the batching arguments, and Loaders of data held on the device),
class-stratified samples, per-epoch generators, a rank's share of a global batch, and
CIFAR-style data held on the device (DeviceLoader).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mq.core.errors import ConfigError

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


class BatchSource(ABC):
    """One set of images in batches: a dataset's training, test or validation images.

    A subclass sets these attributes:

    - ``num_samples``: the images in the whole source, all ranks together.
    - ``batch_size``: the batch size it was made with (a rank may yield its share of it:
      see the subclass).
    - ``train``: True for training (each epoch a new order and augmentation drawn from the
      seed and the epoch; the last partial batch dropped); False for evaluation (no
      augmentation, a fixed order, every image once).
    - ``labels``: the class of each of the ``num_samples`` images in index order (an int64
      tensor or a sequence of ints), the order ``subset`` indexes.

    and implements ``epoch`` and ``subset``. ``len()`` (batches per epoch on this rank),
    ``sample`` (a limited evaluation's images) and ``for_evaluation`` (the validation split's
    source) work from those; a subclass whose ranks share the work differently overrides them.
    """

    num_samples: int
    batch_size: int
    train: bool
    labels: Tensor | Sequence[int]

    @abstractmethod
    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start_batch`` to ``len(self) - 1`` of ``epoch``: (images, labels) on the
        training device, float (N, C, H, W) normalised and int64 (N,). The same epoch and
        start batch give the same batches, so a resumed run continues an epoch exactly."""

    @abstractmethod
    def subset(self, indices: Tensor) -> Self:
        """A source of the same kind and settings over the images at ``indices`` (positions
        in ``labels``, sorted), in that order."""

    def __len__(self) -> int:
        # Train drops the last partial batch so every step sees a full batch; test keeps it.
        if self.train:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def sample(self, batches: int) -> Self:
        """The first ``batches`` batches' worth of images as a fixed, class-stratified sample
        (see balanced_sample); the whole source when that is all of it. Test sets are stored
        class by class, so their first batches would hold one or two classes only."""
        n = batches * self.batch_size
        if n >= self.num_samples:
            return self
        return self.subset(balanced_sample(self.labels, n))

    def for_evaluation(self, batch_size: int) -> Self:
        """This source evaluated like a test set: no augmentation, a fixed order, batches of
        ``batch_size``, every image on every rank (rank 0 evaluates for all, mq.job.train)."""
        part = copy.copy(self)
        part.train, part.batch_size = False, batch_size
        return part


class Loaders(NamedTuple):
    """What a dataset factory returns."""

    train: BatchSource  # iterable per epoch, augmented
    test: BatchSource  # no augmentation, fixed order
    num_classes: int
    val: BatchSource | None = None  # held-out training images (mq.data.split), evaluated like test


class DatasetFactory(Protocol):
    """The function a conf/dataset/*.yaml names by ``_target_``.

    mq.job.run calls it through Hydra's ``instantiate`` with the group's keys (``root``,
    ``name``, ``num_classes``, ``test_batch_size``, ...; keys the group does not set keep the
    function's defaults) and the run's, all by keyword:

    - ``batch_size``: the global training batch; ``device``: where batches are yielded;
      ``seed``: the run's seed (training order and augmentation).
    - ``progress``: whether a slow step before training may show a bar on stderr (the folder
      decode does); a factory with nothing slow accepts and ignores it.
    - ``rank``, ``world_size``: passed only to a data-parallel run; the training source then
      yields this rank's share of each global batch, every rank reading the same permutation.
    - ``val_size``, ``split_seed``: the validation split. Every factory is wrapped in
      mq.data.split.with_split, which takes them and fills ``Loaders.val``.

    It returns ``Loaders``. Bad settings or unusable data raise ``ConfigError`` with one line
    that names the key (``dataset.root=...``), before anything is trained.
    """

    def __call__(
        self,
        *,
        batch_size: int,
        device: torch.device | str,
        seed: int = 0,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        **dataset: Any,
    ) -> Loaders: ...


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


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch) so that nearby pairs such as (0, 1) and (1, 0) get
    # unrelated streams; a plain sum or product would collide.
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


class DeviceLoader(BatchSource):
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
        self.shard = batch_share(batch_size, rank, world_size)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    def subset(self, indices: Tensor) -> DeviceLoader:
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
        g, n = epoch_generator(self.seed, epoch), self.num_samples
        order = torch.randperm(n, generator=g).to(self.device)
        dy, dx = torch.randint(0, 2 * PAD + 1, (2, n), generator=g).to(self.device)
        flip = torch.randint(0, 2, (n,), generator=g).bool().to(self.device)
        first, size = self.shard
        for i in range(start_batch, len(self)):
            sl = slice(i * bs + first, i * bs + first + size)  # this rank's part of batch i
            idx = order[sl]
            x = self._augment(self.images[idx], dy[sl], dx[sl], flip[sl])
            yield self._normalise(x), self.labels[idx]


def batch_share(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
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


@dataclass(frozen=True)
class LoaderArgs:
    """How a factory batches its images: the run's arguments of the factory contract
    (``batch_size``: the global batch, ``device``, ``seed``, this process's ``rank`` of
    ``world_size``) and the dataset's ``test_batch_size``."""

    batch_size: int
    device: torch.device | str
    seed: int = 0
    test_batch_size: int = 500
    rank: int = 0
    world_size: int = 1

    def on_device(
        self,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> Loaders:
        """Loaders of (uint8 NHWC images, labels) held on the device (DeviceLoader)."""
        # Only the training data is sharded: rank 0 evaluates the whole test set (mq.job.train).
        shard = {"rank": self.rank, "world_size": self.world_size}
        dev, seed = self.device, self.seed
        return Loaders(
            DeviceLoader(*train, self.batch_size, mean, std, True, dev, seed, **shard),
            DeviceLoader(*test, self.test_batch_size, mean, std, False, dev, seed),
            num_classes,
        )


def check_num_classes(num_classes: int | None) -> None:
    """``dataset.num_classes``: a positive integer (None: whatever the data holds)."""
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ConfigError(
            f"dataset.num_classes={num_classes} is not allowed; allowed: an integer >= 1"
        )


def check_classes(expected: int | None, found: int, where: str) -> None:
    """``dataset.num_classes`` (``expected``) against the ``found`` classes of ``where``."""
    check_num_classes(expected)
    if expected is not None and expected != found:
        raise ConfigError(
            f"dataset.num_classes={expected} but {where} has {found} classes; allowed: {found}"
        )
