"""The validation split (dataset.val_size, mq/data/split.py): disjoint from training, stratified,
chosen by split_seed alone (the same for every run seed and every run), evaluated every epoch,
and never the test set."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE, compose_config, launch
from PIL import Image

from mq.core.errors import ConfigError
from mq.data.base import BatchSource, DeviceLoader, Loaders
from mq.data.loaders import imagenet_loaders
from mq.data.split import check_split, hold_out, val_indices
from mq.sweep.tune_space import check_objective
from mq.sweep.tune_study import tell

N, CLASSES = 600, 6


def _loaders(seed: int) -> Loaders:
    """Images whose pixel (0, 0) encodes their index (low byte) and (0, 1) the high byte, so
    every image can be identified after the split; classes unbalanced (one class is small)."""
    idx = torch.arange(N)
    images = torch.zeros(N, 4, 4, 3, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = idx % 256, idx // 256
    labels = torch.where(idx < 60, 0, 1 + idx % (CLASSES - 1))
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    train = DeviceLoader(images, labels, 16, mean, std, train=True, device="cpu", seed=seed)
    test = DeviceLoader(images[:50], labels[:50], 25, mean, std, train=False, device="cpu")
    return Loaders(train, test, CLASSES)


def _ids(source) -> list[int]:
    out = []
    for x, _ in source.epoch(0):
        # normalisation with mean 0, std 1 is x / 255: undo it to read the index back
        raw = (x * 255).round().long()
        out += (raw[:, 0, 0, 0] + 256 * raw[:, 0, 0, 1]).tolist()
    return out


def test_split_is_disjoint_stratified_and_independent_of_the_run_seed():
    data = hold_out(_loaders(seed=0), 120, split_seed=7)
    val_ids = _ids(data.val)
    stored = data.train.images.long()  # (N, C, H, W)
    train_ids = (stored[:, 0, 0, 0] + 256 * stored[:, 0, 0, 1]).tolist()
    assert len(val_ids) == len(set(val_ids)) == 120
    assert not set(val_ids) & set(train_ids)  # no image in both
    assert set(val_ids) | set(train_ids) == set(range(N))  # and none lost
    # stratified: each class its share (class 0 has 60 of 600 images: 12 of 120)
    counts = torch.bincount(data.val.labels, minlength=CLASSES).tolist()
    assert counts[0] == 12 and sorted(counts[1:]) == [21, 21, 22, 22, 22]
    # the validation set is not augmented and keeps its order: two passes are equal
    assert _ids(data.val) == val_ids and data.val.train is False
    # another run seed (data order, init) or another run: the very same split
    for seed in (1, 12345):
        assert _ids(hold_out(_loaders(seed=seed), 120, split_seed=7).val) == val_ids
    assert _ids(hold_out(_loaders(seed=0), 120, split_seed=7).val) == val_ids
    # split_seed alone changes it
    assert set(_ids(hold_out(_loaders(seed=0), 120, split_seed=8).val)) != set(val_ids)
    assert len(data.train) == (N - 120) // 16  # batches of the rest only


class Listed(BatchSource):
    """The least a dataset supplies (mq.data.base.BatchSource): labels, batches, a subset.
    Its "images" are the image ids, so every image can be followed through the split."""

    def __init__(self, ids: list[int], labels: list[int], batch_size: int, train: bool) -> None:
        self.ids, self.labels = ids, labels
        self.num_samples, self.batch_size, self.train = len(ids), batch_size, train

    def epoch(self, epoch, start_batch=0):
        bs = self.batch_size
        for i in range(start_batch, len(self)):
            yield (
                torch.tensor(self.ids[i * bs : (i + 1) * bs]),
                torch.tensor(self.labels[i * bs : (i + 1) * bs]),
            )

    def subset(self, indices):
        idx = indices.tolist()
        ids, labels = [self.ids[i] for i in idx], [self.labels[i] for i in idx]
        return Listed(ids, labels, self.batch_size, self.train)


def test_any_batch_source_goes_through_the_split():
    labels = [i % 4 for i in range(100)]
    train = Listed(list(range(100)), labels, 8, train=True)
    test = Listed(list(range(1000, 1040)), labels[:40], 10, train=False)
    data = hold_out(Loaders(train, test, 4), 20, split_seed=3)
    val_ids = torch.cat([x for x, _ in data.val.epoch(0)]).tolist()
    train_ids = torch.cat([x for x, _ in data.train.epoch(0)]).tolist()
    assert val_ids == val_indices(torch.tensor(labels), 20, 3).tolist()  # in order
    assert set(train_ids) == set(range(100)) - set(val_ids) and len(data.train) == 80 // 8
    assert torch.bincount(torch.tensor(data.val.labels)).tolist() == [5, 5, 5, 5]
    # evaluated like the test set: not augmented, the test batch size, the last batch kept
    assert data.val.train is False and data.val.batch_size == 10 and len(data.val) == 2
    assert data.train.train and train.train and train.num_samples == 100  # the input is kept
    assert data.test is test and data.num_classes == 4
    assert data.val.sample(1).num_samples == 10  # a limited evaluation of it, stratified


def test_a_batch_source_without_a_subset_is_refused():
    class NoSubset(BatchSource):
        def epoch(self, epoch, start_batch=0):
            yield from ()

    with pytest.raises(TypeError, match="subset"):
        NoSubset()


def test_val_size_larger_than_the_training_set_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dataset.val_size=600 is too large.*allowed: 0..584"):
        hold_out(_loaders(seed=0), 600, split_seed=0)
    cfg = compose_config(["dataset=fake", "dataset.val_size=600", "batch_size=32"])
    with pytest.raises(ConfigError, match=r"the training set has 512 images.*allowed: 0..480"):
        check_split(cfg.dataset, cfg.batch_size)
    cifar = compose_config(["dataset=cifar10", "dataset.val_size=60000"])
    with pytest.raises(ConfigError, match="has 50000 images"):
        check_split(cifar.dataset, cifar.batch_size)


def test_imagenet_split_holds_out_training_files_with_the_test_transforms(tmp_path):
    """ImageNet's streamed path: held-out training files, evaluated with the test transforms
    (resize and center crop: the same pixels every epoch), in order."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6 if split == "train" else 2):
                image = Image.new("RGB", (40, 30), (i * 40, 10 * i, 0))
                image.save(tmp_path / split / c / f"{i}.jpg")
    data = imagenet_loaders(str(tmp_path), 2, "cpu", workers=0)
    split = hold_out(data, 4, split_seed=0)
    held, kept = set(split.val.files), set(split.train.files)
    assert len(held) == 4 and not held & kept and len(held | kept) == 12
    assert split.train.train and not split.val.train
    first, second = ([x for x, _ in split.val.epoch(e)] for e in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.cat([y for _, y in split.val.epoch(0)]).tolist() == [0, 0, 1, 1]  # in order


def test_objective_never_reads_the_test_set(tmp_path):
    with pytest.raises(ConfigError, match="the test set is never an objective"):
        check_objective("best_test_acc")
    # a trial whose summary has test numbers but not the validation metric is FAIL, not a
    # value read from the test set
    import optuna

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    summary = {"status": "completed", "best_test_acc": 90.0, "final_test_acc": 90.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert tell(study, trial, tmp_path, "best_val_acc") is None
    assert study.trials[0].state.name == "FAIL"
    trial = study.ask()
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "best_val_acc": 40.0}))
    assert tell(study, trial, tmp_path, "best_val_acc") == 40.0


@pytest.mark.slow
def test_a_run_with_a_split_records_val_metrics(tmp_path):
    result = launch(*SMOKE, "meta=ste", "epochs=2", "dataset.val_size=64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (tmp_path / "outputs/quantize/fake").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_images"] == 64 and len(summary["val_acc"]) == 2
    assert summary["best_val_acc"] == max(summary["val_acc"])
    assert summary["train_batches_total"] == (512 - 64) // 32
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["val_acc"] for r in epochs] == summary["val_acc"]
    assert all("val_loss" in r and "test_acc" in r for r in epochs)
