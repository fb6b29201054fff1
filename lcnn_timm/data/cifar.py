"""CIFAR-10 / CIFAR-100 in the Hub's ``uoft-cs/cifar10`` / ``uoft-cs/cifar100`` layout.

Source: a local directory of that repository's Parquet files (``img`` column of
``{"bytes": png}``, labels in ``label`` or ``fine_label``/``coarse_label``), or
the Hub id itself through the ``datasets`` library.
"""
from pathlib import Path
from typing import Optional, Tuple

import torch

from .image_table import load_hub_split, load_parquet_split

__all__ = ["CIFAR_HUB_IDS", "load_cifar"]

CIFAR_HUB_IDS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
_DEFAULT_LABEL_KEY = {"cifar10": "label", "cifar100": "fine_label"}


def load_cifar(
        name: str,
        split: str,
        data_dir: Optional[str] = None,
        label_key: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 ``(N, 3, 32, 32)`` and int64 labels.

    ``name`` is 'cifar10' or 'cifar100'; ``data_dir`` a local Parquet directory,
    or None for the Hub id. ``label_key`` picks e.g. CIFAR-100's ``coarse_label``.
    """
    if name not in CIFAR_HUB_IDS:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose one of {sorted(CIFAR_HUB_IDS)}")
    label_key = label_key or _DEFAULT_LABEL_KEY[name]
    if data_dir is not None and Path(data_dir).is_dir():
        return load_parquet_split(data_dir, split, "img", label_key)
    return load_hub_split(data_dir or CIFAR_HUB_IDS[name], split, "img", label_key)
