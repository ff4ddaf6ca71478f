"""Evaluation: test (or validation) loss, top-1 and top-5 accuracy of a model on a BatchSource,
and task=eval's one evaluation with the summary that says what it was measured on."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mq.data.base import BatchSource
from mq.quant.layers import QuantizedModel

log = logging.getLogger(__name__)


class Evaluation(NamedTuple):
    loss: float
    acc: float  # %
    images: int  # test images it was measured on
    acc5: float | None = None  # top-5 %, for more than TOP5_FROM classes (ImageNet, CIFAR-100)


# Top-5 is reported above 10 classes only: on CIFAR-10 (or fake data) a random guess is already
# 50% top-5, so the number says nothing there and its metrics stay as they were.
TOP5_FROM = 10


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: BatchSource,
    *,
    progress: bool = False,
    desc: str = "test",
) -> Evaluation:
    """Test loss and accuracy (%) with the current (quantized) weights on every image of
    ``loader`` (a limited evaluation passes ``test.sample(limit)``: a fixed class-stratified
    sample, since the first batches of a test set stored class by class hold one class).
    ``progress``: a bar on stderr."""
    model.eval()
    weights = None
    if isinstance(model, QuantizedModel):  # quantize once, not once per batch
        weights = model.quantize_weights()
    loss_sum = torch.zeros((), device=_device(model))
    correct = torch.zeros((), device=_device(model), dtype=torch.long)
    correct5 = torch.zeros((), device=_device(model), dtype=torch.long)
    count, classes = 0, 0
    bar = tqdm(
        total=len(loader),
        desc=desc,
        unit="batch",
        disable=not progress,
        file=sys.stderr,
        leave=False,
        mininterval=1.0,
    )
    with bar:
        for x, y in loader.epoch(0):
            logits = model(x, weights) if weights is not None else model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            classes = logits.shape[1]
            if classes > TOP5_FROM:
                correct5 += (logits.topk(5, 1).indices == y[:, None]).any(1).sum()
            count += y.numel()
            bar.update(1)
    model.train()
    acc5 = 100.0 * correct5.item() / max(count, 1) if classes > TOP5_FROM else None
    return Evaluation(
        loss_sum.item() / max(count, 1), 100.0 * correct.item() / max(count, 1), count, acc5
    )


def tested_on(images: int, total: int, limit: int | None) -> str:
    """How much of the test set a measurement saw, for logs: "" when all of it."""
    if images >= total:
        return ""
    return f"{images} of {total} test images (limit_test_batches={limit}, class-stratified)"


def evaluate_only(
    model: nn.Module, test_data: BatchSource, limit: int | None, progress: bool
) -> dict[str, Any]:
    """task=eval: one evaluation, logged before (it can take a minute) and after; returns the
    summary, which says what it was measured on."""
    start = time.time()
    part = test_data if limit is None else test_data.sample(limit)
    where = tested_on(part.num_samples, test_data.num_samples, limit)
    log.info("testing on %s", where or f"all {test_data.num_samples} test images")
    loss, acc, images, acc5 = evaluate(model, part, progress=progress)
    log.info("test loss %.4f, test accuracy %.2f%%%s", loss, acc, f" on {where}" if where else "")
    return {
        "status": "completed",
        "test_loss": loss,
        "final_test_acc": acc,
        **({"final_test_acc5": acc5} if acc5 is not None else {}),
        "limit_test_batches": limit,
        "test_images": images,
        "test_images_total": test_data.num_samples,
        "started": start,
        "updated": time.time(),
        "elapsed": time.time() - start,
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
