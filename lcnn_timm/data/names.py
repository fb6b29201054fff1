"""Dataset names and default locations (standard library only: the ``lcnn-timm`` front end reads them before
importing torch)."""
from typing import Optional

__all__ = ["DATASET_ALIASES", "DEFAULT_FASHION_MNIST_DIR", "resolve_dataset_name"]

# Debian's dataset-fashion-mnist package puts the IDX files here
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# accepted spellings (ours, timm's ``hfds/<hub id>`` and ``torch/<name>``) -> canonical name
DATASET_ALIASES = {
    "cifar10": "cifar10", "hfds/uoft-cs/cifar10": "cifar10", "uoft-cs/cifar10": "cifar10",
    "cifar100": "cifar100", "hfds/uoft-cs/cifar100": "cifar100", "uoft-cs/cifar100": "cifar100",
    "fashion_mnist": "fashion_mnist", "fashion-mnist": "fashion_mnist", "torch/fashion_mnist": "fashion_mnist",
    "hfds/zalando-datasets/fashion_mnist": "fashion_mnist", "zalando-datasets/fashion_mnist": "fashion_mnist",
}


def resolve_dataset_name(name: str) -> Optional[str]:
    """Canonical name of a small-image dataset this package decodes itself, else None (timm's job)."""
    return DATASET_ALIASES.get(name.lower())
