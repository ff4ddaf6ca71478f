"""The CIFAR ResNet the binary-network papers train: IR-Net's ``resnet20_1w1a`` (Qin et al., CVPR
2020; htqin/IR-Net, CIFAR-10/ResNet20/1w1a/resnet.py), ``model=resnet20_irnet``.

Unlike He et al.'s block (mq.models.resnet_cifar: one shortcut per two convs, ReLU), every conv
has its own shortcut, x -> hardtanh(bn(conv(x)) + shortcut(x)), so the real-valued signal
bypasses each binary conv; downsampling shortcuts are option A (every other pixel, zero channels
padded on both sides: no parameters); the stem ends in hardtanh and the pooled features pass a
BatchNorm1d before the fc. Module names and the initialisation (kaiming_normal_ on conv and fc
weights) are theirs, so their state dicts load strictly. IR-Net binarizes the activations inside
each conv too; in mq that is ``act=sign`` (the act group, on every conv input but the first).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mq.core.errors import ConfigError
from mq.models.resnet_cifar import MAX_DEPTH, cifar_stages
from mq.models.weights import check_num_classes, finish_model


class OptionAShortcut(nn.Module):
    """He et al.'s option A: x[:, :, ::2, ::2] with ``pad`` zero channels before and after."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class IRNetBlock(nn.Module):
    """Two convs, each inside its own shortcut, each followed by hardtanh."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        downsample = stride != 1 or in_planes != planes
        self.shortcut = OptionAShortcut(planes // 4) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.hardtanh(self.bn1(self.conv1(x)) + self.shortcut(x))
        return F.hardtanh(self.bn2(self.conv2(out)) + out)


class IRNetResNet(nn.Module):
    """Three stages of 16/32/64 channels, (depth - 2) / 6 blocks each; IR-Net builds depth 20."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, self.layer2, self.layer3 = cifar_stages(IRNetBlock, blocks)
        self.bn2 = nn.BatchNorm1d(64)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)  # their _weights_init: torch's defaults

    def forward(self, x: Tensor) -> Tensor:
        x = F.hardtanh(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.avg_pool2d(x, x.size(3)).flatten(1)
        return self.linear(self.bn2(x))


def check_irnet_resnet(name: Any, depth: Any) -> None:
    """``depth`` is 6n+2 and ``name`` says it (``resnet{depth}_irnet``)."""
    if (
        not isinstance(depth, int)
        or isinstance(depth, bool)
        or not 8 <= depth <= MAX_DEPTH
        or (depth - 2) % 6
    ):
        raise ConfigError(
            f"model.depth={depth} is not allowed; allowed: 6n+2 in 8..{MAX_DEPTH} (IR-Net: 20)"
        )
    if name != f"resnet{depth}_irnet":
        raise ConfigError(
            f"model.name={name} does not name IR-Net's ResNet of model.depth={depth}; "
            f"allowed: resnet{depth}_irnet"
        )


def irnet_resnet(
    name: str,
    depth: int,
    num_classes: int,
    pretrained: str | None = None,
    channels_last: bool = True,
) -> nn.Module:
    """IR-Net's CIFAR ResNet of ``depth`` layers named ``name`` (``resnet{depth}_irnet``) for
    ``num_classes`` classes, with ``pretrained`` weights loaded strictly (their key layout).
    ``model.pretrained=original`` is refused (mq.models.original): MetaQuant's released
    checkpoints are He et al.'s ResNets, not this one."""
    check_irnet_resnet(name, depth)
    check_num_classes(num_classes)
    return finish_model(IRNetResNet(depth, num_classes), pretrained, channels_last)


irnet_resnet.check = check_irnet_resnet  # type: ignore[attr-defined]
