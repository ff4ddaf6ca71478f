import inspect
import logging
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, compose_config
from hydra.utils import get_method
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from mq.core.errors import ConfigError
from mq.data import imagenet
from mq.data import loaders as data
from mq.data.base import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader, balanced_sample
from mq.data.loaders import (
    cifar_loaders,
    fake_loaders,
    folder_loaders,
    imagenet_loaders,
)
from mq.data.split import SPLIT_KEYS
from mq.job.evaluation import evaluate

MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
CLASSES = ["cat", "dog", "frog"]


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return ((x * STD + MEAN) * 255).round().to(torch.uint8)


def collect(source, epoch=0, start_batch=0):
    return [(x.clone(), y.clone()) for x, y in source.epoch(epoch, start_batch)]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory) -> Path:
    """train/ with 70 images per class, test/ with 20; cat is JPEG, the others PNG."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 70), ("test", 20)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            ext = "jpg" if cls == "cat" else "png"
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:03d}.{ext}")
    return root


def test_folder_loaders_pixels_and_labels(folder_tree):
    loaders = folder_loaders(str(folder_tree), batch_size=64, device="cpu", test_batch_size=25)
    assert loaders.num_classes == 3
    assert (loaders.train.num_samples, loaders.test.num_samples) == (210, 60)
    assert (len(loaders.train), len(loaders.test)) == (3, 3)
    batches = collect(loaders.test)
    assert [len(y) for _, y in batches] == [25, 25, 10]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (60, 3, 32, 32)
    assert y.dtype == torch.int64
    files = sorted((folder_tree / "test").glob("*/*"))
    expected = [CLASSES.index(f.parent.name) for f in files]
    assert y.tolist() == expected
    # Decoded by PIL independently of the loader's torchvision decoder.
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(unnormalise(x), torch.from_numpy(pixels).permute(0, 3, 1, 2))
    for x, y in loaders.train.epoch(0):
        assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}


def test_folder_loaders_cache(folder_tree, tmp_path, monkeypatch):
    cache = tmp_path / "sub" / "cache.pt"
    first = folder_loaders(str(folder_tree), 32, "cpu", cache=str(cache))
    assert cache.is_file() and not list(cache.parent.glob("*.tmp*"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_decode_all", no_decoding)
    second = folder_loaders(str(folder_tree), 32, "cpu", cache=str(cache))
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    # A different file list must not reuse the stale cache.
    other = tmp_path / "other"
    for split in ("train", "test"):
        (other / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(other / split / "a" / "x.png")
    with pytest.raises(AssertionError, match="decoded again"):
        folder_loaders(str(other), 1, "cpu", cache=str(cache))


def test_folder_loaders_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "a" / "ok.png")
    with pytest.raises(ConfigError, match="no test/") as err:
        folder_loaders(str(tmp_path), 1, "cpu")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    (tmp_path / "test" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "test" / "a" / "big.png")
    with pytest.raises(ConfigError, match=r"big\.png is 40x30"):
        folder_loaders(str(tmp_path), 1, "cpu")


def coded_images(n: int) -> torch.Tensor:
    """Images whose pixels say where they came from: channel 0 = 10 + column, 1 = 10 + row."""
    img = torch.empty(32, 32, 3, dtype=torch.uint8)
    img[..., 0] = 10 + torch.arange(32).view(1, 32)
    img[..., 1] = 10 + torch.arange(32).view(32, 1)
    img[..., 2] = 200
    return img.expand(n, -1, -1, -1).contiguous()


def test_crop_flip_match_torchvision_and_distribution():
    n = 9000
    images = coded_images(n)
    loader = DeviceLoader(images, torch.zeros(n), 1000, CIFAR10_MEAN, CIFAR10_STD, True, "cpu")
    out = unnormalise(torch.cat([x for x, _ in loader.epoch(0)]))
    # Recover each sample's offset and flip from the always-inside centre pixel.
    centre, right = out[:, 0, 16, 16].long(), out[:, 0, 16, 17].long()
    flip = right < centre
    dx = torch.where(flip, centre - 21, centre - 22)
    dy = out[:, 1, 16, 16].long() - 22
    assert dx.min() == 0 and dx.max() == 8 and dy.min() == 0 and dy.max() == 8
    padded = TF.pad(images[0].permute(2, 0, 1), [4])  # zero fill, as RandomCrop(32, padding=4)
    for i in range(300):
        expected = TF.crop(padded, int(dy[i]), int(dx[i]), 32, 32)
        if flip[i]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(out[i], expected), i
    # Offsets uniform over 0..8 on each axis (expected 1000 each, sd ~30), flips ~50%.
    for offsets in (dx, dy):
        counts = torch.bincount(offsets, minlength=9)
        assert (counts - 1000).abs().max() < 150, counts
    joint = torch.bincount(dy * 9 + dx, minlength=81)
    assert joint.min() > 60 and joint.max() < 170
    assert abs(flip.float().mean().item() - 0.5) < 0.03


def test_constant_image_border_frequency():
    # The zero padding must reach the output: a white image shows black rows for offsets != 4.
    n = 4500
    images = torch.full((n, 32, 32, 3), 255, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(n), 500, (0, 0, 0), (1, 1, 1), True, "cpu")
    x = torch.cat([x for x, _ in loader.epoch(1)])
    zero_rows = (x[:, 0].amax(dim=2) == 0).sum(dim=1)
    assert set(zero_rows.unique().tolist()) == {0, 1, 2, 3, 4}
    # |dy - 4| zero rows: 0 with p 1/9, each of 1..4 with p 2/9.
    freq = torch.bincount(zero_rows, minlength=5).float() / n
    assert torch.allclose(freq, torch.tensor([1, 2, 2, 2, 2]) / 9, atol=0.03)
    assert set(x.unique().tolist()) == {0.0, 1.0}


def test_determinism_and_resume():
    n = 1000
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(n)

    def make(seed: int) -> DeviceLoader:
        return DeviceLoader(images, labels, 128, CIFAR10_MEAN, CIFAR10_STD, True, "cpu", seed)

    loader = make(0)
    full = collect(loader, 3)
    assert_same_batches(full, collect(make(0), 3))
    assert not torch.equal(full[0][1], collect(loader, 4)[0][1])
    assert not torch.equal(full[0][1], collect(make(1), 3)[0][1])
    for k in (0, 1, 5, 7):
        assert_same_batches(collect(loader, 3, start_batch=k), full[k:])


def test_train_drops_partial_batch_and_test_keeps_all():
    n = 1000
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
    ids = torch.arange(n)
    train = DeviceLoader(images, ids, 128, CIFAR10_MEAN, CIFAR10_STD, True, "cpu")
    test = DeviceLoader(images, ids, 300, CIFAR10_MEAN, CIFAR10_STD, False, "cpu")
    assert len(train) == 7 and train.num_samples == n
    seen = torch.cat([y for _, y in train.epoch(0)])
    assert len(seen) == 7 * 128 and len(seen.unique()) == len(seen)
    assert len(test) == 4
    batches = collect(test)
    assert [len(y) for _, y in batches] == [300, 300, 300, 100]
    assert torch.equal(torch.cat([y for _, y in batches]), ids)
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(unnormalise(x), images.permute(0, 3, 1, 2))
    assert collect(test, 0, start_batch=3)[0][1].tolist() == list(range(900, 1000))
    with pytest.raises(ConfigError, match="batch_size=2000"):
        DeviceLoader(images, ids, 2000, CIFAR10_MEAN, CIFAR10_STD, True, "cpu")


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10"), ("cifar100", "cifar-100")])
def test_cifar_loaders_missing_files(tmp_path, name, folder):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(ConfigError) as err:
        cifar_loaders(name, str(root), download=False, batch_size=128, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and f"dataset.root={root}" in msg and "dataset.download=true" in msg
    assert folder in msg


def test_a_failed_download_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """dataset.download=true without a network (a proxy on a closed port stands in for the
    offline machine): one line, and the folders the download made are gone again; a folder
    that existed before stays, with what it held."""
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    before = tmp_path / "kept"
    before.mkdir()
    (before / "mine.txt").write_text("x")
    root = before / "new" / "data"
    with pytest.raises(ConfigError, match="could not load CIFAR-10") as err:
        cifar_loaders("cifar10", str(root), download=True, batch_size=128, device="cpu")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in before.iterdir()) == ["mine.txt"]


def test_cifar_loaders_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="cifar10.*cifar100") as err:
        cifar_loaders("mnist", str(tmp_path), download=False, batch_size=128, device="cpu")
    assert "mnist" in str(err.value)


def test_fake_loaders():
    a = fake_loaders(batch_size=64, device="cpu", seed=3, num_train=200, num_test=70)
    b = fake_loaders(batch_size=64, device="cpu", seed=3, num_train=200, num_test=70)
    c = fake_loaders(batch_size=64, device="cpu", seed=4, num_train=200, num_test=70)
    assert a.num_classes == 10 and len(a.train) == 3 and len(a.test) == 1
    assert a.train.images.shape == (200, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert not torch.equal(a.train.images[:70], a.test.images)
    assert_same_batches(collect(a.train, 2), collect(b.train, 2))
    x, y = next(a.test.epoch(0))
    assert x.shape == (70, 3, 32, 32) and y.min() >= 0 and y.max() < 10


def test_imagenet_loaders(tmp_path):
    with pytest.raises(ConfigError, match="no train/"):
        imagenet_loaders(str(tmp_path), 4, "cpu")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (80, 60), (i * 40, 0, 0)).save(tmp_path / split / cls / f"{i}.jpg")
    loaders = imagenet_loaders(str(tmp_path), 4, "cpu", seed=1, workers=0, test_batch_size=3)
    assert loaders.num_classes == 2 and len(loaders.train) == 2 and len(loaders.test) == 4
    train = collect(loaders.train, 5)
    assert [x.shape for x, _ in train] == [(4, 3, 224, 224)] * 2
    assert torch.equal(collect(loaders.train, 5, start_batch=1)[0][1], train[1][1])
    test = collect(loaders.test)
    assert torch.cat([y for _, y in test]).tolist() == [0] * 5 + [1] * 5
    assert test[0][0].shape == (3, 3, 224, 224)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    loaders = [fake_loaders(64, dev, seed=2, num_train=256, num_test=64) for dev in ("cpu", "cuda")]
    cpu, gpu = collect(loaders[0].train, 1), collect(loaders[1].train, 1)
    assert len(cpu) == len(gpu) == 4
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu())


def shared_data() -> Path:
    env = os.environ.get("MQ_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data"


@pytest.mark.slow
def test_real_cifar10_jpeg(tmp_path):
    archive = shared_data() / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path, filter="data")
        loaders = folder_loaders(str(tmp_path), 512, "cpu")
    finally:
        # pytest keeps recent tmp dirs; 60,000 files each is too much to leave behind.
        shutil.rmtree(tmp_path / "train", ignore_errors=True)
        shutil.rmtree(tmp_path / "test", ignore_errors=True)
    assert (loaders.train.num_samples, loaders.test.num_samples) == (50_000, 10_000)
    assert loaders.num_classes == 10
    assert torch.bincount(loaders.test.labels).tolist() == [1000] * 10
    x, y = next(loaders.train.epoch(0))
    assert x.shape == (512, 3, 32, 32) and x.dtype == torch.float32


TEN = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def sorted_tree(tmp_path_factory) -> Path:
    """Ten classes, stored (and so read) class by class: train/ 10 images each, test/ 30."""
    root = tmp_path_factory.mktemp("sorted")
    for split, n in (("train", 10), ("test", 30)):
        for c, cls in enumerate(TEN):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (c * 20, i, 0)).save(root / split / cls / f"{i}.png")
    return root


class Constant(torch.nn.Module):
    """Predicts one class for every image: 1/classes accuracy on any class-balanced sample."""

    def __init__(self, answer: int) -> None:
        super().__init__()
        self.answer = answer
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 10)
        logits[:, self.answer] = 1.0
        return logits + self.w


def test_limited_evaluation_is_a_fixed_class_balanced_sample(sorted_tree):
    loaders = folder_loaders(str(sorted_tree), 10, "cpu", seed=0, test_batch_size=20)
    assert loaders.test.labels.tolist() == sorted(loaders.test.labels.tolist())  # class-sorted
    for answer in (0, 9):  # the first two batches are all class 0: this was 100% and 0%
        full = evaluate(Constant(answer), loaders.test)
        limited = evaluate(Constant(answer), loaders.test.sample(2))
        assert (full.acc, full.images) == (pytest.approx(10.0), 300)
        assert (limited.acc, limited.images) == (pytest.approx(10.0), 40)
    part = loaders.test.sample(2)
    assert part.num_samples == 40 and len(part) == 2
    labels = torch.cat([y for _, y in part.epoch(0)])
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10
    # The same images every time and for every run seed; the images are not the first of
    # each class folder but a random choice.
    other_seed = folder_loaders(str(sorted_tree), 10, "cpu", seed=7, test_batch_size=20)
    again = collect(other_seed.test.sample(2))
    assert_same_batches(collect(part), again)
    assert_same_batches(collect(part), collect(loaders.test.sample(2)))
    first_of_class = torch.arange(10) * 30
    assert not set(first_of_class.tolist()) >= set(
        balanced_sample(loaders.test.labels, 10).tolist()
    )
    # A limit covering the whole test set is the whole test set, in its order.
    assert loaders.test.sample(15) is loaders.test


def test_limited_training_batches_span_the_classes(sorted_tree):
    # limit_train_batches takes the first batches of an epoch: a fresh permutation each epoch.
    loaders = folder_loaders(str(sorted_tree), 20, "cpu", seed=0)
    first = [next(iter(loaders.train.epoch(e)))[1] for e in range(3)]
    assert all(len(y.unique()) >= 6 for y in first)
    assert not torch.equal(first[0], first[1])


def test_balanced_sample_is_proportional_and_exact():
    rng = np.random.default_rng(1)
    for _ in range(30):
        classes = int(rng.integers(1, 8))
        labels = torch.from_numpy(rng.integers(0, classes, int(rng.integers(1, 200))))
        n = int(rng.integers(0, len(labels) + 1))
        idx = balanced_sample(labels, n)
        assert len(idx) == n == len(idx.unique()) and torch.equal(idx, idx.sort().values)
        got = torch.bincount(labels[idx], minlength=classes).double()
        share = torch.bincount(labels, minlength=classes).double() * n / len(labels)
        assert ((got - share).abs() < 1).all(), (got, share)
        assert torch.equal(idx, balanced_sample(labels, n))
    # More classes than images: one image each from classes drawn at random, not the first.
    labels = torch.arange(1000).repeat_interleave(50)
    picked = labels[balanced_sample(labels, 512)]
    assert len(picked.unique()) == 512 and picked.max() > 900


def test_fake_and_stream_loaders_sample_by_class(tmp_path):
    fake = fake_loaders(32, "cpu", seed=3, num_train=64, num_test=200, test_batch_size=50)
    part = fake.test.sample(1)
    got = torch.bincount(part.labels, minlength=10).double()
    share = torch.bincount(fake.test.labels, minlength=10).double() * 50 / 200
    assert part.num_samples == 50 and ((got - share).abs() < 1).all()
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40, 40)).save(tmp_path / split / cls / f"{i}.jpg")
    stream = imagenet_loaders(str(tmp_path), 2, "cpu", workers=0, test_batch_size=4)
    labels = torch.cat([y for _, y in stream.test.sample(1).epoch(0)])
    assert sorted(labels.tolist()) == [0, 0, 1, 1]  # the first batch alone was [0, 0, 0, 0]


def test_corrupt_cache_is_refused_and_kept(folder_tree, tmp_path):
    # mq writes its cache atomically: a file it cannot read is not one it wrote
    cache = tmp_path / "cache.pt"
    folder_loaders(str(folder_tree), 32, "cpu", cache=str(cache))
    whole = cache.read_bytes()
    for broken in (b"not a torch file", whole[: len(whole) // 2]):
        cache.write_bytes(broken)
        with pytest.raises(ConfigError, match="not an mq image cache") as info:
            folder_loaders(str(folder_tree), 32, "cpu", cache=str(cache))
        assert "\n" not in str(info.value) and str(cache) in str(info.value)
        assert cache.read_bytes() == broken and not list(tmp_path.glob("*.tmp*"))


def test_decoding_and_evaluation_show_progress(folder_tree, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="mq"):
        loaders = folder_loaders(str(folder_tree), 32, "cpu", test_batch_size=10)
    assert f"decoding 270 images under {folder_tree}" in caplog.text
    assert "decoding" in capsys.readouterr().err
    folder_loaders(str(folder_tree), 32, "cpu", progress=False)
    assert capsys.readouterr().err == ""
    evaluate(Constant(0), loaders.test, progress=True, desc="testing")
    assert "testing" in capsys.readouterr().err
    evaluate(Constant(0), loaders.test)
    assert capsys.readouterr().err == ""


def test_data_folder_is_ignored_by_git():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "data/cifar-10-batches-py"], cwd=root)
    assert result.returncode == 0, "data/ is not in .gitignore"


def test_every_dataset_group_names_a_factory_that_takes_the_contract():
    """mq.data.base.DatasetFactory: each conf/dataset group's ``_target_`` takes the group's
    keys and the run's (progress included: the folder decode shows a bar), and is wrapped by
    the validation split hook, which takes val_size and split_seed."""
    run = {"batch_size": 8, "device": "cpu", "seed": 0, "progress": False}
    ranks = {"rank": 1, "world_size": 2}
    names = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
    assert {"cifar10", "cifar10_folder", "fake", "imagenet"} <= set(names)
    for name in names:
        group = OmegaConf.to_container(compose_config([f"dataset={name}"]).dataset)
        factory = get_method(group.pop("_target_"))
        assert factory.__wrapped__ and all(group.pop(k) is not None for k in SPLIT_KEYS)
        inner = imagenet.imagenet_loaders if name == "imagenet" else factory
        inspect.signature(inner).bind(**group, **run, **ranks)  # TypeError: a key it lacks
