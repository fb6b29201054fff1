"""Fashion-MNIST from the original IDX files (e.g. Debian's ``dataset-fashion-mnist``).

Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from a directory
(or its ``FashionMNIST/raw`` sub-folder, torchvision's layout), or from a Hub
dataset id through the ``datasets`` library.
"""
import gzip
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .image_table import load_hub_split
from .names import DEFAULT_FASHION_MNIST_DIR

__all__ = ["DEFAULT_FASHION_MNIST_DIR", "load_fashion_mnist", "read_idx"]

_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def read_idx(path: Path) -> np.ndarray:
    """Decode one IDX file (gzipped or not) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header declares shape {shape} but holds {array.size} values")
    return array.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no {stem}[.gz] in {directory} (nor in its FashionMNIST/raw sub-folder)")


def load_fashion_mnist(split: str, data_dir: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 ``(N, 1, 28, 28)`` and int64 labels for ``split`` ('train' or 'test').

    ``data_dir`` is a directory of IDX files, or a Hub dataset id (e.g.
    ``zalando-datasets/fashion_mnist``); None means the Debian package's directory.
    """
    if split not in _PREFIX:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_PREFIX)}, got {split!r}")
    source = data_dir or DEFAULT_FASHION_MNIST_DIR
    if not Path(source).is_dir():
        return load_hub_split(source, split, image_key="image", label_key="label")
    prefix = _PREFIX[split]
    images = read_idx(_find(Path(source), f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(Path(source), f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{source}: expected images (N, H, W) and N labels, got {images.shape} and {labels.shape}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
