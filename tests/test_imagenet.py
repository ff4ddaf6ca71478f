"""ImageNet input (mq.data.imagenet) on real JPEG folders written here: the transforms against
torchvision's, exact mid-epoch resume, worker-independence, rank shards, top-5, bad folders."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from conftest import launch
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from mq.core.errors import ConfigError
from mq.data.base import IMAGENET_MEAN, IMAGENET_STD
from mq.data.imagenet import RATIO, SCALE, ImageNetLoader, crop_box, imagenet_loaders, list_folder
from mq.job.evaluation import evaluate


def smooth_image(h: int, w: int, phase: float) -> torch.Tensor:
    """Gradients and a slow wave: JPEG decoders agree on such images to a level or two (on
    noise their chroma upsampling differs by tens), while a shifted crop would not."""
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    wave = 0.5 + 0.4 * torch.sin(6.28 * (x + y + phase))
    return (torch.stack([x, y, wave]) * 255).round().to(torch.uint8)


def write_tree(root: Path, classes: int, train: int, val: int, smooth: bool = False) -> Path:
    """root/{train,val}/nNNNN/*.JPEG of mixed landscape and portrait sizes: random pixels, or
    ``smooth`` images."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:04d}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = (48, 64) if (c + i) % 2 else (70, 40)
                img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
                if smooth:
                    img = smooth_image(h, w, phase=0.1 * (c * n + i))
                data = torchvision.io.encode_jpeg(img, quality=90)
                torchvision.io.write_file(str(folder / f"img{i}.JPEG"), data)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("imagenet"), classes=3, train=8, val=3)


def batches(src, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(src.epoch(epoch, start))


def test_val_is_torchvision_resize_256_center_crop_224_normalised(tree):
    loaders = imagenet_loaders(str(tree), 4, "cpu", workers=0, test_batch_size=5)
    x, y = batches(loaders.test)[0]
    _, files, labels = list_folder(tree / "val", "val")
    img = decode_jpeg(read_file(files[0]), mode=ImageReadMode.RGB)
    want = TF.center_crop(TF.resize(img, [256], antialias=True), [224, 224]).float() / 255
    want = TF.normalize(want, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert x.shape == (5, 3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], want, atol=1e-5, rtol=0)
    assert y.tolist() == labels[:5] and loaders.num_classes == 3


def test_crop_box_is_random_resized_crops_distribution():
    rng = random.Random(0)
    for h, w in [(375, 500), (500, 375), (40, 400), (224, 224)]:
        boxes = [crop_box(h, w, rng) for _ in range(300)]
        for top, left, ch, cw in boxes:
            assert 0 <= top <= h - ch and 0 <= left <= w - cw and ch > 0 and cw > 0
        areas = [ch * cw / (h * w) for _, _, ch, cw in boxes]
        assert min(areas) >= SCALE[0] * 0.9 and max(areas) <= 1
        if (
            max(h, w) / min(h, w) < 2
        ):  # not the fallback: every ratio within RandomResizedCrop's range
            ratios = [cw / ch for _, _, ch, cw in boxes]
            assert min(ratios) > RATIO[0] * 0.9 and max(ratios) < RATIO[1] * 1.1
            assert len({b for b in boxes}) > 250  # random, not one box


def test_resume_mid_epoch_and_worker_processes_give_the_same_batches(tree):
    """Augmentation is a function of (seed, epoch, position): start_batch=2 replays batches 2..
    exactly, with or without workers, and another epoch or seed draws other ones."""
    src = imagenet_loaders(str(tree), 4, "cpu", seed=3, workers=0).train
    full = batches(src, epoch=1)
    assert len(full) == 6 and all(x.shape == (4, 3, 224, 224) for x, _ in full)
    for (xa, ya), (xb, yb) in zip(full[2:], batches(src, epoch=1, start=2), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    two = imagenet_loaders(str(tree), 4, "cpu", seed=3, workers=2).train
    for (xa, ya), (xb, yb) in zip(full, batches(two, epoch=1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch, other_seed = (
        batches(src, epoch=2),
        batches(imagenet_loaders(str(tree), 4, "cpu", seed=4, workers=0).train, epoch=1),
    )
    assert not torch.equal(full[0][0], other_epoch[0][0])
    assert not torch.equal(full[0][0], other_seed[0][0])


def test_ranks_read_disjoint_shards_of_one_permutation(tree):
    _, files, labels = list_folder(tree / "train", "train")
    one = ImageNetLoader(files, labels, 2, True, "cpu", seed=5, workers=0)
    perm, seeds = one.order(epoch=7)
    shards = [
        ImageNetLoader(files, labels, 2, True, "cpu", seed=5, workers=0, rank=r, world_size=3)
        for r in range(3)
    ]
    orders = [s.order(epoch=7) for s in shards]
    assert [len(s) for s in shards] == [4, 4, 4]  # 24 files / 3 ranks / batch 2: equal steps
    for r, (index, aug) in enumerate(orders):
        assert torch.equal(index, perm[r::3]) and torch.equal(aug, seeds[r::3])
    everyone = torch.cat([index for index, _ in orders])
    assert sorted(everyone.tolist()) == list(range(24))
    val = [
        ImageNetLoader(files[:10], labels[:10], 4, False, "cpu", rank=r, world_size=3)
        for r in range(3)
    ]
    assert sorted(sum((v.order(0)[0].tolist() for v in val), [])) == list(range(10))
    assert [len(v) for v in val] == [1, 1, 1] and val[0].shard_size() == 4
    # a limited evaluation keeps k batches per rank: k x batch x ranks images, sharded
    part = ImageNetLoader(files, labels, 2, False, "cpu", rank=1, world_size=3).sample(2)
    assert part.num_samples == 12 and len(part) == 2
    assert sorted(torch.bincount(torch.tensor(part.labels)).tolist()) == [4, 4, 4]
    with pytest.raises(ConfigError, match="rank=3 is not allowed for world_size=3"):
        ImageNetLoader(files, labels, 2, True, "cpu", rank=3, world_size=3)


def test_evaluate_reports_top5_above_ten_classes():
    class Logits(torch.nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.classes = classes

        def forward(self, x):  # class c scores c: top-1 is the last class, top-5 the last 5
            return torch.arange(self.classes, dtype=torch.float32).expand(len(x), -1) + self.w

    class Source:
        num_samples, batch_size = 4, 4

        def __init__(self, y):
            self.y = torch.tensor(y)

        def __len__(self):
            return 1

        def epoch(self, epoch, start_batch=0):
            yield torch.zeros(4, 1), self.y

    result = evaluate(Logits(12), Source([11, 8, 6, 0]))
    assert (result.acc, result.acc5, result.images) == (25.0, 50.0, 4)
    assert evaluate(Logits(10), Source([9, 8, 7, 0])).acc5 is None  # CIFAR-10: unchanged


def test_unreadable_or_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="has no train/ folder"):
        imagenet_loaders(str(tmp_path / "missing"), 4, "cpu")
    (tmp_path / "train" / "n0").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError) as err:
        imagenet_loaders(str(tmp_path), 4, "cpu")
    assert "has no <class>/*.jpg images" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "train" / "n0" / "a.JPEG").write_bytes(b"")
    (tmp_path / "val" / "n0").symlink_to(tmp_path / "nowhere")  # a dangling class folder
    with pytest.raises(ConfigError, match="cannot read|has no <class>"):
        imagenet_loaders(str(tmp_path), 1, "cpu")
    with pytest.raises(ConfigError, match="dataset.decode=gpu is not allowed; allowed: auto"):
        imagenet_loaders(str(write_tree(tmp_path / "ok", 1, 2, 1)), 1, "cpu", decode="gpu")
    with pytest.raises(ConfigError, match="batch_size=3 is not allowed; allowed: 1 to 2"):
        imagenet_loaders(str(tmp_path / "ok"), 3, "cpu")


@pytest.mark.slow  # ~10 s: one launch
def test_launch_on_an_unreadable_folder_is_one_line_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    result = launch("dataset=imagenet", "dataset.root=data", "logger=none", cwd=tmp_path)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("error: dataset.root=data: ") and "no <class>/*.jpg" in lines[-1]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # ~30 s: a 224x224 mobilenet_v2 epoch through launch.py
def test_imagenet_run_logs_top5(tmp_path):
    write_tree(tmp_path / "data", classes=12, train=2, val=1)
    args = ["dataset=imagenet", "dataset.root=data", "dataset.num_classes=12", "logger=none"]
    args += ["model=torchvision", "model.name=mobilenet_v2", "meta=ste", "epochs=1"]
    args += ["batch_size=8", "limit_train_batches=1", "dataset.workers=1", "progress=false"]
    result = launch(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "outputs/quantize/imagenet/mobilenet_v2-dorefa-w1-ste-sgd-s0"
    (row,) = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()[-1:]]
    assert row["kind"] == "epoch" and 0 <= row["test_acc"] <= row["test_acc5"] <= 100


def test_batched_decode_path_gives_the_cpu_paths_batches(tree):
    """decode="cuda" (workers read bytes, one batched decode_jpeg call per batch in the main
    process) run on the CPU: the same crops, flips and labels as decoding in the workers."""
    _, files, labels = list_folder(tree / "train", "train")
    a = ImageNetLoader(files, labels, 4, True, "cpu", seed=1, workers=0, decode="cpu")
    b = ImageNetLoader(files, labels, 4, True, "cpu", seed=1, workers=1, decode="cuda")
    for (xa, ya), (xb, yb) in zip(batches(a, 2, 1), batches(b, 2, 1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_nvjpeg_batches_match_the_cpu_decode(tmp_path):
    # Smooth images: on random pixels (the `tree` fixture) nvJPEG and libjpeg-turbo upsample
    # chroma differently by tens of levels (seen on an H200: mean 0.15 after normalising).
    tree = write_tree(tmp_path, classes=2, train=4, val=1, smooth=True)
    _, files, labels = list_folder(tree / "train", "train")
    cpu = ImageNetLoader(files, labels, 4, True, "cuda", seed=1, workers=0, decode="cpu")
    gpu = ImageNetLoader(files, labels, 4, True, "cuda", seed=1, workers=0, decode="cuda")
    for (xa, ya), (xb, yb) in zip(batches(cpu), batches(gpu), strict=True):
        assert xb.is_cuda and torch.equal(ya, yb)
        # nvJPEG's IDCT and the float resize differ from libjpeg-turbo's by a few levels
        assert (xa - xb).abs().mean() < 0.05


def test_loader_benchmark_measures_both_pipelines_on_a_generated_folder(tmp_path, capsys):
    from mq.tools.bench_loader import main, make_folder

    make_folder(str(tmp_path / "gen"), files=20, classes=2)
    _, files, _ = list_folder(tmp_path / "gen" / "train", "gen")
    img = decode_jpeg(read_file(files[0]))
    assert len(files) == 20 and tuple(img.shape) in {(3, 375, 500), (3, 500, 375)}
    assert len(read_file(files[0])) > 30_000  # real-size JPEGs, not flat ones
    args = [str(tmp_path / "gen"), "--workers", "0", "--batch-size", "4", "--batches", "2"]
    result = main([*args, "--rounds", "1", "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "PIL ImageFolder" in out and "torchvision.io (mq, cpu)" in out and "per GPU" in out
    saved = json.loads((tmp_path / "b.json").read_text())
    assert {r["pipeline"] for r in saved["rows"]} == {"PIL ImageFolder", "torchvision.io (mq, cpu)"}
    assert result["workers_per_gpu"] >= 1 and all(r["img_s"] > 0 for r in saved["rows"])
    with pytest.raises(SystemExit, match="has 20 train images; allowed: at least"):
        main([str(tmp_path / "gen"), "--batch-size", "16", "--batches", "2"])


class SlowItems(torch.utils.data.Dataset):
    """Each item takes SLEEP seconds of a worker's time (sleeping: no CPU needed)."""

    SLEEP = 0.1

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.SLEEP)
        return torch.zeros(1), 0


def test_loader_benchmark_times_the_steady_state_not_a_prefetched_queue():
    """4 workers at 10 items/s each make 40 items/s. Timing 2 batches after 1 warm-up batch
    (the first wave made all 4 at once) measured a queue: several times too fast."""
    from mq.tools.bench_loader import _rate, waves

    assert waves(0, 3) == (1, 3) and waves(4, 2) == (4, 4) and waves(4, 5) == (4, 8)
    loader = torch.utils.data.DataLoader(SlowItems(), batch_size=1, num_workers=4)
    rate = _rate(loader, workers=4, batches=2)
    assert 25 < rate < 60, rate
