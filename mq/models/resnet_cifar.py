"""CIFAR ResNets (He et al. 2016, option B shortcuts) with the original MetaQuant key layout:
``model=resnet20`` ... build them through :func:`cifar_resnet`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.models.weights import check_num_classes, finish_model

# The CIFAR ResNets of the paper, by model.name: conf/model/resnet{20,32,44,56,110}.yaml, and
# the released full-precision checkpoints (model.pretrained=original).
CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
# The deepest CIFAR ResNet of He et al. 2016; far more is a typo that would build a huge net.
MAX_DEPTH = 1202


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            # Projection shortcut (1x1 conv + BN), named as in the released checkpoints.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def cifar_stages(block: Callable[[int, int, int], nn.Module], blocks: int) -> list[nn.Sequential]:
    """The three stages of a CIFAR ResNet, 16/32/64 channels, ``blocks`` blocks
    ``block(in_planes, planes, stride)`` each, the first of stages 2 and 3 with stride 2."""
    planes, stages = 16, []
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        layers = []
        for i in range(blocks):
            layers.append(block(planes, width, stride if i == 0 else 1))
            planes = width
        stages.append(nn.Sequential(*layers))
    return stages


class CifarResNet(nn.Module):
    """Three stages of 16/32/64 channels, (depth - 2) / 6 basic blocks each."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth={depth} is not 6n+2")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = cifar_stages(BasicBlock, blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def check_cifar_resnet(name: Any, depth: Any) -> None:
    """``depth`` is 6n+2 (n >= 1 blocks per stage) and ``name`` says it (``resnet{depth}``), so
    that run names, folders and reports never call one depth by another's name."""
    if (
        not isinstance(depth, int)
        or isinstance(depth, bool)
        or not 8 <= depth <= MAX_DEPTH
        or (depth - 2) % 6
    ):
        raise ConfigError(
            f"model.depth={depth} is not allowed; allowed: 6n+2 in 8..{MAX_DEPTH} "
            "(20, 32, 44, 56, 110)"
        )
    if name != f"resnet{depth}":
        raise ConfigError(
            f"model.name={name} does not name a CIFAR ResNet of model.depth={depth}; "
            f"allowed: resnet{depth} (another depth is another model, e.g. model=resnet32)"
        )


def cifar_resnet(
    name: str,
    depth: int,
    num_classes: int,
    pretrained: str | None = None,
    channels_last: bool = True,
) -> nn.Module:
    """The CIFAR ResNet of ``depth`` layers named ``name`` (``resnet{depth}``) for
    ``num_classes`` classes, with ``pretrained`` weights loaded strictly (see finish_model)."""
    check_cifar_resnet(name, depth)
    check_num_classes(num_classes)
    return finish_model(CifarResNet(depth, num_classes), pretrained, channels_last)


# What mq.models.check_model runs for model=resnet20 ... before a sweep, building nothing.
cifar_resnet.check = check_cifar_resnet  # type: ignore[attr-defined]
