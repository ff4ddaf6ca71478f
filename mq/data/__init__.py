"""Datasets: one loader factory per dataset (conf/dataset/*.yaml name them by ``_target_``), the
decoded image-folder cache, ImageNet's loader and the validation split. The factories are named
here, where saved run configs point (``mq.data.cifar_loaders``); mq.data.base writes down what
a factory receives and returns (DatasetFactory) and what its batch sources offer (BatchSource)."""

from mq.data.loaders import cifar_loaders, fake_loaders, folder_loaders, imagenet_loaders

__all__ = ["cifar_loaders", "fake_loaders", "folder_loaders", "imagenet_loaders"]
