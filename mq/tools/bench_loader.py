"""ImageNet input benchmark: loader-only images/s of mq.data.imagenet against PIL's ImageFolder.

    python -m mq.bench_loader make DIR [--files 2000]      # an ImageNet-like JPEG folder
    python -m mq.bench_loader DIR --workers 0,1,2          # CPU: both pipelines, same run
    python -m mq.bench_loader DIR --device cuda            # + nvJPEG batched decode on the GPU

Each measurement iterates a fresh DataLoader: the first wave of batches (one per worker, all
started at once with the workers) is the warm-up, then ``--batches`` batches, rounded up to
whole waves, are timed; images/s is the median of ``--rounds`` rounds in which PIL and mq
alternate. (Timing fewer batches than the workers had already prepared measured a queue, not
the decoding: 8 workers over 4 batches once gave PIL 29,944 img/s.) "per core" divides by
max(workers, 1). The train pipeline (random-resized crop 224, flip) is measured; the PIL one
is torchvision's ImageFolder + RandomResizedCrop/Flip/ToTensor/Normalize, as mq had before.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms as T

from mq.data.base import IMAGENET_MEAN, IMAGENET_STD
from mq.data.imagenet import ImageNetLoader, gpu_decode, list_folder, one_thread, transform

TARGET = 3000  # img/s one GPU needs for ResNet-18 training


def make_folder(root: str, files: int = 2000, classes: int = 10, seed: int = 0) -> Path:
    """``root/{train,val}/cNNN/*.JPEG``: ``files`` train JPEGs of ImageNet's typical size
    (500x375 or 375x500, quality 90) and a tenth as many val ones. Smooth random fields plus
    noise, so the JPEG holds ImageNet-like entropy (~100-150 kB/image is typical; flat images
    would decode unrealistically fast)."""
    g = torch.Generator().manual_seed(seed)
    out = Path(root)
    for split, n in (("train", files), ("val", max(classes, files // 10))):
        for i in range(n):
            folder = out / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (375, 500) if i % 3 else (500, 375)
            low = torch.rand(3, h // 25 + 1, w // 25 + 1, generator=g)
            img = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bicubic")[0]
            img = img * 200 + torch.randn(3, h, w, generator=g) * 25
            data = torchvision.io.encode_jpeg(img.clamp(0, 255).to(torch.uint8), quality=90)
            torchvision.io.write_file(str(folder / f"img{i:06d}.JPEG"), data)
    return out


def waves(workers: int, batches: int) -> tuple[int, int]:
    """(warm-up, timed) batches for ``workers``: the first wave (each worker's first batch,
    made in parallel) is skipped, and whole waves are timed, so that no timed batch was
    ready before the clock started and every worker is busy throughout."""
    wave = max(workers, 1)
    return wave, wave * math.ceil(batches / wave)


def _rate(loader: torch.utils.data.DataLoader, workers: int, batches: int) -> float:
    warm, timed = waves(workers, batches)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(timed):
        images += len(next(it)[1])
    return images / (time.perf_counter() - start)


def pil_rate(root: str, workers: int, batch_size: int, batches: int) -> float:
    tf = T.Compose(
        [
            T.RandomResizedCrop(224),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(Path(root) / "train"), tf)
    loader = torch.utils.data.DataLoader(
        ds, batch_size, shuffle=True, num_workers=workers, worker_init_fn=one_thread
    )
    return _rate(loader, workers, batches)


def mq_rate(root: str, workers: int, batch_size: int, batches: int, decode: str) -> float:
    _, files, labels = list_folder(Path(root) / "train", root)
    device = "cuda" if decode == "cuda" else "cpu"
    src = ImageNetLoader(files, labels, batch_size, True, device, workers=workers, decode=decode)
    warm, timed = waves(workers, batches)
    it = src.epoch(0)
    for _ in range(warm):
        next(it)
    if device == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for _ in range(timed):
        x, _ = next(it)
        images += len(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def gpu_decode_rate(root: str, batch_size: int, batches: int) -> float:
    """nvJPEG alone: decode + crop/resize of batches whose bytes are already in memory."""
    _, files, _ = list_folder(Path(root) / "train", root)
    encoded = [torchvision.io.read_file(f) for f in files[: batch_size * (batches + 1)]]
    device = torch.device("cuda")

    def one(i: int) -> None:
        part = encoded[i * batch_size : (i + 1) * batch_size]
        images = gpu_decode(part, device)
        torch.stack([transform(im, True, i * batch_size + j) for j, im in enumerate(images)])

    one(0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(1, batches + 1):
        one(i)
    torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mq.bench_loader", description=__doc__.split("\n")[0]
    )
    p.add_argument("root", help="folder with train/<class>/*.JPEG (or, after make, where to write)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0,1,2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians shown")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-pil", action="store_true", help="skip the PIL baseline")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; allowed: cpu")
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers {args.workers} is not allowed; allowed: integers >= 0, e.g. 0,1,2")
    if min(args.workers) < 0:
        p.error(f"--workers {args.workers} is not allowed; allowed: integers >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make"]:
        p = argparse.ArgumentParser(prog="python -m mq.bench_loader make")
        p.add_argument("root")
        p.add_argument("--files", type=int, default=2000)
        a = p.parse_args(argv[1:])
        print(f"wrote {make_folder(a.root, a.files)}")
        return {}
    args = parse(argv)
    torch.set_num_threads(1)  # the main process only collates; workers are the measured cores
    have = len(list_folder(Path(args.root) / "train", f"root {args.root}")[1])
    need = args.batch_size * max(sum(waves(w, args.batches)) for w in args.workers)
    if have < need:
        sys.exit(
            f"error: {args.root} has {have} train images; allowed: at least {need} (a warm-up "
            f"wave of one batch per worker, then --batches rounded up to whole waves, "
            f"x --batch-size {args.batch_size}, for --workers {max(args.workers)})"
        )
    rows = []
    print(f"{'pipeline':<26}{'workers':>8}{'img/s':>9}{'img/s/core':>12}{'vs PIL':>8}")
    for w in args.workers:
        # PIL and mq alternate, --rounds times, and the medians are compared: on a shared
        # machine the load drifts, and alternating exposes both pipelines to the same drift.
        pils, ours_all = [], []
        for _ in range(args.rounds):
            if not args.no_pil:
                pils.append(pil_rate(args.root, w, args.batch_size, args.batches))
            ours_all.append(mq_rate(args.root, w, args.batch_size, args.batches, "cpu"))
        pil = statistics.median(pils) if pils else None
        ours = statistics.median(ours_all)
        cores = max(w, 1)
        for name, rate in (("PIL ImageFolder", pil), ("torchvision.io (mq, cpu)", ours)):
            if rate is None:
                continue
            vs = f"{rate / pil:.2f}x" if pil else ""
            print(f"{name:<26}{w:>8}{rate:>9.0f}{rate / cores:>12.0f}{vs:>8}")
            rows.append({"pipeline": name, "workers": w, "img_s": rate, "per_core": rate / cores})
    # worker processes (workers >= 1) are what a training run uses; 0 is the main process
    ours = [r for r in rows if "mq" in r["pipeline"]]
    best = max([r for r in ours if r["workers"] > 0] or ours, key=lambda r: r["per_core"])
    per_gpu = math.ceil(TARGET / best["per_core"])
    print(
        f"=> {best['per_core']:.0f} img/s per worker core: {per_gpu} CPU workers per GPU for "
        f"{TARGET} img/s (ResNet-18 training)"
    )
    result = {"rows": rows, "workers_per_gpu": per_gpu, "target_img_s": TARGET}
    if args.device == "cuda":
        decode = gpu_decode_rate(args.root, args.batch_size, args.batches)
        print(f"{'nvJPEG decode+crop (GPU)':<26}{'-':>8}{decode:>9.0f}   (bytes in memory)")
        for w in args.workers:
            rate = mq_rate(args.root, w, args.batch_size, args.batches, "cuda")
            print(f"{'torchvision.io (mq, cuda)':<26}{w:>8}{rate:>9.0f}   (file reads in workers)")
            rows.append({"pipeline": "mq cuda decode", "workers": w, "img_s": rate})
        result["gpu_decode_img_s"] = decode
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
