"""Model zoo. Each conf/model option names its constructor in ``_target_``: CIFAR ResNets
(:func:`cifar_resnet`, ``model=resnet20`` ...) and every torchvision classification model
(:func:`torchvision_model`, ``model=torchvision model.name=mobilenet_v2``; ``model=resnet18`` is
one of them). A constructor takes ``name``, ``num_classes`` and ``pretrained`` (loaded strictly
in the architecture's own key layout, mq.models.weights) besides its own keys, and carries the
checks of those keys as its ``check`` attribute, which :func:`check_model` runs before a sweep
without building anything."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from mq.core.errors import ConfigError
from mq.models.original import ORIGINAL, ORIGINAL_SOURCE, original_checkpoint, resolve_original
from mq.models.resnet_cifar import CIFAR_DEPTHS, CifarResNet, cifar_resnet
from mq.models.torchvision_models import TORCHVISION, torchvision_model
from mq.models.weights import (
    MAX_CLASSES,
    check_num_classes,
    checkpoint_file,
    load_pretrained,
    read_state_dict,
)

__all__ = [
    "CIFAR_DEPTHS",
    "MAX_CLASSES",
    "MODELS",
    "ORIGINAL",
    "ORIGINAL_SOURCE",
    "TORCHVISION",
    "CifarResNet",
    "build_model",
    "check_model",
    "checkpoint_file",
    "cifar_resnet",
    "load_pretrained",
    "original_checkpoint",
    "read_state_dict",
    "resolve_original",
    "torchvision_model",
]

# The models build_model knows by name alone.
MODELS = (*CIFAR_DEPTHS, *TORCHVISION)


def constructor(model: Mapping[str, Any]) -> Callable[..., nn.Module]:
    """The function or class ``model._target_`` names, imported but not called."""
    from hydra.utils import get_object

    target = model.get("_target_")
    try:
        found = get_object(str(target))
    except Exception as exc:
        reason = str(exc.__cause__ or exc).strip().splitlines()[0]
        raise ConfigError(f"model._target_={target} cannot be imported: {reason}") from None
    if not callable(found):
        raise ConfigError(f"model._target_={target} is not a function or class")
    return found


def check_model(model: Mapping[str, Any]) -> None:
    """Fail on what the model config's constructor would refuse (its own ``check``: a name
    torchvision does not know, a CIFAR ResNet's depth), a number of classes outside
    1..MAX_CLASSES or a missing pretrained file, without building anything (cheap enough for
    every sweep point before submission)."""
    check = getattr(constructor(model), "check", None)
    if check is not None:
        check(**{key: model.get(key) for key in inspect.signature(check).parameters})
    check_num_classes(model.get("num_classes"))
    if model.get("pretrained"):
        checkpoint_file(str(model.get("pretrained")))


def build_model(
    name: str, num_classes: int, pretrained: str | None = None, channels_last: bool = True
) -> nn.Module:
    """The model conf/ offers as ``name`` (a CIFAR ResNet of CIFAR_DEPTHS or a torchvision
    model) for ``num_classes`` classes, for code that picks a model by name (the benchmarks,
    tests); a run builds ``model._target_``."""
    if name not in MODELS:
        raise ConfigError(f"model.name={name} is not known; allowed: {', '.join(MODELS)}")
    if name in CIFAR_DEPTHS:
        return cifar_resnet(name, CIFAR_DEPTHS[name], num_classes, pretrained, channels_last)
    return torchvision_model(name, num_classes, pretrained, channels_last)
