"""Image folders for mq.data: listing, decoding (threads, a progress bar) and the decoded-tensor
cache that spares the next run the decode."""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file
from tqdm import tqdm

from mq.core.errors import ConfigError, first_line

log = logging.getLogger(__name__)
EXTENSIONS = (".png", ".jpg", ".jpeg")


def _decode_chunk(paths: list[str]) -> Tensor:
    out = []
    for p in paths:
        try:
            img = decode_image(read_file(p), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise ConfigError(f"cannot decode image {p}: {first_line(e)}") from e
        if img.shape[1:] != (32, 32):
            raise ConfigError(f"image {p} is {img.shape[2]}x{img.shape[1]}; expected 32x32 RGB")
        out.append(img)
    return torch.stack(out)


def decode_all(paths: list[str], progress: bool = False) -> Tensor:
    # torchvision's decoders release the GIL, so threads scale; chunks keep per-task overhead low.
    chunks = [paths[i : i + 1000] for i in range(0, len(paths), 1000)]
    bar = tqdm(
        total=len(paths),
        desc="decoding",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        leave=False,
        mininterval=1.0,
    )
    out = []
    with bar, ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for chunk in pool.map(_decode_chunk, chunks):
            out.append(chunk)
            bar.update(len(chunk))
    return torch.cat(out)


def read_cache(cache: str, files: list[str], classes: list[str]) -> dict[str, Any] | None:
    """The decoded images in ``cache`` when it holds exactly these files; None when it does not
    exist or is an mq cache of other files (rewritten then). Any other existing file is
    someone else's (mq writes its cache atomically, so a torn one is not mq's): a ConfigError,
    the file left as it is."""
    if not os.path.lexists(cache):
        return None

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"dataset.cache={cache} is an existing file that is not an mq image cache ({why}); "
            "allowed: a new path, or a cache mq wrote (move this file away)"
        )

    if os.path.islink(cache) or not os.path.isfile(cache):
        raise refuse("a link or not a regular file")
    try:
        data = torch.load(cache, weights_only=True)
    except Exception:  # torch's reasons run to several sentences; what matters is whose it is
        raise refuse("not a file torch.load reads as tensors") from None
    if not isinstance(data, dict) or not {"files", "classes", "train", "test"} <= set(data):
        raise refuse("other content")
    if data.get("files") != files or data.get("classes") != classes:
        log.info("dataset.cache=%s lists other files; decoding again", cache)
        return None
    images = [data.get(k) for k in ("train", "test")]
    if not all(isinstance(t, Tensor) for t in images) or sum(len(t) for t in images) != len(files):
        log.warning("dataset.cache=%s is incomplete; decoding again", cache)
        return None
    return data


def write_cache(cache: str, data: dict[str, Any]) -> None:
    """Through a temporary file and a rename: a kill mid-write leaves no torn cache behind.
    A cache that cannot be written costs the next run a decode, not this run its result."""
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache)
    except OSError as e:
        log.warning("dataset.cache=%s not written: %s", cache, first_line(e))
        Path(tmp).unlink(missing_ok=True)


def scan(folder: Path) -> tuple[list[str], list[str], list[int]]:
    try:
        ds = torchvision.datasets.ImageFolder(
            str(folder), is_valid_file=lambda p: p.lower().endswith(EXTENSIONS)
        )
    except FileNotFoundError as e:
        raise ConfigError(f"{folder}: {first_line(e)}") from e
    return ds.classes, [p for p, _ in ds.samples], [c for _, c in ds.samples]
