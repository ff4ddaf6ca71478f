"""Meta quantizers and the training steps that use them."""

from mq.meta.nets import LSTMFC, FCGrad, IdentitySTE, MetaNet, MultiFC, build_meta_net
from mq.meta.step import MetaQuantStep, STEStep

__all__ = [
    "FCGrad",
    "IdentitySTE",
    "LSTMFC",
    "MetaNet",
    "MetaQuantStep",
    "MultiFC",
    "STEStep",
    "build_meta_net",
]
