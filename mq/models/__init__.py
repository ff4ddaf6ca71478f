"""Model zoo: CIFAR ResNets and every torchvision classification model (``model=torchvision
model.name=mobilenet_v2``; ``model=resnet18`` is one of them), with strict loading of
pre-trained weights in the architecture's own key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from mq.core.checkpoint import load_error, load_tensors
from mq.core.errors import ConfigError
from mq.models.resnet_cifar import CifarResNet

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
# torchvision's classification models (module= leaves out detection, video, quantized, ...).
TORCHVISION = tuple(torchvision.models.list_models(module=torchvision.models))
MODELS = (*CIFAR_DEPTHS, *TORCHVISION)
# Inception-style nets return auxiliary logits in training by default; mq trains on the main head.
NO_AUX = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


# model.pretrained=original: the full-precision model released with the paper's code
# (csyhhu/MetaQuant, folder Results/) for the run's model and number of classes, read from
# checkpoints_dir (conf/config.yaml: $MQ_CHECKPOINTS, else ../shared/data/original-checkpoints).
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


# ImageNet-21k has 21,841 classes; far more is a typo that would allocate a huge last layer.
MAX_CLASSES = 100_000


def check_model(name: str, pretrained: str | None = None, num_classes: int | None = None) -> None:
    """Fail on an unknown model name, a number of classes outside 1..MAX_CLASSES or a missing
    pretrained file, without building anything (cheap enough for every sweep point before
    submission)."""
    if name not in MODELS:
        raise ConfigError(f"model.name={name} is not known; allowed: {', '.join(MODELS)}")
    if num_classes is not None and (
        not isinstance(num_classes, int)
        or isinstance(num_classes, bool)
        or not 1 <= num_classes <= MAX_CLASSES
    ):
        raise ConfigError(
            f"model.num_classes={num_classes} is not allowed; "
            f"allowed: an integer in 1..{MAX_CLASSES}"
        )
    if pretrained:
        checkpoint_file(pretrained)


def checkpoint_file(path: str) -> Path:
    """The file ``path`` names: itself, or a run directory's checkpoint.pt."""
    file = Path(path)
    if file.is_dir():
        file = file / "checkpoint.pt"
    if not file.is_file():
        raise ConfigError(
            f"model.pretrained={path} does not exist; give a .pth/.pt file or run dir"
        )
    return file


def build_model(
    name: str, num_classes: int, pretrained: str | None = None, channels_last: bool = True
) -> nn.Module:
    """Build ``name`` for ``num_classes`` classes; load ``pretrained`` weights strictly.

    ``channels_last``: keep conv weights in NHWC order, so oneDNN/cuDNN run NHWC convolutions
    without reordering (on a 2-core CPU a ResNet20 step took 127 ms instead of 168 ms). Only the
    memory layout changes: state dicts, checkpoints and results are the same.
    """
    check_model(name, num_classes=num_classes)
    if name in CIFAR_DEPTHS:
        model: nn.Module = CifarResNet(CIFAR_DEPTHS[name], num_classes)
    else:
        # weights=None: never a download at run time; model.pretrained is a local file.
        kwargs = NO_AUX.get(name, {})
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A plain state dict from an original checkpoint, one of ours, or a run directory."""
    file = checkpoint_file(path)
    try:
        state = load_tensors(file)
    except Exception as exc:
        message = f"model.pretrained={path} is not a readable checkpoint: {load_error(exc)}"
        raise ConfigError(message) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint written by mq
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained={path} holds no state dict of tensors")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str) -> None:
    """Strict load: any missing, unexpected or mis-shaped key is an error, never a partial load."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    # googlenet/inception_v3 built without aux heads: torchvision's files carry them; drop only
    # those (a file without them loads the same), so such weights still load strictly otherwise.
    if getattr(model, "aux_logits", None) is False:
        unexpected = [k for k in unexpected if not k.startswith(("aux1.", "aux2.", "AuxLogits."))]
        state = {k: v for k, v in state.items() if k in own}
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{label} keys: {shown}")
        raise ConfigError(f"model.pretrained={path} does not match the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
