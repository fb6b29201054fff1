"""Image-classification tables (Hub datasets or local Parquet files) decoded once into uint8 tensors.

Both sources have one encoded image column (``{"bytes": ...}`` structs, or PIL
images from ``datasets``) and one integer label column.
"""
import io
from pathlib import Path
from typing import Iterable, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ["decode_images", "load_hub_split", "load_parquet_split"]


def _to_array(item) -> np.ndarray:
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, dict) and item.get("bytes") is not None:
        image = Image.open(io.BytesIO(item["bytes"]))
    else:
        raise TypeError(f"cannot decode an image from {type(item).__name__} (expected PIL image or {{'bytes': ...}})")
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def decode_images(items: Iterable) -> torch.Tensor:
    """Decode encoded images of one size into a uint8 ``(N, C, H, W)`` tensor."""
    arrays = [_to_array(item) for item in items]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images must all have one size to be stacked, found {sorted(shapes)[:4]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _check_columns(columns, image_key: str, label_key: str, where: str) -> None:
    missing = [key for key in (image_key, label_key) if key not in columns]
    if missing:
        raise ValueError(f"{where} has no column {missing} (columns: {sorted(columns)})")


def load_parquet_split(directory: str, split: str, image_key: str, label_key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read ``<split>-*.parquet`` files found anywhere under ``directory`` (the Hub's layout)."""
    import pyarrow.parquet as pq

    files = sorted(Path(directory).rglob(f"{split}-*.parquet")) or sorted(Path(directory).rglob(f"{split}.parquet"))
    if not files:
        raise FileNotFoundError(f"no '{split}-*.parquet' file under {directory}")
    images, labels = [], []
    for file in files:
        table = pq.read_table(file)
        _check_columns(table.column_names, image_key, label_key, str(file))
        images.append(decode_images(table.column(image_key).to_pylist()))
        labels.append(torch.tensor(table.column(label_key).to_pylist(), dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def load_hub_split(hub_id: str, split: str, image_key: str, label_key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Download (or reuse the cache of) a Hub dataset through the ``datasets`` library."""
    import datasets

    table = datasets.load_dataset(hub_id, split=split)
    _check_columns(table.column_names, image_key, label_key, f"Hub dataset {hub_id!r}")
    return decode_images(table[image_key]), torch.as_tensor(table[label_key], dtype=torch.int64)
