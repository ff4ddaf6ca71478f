"""``model.pretrained=original``: the full-precision model released with the paper's code
(csyhhu/MetaQuant, folder Results/) for the run's model and number of classes, read from
checkpoints_dir (conf/config.yaml: $MQ_CHECKPOINTS, else ../shared/data/original-checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mq.core.errors import ConfigError
from mq.models.resnet_cifar import CIFAR_DEPTHS

ORIGINAL = "original"
ORIGINAL_SOURCE = "https://github.com/csyhhu/MetaQuant (folder Results/)"


def original_checkpoint(name: str, num_classes: int, folder: str) -> Path:
    """The released checkpoint file for ``name`` on CIFAR-``num_classes``, e.g.
    ``FOLDER/ResNet20-CIFAR10-pretrain.pth``; a one-line error when there is none."""
    if name not in CIFAR_DEPTHS or num_classes not in (10, 100):
        raise ConfigError(
            f"model.pretrained={ORIGINAL} is not known for model.name={name} with "
            f"{num_classes} classes; allowed: a CIFAR ResNet ({', '.join(CIFAR_DEPTHS)}) on "
            "CIFAR-10 or CIFAR-100, or a checkpoint path"
        )
    file = Path(folder).expanduser() / f"ResNet{CIFAR_DEPTHS[name]}-CIFAR{num_classes}-pretrain.pth"
    if not file.is_file():
        raise ConfigError(
            f"model.pretrained={ORIGINAL}: {file} does not exist; get {file.name} from "
            f"{ORIGINAL_SOURCE} and put it in {file.parent}, or set checkpoints_dir=DIR "
            "(or MQ_CHECKPOINTS=DIR) to the folder that holds it"
        )
    return file


def resolve_original(cfg: Any) -> None:
    """Replace ``model.pretrained=original`` in ``cfg`` by the released file's path, so the
    run's config.yaml, its eval folder name and the checks all see the file actually read."""
    if str(cfg.model.get("pretrained")) != ORIGINAL:
        return
    folder = str(cfg.get("checkpoints_dir") or ".")
    cfg.model.pretrained = str(original_checkpoint(cfg.model.name, cfg.model.num_classes, folder))
