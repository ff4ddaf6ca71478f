"""Meta quantizers and the training steps that use them."""

from mq.meta.nets import LSTMFC, FCGrad, IdentitySTE, MetaNet, MultiFC
from mq.meta.step import MetaQuantStep, STEStep

__all__ = [
    "FCGrad",
    "IdentitySTE",
    "LSTMFC",
    "MetaNet",
    "MetaQuantStep",
    "MultiFC",
    "STEStep",
]
