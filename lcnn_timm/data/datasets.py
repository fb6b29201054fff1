"""Dataset names -> uint8 image tensors, and the evaluation dataset view.

Small-image datasets known here (CIFAR-10/100, Fashion-MNIST) are decoded once
into a uint8 tensor; any other name goes to timm's ``create_dataset``.
"""
from typing import Optional, Tuple

import torch
from torch.utils.data import Dataset

from .cifar import load_cifar
from .fashion_mnist import load_fashion_mnist
from .names import DATASET_ALIASES, resolve_dataset_name

__all__ = ["ImageTensorDataset", "is_tensor_dataset", "load_eval_dataset", "load_image_tensors", "resolve_dataset_name"]

# timm's split names -> the files' split names
_SPLITS = {"train": "train", "test": "test", "validation": "test", "val": "test"}


def is_tensor_dataset(name: str) -> bool:
    return resolve_dataset_name(name) is not None


def load_image_tensors(
        name: str,
        split: str,
        data_dir: Optional[str] = None,
        target_key: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels of a small-image dataset.

    ``split`` is 'train' or 'test' ('validation'/'val' mean the test split: these
    datasets have no separate validation split). ``target_key`` selects a label
    column (e.g. CIFAR-100's 'coarse_label').
    """
    canonical = resolve_dataset_name(name)
    if canonical is None:
        raise ValueError(f"{name!r} is not a small-image dataset; known: {sorted(set(DATASET_ALIASES.values()))}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLITS)}")
    if canonical == "fashion_mnist":
        return load_fashion_mnist(_SPLITS[split], data_dir)
    return load_cifar(canonical, _SPLITS[split], data_dir, label_key=target_key)


class ImageTensorDataset(Dataset):
    """``(CHW float image in [0, 1], int label)`` pairs over uint8 images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index].float().div(255.0), int(self.labels[index])


def load_eval_dataset(name: str, split: str = "test", data_dir: Optional[str] = None) -> Dataset:
    """A dataset of ``(CHW float tensor in [0, 1], int label)`` with no augmentation and no normalisation.

    Small-image datasets come from :func:`load_image_tensors`; other names go to
    timm's ``create_dataset`` with a plain ``ToTensor`` transform.
    """
    if is_tensor_dataset(name):
        return ImageTensorDataset(*load_image_tensors(name, split, data_dir))
    from timm.data import create_dataset
    from torchvision.transforms import ToTensor

    return create_dataset(name, root=data_dir, split=split, is_training=False, transform=ToTensor())
