"""ImageNet input at GPU speed: JPEG files decoded by libjpeg-turbo (torchvision.io) in DataLoader
workers, or by nvJPEG on the GPU in batches; each rank reads its shard of one permutation.

Why not PIL's ImageFolder: the worker spends its time in PIL's decode, PIL's resize and the
float conversion of ToTensor/Normalize. Here a worker decodes with torchvision.io, crops before
it resizes (resizing only the crop), resizes uint8 with torch's vectorised antialiased kernel
and ships uint8 (a quarter of float32's bytes through shared memory and PCIe); normalisation is
one multiply-add per batch on the training device. docs/imagenet.md has the measurements.

Augmentation is a pure function of (seed, epoch, image position in the epoch): each image gets
its own seed drawn with the epoch's permutation, so a run resumed at any batch sees exactly the
crops and flips of an uninterrupted one, whichever worker (or the GPU) handles the image.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from mq.core.errors import ConfigError, first_line
from mq.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchSource,
    Loaders,
    batch_share,
    check_classes,
    epoch_generator,
)

EXTENSIONS = (".jpg", ".jpeg", ".JPEG", ".JPG")
SIZE, RESIZE = 224, 256  # train crop / val: resize the short side to 256, center crop 224
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults


def list_folder(folder: Path, where: str) -> tuple[list[str], list[str], list[int]]:
    """(classes, files, labels) of ``folder/<class>/*.jpg`` in ImageFolder's order (classes and
    files sorted), without opening any image; an unreadable or empty folder is a ConfigError."""
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        files, labels = [], []
        for label, cls in enumerate(classes):
            names = sorted(e.name for e in os.scandir(folder / cls) if e.name.endswith(EXTENSIONS))
            files += [str(folder / cls / n) for n in names]
            labels += [label] * len(names)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {folder} ({first_line(e)})") from e
    if not files:
        raise ConfigError(f"{where}: {folder} has no <class>/*.jpg images; allowed: JPEG files")
    return classes, files, labels


def crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop: torchvision's RandomResizedCrop.get_params
    (10 tries at scale 0.08-1 and log-uniform ratio 3/4-4/3, then a clamped center crop), drawn
    from ``rng`` instead of torch's global generator."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def transform(img: Tensor, train: bool, aug_seed: int) -> Tensor:
    """uint8 (3, H, W) -> uint8 (3, 224, 224): random-resized crop and flip (train), or resize
    256 and center crop 224 (val). Works on CPU and CUDA tensors alike."""
    # CUDA's antialiased resize takes floating point only; the CPU's uint8 kernel is the fast one
    x = img.float() if img.is_cuda else img
    if train:
        rng = random.Random(aug_seed)
        top, left, h, w = crop_box(img.shape[-2], img.shape[-1], rng)
        x = TF.resized_crop(x, top, left, h, w, [SIZE, SIZE], antialias=True)
        if rng.random() < 0.5:
            x = x.flip(-1)
    else:
        x = TF.center_crop(TF.resize(x, [RESIZE], antialias=True), [SIZE, SIZE])
    return x.round_().clamp_(0, 255).to(torch.uint8) if x.is_floating_point() else x


class JpegFiles(torch.utils.data.Dataset):
    """Item ``(index, aug_seed)`` -> (uint8 image, label). ``decode=False``: the file's bytes
    (a uint8 1-D tensor) for a batched decode on the GPU, plus the aug seed."""

    def __init__(self, files: list[str], labels: list[int], train: bool, decode: bool) -> None:
        self.files, self.labels, self.train, self.decode = files, labels, train, decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int] | tuple[Tensor, int, int]:
        index, aug_seed = key
        data = read_file(self.files[index])
        if not self.decode:
            return data, self.labels[index], aug_seed
        try:
            img = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as e:  # a PNG or CMYK file named .JPEG: torchvision's general path
            from torchvision.io import decode_image

            try:
                img = decode_image(data, mode=ImageReadMode.RGB)
            except RuntimeError:
                raise RuntimeError(f"cannot decode {self.files[index]}: {first_line(e)}") from e
        return transform(img, self.train, aug_seed), self.labels[index]


def _encoded_batch(items: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch of encoded files as one flat byte tensor and sizes: a worker hands each tensor
    over in its own shared-memory segment and file descriptor, and 128 of them per batch
    exhaust descriptors (the DataLoader then hangs)."""
    data = torch.cat([d for d, _, _ in items])
    sizes = torch.tensor([len(d) for d, _, _ in items])
    return data, sizes, torch.tensor([y for _, y, _ in items]), torch.tensor([s for *_, s in items])


def gpu_decode(encoded: list[Tensor], device: torch.device) -> list[Tensor]:
    """nvJPEG batched decode of a list of encoded JPEGs; an image nvJPEG refuses (CMYK, a PNG
    named .JPEG) is decoded on the CPU and copied, so one odd file does not stop an epoch."""
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        from torchvision.io import decode_image

        out = []
        for data in encoded:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
        return out


class ImageNetLoader(BatchSource):
    """BatchSource over JPEG files for rank ``rank`` of ``world_size``.

    Train: every epoch draws one permutation of all files from (seed, epoch); rank r takes
    positions r, r + world_size, ... of it, cut to the same count on every rank (so all ranks
    run the same number of steps). Val: rank r takes files r, r + world_size, ... in order
    (every image exactly once over all ranks). ``decode``: "cpu" (libjpeg-turbo in ``workers``
    processes) or "cuda" (workers read bytes; nvJPEG decodes each batch on ``device``).
    ``num_samples`` counts the whole set (all ranks); ``len()`` is this rank's batches.
    """

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        batch_size: int,
        train: bool,
        device: torch.device | str,
        seed: int = 0,
        workers: int = 8,
        decode: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is not allowed for world_size={world_size}")
        self.files, self.labels = files, labels
        self.num_samples, self.batch_size, self.train = len(files), batch_size, train
        self.device, self.seed, self.workers = torch.device(device), seed, workers
        self.decode, self.rank, self.world_size = decode, rank, world_size
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the training device
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)

    def shard_size(self) -> int:
        if self.train:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        n = self.shard_size()
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def sample(self, batches: int) -> ImageNetLoader:
        """``batches`` batches per rank: a class-stratified sample of the whole set, sharded."""
        return super().sample(batches * self.world_size)

    def subset(self, indices: Tensor) -> ImageNetLoader:
        part = copy.copy(self)
        idx = indices.tolist()
        part.files, part.labels = [self.files[i] for i in idx], [self.labels[i] for i in idx]
        part.num_samples = len(idx)
        return part

    def for_evaluation(self, batch_size: int) -> ImageNetLoader:
        part = super().for_evaluation(batch_size)
        part.rank, part.world_size = 0, 1
        return part

    def order(self, epoch: int) -> tuple[Tensor, Tensor]:
        """This rank's (file indices, augmentation seeds) for ``epoch``, in batch order."""
        g = epoch_generator(self.seed, epoch)
        n = self.num_samples
        if not self.train:
            return torch.arange(self.rank, n, self.world_size), torch.zeros(0, dtype=torch.int64)
        perm = torch.randperm(n, generator=g)
        seeds = torch.randint(0, 2**62, (n,), generator=g)  # per position, same on every rank
        take = slice(self.rank, self.world_size * self.shard_size(), self.world_size)
        return perm[take], seeds[take]

    def _normalise(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True).to(memory_format=torch.channels_last)
        return x.float().mul_(self._scale).add_(self._shift)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        index, seeds = self.order(epoch)
        if not self.train:
            seeds = torch.zeros_like(index)
        bs, on_gpu = self.batch_size, self.decode == "cuda"
        keys = list(zip(index.tolist(), seeds.tolist(), strict=True))
        batches = [keys[i * bs : (i + 1) * bs] for i in range(start_batch, len(self))]
        loader = torch.utils.data.DataLoader(
            JpegFiles(self.files, self.labels, self.train, decode=not on_gpu),
            batch_sampler=batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda" and not on_gpu,
            collate_fn=_encoded_batch if on_gpu else None,
            # a worker's torch threads would fight the other workers for the cores
            worker_init_fn=one_thread,
        )
        for batch in loader:
            if on_gpu:
                data, sizes, y, aug = batch
                images = gpu_decode(list(data.split(sizes.tolist())), self.device)
                x = torch.stack(
                    [
                        transform(im, self.train, s)
                        for im, s in zip(images, aug.tolist(), strict=True)
                    ]
                )
            else:
                x, y = batch
            yield self._normalise(x), y.to(self.device, non_blocking=True)


def one_thread(_: int) -> None:
    """A DataLoader worker's init: one torch thread."""
    torch.set_num_threads(1)


def resolve_decode(decode: str, device: torch.device) -> str:
    if decode == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if decode not in ("cpu", "cuda"):
        raise ConfigError(f"dataset.decode={decode} is not allowed; allowed: auto, cpu, cuda")
    if decode == "cuda" and device.type != "cuda":
        raise ConfigError(f"dataset.decode=cuda needs device=cuda (the device is {device})")
    return decode


def imagenet_loaders(
    root: str,
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    workers: int = 8,
    test_batch_size: int = 256,
    num_classes: int | None = None,
    progress: bool = True,  # the factory contract's (mq.data.base); batches stream, nothing slow
    decode: str = "auto",
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """ImageNet from ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: train
    random-resized crop 224 and flip, val resize 256 and center crop 224. ``batch_size`` is the
    global batch, as for every mq loader: ``rank`` reads batch_size / world_size images of each
    step from its shard (see ImageNetLoader); the val loader is whole on every rank, since rank 0
    evaluates for all (mq.job.train). ``decode``: auto (cuda on a CUDA device)."""
    for split in ("train", "val"):
        if not (Path(root) / split).is_dir():
            raise ConfigError(
                f"dataset.root={root} has no {split}/ folder; point dataset.root at an ImageNet "
                "folder with train/<class>/ and val/<class>/"
            )
    where = f"dataset.root={root}"
    classes, train_files, train_y = list_folder(Path(root) / "train", where)
    val_classes, val_files, val_y = list_folder(Path(root) / "val", where)
    if val_classes != classes:
        raise ConfigError(f"{where}: train/ and val/ have different class folders")
    check_classes(num_classes, len(classes), root)
    device = torch.device(device)
    how = resolve_decode(decode, device)
    per_rank = batch_share(batch_size, rank, world_size)[1]
    common = dict(device=device, seed=seed, workers=workers, decode=how)
    train = ImageNetLoader(
        train_files, train_y, per_rank, True, rank=rank, world_size=world_size, **common
    )
    if not 1 <= per_rank <= train.shard_size():
        raise ConfigError(
            f"batch_size={batch_size} is not allowed; allowed: {world_size} to "
            f"{train.shard_size() * world_size} (the training images)"
        )
    val = ImageNetLoader(val_files, val_y, test_batch_size, False, **common)
    return Loaders(train, val, len(classes))
