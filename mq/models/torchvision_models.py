"""Every torchvision classification model by name (``model=torchvision model.name=mobilenet_v2``;
``model=resnet18`` is one of them): :func:`torchvision_model`. Every Conv2d and Linear weight is
quantized like the CIFAR ResNets'."""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn

from mq.core.errors import ConfigError
from mq.models.resnet_cifar import CIFAR_DEPTHS
from mq.models.weights import check_num_classes, finish_model

# torchvision's classification models (module= leaves out detection, video, quantized, ...).
TORCHVISION = tuple(torchvision.models.list_models(module=torchvision.models))
# Inception-style nets return auxiliary logits in training by default; mq trains on the main head.
NO_AUX = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def check_torchvision_model(name: Any) -> None:
    """``name`` is one of torchvision's classification models, else a one-line ConfigError."""
    if name not in TORCHVISION:
        hint = f" (the CIFAR ResNet is model={name})" if name in CIFAR_DEPTHS else ""
        raise ConfigError(
            f"model.name={name} is not known; allowed: {', '.join(TORCHVISION)}{hint}"
        )


def torchvision_model(
    name: str, num_classes: int, pretrained: str | None = None, channels_last: bool = True
) -> nn.Module:
    """torchvision's ``name`` for ``num_classes`` classes, with ``pretrained`` weights (in
    torchvision's key layout, or a checkpoint of ours) loaded strictly (see finish_model)."""
    check_torchvision_model(name)
    check_num_classes(num_classes)
    # weights=None: never a download at run time; model.pretrained is a local file.
    model = torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, **NO_AUX.get(name, {})
    )
    return finish_model(model, pretrained, channels_last)


# What mq.models.check_model runs for model=torchvision before a sweep, building nothing.
torchvision_model.check = check_torchvision_model  # type: ignore[attr-defined]
